"""Microbenchmark of the fused vocabulary path: `python -m amos_kernels.bench [--rows ...] [--vocab ...]`.

Times forward + backward and measures the peak extra memory (peak allocated during one step minus what the inputs
hold) of: the plain PyTorch reference ("eager"), `torch.compile` of it ("compiled"), for the cross-entropy part
alone Liger-Kernel's fused linear cross-entropy summed over the K heads ("liger-ce", when liger_kernel is installed),
then the fused Triton path in each layout with its default tiles ("triton stacked_slots", "triton chunked_logits")
and any `--extra` implementation. One markdown table with each row's speed-up over the baselines measured before it
in the same run (eager, compiled, liger-ce: their time over the row's), plus the matmul floor: the FLOPs of the
matmuls the path needs, 2 N H V (3K + 1) (K logits forward; K input and K embedding gradients and the
straight-through grad_sampled @ E^T backward), over this GPU's measured bf16 matmul rate ("vs floor": the row's time
over the floor's).

The reference is a plug, `--reference package.module:function` (default: amos_ds's own reference), imported by name
at run time. This keeps one reference in the project (no copy of it in the kernels package) while amos_kernels
itself imports nothing from amos_ds; any function with the contract's signature can be plugged in.

On a machine without CUDA it runs under TRITON_INTERPRET=1 (set it before starting Python) at the sizes given,
without memory figures: only a smoke test of this script.
"""

import argparse
import functools
import importlib
import os
import time
from collections.abc import Callable

import torch

from .config import LAYOUTS, default_config
from .vocab_path import mlm_and_sample_triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TAU = 0.3
SEED = 17
LIGER = "liger-ce (CE only)"
BASELINES = ("eager", "compiled", LIGER)  # the "vs ..." columns, in this order


def load_function(path: str) -> Callable:
    """The function that 'package.module:function' names."""
    module_name, _, function_name = path.partition(":")
    if not function_name:
        raise ValueError(f"expected package.module:function, got {path!r}")
    return getattr(importlib.import_module(module_name), function_name)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_inputs(num_heads: int, rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device,
                 ) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float, dtype: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    return dict(head_states=randn(num_heads, rows, hidden, scale=1.0),
                mix_logits=randn(rows, num_heads, scale=1.0, dtype=torch.float32),
                embedding=randn(vocab, hidden, scale=0.02), bias=randn(vocab, scale=0.02),
                targets=torch.randint(0, vocab, (rows,), generator=generator, device=device),
                grad_sampled=randn(rows, hidden, scale=1.0))


def _vocab_path_step(function: Callable) -> Callable[[dict[str, torch.Tensor]], None]:
    """Forward + backward of a contract implementation with a straight-through gradient arriving."""

    def step(inputs: dict[str, torch.Tensor]) -> None:
        losses, _, sampled = function(inputs["head_states"], inputs["mix_logits"], inputs["embedding"],
                                      inputs["bias"], inputs["targets"], TAU, SEED)
        torch.autograd.backward([losses.sum(), sampled], [None, inputs["grad_sampled"]])

    return step


