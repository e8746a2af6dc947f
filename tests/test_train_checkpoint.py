"""Checkpoint bookkeeping: completeness, `--resume` lookup, keep-last-K, compatibility checks, RNG states and the code
version a checkpoint records; then saving, resuming, the universal conversion and failed saves with a real DeepSpeed
engine around a linear layer."""

import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import unread

import amos_ds
from amos_ds.errors import CheckpointError, ConfigError
from amos_ds.train import checkpoint
from amos_ds.train.version import code_version

MODEL = {"hidden_size": 64, "head_layers": [1, 2, 3], "vocab_impl": "auto"}


def fake_checkpoint(run_dir, step, complete=True, world_size=2, zero_stage=1):
    path = run_dir / "checkpoints" / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        meta = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "tokenizer_hash": "abc",
                "model": MODEL}
        (path / checkpoint.META).write_text(json.dumps(meta))
    return path


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    assert checkpoint.find_resume(tmp_path, "auto") is None
    for step in (100, 99_999_999, 200):  # past 8 digits, the newest by step is not the last by name
        fake_checkpoint(tmp_path, step)
    newest = fake_checkpoint(tmp_path, 100_000_000)
    fake_checkpoint(tmp_path, 100_000_001, complete=False)  # killed while saving
    point = checkpoint.find_resume(tmp_path, "auto")
    assert (point.path, point.step) == (newest, 100_000_000)
    assert checkpoint.find_resume(tmp_path, str(tmp_path)).path == newest
    assert checkpoint.verified_checkpoint(tmp_path / "checkpoints", "--pretrained") == newest
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "checkpoints" / "step_00000300"))


def test_a_run_never_overwrites_its_newer_checkpoints(tmp_path):
    other = tmp_path / "other"
    older = fake_checkpoint(other, 100)
    fake_checkpoint(other, 150)
    fake_checkpoint(other, 200)
    assert checkpoint.find_resume(other, str(other / "checkpoints" / "step_00000200")).step == 200
    assert checkpoint.find_resume(tmp_path / "new", str(older)).step == 100  # branching into a new run directory
    for resume in ("none", str(older)):
        with pytest.raises(ConfigError) as err:
            checkpoint.find_resume(other, resume)
        assert str(err.value) == (f"--resume {resume}: --run-dir {other} already holds checkpoints up to step 200, "
                                  "which this run would overwrite; use --resume auto to continue it, or another "
                                  "--run-dir")


def test_universal_conversion_is_needed_for_another_world_size_or_stage(tmp_path):
    point = checkpoint.find_resume(tmp_path, str(fake_checkpoint(tmp_path, 10, world_size=2, zero_stage=1)))
    assert not point.needs_universal(2, 1)
    assert point.needs_universal(1, 1) and point.needs_universal(2, 2)


