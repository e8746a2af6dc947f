"""Settings of the fused vocabulary path: which layout runs (`KernelConfig.layout`), its tiles and its buffer bound.

The two layouts compute the same numbers (see `vocab_path`); which one is faster is a question for a GPU
(`python -m amos_kernels.bench` times both). `DEFAULT_LAYOUT` is what `KernelConfig()` and `default_config` take.
"""

import os
from dataclasses import dataclass

import torch
import triton

LAYOUTS = ("stacked_slots", "chunked_logits")
DEFAULT_LAYOUT = "stacked_slots"  # the layout measured so far (BENCHMARKS.md); the other is not yet timed on a GPU


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """Layout, tile sizes and launch settings; the results do not depend on tiles (up to fp32 summation order).

    layout: "stacked_slots" (`stacked_slots.py`: Triton computes the logit tiles with tl.dot) or "chunked_logits"
    (`chunked_logits.py`: cuBLAS writes a chunk of rows' logits, a Triton pass reads them).
    block_n: rows per program (the stacked tile has next_pow2(slots) * block_n rows).
    block_v, block_h: vocabulary and hidden tile (block_h: stacked_slots only). num_splits: vocabulary splits of the
    stacked_slots forward grid (None: enough programs to fill the GPU). buffer_bytes: bound on the chunk buffer
    ([K, chunk, V] logit gradients in stacked_slots' backward; [K + 1, chunk, V] logits and gy in chunked_logits).
    maxnreg: cap on registers per thread (PTX .maxnreg; None: the compiler's choice; stacked_slots only). A cap of
    128, low enough for two 8-warp programs per SM, spilled and was slower on an H200 (BENCHMARKS.md).
    """

    layout: str = DEFAULT_LAYOUT
    block_n: int = 32
    block_v: int = 128
    block_h: int = 64
    num_splits: int | None = None
    buffer_bytes: int = 512 * 2**20
    num_warps: int = 8
    num_stages: int = 3
    maxnreg: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"KernelConfig.layout: {self.layout!r} is not one of {LAYOUTS}")
        # tl.dot needs tiles of at least 16; the chunked_logits pass has no tl.dot, only tl.arange's powers of two.
        smallest = 16 if self.layout == "stacked_slots" else 1
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < smallest or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}: {value} is not a power of two >= {smallest} "
                                 f"(layout {self.layout})")


def default_config(num_heads: int, device: torch.device, layout: str = DEFAULT_LAYOUT) -> KernelConfig:
    """Tiles of `layout` for `device`; few, large tiles under the interpreter (fewer steps).

    stacked_slots: a 256 x 64 stacked tile. On an H200 it took under a third of the time of 128 x 128 (which
    spilled registers); the best tile that `python -m amos_kernels.bench_tiles` found was 7% faster still
    (BENCHMARKS.md). chunked_logits: one row x 1024 ids per program, 8 warps (a 512 MiB chunk of a 32K vocabulary
    is 2048 programs): of the tiles compiled ahead of time for sm_90 with Triton 3.7 on a CPU, it used the fewest
    registers (64 forward, 80 backward) with no spills, where 4 rows x 512 ids used 233-255 and spilled. Its speed
    is unmeasured: no GPU has run this layout yet; `bench_tiles` times it against alternatives.
    """
    if device.type != "cuda":
        return KernelConfig(layout=layout, block_n=16, block_v=64, block_h=64, num_splits=1)
    if layout == "chunked_logits":
        return KernelConfig(layout=layout, block_n=1, block_v=1024)
    slots = triton.next_power_of_2(num_heads + 1)
    return KernelConfig(layout=layout, block_n=max(16, 256 // slots), block_v=64)
