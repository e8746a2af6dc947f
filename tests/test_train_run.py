"""End-to-end runs of amos_ds/pretrain.py on the CPU: gloo over loopback, the `tiny` preset, a few steps each.

Two-rank runs go through the `deepspeed` launcher, one-rank runs through plain `python`. A run that finished its
work and then hit gloo's rare abort at interpreter exit (see ../shared/ENVIRONMENT.md) is judged by its outputs,
not by that exit code.
"""

import glob
import json
import signal
import subprocess

import pytest
import torch
from conftest import (
    GLOBAL_BATCH,
    MICRO_BATCH,
    REPO,
    SEQ_LEN,
    VOCAB,
    cleanup,
    command,
    complete_steps,
    logged_steps,
    metrics,
    run,
    start,
    wait_until,
    write_configs,
)

from amos_ds.data import ResumableSampler, open_corpora
from amos_ds.data.held_out import split_held_out

pytestmark = pytest.mark.slow  # every test here starts training processes or daemons


def test_two_ranks_zero2_bf16_trains_and_loss_falls(tmp_path, corpus):
    flags = write_configs(tmp_path, corpus, zero_stage=2, lr=3e-3, bf16=True)
    run_dir = tmp_path / "run"
    run(2, [*flags, "--run-dir", str(run_dir), "--max-steps", "16", "--save-every", "8"])
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 17))
    assert all(r["world_size"] == 2 for r in records)
    first, last = (sum(r["loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last < first - 1.0, (first, last)
    for name in ("mlm_loss_L1", "mix_weight_L3", "disc_acc_replaced", "lr", "grad_norm", "tokens_per_s", "mfu",
                 "data_wait_s", "mem_gib"):
        assert name in records[-1]
    assert complete_steps(run_dir) == [8, 16]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000016"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The config says bf16: the engine trained bf16 weights (so the forward ran in bf16), and the run records it.
    checkpoint = run_dir / "checkpoints" / "step_00000016"
    assert json.loads((checkpoint / "amos_meta.json").read_text())["precision"] == "bf16"
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert {tensor.dtype for tensor in module.values()} == {torch.bfloat16}


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_resume_after_sigkill_is_bit_exact(tmp_path, corpus, zero_stage):
    """2N steps straight vs N steps, SIGKILL, resume: in fp32 the losses after the resume are identical."""
    flags = [*write_configs(tmp_path, corpus, zero_stage), "--fp32", "--max-steps", "6", "--save-every", "3"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run(2, [*flags, "--run-dir", str(reference)])

    process, port = start(2, [*flags, "--run-dir", str(interrupted)])
    try:
        wait_until((interrupted / "checkpoints/step_00000003/amos_meta.json").exists, process, poll=0.01)
    finally:
        cleanup(process, port)  # SIGKILL, no clean exit
    assert complete_steps(interrupted) == [3], "the run finished before the kill: nothing was tested"

    output = run(2, [*flags, "--run-dir", str(interrupted), "--resume", "auto"])
    assert "resumed from" in output and "step_00000003" in output
    expected = metrics(reference)
    resumed = metrics(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for name in ("loss", "mlm_loss", "rtd_loss", "samples"):
        assert [r[name] for r in resumed[3:]] == [r[name] for r in expected[3:]], name


@pytest.mark.parametrize("ranks_before, ranks_after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_neither_repeats_nor_skips(tmp_path, corpus, ranks_before, ranks_after):
    flags = [*write_configs(tmp_path, corpus, zero_stage=2), "--run-dir", str(tmp_path / "run")]
    run(ranks_before, [*flags, "--max-steps", "3"])
    output = run(ranks_after, [*flags, "--max-steps", "6"])
    assert "universal checkpoint" in output
    records = metrics(tmp_path / "run")
    assert [(r["step"], r["world_size"]) for r in records] == [
        (step, ranks_before if step <= 3 else ranks_after) for step in range(1, 7)]
    dataset = open_corpora([glob.glob(f"{corpus}/builtin-*")[0]], SEQ_LEN, seed=1234)
    training, held_out = split_held_out(dataset, 8 * GLOBAL_BATCH)  # the default --eval-batches 8
    order = ResumableSampler(len(training), MICRO_BATCH, rank=0, world_size=1, seed=1234)
    for record in records:
        expected = order.global_indices((record["step"] - 1) * GLOBAL_BATCH, GLOBAL_BATCH).tolist()
        assert sorted(record["samples"]) == sorted(training.dataset_index(i) for i in expected), record["step"]
    # Each run evaluated at its end on the same held-out slice, which training never read.
    evaluated = [record for record in records if "eval_samples" in record]
    assert [record["step"] for record in evaluated] == [3, 6]
    assert evaluated[0]["eval_samples"] == evaluated[1]["eval_samples"] == held_out.held_out.tolist()
    assert not set(evaluated[0]["eval_samples"]) & {i for record in records for i in record["samples"]}
    assert complete_steps(tmp_path / "run") == [3, 6]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, corpus):
    run_dir = tmp_path / "run"
    flags = [*write_configs(tmp_path, corpus, zero_stage=1), "--run-dir", str(run_dir), "--max-steps", "1000",
             "--save-every", "1000"]
    process, port = start(1, flags)
    try:
        wait_until(lambda: logged_steps(run_dir) > 0, process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        cleanup(process, port)
    assert process.returncode == 0, output[-4000:]
    assert "stop signal received" in output
    steps = complete_steps(run_dir)
    assert steps == [metrics(run_dir)[-1]["step"]] and 0 < steps[0] < 1000


def test_bad_batch_size_is_one_line_error(tmp_path, corpus):
    flags = write_configs(tmp_path, corpus, zero_stage=1)
    ds_config = json.loads((tmp_path / "ds.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps({**ds_config, "train_micro_batch_size_per_gpu": 3}))
    result = subprocess.run(command(1, 0, [*flags, "--run-dir", str(tmp_path / "run")]), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2
    assert errors == [f"error: --deepspeed_config {tmp_path / 'ds.json'}: train_batch_size 8 is not divisible by "
                      "train_micro_batch_size_per_gpu 3 x 1 data-parallel ranks = 3; pick a micro-batch and rank "
                      "count whose product divides 8"]
    assert not (tmp_path / "run").exists()


def test_two_ranks_zero3_partitioned_shared_embedding_trains(tmp_path, corpus):
    """ZeRO-3 partitions the tied token embedding over the ranks; the vocabulary path must still see it whole."""
    flags = write_configs(tmp_path, corpus, zero_stage=3, lr=3e-3, bf16=True)
    run_dir = tmp_path / "run"
    run(2, [*flags, "--run-dir", str(run_dir), "--max-steps", "10"])
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 11))
    first, last = (sum(r["loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last < first - 1.0, (first, last)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000010")
    assert tuple(state["token_embedding"].shape) == (VOCAB, 64)


def test_two_ranks_zero3_fused_vocabulary_path_matches_the_plain_one(tmp_path, corpus):
    """The Triton kernel (the interpreter here) under ZeRO-3 sees the whole partitioned embedding: in fp32 its
    losses follow the plain PyTorch path's step by step."""
    losses = {}
    for impl in ("torch", "triton"):
        directory = tmp_path / impl
        directory.mkdir()
        flags = write_configs(directory, corpus, zero_stage=3, lr=3e-3, vocab_impl=impl)
        run(2, [*flags, "--run-dir", str(directory / "run"), "--max-steps", "3"])
        losses[impl] = [r["loss"] for r in metrics(directory / "run")]
    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)
