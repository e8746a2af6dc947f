"""Checkpoint bookkeeping without a model: completeness, `--resume` lookup, keep-last-K, compatibility checks."""

import json

import pytest

from amos_ds.train import checkpoint
from amos_ds.train.train_config import ConfigError

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
    fake_checkpoint(tmp_path, 100)
    newest = fake_checkpoint(tmp_path, 200)
    fake_checkpoint(tmp_path, 300, complete=False)  # killed while saving
    point = checkpoint.find_resume(tmp_path, "auto")
    assert (point.path, point.step) == (newest, 200)
    assert checkpoint.find_resume(tmp_path, str(tmp_path)).path == newest
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "checkpoints" / "step_00000300"))


def test_a_run_never_overwrites_its_newer_checkpoints(tmp_path):
    other = tmp_path / "other"
    older = fake_checkpoint(other, 100)
    fake_checkpoint(other, 200)
    assert checkpoint.find_resume(other, str(other / "checkpoints" / "step_00000200")).step == 200
    assert checkpoint.find_resume(tmp_path / "new", str(older)).step == 100  # branching into a new run directory
    for resume in ("none", str(older)):
        with pytest.raises(ConfigError, match=f"--resume {resume}: --run-dir {other} already holds checkpoints up "
                                              "to step 200, which this run would overwrite"):
            checkpoint.find_resume(other, resume)


def test_universal_conversion_is_needed_for_another_world_size_or_stage(tmp_path):
    point = checkpoint.find_resume(tmp_path, str(fake_checkpoint(tmp_path, 10, world_size=2, zero_stage=1)))
    assert not point.needs_universal(2, 1)
    assert point.needs_universal(1, 1) and point.needs_universal(2, 2)


def test_prune_keeps_the_last_k_and_drops_incomplete_leftovers(tmp_path):
    for step in (100, 200, 300):
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
    with pytest.raises(ConfigError, match=r"model differs from the checkpoint's \(hidden_size: 64 -> 128\)"):
        checkpoint.check_compatible(point, "abc", {**MODEL, "hidden_size": 128})
