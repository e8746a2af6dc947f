"""What a run reports each step: the averages over micro-batches and ranks, metrics.jsonl (kept consistent with the
checkpoint a run resumes from), monitor events, the console line and the memory figure."""

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_on_two_ranks, unread
from deepspeed.monitor.config import get_monitor_config
from deepspeed.monitor.csv_monitor import csvMonitor

from amos_ds.train.metrics import (
    METRICS_FILE,
    MetricsLog,
    average_over_ranks,
    console_line,
    eval_line,
    memory_gib,
    read_metrics,
)

RECORD = {"step": 7, "loss": 12.34567, "mlm_loss": 9.87654, "rtd_loss": 0.123456, "disc_acc_replaced": 0.4567,
          "disc_acc_original": 0.9876, "mix_weight_L4": 0.5, "mix_weight_L6": 0.3, "mix_weight_L8": 0.2,
          "lr": 0.000123, "grad_norm": 1.23456, "tokens_per_s": 12345.6, "tflops": 1.2345, "mfu": 0.4321,
          "data_wait_s": 0.6, "mem_gib": 3.456}
DISABLED_MONITOR = type("Monitor", (), {"enabled": False})()  # what MetricsLog reads of a monitor with none configured


def test_average_over_ranks_divides_the_sums_by_the_micro_batches(one_process_group):
    sums = {"rtd_loss": torch.tensor(1.5, dtype=torch.float64), "loss": torch.tensor(6.0)}
    assert average_over_ranks(sums, 3) == {"loss": 2.0, "rtd_loss": 0.5}


@pytest.mark.slow
def test_average_over_ranks_is_the_mean_over_the_micro_batches_of_every_rank(tmp_path):
    sums = [({"loss": torch.tensor(3.0)}, 3), ({"loss": torch.tensor(9.0)}, 3)]  # rank 0, rank 1: 3 micro-batches each
    assert [average for average, _ in run_on_two_ranks(average_over_ranks, sums, tmp_path)] == [{"loss": 2.0}] * 2


def test_console_line_shows_what_the_paper_plots():
    assert console_line(RECORD, 100) == (
        "step 7/100 | loss 12.3457 (mlm 9.877, rtd 0.1235) | acc rep 0.457 orig 0.988 | mix L4/6/8 0.50/0.30/0.20 | "
        "lr 1.23e-04 | gnorm 1.235 | 12,346 tok/s | 1.234 TFLOP/s | MFU 43.2% | data 600 ms | mem 3.46 GiB")
    line = console_line({**RECORD, "mfu": None, "grad_norm": None}, 100)
    assert "gnorm n/a" in line and "MFU n/a" in line


def test_log_writes_records_and_monitor_events_and_a_resume_drops_later_steps(one_process_group, tmp_path, capsys):
    config = get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "csv"}})
    log = MetricsLog(tmp_path, csvMonitor(config.csv_monitor), resume_step=0, enabled=True)
    for step in (1, 2, 3):
        log.log({**RECORD, "step": step, "loss": float(step)}, max_steps=3)
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 3.0]
    assert read_metrics(tmp_path)[0] == {**RECORD, "step": 1, "loss": 1.0}
    assert capsys.readouterr().out.splitlines()[-1].startswith("step 3/3 | loss 3.0000")
    events = (tmp_path / "csv" / "Train_loss.csv").read_text().split()
    assert events == ["step,loss", "1,1.0", "2,2.0", "3,3.0"]
    assert not (tmp_path / "csv" / "Train_step.csv").exists()

    # A crash after step 3 and a resume from the checkpoint of step 2: step 3 is logged again, once.
    log = MetricsLog(tmp_path, csvMonitor(config.csv_monitor), resume_step=2, enabled=True)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    log.log({**RECORD, "step": 3, "loss": 30.0}, max_steps=3)
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_each_steps_line_reaches_a_piped_stdout_at_once(tmp_path, monkeypatch):
    """A launched run's stdout is a pipe, which Python buffers by blocks: the line is flushed at each step."""
    log = MetricsLog(tmp_path, csvMonitor(get_monitor_config({}).csv_monitor), resume_step=0, enabled=True)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with open(write_end, "w") as pipe, monkeypatch.context() as patch:
        assert not pipe.line_buffering
        patch.setattr(sys, "stdout", pipe)
        log.log(RECORD, max_steps=10)
        assert unread(read_end) == console_line(RECORD, 10) + "\n"
        log.log({**RECORD, **EVAL}, max_steps=10)  # and the evaluation's line after it
        assert unread(read_end) == console_line({**RECORD, **EVAL}, 10) + "\n" + eval_line({**RECORD, **EVAL}) + "\n"
    os.close(read_end)
    log.close()


def test_other_ranks_write_nothing(tmp_path, capsys):
    log = MetricsLog(tmp_path, monitor=None, resume_step=0, enabled=False)
    log.log(RECORD, max_steps=10)
    log.close()
    assert not (tmp_path / METRICS_FILE).exists() and capsys.readouterr().out == ""