def test_prune_keeps_the_last_k_and_drops_incomplete_leftovers(tmp_path):
    for step in (100, 200, 250, 300):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 350, complete=False)
    fake_checkpoint(tmp_path, 400)
    fake_checkpoint(tmp_path, 500, complete=False)
    checkpoint._prune(tmp_path / "checkpoints", keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000300", "step_00000400"]


def test_resume_refuses_another_tokenizer_or_model(tmp_path):
    point = checkpoint.find_resume(tmp_path, str(fake_checkpoint(tmp_path, 10)))
    checkpoint.check_compatible(point, "abc", {**MODEL, "head_layers": (1, 2, 3)})
    checkpoint.check_compatible(point, "abc", {**MODEL, "vocab_impl": "triton"})  # implementation only
    with pytest.raises(ConfigError, match="trained on tokenizer abc, --data has xyz"):
        checkpoint.check_compatible(point, "xyz", MODEL)
    with pytest.raises(ConfigError) as err:
        checkpoint.check_compatible(point, "abc", {**MODEL, "hidden_size": 128, "rtd_weight": 7.0})
    assert str(err.value) == (f"--resume {point.path}: model differs from the checkpoint's (hidden_size: 64 -> 128, "
                              "rtd_weight: None -> 7.0); use the same --preset and config, or --resume none / "
                              "another --run-dir")


def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_state_round_trip_and_seeding():
    checkpoint.seed_rng(5)
    assert draws() == (random.Random(5).random(), float(np.random.RandomState(5).rand()),
                       torch.rand(1, generator=torch.Generator().manual_seed(5)).item())
    checkpoint.seed_rng(2**32 + 5)  # NumPy takes seeds below 2**32: the seed modulo 2**32
    assert float(np.random.rand()) == float(np.random.RandomState(5).rand())
    saved = checkpoint.rng_state()
    expected = draws()
    checkpoint.seed_rng(6)
    checkpoint.set_rng_state(saved)
    assert draws() == expected


def test_restore_rng_takes_this_ranks_state_or_seeds_at_another_world_size(one_process_group):
    checkpoint.seed_rng(1)
    saved = checkpoint.rng_state()
    expected = draws()
    checkpoint.restore_rng({"rng": [saved]}, seed=1234, step=10)  # same world size: this rank's own state
    assert draws() == expected
    checkpoint.restore_rng({"rng": [saved, saved]}, seed=1234, step=10)  # saved by two ranks
    resumed = draws()
    checkpoint.seed_rng(hash((1234, 10, 0)) & 0x7FFFFFFF)
    assert resumed == draws() != expected


def test_code_version_names_the_commit(tmp_path, monkeypatch):
    root = Path(amos_ds.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)  # the checkout's commit, whatever the working directory (amos-ds launch's ssh)
    version = code_version()
    assert re.fullmatch(rf"{re.escape(amos_ds.__version__)}\+[0-9a-f]{{12}}(-dirty)?", version), version
    assert version.split("+")[1].startswith(commit[:12])


def test_code_version_without_git_is_the_package_version(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an installed copy on a node without git
    assert code_version() == amos_ds.__version__


def linear_engine(**config):
    """A DeepSpeed engine (ZeRO-1, fp32) around a small linear layer, with the same initial weights every time."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ds_config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}, **config}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)[0]


@pytest.mark.slow
def test_save_resume_and_universal_conversion_with_a_real_engine(one_process_group, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets, and DeepSpeed's engine asks for
    trained = linear_engine()
    info = {"world_size": 1, "zero_stage": 1, "tokenizer_hash": "abc", "model": MODEL}
    for step in (1, 2, 3):
        trained.backward(trained(torch.ones(2, 4)).sum())
        trained.step()
        saved_rng = checkpoint.rng_state()
        path = checkpoint.save_checkpoint(trained, tmp_path, step, info, {"consumed_samples": 2 * step}, keep_last=2)
    checkpoints = tmp_path / "checkpoints"
    assert path == checkpoints / "step_00000003"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000003"]  # keep_last=2
    assert (checkpoints / "latest").read_text() == "step_00000003"
    meta = json.loads((path / checkpoint.META).read_text())
    files = meta.pop(checkpoint.FILES)
    assert meta == {"step": 3, **info}
    assert sorted(files) == sorted(f.name for f in path.iterdir() if f.name != checkpoint.META)
    assert all(entry["bytes"] == (path / name).stat().st_size for name, entry in files.items())
    assert not list(tmp_path.rglob("*.tmp"))

    point = checkpoint.find_resume(tmp_path, "auto")
    resumed = linear_engine()
    client_state = checkpoint.load_checkpoint(resumed, point, universal=False)
    assert (client_state["info"], client_state["sampler"]) == (info, {"consumed_samples": 6})
    (rng,) = client_state["rng"]
    assert torch.equal(rng["torch"], saved_rng["torch"]) and rng["python"] == saved_rng["python"]
    assert resumed.global_steps == 3 and torch.equal(resumed.module.weight, trained.module.weight)

    # Another world size or ZeRO stage: converted once to DeepSpeed's universal format, then loaded from it. A
    # conversion cut short earlier left a partial folder: it is started afresh.
    (path / "universal.partial").mkdir()
    (path / "universal.partial" / "stale").write_text("from a conversion cut short")
    capfd.readouterr()
    checkpoint.prepare_universal(point)
    command = (f"{sys.executable} -m deepspeed.checkpoint.ds_to_universal --input_folder {path} --output_folder "
               f"{path / 'universal.partial'} --inject_missing_state")
    assert capfd.readouterr().out == f"converting {path} for world size 1: {command}\n"  # the converter's is kept
    assert (path / "universal").is_dir() and not (path / "universal.partial").exists()
    assert not (path / "latest_universal").exists() and not (path / "universal" / "stale").exists()
    checkpoint.prepare_universal(point)  # converted once, reused
    assert capfd.readouterr().out == ""
    universal = linear_engine(checkpoint={"load_universal": True})
    checkpoint.load_checkpoint(universal, point, universal=True)
    assert torch.equal(universal.module.weight, trained.module.weight)


@pytest.mark.slow
def test_a_failed_universal_conversion_is_one_error_with_the_converters_last_line(one_process_group, tmp_path,
                                                                                   monkeypatch):
    path = fake_checkpoint(tmp_path, 5)  # amos_meta.json but no DeepSpeed files: DeepSpeed's converter fails
    point = checkpoint.ResumePoint(path, json.loads((path / checkpoint.META).read_text()))
    read_end, write_end = os.pipe()  # a launched run's stdout, buffered by blocks: the line is flushed at once
    os.set_blocking(read_end, False)
    with open(write_end, "w") as pipe, monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", pipe)
        with pytest.raises(CheckpointError) as raised:
            checkpoint.prepare_universal(point)
        printed = unread(read_end)  # before the pipe's close flushes it
    os.close(read_end)
    assert str(raised.value) == (f"converting {path} to a universal checkpoint failed: FileNotFoundError: can't find "
                                 f"*_optim_states.pt files in directory '{path}'")
    assert printed.startswith(f"converting {path} for world size 1: {sys.executable} -m deepspeed")
    assert not (path / "universal").exists()
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # a converter that dies without a word (OOM-killed)
    with pytest.raises(CheckpointError) as raised:
        checkpoint.prepare_universal(point)
    assert str(raised.value) == f"converting {path} to a universal checkpoint failed: ?"


def test_each_rank_hashes_its_own_zero_files_and_rank_0_the_rest(tmp_path):
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_10_mp_rank_00_optim_states.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert sorted(f.name for f in checkpoint._files_written_by(tmp_path, 0)) == names[:2]
    assert [f.name for f in checkpoint._files_written_by(tmp_path, 1)] == [names[2]]
    assert [f.name for f in checkpoint._files_written_by(tmp_path, 10)] == [names[3]]


def test_a_failed_save_marks_nothing_and_names_what_is_intact(tmp_path, one_process_group, monkeypatch):
    """In this process: an fsync that fails after DeepSpeed has written everything (EIO), then torch.save refused
    by RLIMIT_FSIZE (as a full disk refuses it); between them a save over the failed one's leftover folder."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets, and DeepSpeed's engine asks for
    engine = linear_engine()
    info = {"world_size": 1, "zero_stage": 1}
    checkpoints = tmp_path / "checkpoints"
    first = checkpoints / "step_00000001"
    model_file = first / "mp_rank_00_model_states.pt"

    def fsync_failing_on_the_model_file(file: Path) -> None:
        if file.name == model_file.name:
            raise OSError(errno.EIO, "Input/output error", str(file))

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "fsync", fsync_failing_on_the_model_file)
        with pytest.raises(CheckpointError) as raised:
            checkpoint.save_checkpoint(engine, tmp_path, 1, info, {}, keep_last=2)
    assert str(raised.value) == (f"saving checkpoint {first} failed: {model_file}: Input/output error; removed the "
                                 "partial step_00000001, and the previous complete checkpoint (none) is intact: free "
                                 "space or fix the disk, then resume with --resume auto")
    assert not first.exists()  # the partial folder is gone: freeing space is all a user must do
    assert not (checkpoints / "latest").exists()

    first.mkdir()
    (first / "stale").write_text("a leftover of a run killed while saving")
    checkpoint.save_checkpoint(engine, tmp_path, 1, info, {}, keep_last=2)
    assert sorted(json.loads((first / checkpoint.META).read_text())[checkpoint.FILES]) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]  # the leftover was removed

    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # a write past 4 KiB fails (EFBIG), no signal
    try:
        with pytest.raises(CheckpointError) as raised:
            checkpoint.save_checkpoint(engine, tmp_path, 2, info, {}, keep_last=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    second = checkpoints / "step_00000002"
    first_path, second_path = re.escape(str(first)), re.escape(str(second))
    assert re.fullmatch(rf"saving checkpoint {second_path} failed: {second_path}: a write failed \(\[enforce fail at "
                        rf"[^\n]+\); removed the partial step_00000002, and the previous complete checkpoint "
                        rf"\({first_path}\) is intact: free space or fix the disk, then resume with --resume auto",
                        str(raised.value)), raised.value
    assert not second.exists()
    assert (checkpoints / "latest").read_text() == first.name
    assert checkpoint.find_resume(tmp_path, "auto").path == first


def test_a_bug_while_saving_keeps_its_traceback_and_is_not_called_a_disk_error(tmp_path, one_process_group,
                                                                              monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine = linear_engine()

    def buggy_hash(file: Path) -> str:
        raise RuntimeError("a bug in the hashing")

    monkeypatch.setattr(checkpoint, "_sha256", buggy_hash)
    with pytest.raises(RuntimeError) as raised:
        checkpoint.save_checkpoint(engine, tmp_path, 1, {"world_size": 1, "zero_stage": 1}, {}, keep_last=2)
    assert type(raised.value) is RuntimeError and str(raised.value) == "a bug in the hashing"
    assert any(frame.name == "buggy_hash" for frame in traceback.extract_tb(raised.tb))
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()


DS_CONFIG = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.01}},
             "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 1e-3,
                                                               "total_num_steps": 100}},
             "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}
