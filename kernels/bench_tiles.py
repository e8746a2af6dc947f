"""Tile sweep of the fused vocabulary path: `python -m amos_kernels.bench_tiles [--rows N] [--vocab V]`.

Times the forward alone and forward + backward for several `KernelConfig`s at one shape (bf16) and prints, per
config, the registers and spills of the two kernels, so that the default tiles (`default_config`) can be checked on
a new GPU. CUDA only.
"""

import argparse
import functools
from collections.abc import Callable

import torch

from .bench import SEED, TAU, _make_inputs, _measure, _vocab_path_step
from .vocab_path import KernelConfig, _backward_kernel, _forward_kernel, default_config, mlm_and_sample_triton

CONFIGS = (
    dict(block_n=64, block_v=64),
    dict(block_n=64, block_v=64, block_h=32, num_stages=4),
    dict(block_n=32, block_v=64, num_warps=4),
    dict(block_n=32, block_v=64, block_h=32, num_warps=4, num_stages=4),
    dict(block_n=16, block_v=64, num_warps=4),
    dict(block_n=32, block_v=64, maxnreg=128),
    dict(block_n=32, block_v=64, block_h=32, num_stages=4, maxnreg=128),
    dict(block_n=64, block_v=64, block_h=32, num_stages=4, maxnreg=128),
    dict(block_n=64, block_v=32, maxnreg=128),
    dict(block_n=32, block_v=128, num_warps=4),
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
          f"K {args.heads}, bf16; default {default_config(args.heads, device)}")
    print("| block_n | block_v | block_h | warps | stages | maxnreg | forward ms | fwd + bwd ms | fwd regs/spills "
          "| bwd regs/spills |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for settings in CONFIGS:
        config = KernelConfig(**settings)
        step = _vocab_path_step(functools.partial(mlm_and_sample_triton, config=config))
        inputs = _make_inputs(args.heads, args.rows, args.hidden, args.vocab, torch.bfloat16, device)
        settings_text = (f"| {config.block_n} | {config.block_v} | {config.block_h} | {config.num_warps} | "
                         f"{config.num_stages} | {config.maxnreg or '-'} |")
        try:
            forward_ms, _ = _measure(_forward_step(config), inputs, 1, args.repeats)
            total_ms, _ = _measure(step, inputs, 1, args.repeats)
        except Exception as error:  # a tile the GPU cannot run (say, too much shared memory) is one failed row
            print(f"{settings_text} failed: {type(error).__name__} | | | |", flush=True)
            continue
        finally:
            del inputs
        print(f"{settings_text} {forward_ms:.1f} | {total_ms:.1f} | {_registers(_forward_kernel)} | "
              f"{_registers(_backward_kernel)} |", flush=True)


if __name__ == "__main__":
    main()