def test_read_metrics_skips_blank_lines_and_a_missing_file(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_cpu_memory_is_the_peak_resident_size_in_gib():
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    assert memory_gib(torch.device("cpu")) == pytest.approx(peak_kib / 2**20, rel=0.05)


def test_a_torn_last_line_is_dropped_with_a_warning_on_resume(one_process_group, tmp_path, capsys, monkeypatch):
    """A full disk or a power cut while a record was appended leaves part of a line: the resume drops it."""
    path = tmp_path / METRICS_FILE
    whole = "".join(f'{{"step": {step}, "loss": {step}.0}}\n' for step in (1, 2))
    path.write_text(whole + '{"step": 3, "lo')
    log = MetricsLog(tmp_path, DISABLED_MONITOR, resume_step=2, enabled=True)
    log.close()
    assert path.read_text() == whole
    assert capsys.readouterr().err == (f"warning: {path}: dropped its last line, a record cut short while it was "
                                       "written ('{\"step\": 3, \"lo')\n")

    # The rewrite is atomic: a failure while writing leaves the old file whole.
    path.write_text(whole + '{"step": 3, "lo')
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        MetricsLog(tmp_path, DISABLED_MONITOR, resume_step=2, enabled=True)
    assert path.read_text() == whole + '{"step": 3, "lo'


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    from amos_ds.errors import ConfigError

    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"st\x00\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=f"{tmp_path / METRICS_FILE} line 2: not a JSON record; restore the file or "
                                          "delete that line"):
        read_metrics(tmp_path)


def test_a_config_change_is_warned_and_recorded_in_the_next_record(tmp_path, capsys):
    log = MetricsLog(tmp_path, DISABLED_MONITOR, resume_step=0, enabled=True)
    log.note_config_change({"deepspeed.optimizer.params.lr": [0.001, 0.002]})
    assert capsys.readouterr().err == ('warning: resuming with changed settings, recorded in metrics.jsonl: '
                                       '{"deepspeed.optimizer.params.lr": [0.001, 0.002]}\n')
    for step in (1, 2):
        log.log({**RECORD, "step": step}, max_steps=2)
    log.close()
    records = read_metrics(tmp_path)
    assert records[0]["config_change"] == {"deepspeed.optimizer.params.lr": [0.001, 0.002]}
    assert "config_change" not in records[1]


EVAL = {"eval_mlm_loss": 13.5, "eval_mlm_loss_L4": 7.1234, "eval_mlm_acc_L4": 0.0456, "eval_mlm_loss_L8": 6.4321,
        "eval_mlm_acc_L8": 0.0789, "eval_rtd_loss": 0.40567, "eval_rtd_loss_constant": 0.41834, "eval_rtd_auc": 0.61512,
        "eval_disc_acc_replaced": 0.0269, "eval_disc_acc_original": 0.9938, "eval_time_s": 1.26,
        "probe_accuracy": 0.5862, "probe_majority": 0.5316, "probe_time_s": 2.04,
        "health_mean_cosine": 0.8272, "health_effective_rank": 31.25, "health_unit_std": 0.4263}


def test_an_evaluation_goes_to_eval_events_and_a_second_console_line(one_process_group, tmp_path, capsys):
    config = get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "csv"}})
    log = MetricsLog(tmp_path, csvMonitor(config.csv_monitor), resume_step=0, enabled=True)
    log.log({**RECORD, **EVAL}, max_steps=100)
    log.close()
    assert capsys.readouterr().out.splitlines() == [console_line({**RECORD, **EVAL}, 100), (
        "eval step 7 | mlm loss/acc L4 7.123/0.046 L8 6.432/0.079 | rtd 0.4057 (constant 0.4183) AUC 0.615 | acc rep "
        "0.027 orig 0.994 | probe 0.586 (majority 0.532, 2.0 s) | health cos 0.827 rank 31.2 std 0.426 | 1.3 s")]
    events = {path.name for path in (tmp_path / "csv").iterdir()}
    assert {f"Eval_{name}.csv" for name in EVAL} <= events and not any(name.startswith("Train_eval") for name in events)
    assert {"Train_loss.csv", "Train_mfu.csv"} <= events and not any(name.startswith("Eval_loss") for name in events)
    assert (tmp_path / "csv" / "Eval_eval_rtd_auc.csv").read_text().split() == ["step,eval_rtd_auc", "7,0.61512"]


def test_an_evaluation_without_probe_health_or_auc_says_so(one_process_group, tmp_path, capsys):
    """No --probe-task, no health figures, and an AUC that is undefined (no replaced token in the held-out slice)."""
    log = MetricsLog(tmp_path, DISABLED_MONITOR, resume_step=0, enabled=True)
    bare = {name: value for name, value in EVAL.items() if not name.startswith(("probe_", "health_"))}
    log.log({**RECORD, **bare, "eval_rtd_auc": None}, max_steps=100)
    log.log(RECORD, max_steps=100)  # a step without evaluation prints one line
    log.close()
    assert capsys.readouterr().out.splitlines()[1:] == [
        "eval step 7 | mlm loss/acc L4 7.123/0.046 L8 6.432/0.079 | rtd 0.4057 (constant 0.4183) AUC n/a | acc rep "
        "0.027 orig 0.994 | 1.3 s", console_line(RECORD, 100)]


def test_a_torn_line_of_invalid_bytes_is_dropped_too(one_process_group, tmp_path, capsys):
    """The cut may fall inside a multi-byte character: the file is still read, and the piece dropped."""
    path = tmp_path / METRICS_FILE
    whole = '{"step": 1, "loss": 1.0}\n'
    path.write_bytes(whole.encode() + b'{"step": 2, "loss": 2.0, "note": "a long piece \xc3')
    MetricsLog(tmp_path, DISABLED_MONITOR, resume_step=1, enabled=True).close()
    assert path.read_text() == whole
    assert capsys.readouterr().err == (f"warning: {path}: dropped its last line, a record cut short while it was "
                                       "written ('{\"step\": 2, \"loss\": 2.0, \"note\": \"a long')\n")  # 40 chars
