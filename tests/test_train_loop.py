"""The training loop of amos_ds/pretrain.py in this process (one rank): the fast subset's end-to-end check; the
subprocess runs of test_train_run.py (slow) cover launchers, several ranks, signals and resume."""

import os
import signal

from conftest import GLOBAL_BATCH, complete_steps, logged_steps, metrics, run_pretrain, write_configs

from amos_ds import pretrain


def test_two_steps_log_every_step_save_the_last_and_summarise(tmp_path, corpus, one_process_group, capsys):
    run_dir = tmp_path / "run"
    flags = write_configs(tmp_path, corpus, zero_stage=1)
    code = run_pretrain([*flags, "--fp32", "--run-dir", str(run_dir), "--max-steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2] and all(r["world_size"] == 1 for r in records)
    samples = [index for record in records for index in record["samples"]]  # log_samples is on in write_configs
    assert len(samples) == 2 * GLOBAL_BATCH == len(set(samples))
    assert complete_steps(run_dir) == [2] and (run_dir / "summary.json").is_file()
    assert "training tiny (" in out


def test_a_stop_signal_during_start_up_ends_the_run_cleanly_before_its_first_step(tmp_path, corpus, one_process_group,
                                                                                 capsys, monkeypatch):
    """A scheduler's signal while the run is still starting (here: while its data is opened) exits 0 at the first
    step boundary, with no step taken and nothing written but the tokenizer; before, the signal killed the rank."""
    run_dir = tmp_path / "run"
    flags = write_configs(tmp_path, corpus, zero_stage=1)
    open_data = pretrain.open_data

    def signalled_open_data(config):
        os.kill(os.getpid(), signal.SIGUSR1)
        return open_data(config)

    monkeypatch.setattr(pretrain, "open_data", signalled_open_data)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    code = run_pretrain([*flags, "--fp32", "--run-dir", str(run_dir), "--max-steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "stop signal received before step 1: nothing new to save, exiting" in out
    assert complete_steps(run_dir) == [] and logged_steps(run_dir) == 0
    assert {number: signal.getsignal(number) for number in handlers} == handlers  # the run took its handlers along
