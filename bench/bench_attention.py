"""Which attention kernel takes AMOS's relative bias, and how fast: forward + backward of one attention call.

    python bench/bench_attention.py                      # CUDA: base shapes (32 x 12 heads x 512 x 64), bf16
    python bench/bench_attention.py --batch 2 --seq-len 128  # CPU: small shapes, fp32

Each row forces one kernel: SDPA with one backend (memory-efficient, cuDNN, flash, math) given the relative bias as a
contiguous additive mask [1, heads, T, T] that requires grad, with attention dropout 0.1 and 0; and FlexAttention
(compiled on CUDA) with the bias as a score_mod reading the [buckets, heads] table. A backend that refuses the call
says why (PyTorch's own message, first line); the rest show the median milliseconds of forward + backward and
whether the bias table received a gradient. ModelConfig.attention_impl picks sdpa (PyTorch then chooses among the
backends that accept the call) or flex.
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Appended, not first: the root's kernels/ would shadow PyPI's `kernels`, which transformers imports.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from amos_ds.model.encoder import FlexBias, biased_flex_attention  # noqa: E402
from amos_ds.model.relative_position import RelativePositionBias  # noqa: E402

BACKENDS = {"memory-efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def median_ms(function, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up (and compiles FlexAttention)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32 if cuda else 2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=512 if cuda else 128)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--buckets", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    relative = RelativePositionBias(args.buckets, 128, args.heads).to(device)
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}; {dtype}; "
          f"q, k, v {list(shape)}; median of {args.repeats}")
    print("| kernel | dropout | forward + backward ms | bias table gets a gradient |")
    print("|---|---|---|---|")

    def report(name: str, dropout: str, run) -> None:
        relative.table.weight.grad = None
        with warnings.catch_warnings(record=True) as caught:  # PyTorch gives its reasons for refusing as warnings
            warnings.simplefilter("always")
            try:
                ms = median_ms(run, args.repeats, device)
            except RuntimeError as err:  # the backend refused these inputs
                reasons = "; ".join(dict.fromkeys(str(w.message).split(" (Triggered")[0] for w in caught))
                print(f"| {name} | {dropout} | refused: {reasons or str(err).strip().splitlines()[0]} | |", flush=True)
                return
        grad = relative.table.weight.grad
        print(f"| {name} | {dropout} | {ms:.2f} | {grad is not None and bool(grad.abs().sum() > 0)} |", flush=True)

    for name, backend in BACKENDS.items():
        for dropout in (0.1, 0.0):
            def sdpa(backend=backend, dropout=dropout):
                bias = relative(args.seq_len).to(dtype)
                with sdpa_kernel([backend]):
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
                out.backward(grad_out)
            report(f"sdpa {name}", str(dropout), sdpa)

    def flex():
        bias = FlexBias(relative.table.weight, relative.bucket_index(args.seq_len), None)
        biased_flex_attention(q, k, v, bias).backward(grad_out)
    if cuda:
        report("flex (compiled)", "none", flex)
    else:
        print("| flex | none | skipped: PyTorch runs no FlexAttention backward on the CPU | |")


if __name__ == "__main__":
    main()
