"""Non-finite losses: the step is skipped by DeepSpeed's own optimizer on every rank (weights, optimizer state and
learning rate untouched), counted, and after TrainConfig.max_nonfinite_steps in a row the run saves and stops."""

import json
import subprocess

import deepspeed
import pytest
import torch
from conftest import REPO, command, metrics, subprocess_env, write_configs

from amos_ds.errors import ConfigError
from amos_ds.train.nonfinite import NonFiniteGuard


def make_engine(zero_stage: int, bf16: bool):
    torch.manual_seed(0)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2,
                                                           "warmup_num_steps": 10, "warmup_type": "linear"}},
              "bf16": {"enabled": bf16}, "zero_optimization": {"stage": zero_stage}}
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, config


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def optimizer_step(engine, guard: NonFiniteGuard | None, infinite_micro_batch: int | None) -> None:
    """Two micro-batches; one of them may get an infinite loss whose gradients are finite (loss + inf)."""
    for micro_batch in range(2):
        x = torch.randn(1, 8, device=engine.device, dtype=next(engine.module.parameters()).dtype)
        loss = engine(x).float().pow(2).mean()
        if micro_batch == infinite_micro_batch:
            loss = loss + torch.inf
        engine.backward(guard.guard(loss, last_micro_batch=micro_batch == 1) if guard else loss)
        engine.step()


@pytest.mark.parametrize("zero_stage, bf16", [(1, False), (2, True)])
def test_a_non_finite_loss_skips_the_whole_update(one_process_group, zero_stage, bf16):
    engine, config = make_engine(zero_stage, bf16)
    unguarded = weights(engine)
    optimizer_step(engine, None, infinite_micro_batch=0)
    assert engine.was_step_applied() and not same(weights(engine), unguarded), "DeepSpeed alone applies it"

    guard = NonFiniteGuard(engine, config, "ds.json", max_in_a_row=2)
    optimizer_step(engine, guard, None)
    assert not guard.after_step() and engine.was_step_applied()
    before, lr, skipped = weights(engine), engine.get_lr(), engine.skipped_steps
    for infinite_micro_batch in (0, 1):  # the first or the last micro-batch of the step
        optimizer_step(engine, guard, infinite_micro_batch)
        stop = guard.after_step()
        assert not engine.was_step_applied()
        assert same(weights(engine), before) and engine.get_lr() == lr
        if infinite_micro_batch == 0:
            assert not stop and guard.in_a_row == 1
            optimizer_step(engine, guard, None)  # a good step in between resets the count
            assert not guard.after_step() and guard.in_a_row == 0 and not same(weights(engine), before)
            before, lr = weights(engine), engine.get_lr()
    optimizer_step(engine, guard, 1)
    assert guard.after_step() and guard.in_a_row == 2  # two in a row: stop
    assert engine.skipped_steps == skipped + 3


def test_an_optimizer_that_cannot_skip_is_refused(one_process_group):
    engine, config = make_engine(zero_stage=0, bf16=False)
    with pytest.raises(ConfigError, match="--deepspeed_config ds.json: this optimizer setup .* cannot skip"):
        NonFiniteGuard(engine, config, "ds.json", max_in_a_row=2)


@pytest.mark.slow
def test_a_diverging_run_skips_counts_saves_and_stops(tmp_path, corpus):
    """lr 1e30: the first applied updates blow the weights up, then every loss is NaN or inf."""
    flags = write_configs(tmp_path, corpus, zero_stage=1, lr=1e30)
    train_config = json.loads((tmp_path / "train.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps({**train_config, "max_nonfinite_steps": 3, "keep_last": 20}))
    run_dir = tmp_path / "run"
    result = subprocess.run(command(1, 0, [*flags, "--fp32", "--run-dir", str(run_dir), "--max-steps", "20",
                                           "--save-every", "1"]),
                            cwd=REPO, capture_output=True, text=True, timeout=240,
                            env=subprocess_env())
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 3, result.stderr[-3000:]
    records = metrics(run_dir)
    last = records[-1]["step"]
    assert [r["skipped_steps"] for r in records] == [0] * (last - 3) + [1, 2, 3]
    assert all(r["loss"] != r["loss"] or abs(r["loss"]) == float("inf") for r in records[-3:])
    assert errors == [f"error: steps {last - 2}-{last}: 3 non-finite losses in a row (TrainConfig.max_nonfinite_steps)"
                      f", all skipped; saved the last good weights in {run_dir}/checkpoints/step_{last:08d}; lower "
                      "the learning rate or check the data, then --resume auto"]
    saved = [torch.load(run_dir / f"checkpoints/step_{step:08d}/mp_rank_00_model_states.pt",
                        weights_only=False)["module"] for step in (last - 3, last)]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[0])  # the last applied step's
    assert all(torch.isfinite(tensor).all() for tensor in saved[1].values())
