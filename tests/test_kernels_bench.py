"""Smoke test of `python -m amos_kernels.bench` at a tiny size (the interpreter without a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from amos_kernels import bench  # noqa: E402


def test_bench_prints_one_table() -> None:
    table = bench.main(["--rows", "24", "--vocab", "100", "--hidden", "32", "--no-compile", "--warmup", "1",
                        "--repeats", "1", "--extra", "amos_ds.ops.vocab_path:mlm_and_sample_chunked"])
    methods = [line.split("|")[3].strip() for line in table.splitlines() if line.startswith("| 24 |")]
    assert [name for name in methods if name != "liger-ce (CE only)"] == [
        "eager", "triton stacked_slots", "triton chunked_logits", "mlm_and_sample_chunked", "matmul floor"]