# One change of every kind that alters the run, and the one-line name it is reported under.
DRIFT = [
    ({"seq_len": 64}, {}, "train.seq_len: 128 -> 64"),
    ({"mask_prob": 0.2}, {}, "train.mask_prob: 0.15 -> 0.2"),
    ({"mask_split": (0.8, 0.1, 0.1)}, {}, "train.mask_split: [1.0, 0.0, 0.0] -> [0.8, 0.1, 0.1]"),
    ({"seed": 7}, {}, "train.seed: 1234 -> 7"),
    ({"data": ["corpus_b"]}, {}, "train.data: ['corpus_a'] -> ['corpus_b']"),
    ({"data": ["corpus_a:2"]}, {}, "train.data: ['corpus_a'] -> ['corpus_a:2']"),
    ({"builtin_vocab_size": 4096}, {}, "train.builtin_vocab_size: 8192 -> 4096"),
    ({"ablation": "adv_mlm"}, {}, "train.ablation: None -> 'adv_mlm'"),
    ({"fp32": True}, {}, "deepspeed.precision: 'bf16' -> 'fp32'"),
    ({}, {"train_batch_size": 128}, "deepspeed.train_batch_size: 64 -> 128"),
    ({}, {"gradient_clipping": 2.0}, "deepspeed.gradient_clipping: 1.0 -> 2.0"),
    ({}, {"optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "weight_decay": 0.01}}},
     "deepspeed.optimizer.params.lr: 0.001 -> 0.002"),
    ({}, {"optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.01}}},
     "deepspeed.optimizer.type: 'AdamW' -> 'Lamb'"),
    ({}, {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 20, "warmup_max_lr": 1e-3,
                                                            "total_num_steps": 100}}},
     "deepspeed.scheduler.params.warmup_num_steps: 10 -> 20"),
    ({}, {"bf16": {"enabled": False}, "fp16": {"enabled": True}}, "deepspeed.precision: 'bf16' -> 'fp16'"),
    ({}, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.01,
                                                    "eps": 1e-6}}}, "deepspeed.optimizer.params.eps: None -> 1e-06"),
    ({"eval_batches": 4}, {}, "train.eval_batches: 8 -> 4"),
    ({"eval_data": ["held_out"]}, {}, "train.eval_data: [] -> ['held_out']"),
]