def _liger_step() -> Callable[[dict[str, torch.Tensor]], None] | None:
    """Liger's fused linear cross-entropy on each head (the cross-entropy part only), or None without Liger."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def step(inputs: dict[str, torch.Tensor]) -> None:
        losses = [loss_fn(inputs["embedding"], states, inputs["targets"], inputs["bias"])
                  for states in inputs["head_states"].unbind(0)]
        torch.stack(losses).sum().backward()

    return step


def _measure(step: Callable[[dict[str, torch.Tensor]], None], inputs: dict[str, torch.Tensor], warmup: int,
             repeats: int) -> tuple[float, float | None]:
    """(milliseconds per forward + backward, peak extra MiB or None off CUDA)."""
    device = inputs["embedding"].device
    leaves = [inputs[name] for name in ("head_states", "mix_logits", "embedding", "bias")]
    for leaf in leaves:
        leaf.requires_grad_(True)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        step(inputs)

    for _ in range(warmup):
        run()
    _synchronize(device)
    peak = None
    if device.type == "cuda":
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        _synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3 / repeats, peak


def matmul_tflops(dtype: torch.dtype, device: torch.device, size: int) -> float:
    """Measured dense matmul rate in TFLOP/s for size x size x size."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    repeats = 20 if device.type == "cuda" else 2
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def run_benchmark(rows_list: list[int], vocab_list: list[int], hidden: int, num_heads: int, dtype: torch.dtype,
                  reference: str, extra: list[str], compile_reference: bool, warmup: int, repeats: int) -> str:
    """The markdown table (one row per shape and method), also printed line by line as it is measured."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 (a smoke test at small sizes)")
    reference_fn = load_function(reference)
    methods: list[tuple[str, Callable]] = [("eager", _vocab_path_step(reference_fn))]
    if compile_reference:
        # Default dynamism: the second shape recompiles once with dynamic shapes, later shapes reuse that graph.
        methods.append(("compiled", _vocab_path_step(torch.compile(reference_fn))))
    liger = _liger_step()
    if liger is not None:
        methods.append((LIGER, liger))
    for layout in LAYOUTS:
        config = default_config(num_heads, device, layout)
        methods.append((f"triton {layout}", _vocab_path_step(functools.partial(mlm_and_sample_triton, config=config))))
    methods += [(path.rpartition(":")[2], _vocab_path_step(load_function(path))) for path in extra]
    rate = matmul_tflops(dtype, device, 8192 if device.type == "cuda" else 512)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    emit(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}; "
         f"{dtype} matmul {rate:.1f} TFLOP/s; H {hidden}, K {num_heads}; forward + backward; reference {reference}")
    emit("")
    emit("| N | V | method | ms | peak extra MiB | vs eager | vs compiled | vs liger-ce | vs floor |")
    emit("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in rows_list:
        for vocab in vocab_list:
            floor_ms = 2 * rows * hidden * vocab * (3 * num_heads + 1) / (rate * 1e12) * 1e3
            baseline_ms: dict[str, float] = {}
            for name, step in methods:
                inputs = _make_inputs(num_heads, rows, hidden, vocab, dtype, device)
                try:
                    ms, peak = _measure(step, inputs, warmup, repeats)
                except torch.cuda.OutOfMemoryError:
                    emit(f"| {rows} | {vocab} | {name} | OOM | | | | | |")
                    continue
                except Exception as error:  # a method that fails (say, a compiler error) must not end the table
                    first_line = (str(error).strip().splitlines() or [""])[0][:100].replace("|", "/")
                    emit(f"| {rows} | {vocab} | {name} | failed: {type(error).__name__}: {first_line} | | | | | |")
                    continue
                finally:
                    del inputs
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if name in BASELINES:
                    baseline_ms[name] = ms
                speedups = " | ".join(f"{baseline_ms[base] / ms:.2f}x" if base in baseline_ms else ""
                                      for base in BASELINES)
                peak_text = f"{peak:.0f}" if peak is not None else "n/a"
                emit(f"| {rows} | {vocab} | {name} | {ms:.2f} | {peak_text} | {speedups} | {ms / floor_ms:.2f}x |")
            emit(f"| {rows} | {vocab} | matmul floor | {floor_ms:.2f} | | | | | 1.00x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 64000])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reference", default="amos_ds.ops.vocab_path:mlm_and_sample_torch",
                        help="package.module:function with the contract's signature (the eager baseline)")
    parser.add_argument("--extra", nargs="*", default=[], help="more package.module:function implementations")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    return run_benchmark(args.rows, args.vocab, args.hidden, args.heads, DTYPES[args.dtype], args.reference,
                         args.extra, not args.no_compile, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
