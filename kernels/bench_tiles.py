"""Tile sweep of the fused vocabulary path: `python -m amos_kernels.bench_tiles [--rows N] [--vocab V]`.

Times the forward alone and forward + backward for several `KernelConfig`s of both layouts at one shape (bf16) and
prints, per config, the registers and spills of the layout's two Triton kernels (forward and backward), so that the
default layout and tiles (`default_config`) can be checked on a new GPU. The first row of each layout is its
default. CUDA only.
"""

import argparse
import functools
from collections.abc import Callable

import torch

from . import chunked_logits, stacked_slots
from .bench import SEED, TAU, _make_inputs, _measure, _vocab_path_step
from .config import LAYOUTS, KernelConfig, default_config
from .vocab_path import mlm_and_sample_triton

# Each layout's (forward, backward) Triton kernels.
KERNELS = {"stacked_slots": (stacked_slots._forward_kernel, stacked_slots._backward_kernel),
           "chunked_logits": (chunked_logits._forward_kernel, chunked_logits._backward_kernel)}
# Settings other than the defaults. chunked_logits: rows and ids per program, warps, the buffer. stacked_slots: the
# best tiles of the sweep in BENCHMARKS.md and one register cap (the rest of that sweep was slower).
CONFIGS = (
    # The chunked_logits default's tiles with a larger buffer: the same kernels, so `_registers` (the most recently
    # compiled) is right only while this row follows the default's.
    dict(layout="chunked_logits", block_n=1, block_v=1024, buffer_bytes=2**31),
    dict(layout="chunked_logits", block_n=1, block_v=512, num_warps=4),
    dict(layout="chunked_logits", block_n=1, block_v=2048, num_warps=16),
    dict(layout="chunked_logits", block_n=1, block_v=4096, num_warps=16),
    dict(layout="chunked_logits", block_n=2, block_v=512),
    dict(layout="chunked_logits", block_n=4, block_v=256),
    dict(block_n=64, block_v=64, block_h=32, num_stages=4),
    dict(block_n=32, block_v=64, num_warps=4),
    dict(block_n=32, block_v=64, block_h=32, num_warps=4, num_stages=4),
    dict(block_n=32, block_v=64, maxnreg=128),
)


def _forward_step(config: KernelConfig) -> Callable[[dict[str, torch.Tensor]], None]:
    """The forward alone (no graph), with the same arguments as `bench._vocab_path_step`."""

    def step(inputs: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            mlm_and_sample_triton(inputs["head_states"], inputs["mix_logits"], inputs["embedding"], inputs["bias"],
                                  inputs["targets"], TAU, SEED, config=config)

    return step


def _registers(kernel) -> str:
    """'regs/spills' of the most recently compiled specialisation of a Triton kernel."""
    compiled = [binary for cache in kernel.device_caches.values() for binary in cache[0].values()]
    if not compiled:
        return "?"
    binary = compiled[-1]
    binary._init_handles()
    return f"{binary.n_regs}/{binary.n_spills}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; N {args.rows}, V {args.vocab}, H {args.hidden}, "
          f"K {args.heads}, bf16")
    print("| layout | block_n | block_v | block_h | warps | stages | maxnreg | buffer MiB | forward ms | fwd + bwd ms "
          "| fwd regs/spills | bwd regs/spills |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    configs = [default_config(args.heads, device, layout) for layout in LAYOUTS]
    for config in configs + [KernelConfig(**settings) for settings in CONFIGS]:
        step = _vocab_path_step(functools.partial(mlm_and_sample_triton, config=config))
        inputs = _make_inputs(args.heads, args.rows, args.hidden, args.vocab, torch.bfloat16, device)
        settings_text = (f"| {config.layout} | {config.block_n} | {config.block_v} | {config.block_h} | "
                         f"{config.num_warps} | {config.num_stages} | {config.maxnreg or '-'} | "
                         f"{config.buffer_bytes // 2**20} |")
        try:
            forward_ms, _ = _measure(_forward_step(config), inputs, 1, args.repeats)
            total_ms, _ = _measure(step, inputs, 1, args.repeats)
        except Exception as error:  # a tile the GPU cannot run (say, too much shared memory) is one failed row
            print(f"{settings_text} failed: {type(error).__name__} | | | |", flush=True)
            continue
        finally:
            del inputs
        forward_kernel, backward_kernel = KERNELS[config.layout]
        print(f"{settings_text} {forward_ms:.1f} | {total_ms:.1f} | {_registers(forward_kernel)} | "
              f"{_registers(backward_kernel)} |", flush=True)

if __name__ == "__main__":
    main()