def drift_point(tmp_path) -> checkpoint.ResumePoint:
    from amos_ds.train.train_config import TrainConfig

    train = TrainConfig(data=["corpus_a"]).to_dict()
    derived = {**DS_CONFIG, "gradient_accumulation_steps": 1, "tensorboard": {"output_path": "old"}}
    return checkpoint.ResumePoint(tmp_path, {"step": 10, "train": json.loads(json.dumps(train)),
                                             "deepspeed": derived})


@pytest.mark.parametrize("train_change, ds_change, reported", DRIFT, ids=[d[2].split(":")[0] for d in DRIFT])
def test_resume_refuses_every_setting_that_alters_the_run(tmp_path, train_change, ds_change, reported):
    from amos_ds.train.train_config import TrainConfig

    point = drift_point(tmp_path)
    settings = checkpoint.run_settings(TrainConfig(**{"data": ["corpus_a"], **train_change}).to_dict(),
                                       {**DS_CONFIG, **ds_change})
    with pytest.raises(ConfigError) as raised:
        checkpoint.check_settings(point, settings, allow_change=False)
    assert str(raised.value) == (f"--resume {tmp_path}: 1 setting(s) differ from the checkpoint's ({reported}); "
                                 "restore them, pass --allow-config-change to continue with the change recorded, or "
                                 "use another --run-dir")
    assert list(checkpoint.check_settings(point, settings, allow_change=True)) == [reported.split(": ")[0]]


