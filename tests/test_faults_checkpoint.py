"""Checkpoint faults: a file corrupted or truncated after the save, and a save that fails half-way (write error).

The hashes are recorded in amos_meta.json at save time and checked at load; `--resume auto` falls back to the
previous complete checkpoint with a warning naming the bad file. A failed save leaves the previous checkpoint
intact, prints one error line and exits non-zero.
"""

import json
import pickle
import resource
import shutil
import subprocess
from pathlib import Path

import deepspeed
import pytest
import torch
from conftest import REPO, command, metrics, run, run_on_two_ranks, subprocess_env, write_configs

from amos_ds.errors import ConfigError
from amos_ds.train import checkpoint

BLOB = b"0123456789" * 100


def hashed_checkpoint(run_dir: Path, step: int) -> Path:
    """A complete checkpoint with two files and their recorded sizes and hashes, as save_checkpoint writes them."""
    path = run_dir / "checkpoints" / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    files = {}
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (path / name).write_bytes(BLOB + name.encode())
        files[name] = {"bytes": (path / name).stat().st_size, "sha256": checkpoint._sha256(path / name)}
    meta = {"step": step, "world_size": 1, "zero_stage": 1, "tokenizer_hash": "abc", "model": {},
            checkpoint.FILES: files}
    (path / checkpoint.META).write_text(json.dumps(meta))
    return path


def flip_one_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_intact_checkpoints_verify(tmp_path):
    assert checkpoint.verify_checkpoint(hashed_checkpoint(tmp_path, 100)) is None
    assert checkpoint.find_resume(tmp_path, "auto").step == 100


def test_a_corrupted_file_falls_back_with_a_warning_naming_it(tmp_path, capsys, one_process_group):
    # In a process group of one, as pretrain.py has: rank 0 warns (the case without a group is the next test).
    hashed_checkpoint(tmp_path, 100)
    newest = hashed_checkpoint(tmp_path, 200)
    bad = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_one_byte(bad)
    assert checkpoint.find_resume(tmp_path, "auto").step == 100
    assert capsys.readouterr().err == (f"warning: --resume auto: {bad} does not match the SHA-256 recorded when it "
                                       "was saved (corrupted); falling back to the previous complete checkpoint\n")


def test_one_process_without_a_group_hashes_every_file(tmp_path, monkeypatch, capsys):
    # Whether this session already holds a process group depends on the tests before it: pin the case without one.
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: False)
    hashed_checkpoint(tmp_path, 100)
    newest = hashed_checkpoint(tmp_path, 200)
    for bad in sorted(newest.glob("*.pt")):  # the first and the second file in hashing order
        data = bad.read_bytes()
        flip_one_byte(bad)
        assert checkpoint.find_resume(tmp_path, "auto").step == 100
        assert f"{bad} does not match the SHA-256" in capsys.readouterr().err
        bad.write_bytes(data)
    assert checkpoint.find_resume(tmp_path, "auto").step == 200


@pytest.mark.slow
def test_two_ranks_share_the_hashing_and_rank_0_alone_warns(tmp_path):
    hashed_checkpoint(tmp_path, 100)
    newest = hashed_checkpoint(tmp_path, 200)
    bad = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # the second file: rank 1 hashes it
    flip_one_byte(bad)
    ranks = run_on_two_ranks(checkpoint.find_resume, [(tmp_path, "auto")] * 2, tmp_path / "ranks")
    assert [(point.step, warning) for point, warning in ranks] == [
        (100, f"warning: --resume auto: {bad} does not match the SHA-256 recorded when it was saved (corrupted); "
              "falling back to the previous complete checkpoint\n"), (100, "")]


def test_a_truncated_or_missing_file_is_named(tmp_path):
    path = hashed_checkpoint(tmp_path, 100)
    model = path / "mp_rank_00_model_states.pt"
    with open(model, "r+b") as f:
        f.truncate(10)
    size = len(BLOB) + len(model.name)
    assert checkpoint.verify_checkpoint(path) == f"{model} has 10 bytes, {size} were saved (truncated or overwritten)"
    model.unlink()
    assert checkpoint.verify_checkpoint(path) == f"{model} is missing"
    meta = path / checkpoint.META
    meta.write_text("")  # emptied, as by a disk that filled up after the save
    assert checkpoint.verify_checkpoint(path) == f"{meta} is not readable JSON (Expecting value: line 1 column 1 " \
                                                 "(char 0))"


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    for step in (100, 200):
        flip_one_byte(hashed_checkpoint(tmp_path, step) / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError) as raised:
        checkpoint.find_resume(tmp_path, "auto")
    assert str(raised.value) == (f"--resume auto: none of the 2 complete checkpoints in {tmp_path / 'checkpoints'} "
                                 "matches its recorded hashes (see the warnings above); restore one, or start another "
                                 "--run-dir with --resume none")


def test_an_explicit_corrupted_checkpoint_is_refused(tmp_path):
    other = hashed_checkpoint(tmp_path / "other", 100)
    flip_one_byte(other / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=f"--resume {other}: {other / 'mp_rank_00_model_states.pt'} does not "
                                          "match the SHA-256"):
        checkpoint.find_resume(tmp_path / "new", str(other))