def test_resume_accepts_what_does_not_alter_the_run_and_lists_every_change(tmp_path):
    from amos_ds.train.train_config import TrainConfig

    point = drift_point(tmp_path)
    same = TrainConfig(data=["corpus_a"], num_workers=7, save_every=3, keep_last=9, max_steps=500, log_every=5,
                       run_dir="elsewhere", resume="none", compile="off", builtin_cache="/other",
                       collective_timeout_s=5.0, max_nonfinite_steps=2, plot=False, allow_config_change=True)
    other_layout = {**DS_CONFIG, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10,
                                                                      "warmup_max_lr": 1e-3, "total_num_steps": 500}}}
    assert checkpoint.check_settings(point, checkpoint.run_settings(same.to_dict(), other_layout), False) == {}
    two = checkpoint.run_settings(TrainConfig(data=["corpus_a"], seq_len=64, seed=1).to_dict(), DS_CONFIG)
    with pytest.raises(ConfigError, match=r"2 setting\(s\) differ .* \(train.seed: 1234 -> 1, train.seq_len: 128 "
                                          r"-> 64\)"):
        checkpoint.check_settings(point, two, allow_change=False)
    assert checkpoint.check_settings(point, two, allow_change=True) == {"train.seed": [1234, 1],
                                                                          "train.seq_len": [128, 64]}
    del point.meta["train"]["eval_batches"]  # a checkpoint from before that field existed
    assert checkpoint.check_settings(point, checkpoint.run_settings(TrainConfig(data=["corpus_a"], eval_batches=2)
                                                                     .to_dict(), DS_CONFIG), False) == {}
    point.meta.pop("train")  # a checkpoint from before settings were recorded
    assert checkpoint.check_settings(point, two, allow_change=False) == {}


def test_run_settings_take_a_scheduler_without_params():
    """DeepSpeed accepts a scheduler block with its type alone (its defaults); the settings flatten it as given."""
    from amos_ds.train.train_config import TrainConfig

    settings = checkpoint.run_settings(TrainConfig(data=["corpus_a"]).to_dict(),
                                       {**DS_CONFIG, "scheduler": {"type": "WarmupLR"}})
    assert settings["deepspeed.scheduler.type"] == "WarmupLR"
    assert not any(name.startswith("deepspeed.scheduler.params") for name in settings)