class RunsCode:
    """A pickle payload: unpickling it would create the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_files_load_without_running_code(tmp_path, one_process_group):
    model = torch.nn.Linear(4, 4)
    config = {"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 1}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    info = {"world_size": 1, "zero_stage": 1}
    path = checkpoint.save_checkpoint(engine, tmp_path, 1, info, {"position": 7}, keep_last=2)
    point = checkpoint.find_resume(tmp_path, "auto")
    assert checkpoint.load_checkpoint(engine, point, universal=False)["sampler"] == {"position": 7}
    assert isinstance(engine.checkpoint_engine, checkpoint.WeightsOnlyCheckpointEngine)

    marker = tmp_path / "code_ran"
    model_file = path / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(model_file, weights_only=True), "payload": RunsCode(marker)}, model_file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load_checkpoint(engine, point, universal=False)
    assert not marker.exists()


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, corpus):
    """One rank, fp32, checkpoints at steps 2 and 4 (hashed), and the flags that made them."""
    directory = tmp_path_factory.mktemp("four_steps")
    flags = [*write_configs(directory, corpus, zero_stage=1), "--fp32", "--save-every", "2"]
    run(1, [*flags, "--run-dir", str(directory / "run"), "--max-steps", "4"])
    return directory / "run", flags


@pytest.mark.slow
def test_training_corrupted_checkpoint_resumes_from_the_previous_one_bit_exactly(tmp_path, four_steps):
    source, flags = four_steps
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    meta = json.loads((run_dir / "checkpoints/step_00000004/amos_meta.json").read_text())
    assert sorted(meta["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    bad = run_dir / "checkpoints/step_00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_one_byte(bad)
    output = run(1, [*flags, "--run-dir", str(run_dir), "--max-steps", "4"])
    assert f"warning: --resume auto: {bad} does not match the SHA-256" in output
    assert "resumed from" in output and "step_00000002 at step 2" in output
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(source)]  # steps 3, 4 again
    assert checkpoint.verify_checkpoint(run_dir / "checkpoints/step_00000004") is None  # saved anew


@pytest.mark.slow
def test_a_failed_save_keeps_the_previous_checkpoint_and_exits_non_zero(tmp_path, four_steps):
    """RLIMIT_FSIZE makes the kernel refuse the checkpoint's large files (EFBIG), as a full disk would (ENOSPC)."""
    source, flags = four_steps
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    limit = 512 * 1024  # above the tokenizer, metrics and TensorBoard files; below the model's weights
    result = subprocess.run(command(1, 0, [*flags, "--run-dir", str(run_dir), "--max-steps", "6"]), cwd=REPO,
                            capture_output=True, text=True, timeout=240, env=subprocess_env(),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: saving checkpoint {run_dir}/checkpoints/step_00000006 "
                                                     f"failed: {run_dir}/checkpoints/step_00000006"), errors
    assert errors[0].endswith("; removed the partial step_00000006, and the previous complete checkpoint "
                              f"({run_dir}/checkpoints/step_00000004) is intact: free space or fix the disk, then "
                              "resume with --resume auto"), errors
    assert {p: p.read_bytes() for p in before} == before
    assert not (run_dir / "checkpoints/step_00000006").exists()
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000004"
    assert checkpoint.find_resume(run_dir, "auto").step == 4


def damaged_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run directory whose newest checkpoint has one flipped byte: (run directory, intact, damaged file)."""
    run_dir = tmp_path / "run"
    intact = hashed_checkpoint(run_dir, 100)
    bad = hashed_checkpoint(run_dir, 200) / "mp_rank_00_model_states.pt"
    flip_one_byte(bad)
    return run_dir, intact, bad


def refused_damaged(bad: Path) -> str:
    return (f"amos-ds: error: --pretrained {bad.parent}: {bad} does not match the SHA-256 recorded when it was saved "
            "(corrupted); give another checkpoint, or its run directory (which falls back to the newest intact one)")


def test_finetune_refuses_a_flipped_byte_and_falls_back_from_a_run_directory(tmp_path, capsys):
    """Every reader of checkpoints verifies them (checkpoint.verified_checkpoint), as the trainer's resume does."""
    from amos_ds.cli import main as cli_main
    from amos_ds.finetune.pretrained import locate_checkpoint

    run_dir, intact, bad = damaged_run(tmp_path)
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "dev", "test"):
        (task / f"{split}.tsv").write_text("label\tsentence\n1\tgood\n0\tbad\n")
    capsys.readouterr()
    assert cli_main(["finetune", "--pretrained", str(bad.parent), "--task-dir", str(task), "--output",
                     str(tmp_path / "ft")]) == 2
    assert capsys.readouterr().err.splitlines() == [refused_damaged(bad)]
    assert not (tmp_path / "ft").exists()

    assert locate_checkpoint(run_dir).path == intact
    assert capsys.readouterr().err == (f"warning: --pretrained {run_dir}: {bad} does not match the SHA-256 recorded "
                                       "when it was saved (corrupted); falling back to the previous complete "
                                       "checkpoint\n")


def test_export_refuses_a_flipped_byte(tmp_path, capsys):
    from amos_ds.cli import main as cli_main

    _, _, bad = damaged_run(tmp_path)
    capsys.readouterr()
    assert cli_main(["export", str(bad.parent), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.splitlines() == [refused_damaged(bad)]
    assert not (tmp_path / "hf").exists()
