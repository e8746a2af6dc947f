"""The AMOS vocabulary path as fused Triton kernels: K MLM heads, the mixture and straight-through Gumbel sampling.

```
mlm_and_sample_triton(head_states[K,N,H], mix_logits[N,K], embedding[V,H], bias[V], targets[N], tau, seed,
                      grad_scale=-1.0, adv_logit_scale=0.0, config=None)
    -> (head_losses[K] float32, sampled_ids[N] int64, sampled_embeds[N,H] in embedding's dtype)
```
Same numbers as the plain PyTorch reference (`amos_ds.ops.vocab_path.mlm_and_sample_torch`): logits_k = head_states[k]
@ embedding.T + bias; head_losses[k] = mean cross-entropy against targets (valid ids in [0, V)); gamma =
softmax(mix_logits); sampled_ids = argmax(sum_k gamma_k logits_k + g) with g = -log(-log(u)), u from word id % 4 of
tl.randint4x(seed, row * cdiv(V, 4) + id // 4) (`amos_ds.ops.gumbel_noise`'s stream);
sampled_embeds = embedding[sampled_ids] in value, its gradient reaching embedding as a lookup and mix_logits through
y = softmax((mixed + g) / tau) times grad_scale (and the head logits, times adv_logit_scale, when that is not 0).
No [N, V] logits are kept: the forward keeps O(N x K) statistics and the backward recomputes logit tiles.

Tiling ("stacked slots"). A program owns BLOCK_N rows and stacks the rows of all its slots into one
[BLOCK_M = SLOTS * BLOCK_N, H] operand, slot-major: tile row m is slot m // BLOCK_N of row m % BLOCK_N. In the
forward the slots are the K heads; in the backward they are the K heads plus grad_sampled (so gy = grad_sampled @ E^T
comes out of the same matmul as the logits). SLOTS is K, or K + 1, rounded up to a power of two (unused slots load
zeros): for the paper's K = 3 the backward has no padding and the forward pads to 4. Each vocabulary tile is then
one [BLOCK_M, BLOCK_H] x [BLOCK_H, BLOCK_V] matmul loop over H with fp32 accumulation, the embedding tile is read
once for all heads, and the mixed logits are a gamma-weighted sum over the slot axis of the tile.

Forward (`_forward_kernel`, grid = row blocks x vocabulary splits). Each program walks its vocabulary range tile by
tile and keeps, per stacked row, the running max and running sum of exp(logit - max) (online softmax) and the target
logit; per row, the running best of mixed + g and its id (Gumbel-max; ties go to the lower id, like torch.argmax)
and the online max/sum of (mixed + g) / tau, the normaliser of y. The noise is keyed by (seed, row, id) alone (one
Philox call per four ids), so the sample depends on neither tile sizes nor splits. Splits write partial statistics
[splits, ...] that a few O(splits x N x K) PyTorch ops merge (log-sum-exp merge, best of the bests).

Backward (`_backward_kernel` plus cuBLAS, over chunks of rows). d loss_k / d logits_k = (p_k - onehot) * dL_k / N
needs only the saved log-sum-exp. The mixture's gradient needs S = sum_v y * gy, a full-row reduction, before
d mixed = y (gy - S) grad_scale / tau is known; but d gamma_k = sum_v d mixed * l_k
= grad_scale / tau * (sum_v y gy l_k - S sum_v y l_k), so one pass accumulating A_k = sum y gy l_k, B_k = sum y l_k and
S gives it exactly, with no d mixed per element. To keep that difference of two large sums accurate when y is peaked,
l_k and gy are shifted by their value at the sampled id (A - S B is invariant to per-row shifts, and y peaks at the
sampled id). Only adv_logit_scale != 0 needs d mixed per element: then a first, statistics-only pass computes S
(two passes; the default is one). Per (row block, vocabulary tile) the kernel recomputes the stacked tile, writes the
head-logit gradients into a [K, chunk, V] buffer in the embedding's dtype and per-tile partial sums of A, B, S
(no atomics: the backward is deterministic). cuBLAS then does grad_head_states = dlogits @ E and grad_embedding +=
dlogits^T @ head_states; bias and the lookup gradient are PyTorch reductions. The chunk bounds the buffer to
`KernelConfig.grad_buffer_bytes`.

Precision: fp32 accumulation everywhere; bf16/fp16 operands go to tl.dot as they are on a GPU (fp32 operands with
input_precision="ieee", no TF32), and are converted to fp32 after loading under TRITON_INTERPRET=1 (the interpreter
gets bf16 wrong). Triton 3.6 and 3.7 have the same Philox (triton/language/random.py is identical in both), so the
noise is the same stream as `amos_ds.ops.gumbel.gumbel_noise` on either.

DeepSpeed ZeRO-3: `embedding` must be the full, gathered [V, H] matrix when this runs. Call the op from inside the
forward of the module that owns the embedding parameter (DeepSpeed gathers a module's own parameters around its
forward), or register it with `deepspeed.zero.register_external_parameter(module, embedding)` in the module that calls
the op, or wrap the call in `deepspeed.zero.GatheredParameters(embedding)`. A partitioned parameter is seen as an
empty tensor: that raises a RuntimeError here instead of a silent wrong loss (a known failure of other fused losses).
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["FusedVocabPath", "KernelConfig", "default_config", "mlm_and_sample_triton"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings; the results do not depend on them (up to fp32 summation order).

    block_n: rows per program (the stacked tile has next_pow2(slots) * block_n rows).
    block_v, block_h: vocabulary and hidden tile. num_splits: vocabulary splits of the forward grid (None: enough
    programs to fill the GPU). grad_buffer_bytes: bound on the backward's [K, chunk, V] logit-gradient buffer.
    maxnreg: cap on registers per thread (PTX .maxnreg; None: the compiler's choice). A cap of 128, low enough for
    two 8-warp programs per SM, spilled and was slower on an H200 (BENCHMARKS.md).
    """

    block_n: int = 32
    block_v: int = 128
    block_h: int = 64
    num_splits: int | None = None
    grad_buffer_bytes: int = 512 * 2**20
    num_warps: int = 8
    num_stages: int = 3
    maxnreg: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}: {value} is not a power of two >= 16 (tl.dot needs one)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(num_heads: int, device: torch.device) -> KernelConfig:
    """Tiles for `device`: a 256 x 64 stacked tile on a GPU; few, large tiles under the interpreter (fewer steps).

    On an H200, 256 x 64 took under a third of the time of 128 x 128 (which spilled registers); the best tile that
    `python -m amos_kernels.bench_tiles` found was 7% faster still (BENCHMARKS.md).
    """
    slots = triton.next_power_of_2(num_heads + 1)
    if device.type != "cuda":
        return KernelConfig(block_n=16, block_v=64, block_h=64, num_splits=1)
    return KernelConfig(block_n=max(16, 256 // slots), block_v=64)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _stacked_tile(x_ptr, e_ptr, b_ptr, slot, rows, cols, n_rows, hidden, vocab, stride_xs, stride_xn, stride_ev,
                  NUM_HEADS: tl.constexpr, NUM_LOADED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32: row m is x[slot[m], rows[m]] @ e[cols]^T, plus bias on head slots (slot < NUM_HEADS).

    Padding slots (slot >= NUM_LOADED), rows >= n_rows and columns >= vocab load zeros.
    """
    row_ok = (slot < NUM_LOADED) & (rows < n_rows)
    col_ok = cols < vocab
    x_rows = x_ptr + slot.to(tl.int64) * stride_xs + rows.to(tl.int64) * stride_xn
    e_cols = e_ptr + cols.to(tl.int64) * stride_ev
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < hidden
        x = tl.load(x_rows[:, None] + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        e_t = tl.load(e_cols[None, :] + hs[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            e_t = e_t.to(tl.float32)
        acc = tl.dot(x, e_t, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return acc + tl.where(slot[:, None] < NUM_HEADS, bias[None, :], 0.0)


@triton.jit
def _gumbel(seed, rows, first_col, vocab, BLOCK_V: tl.constexpr):
    """Gumbel(0, 1) noise [rows, BLOCK_V] for columns first_col + arange(BLOCK_V) (first_col a multiple of 4).

    Column v takes word v % 4 of tl.randint4x(seed, row * cdiv(vocab, 4) + v // 4) (an int64 counter): one Philox
    call per four columns. The words are interleaved with two joins and a reshape.
    """
    quads = first_col // 4 + tl.arange(0, BLOCK_V // 4)
    offsets = rows.to(tl.int64)[:, None] * tl.cdiv(vocab, 4) + quads.to(tl.int64)[None, :]
    word0, word1, word2, word3 = tl.randint4x(seed, offsets)
    words = tl.reshape(tl.join(tl.join(word0, word2), tl.join(word1, word3)), (rows.shape[0], BLOCK_V))
    return -tl.log(-tl.log(tl.uint_to_uniform_float(words)))


@triton.jit
def _slot_sum(tile, weight, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum over slots of weight[m] * tile[m, :] for the stacked [NUM_SLOTS * BLOCK_N, BLOCK_V] tile -> [BLOCK_N, V]."""
    return tl.sum(tl.reshape(tile * weight[:, None], (NUM_SLOTS, BLOCK_N, BLOCK_V)), axis=0)


@triton.jit
def _slot_broadcast(values, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_N, BLOCK_V] -> [NUM_SLOTS * BLOCK_N, BLOCK_V]: the same row values for every slot."""
    stacked = tl.broadcast_to(values[None, :, :], (NUM_SLOTS, BLOCK_N, BLOCK_V))
    return tl.reshape(stacked, (NUM_SLOTS * BLOCK_N, BLOCK_V))


@triton.jit
def _forward_kernel(x_ptr, e_ptr, b_ptr, gamma_ptr, target_ptr,
                    head_max_ptr, head_sum_ptr, target_logit_ptr, best_val_ptr, best_id_ptr, soft_max_ptr,
                    soft_sum_ptr,
                    n_rows, hidden, vocab, cols_per_split, seed, inv_tau, stride_xs, stride_xn, stride_ev,
                    NUM_HEADS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online statistics of one row block over one vocabulary split (see the module docstring).

    Writes, at [split, head, row]: running max, running sum of exp(logit - max), target logit (0 when the target
    lies in another split); at [split, row]: best mixed + g and its id, max and sum of exp of (mixed + g) / tau.
    """
    BLOCK_M: tl.constexpr = NUM_SLOTS * BLOCK_N
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    slot = m // BLOCK_N
    rows_m = row_block * BLOCK_N + m % BLOCK_N
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    head_ok = (slot < NUM_HEADS) & (rows_m < n_rows)
    target_m = tl.load(target_ptr + rows_m, mask=rows_m < n_rows, other=-1)
    gamma_m = tl.load(gamma_ptr + rows_m * NUM_HEADS + slot, mask=head_ok, other=0.0)

    head_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    head_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best_val = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_id = tl.zeros((BLOCK_N,), dtype=tl.int64)
    soft_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    soft_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        logits = _stacked_tile(x_ptr, e_ptr, b_ptr, slot, rows_m, cols, n_rows, hidden, vocab, stride_xs, stride_xn,
                               stride_ev, NUM_HEADS, NUM_HEADS, BLOCK_M, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        # Per-head online softmax: rescale the running sum to the new running max.
        masked = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(head_max, tl.max(masked, axis=1))
        head_sum = head_sum * tl.exp(head_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), axis=1)
        head_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == target_m[:, None], logits, 0.0), axis=1)
        # Mixed logits, Gumbel-max sample and the online normaliser of y = softmax((mixed + g) / tau).
        mixed = _slot_sum(logits, gamma_m, NUM_SLOTS, BLOCK_N, BLOCK_V)
        perturbed = tl.where(col_ok[None, :], mixed + _gumbel(seed, rows, v0, vocab, BLOCK_V), float("-inf"))
        tile_best = tl.max(perturbed, axis=1)
        tile_id = tl.argmax(perturbed, axis=1).to(tl.int64) + v0
        better = tile_best > best_val
        best_id = tl.where(better, tile_id, best_id)
        best_val = tl.where(better, tile_best, best_val)
        scaled = perturbed * inv_tau
        new_soft_max = tl.maximum(soft_max, tl.max(scaled, axis=1))
        soft_sum = soft_sum * tl.exp(soft_max - new_soft_max) + tl.sum(tl.exp(scaled - new_soft_max[:, None]), axis=1)
        soft_max = new_soft_max

    head_at = (split * NUM_HEADS + slot) * n_rows + rows_m
    tl.store(head_max_ptr + head_at, head_max, mask=head_ok)
    tl.store(head_sum_ptr + head_at, head_sum, mask=head_ok)
    tl.store(target_logit_ptr + head_at, target_logit, mask=head_ok)
    row_at = split * n_rows + rows
    row_ok = rows < n_rows
    tl.store(best_val_ptr + row_at, best_val, mask=row_ok)
    tl.store(best_id_ptr + row_at, best_id, mask=row_ok)
    tl.store(soft_max_ptr + row_at, soft_max, mask=row_ok)
    tl.store(soft_sum_ptr + row_at, soft_sum, mask=row_ok)


@triton.jit
def _backward_kernel(x_ptr, e_ptr, b_ptr, gamma_ptr, target_ptr, head_lse_ptr, soft_lse_ptr, center_ptr,
                     loss_scale_ptr, soft_dot_ptr, grad_logits_ptr, part_a_ptr, part_b_ptr, part_s_ptr,
                     row_start, row_end, buffer_rows, n_rows, hidden, vocab, seed, inv_tau, mixed_scale,
                     adv_logit_scale, stride_xs, stride_xn, stride_ev,
                     NUM_HEADS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     STATS_ONLY: tl.constexpr, ADV: tl.constexpr):
    """One (row block, vocabulary tile) of the backward for rows [row_start, row_end) (see the module docstring).

    x is the stack [K + 1, N, H] of head_states and grad_sampled. With c the per-(slot, row) shift (the value at the
    sampled id), l' = l - c and gy' = gy - c_gy, it writes partial sums over this tile at [tile, slot, row - start]
    (buffers hold buffer_rows rows):
    A = sum y gy' l', B = sum y l' and at [tile, row - start]: S = sum y gy'. Unless STATS_ONLY, it writes
    d logits = (softmax - onehot) * loss_scale[k] (+ adv_logit_scale * gamma_k * y (gy' - S) * mixed_scale when ADV,
    S being read from soft_dot) into grad_logits[k, row - start, v]. STATS_ONLY writes S alone (ADV's first pass).
    """
    BLOCK_M: tl.constexpr = NUM_SLOTS * BLOCK_N
    row_block = tl.program_id(0)
    tile = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    slot = m // BLOCK_N
    rows_m = row_start + row_block * BLOCK_N + m % BLOCK_N
    rows = row_start + row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    head_ok = (slot < NUM_HEADS) & (rows_m < row_end)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab

    tile_vals = _stacked_tile(x_ptr, e_ptr, b_ptr, slot, rows_m, cols, row_end, hidden, vocab, stride_xs, stride_xn,
                              stride_ev, NUM_HEADS, NUM_HEADS + 1, BLOCK_M, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
    gamma_m = tl.load(gamma_ptr + rows_m * NUM_HEADS + slot, mask=head_ok, other=0.0)
    mixed = _slot_sum(tile_vals, gamma_m, NUM_SLOTS, BLOCK_N, BLOCK_V)
    center = tl.load(center_ptr + slot * n_rows + rows_m, mask=(slot <= NUM_HEADS) & (rows_m < row_end), other=0.0)
    shifted = tile_vals - center[:, None]
    grad_soft = _slot_sum(shifted, (slot == NUM_HEADS).to(tl.float32), NUM_SLOTS, BLOCK_N, BLOCK_V)  # gy'
    soft_lse = tl.load(soft_lse_ptr + rows, mask=row_ok, other=0.0)
    soft = tl.exp((mixed + _gumbel(seed, rows, tile * BLOCK_V, vocab, BLOCK_V)) * inv_tau - soft_lse[:, None])
    soft = tl.where(row_ok[:, None] & col_ok[None, :], soft, 0.0)  # y
    soft_grad = soft * grad_soft
    tl.store(part_s_ptr + tile * buffer_rows + rows - row_start, tl.sum(soft_grad, axis=1), mask=row_ok)

    if not STATS_ONLY:
        part_at = (tile * NUM_HEADS + slot) * buffer_rows + rows_m - row_start
        part_a = tl.sum(shifted * _slot_broadcast(soft_grad, NUM_SLOTS, BLOCK_N, BLOCK_V), axis=1)
        part_b = tl.sum(shifted * _slot_broadcast(soft, NUM_SLOTS, BLOCK_N, BLOCK_V), axis=1)
        tl.store(part_a_ptr + part_at, part_a, mask=head_ok)
        tl.store(part_b_ptr + part_at, part_b, mask=head_ok)
        # Cross-entropy gradient of each head.
        head_lse = tl.load(head_lse_ptr + slot * n_rows + rows_m, mask=head_ok, other=0.0)
        target_m = tl.load(target_ptr + rows_m, mask=rows_m < row_end, other=-1)
        loss_scale = tl.load(loss_scale_ptr + slot, mask=slot < NUM_HEADS, other=0.0)
        prob = tl.exp(tile_vals - head_lse[:, None])
        grad = (prob - tl.where(cols[None, :] == target_m[:, None], 1.0, 0.0)) * loss_scale[:, None]
        if ADV:
            # "+adv MLM": the heads also receive adv_logit_scale * gamma_k * d mixed.
            soft_dot = tl.load(soft_dot_ptr + rows, mask=row_ok, other=0.0)
            grad_mixed = soft * (grad_soft - soft_dot[:, None]) * mixed_scale
            grad += adv_logit_scale * gamma_m[:, None] * _slot_broadcast(grad_mixed, NUM_SLOTS, BLOCK_N, BLOCK_V)
        out = grad_logits_ptr + (slot.to(tl.int64) * buffer_rows + rows_m - row_start)[:, None] * vocab + cols[None, :]
        tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=head_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------


def _launch_settings(dtype: torch.dtype, config: KernelConfig) -> dict:
    """Constexprs and launch options shared by both kernels (fp32 tiles: at most 2 pipeline stages of shared memory).

    "tf32" is Triton's default precision and has no effect on 16-bit operands.
    """
    fp32 = dtype == torch.float32
    settings = dict(BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h, UPCAST=_interpreting(),
                    PRECISION="ieee" if fp32 else "tf32", num_warps=config.num_warps,
                    num_stages=min(config.num_stages, 2) if fp32 else config.num_stages)
    if config.maxnreg is not None and not _interpreting():
        settings["maxnreg"] = config.maxnreg
    return settings


def _num_splits(config: KernelConfig, device: torch.device, row_blocks: int, vocab_tiles: int) -> int:
    """Vocabulary splits of the forward grid: the configured number, or enough for two programs per SM."""
    if config.num_splits is not None:
        return max(1, min(config.num_splits, vocab_tiles))
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_tiles, triton.cdiv(programs, row_blocks)))


def _merge_logsumexp(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """log(sum_s sums[s] * exp(maxes[s])) over the leading (split) axis."""
    top = maxes.max(dim=0).values
    return top + torch.log((sums * torch.exp(maxes - top)).sum(dim=0))


def _forward(head_states: torch.Tensor, gamma: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
             targets: torch.Tensor, tau: float, seed: int, config: KernelConfig,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head_losses[K], sampled_ids[N], head_lse[K, N], soft_lse[N]) from one launch and a split merge."""
    num_heads, num_rows, hidden = head_states.shape
    vocab = embedding.shape[0]
    row_blocks = triton.cdiv(num_rows, config.block_n)
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    splits = _num_splits(config, head_states.device, row_blocks, vocab_tiles)
    cols_per_split = triton.cdiv(vocab_tiles, splits) * config.block_v
    splits = triton.cdiv(vocab, cols_per_split)
    stats = torch.empty(3, splits, num_heads, num_rows, dtype=torch.float32, device=head_states.device)
    row_stats = torch.empty(3, splits, num_rows, dtype=torch.float32, device=head_states.device)
    best_id = torch.empty(splits, num_rows, dtype=torch.int64, device=head_states.device)
    _forward_kernel[(row_blocks, splits)](
        head_states, embedding, bias, gamma, targets, stats[0], stats[1], stats[2], row_stats[0], best_id,
        row_stats[1], row_stats[2], num_rows, hidden, vocab, cols_per_split, seed, 1.0 / tau,
        head_states.stride(0), head_states.stride(1), embedding.stride(0),
        NUM_HEADS=num_heads, NUM_SLOTS=triton.next_power_of_2(num_heads), **_launch_settings(embedding.dtype, config))
    head_lse = _merge_logsumexp(stats[0], stats[1])
    head_losses = (head_lse - stats[2].sum(dim=0)).mean(dim=1)
    winner = row_stats[0].argmax(dim=0, keepdim=True)  # first maximum: the lowest split, hence the lowest id
    sampled_ids = best_id.gather(0, winner).squeeze(0)
    soft_lse = _merge_logsumexp(row_stats[1], row_stats[2])
    return head_losses, sampled_ids, head_lse, soft_lse


def _backward(head_states: torch.Tensor, gamma: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
              targets: torch.Tensor, sampled_ids: torch.Tensor, head_lse: torch.Tensor, soft_lse: torch.Tensor,
              grad_losses: torch.Tensor, grad_sampled: torch.Tensor, tau: float, seed: int, grad_scale: float,
              adv_logit_scale: float, config: KernelConfig,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_head_states, grad_gamma[N, K] float32, grad_embedding, grad_bias), chunk by chunk of rows."""
    num_heads, num_rows, hidden = head_states.shape
    vocab = embedding.shape[0]
    device = head_states.device
    stack = torch.cat([head_states, grad_sampled.to(head_states.dtype).unsqueeze(0)])
    # Per-row shifts (values at the sampled id) that keep A - S * B accurate; any constant per row is exact.
    picked = embedding[sampled_ids]
    center = torch.cat([torch.einsum("knh,nh->kn", head_states, picked).float() + bias[sampled_ids].float(),
                        torch.einsum("nh,nh->n", stack[num_heads], picked).float().unsqueeze(0)]).contiguous()
    loss_scale = (grad_losses.float() / num_rows).contiguous()
    mixed_scale = grad_scale / tau
    adv = adv_logit_scale != 0.0
    row_bytes = num_heads * vocab * embedding.element_size()
    chunk = min(num_rows, max(config.block_n, config.grad_buffer_bytes // row_bytes // config.block_n * config.block_n))
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    grad_logits = torch.empty(num_heads, chunk, vocab, dtype=embedding.dtype, device=device)
    part_ab = torch.empty(2, vocab_tiles, num_heads, chunk, dtype=torch.float32, device=device)
    part_s = torch.empty(vocab_tiles, chunk, dtype=torch.float32, device=device)
    grad_states = torch.empty_like(head_states)
    grad_embedding = torch.zeros(embedding.shape, dtype=torch.float32, device=device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device)
    soft_dot = torch.empty(num_rows, dtype=torch.float32, device=device)
    sums_ab = torch.empty(2, num_heads, num_rows, dtype=torch.float32, device=device)
    settings = _launch_settings(embedding.dtype, config)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        grid = (triton.cdiv(end - start, config.block_n), vocab_tiles)
        args = (stack, embedding, bias, gamma, targets, head_lse, soft_lse, center, loss_scale, soft_dot, grad_logits,
                part_ab[0], part_ab[1], part_s, start, end, chunk, num_rows, hidden, vocab, seed, 1.0 / tau,
                mixed_scale, adv_logit_scale, stack.stride(0), stack.stride(1), embedding.stride(0))
        constexprs = dict(NUM_HEADS=num_heads, NUM_SLOTS=triton.next_power_of_2(num_heads + 1), ADV=adv, **settings)
        if adv:  # first pass: S, which every d mixed needs
            _backward_kernel[grid](*args, STATS_ONLY=True, **constexprs)
            soft_dot[start:end] = part_s[:, :end - start].sum(dim=0)
        _backward_kernel[grid](*args, STATS_ONLY=False, **constexprs)
        if not adv:
            soft_dot[start:end] = part_s[:, :end - start].sum(dim=0)
        sums_ab[:, :, start:end] = part_ab[:, :, :, :end - start].sum(dim=1)
        chunk_grad = grad_logits[:, :end - start]
        grad_states[:, start:end] = chunk_grad @ embedding
        rows_states = head_states[:, start:end].reshape(-1, hidden)
        grad_embedding += (chunk_grad.reshape(-1, vocab).t() @ rows_states).float()
        grad_bias += chunk_grad.sum(dim=(0, 1), dtype=torch.float32)
    grad_embedding.index_add_(0, sampled_ids, grad_sampled.float())
    # d gamma_k = grad_scale / tau * sum_v y (gy - S) l_k = grad_scale / tau * (A_k - S * B_k).
    grad_gamma = mixed_scale * (sums_ab[0] - soft_dot * sums_ab[1]).t()
    return grad_states, grad_gamma, grad_embedding.to(embedding.dtype), grad_bias.to(bias.dtype)


class _VocabPathFunction(torch.autograd.Function):
    """Autograd glue: the forward keeps O(N x K) statistics, the backward recomputes tiles (module docstring)."""

    @staticmethod
    def forward(ctx, head_states, mix_logits, embedding, bias, targets, tau, seed, grad_scale, adv_logit_scale,
                config):
        gamma = torch.softmax(mix_logits.float(), dim=-1).contiguous()
        head_losses, sampled_ids, head_lse, soft_lse = _forward(head_states, gamma, embedding, bias, targets, tau,
                                                                seed, config)
        ctx.save_for_backward(head_states, gamma, embedding, bias, targets, sampled_ids, head_lse, soft_lse)
        ctx.settings = (tau, seed, grad_scale, adv_logit_scale, config, mix_logits.dtype)
        ctx.mark_non_differentiable(sampled_ids)
        return head_losses, sampled_ids, embedding[sampled_ids]

    @staticmethod
    def backward(ctx, grad_losses, _grad_ids, grad_sampled):
        head_states, gamma, embedding, bias, targets, sampled_ids, head_lse, soft_lse = ctx.saved_tensors
        tau, seed, grad_scale, adv_logit_scale, config, mix_dtype = ctx.settings
        grad_states, grad_gamma, grad_embedding, grad_bias = _backward(
            head_states, gamma, embedding, bias, targets, sampled_ids, head_lse, soft_lse, grad_losses,
            grad_sampled.contiguous(), tau, seed, grad_scale, adv_logit_scale, config)
        grad_mix_logits = gamma * (grad_gamma - (gamma * grad_gamma).sum(dim=-1, keepdim=True))
        return (grad_states, grad_mix_logits.to(mix_dtype), grad_embedding, grad_bias, None, None, None, None, None,
                None)


def _check_inputs(head_states: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
                  targets: torch.Tensor) -> None:
    if embedding.numel() == 0:
        raise RuntimeError(
            "mlm_and_sample_triton: the embedding matrix is empty. Under DeepSpeed ZeRO-3 a partitioned parameter "
            "looks like this: call the op inside the forward of the module that owns the embedding, register it with "
            "deepspeed.zero.register_external_parameter(module, embedding), or wrap the call in "
            "deepspeed.zero.GatheredParameters(embedding).")
    num_heads, num_rows, hidden = head_states.shape
    if mix_logits.shape != (num_rows, num_heads) or embedding.dim() != 2 or embedding.shape[1] != hidden \
            or bias.shape != embedding.shape[:1] or targets.shape != (num_rows,):
        raise ValueError(f"mlm_and_sample_triton: inconsistent shapes head_states {tuple(head_states.shape)}, "
                         f"mix_logits {tuple(mix_logits.shape)}, embedding {tuple(embedding.shape)}, bias "
                         f"{tuple(bias.shape)}, targets {tuple(targets.shape)}")
    if head_states.dtype != embedding.dtype:
        raise ValueError(f"mlm_and_sample_triton: head_states is {head_states.dtype}, embedding {embedding.dtype}")
    if head_states.device.type != "cuda" and not _interpreting():
        raise RuntimeError("mlm_and_sample_triton: CPU tensors need TRITON_INTERPRET=1 (set before importing triton)")


def mlm_and_sample_triton(head_states: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor,
                          bias: torch.Tensor, targets: torch.Tensor, tau: float, seed: int, grad_scale: float = -1.0,
                          adv_logit_scale: float = 0.0, config: KernelConfig | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head MLM losses and the mixed straight-through Gumbel-Softmax sample, fused (see the module docstring).

    Under autocast the matmul operands are cast to the autocast dtype, as F.linear would be (the casts are
    differentiable, so fp32 parameters still get fp32 gradients).
    """
    device_type = head_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        head_states, embedding, bias = head_states.to(dtype), embedding.to(dtype), bias.to(dtype)
    _check_inputs(head_states, mix_logits, embedding, bias, targets)
    if config is None:
        config = default_config(head_states.shape[0], head_states.device)
    return _VocabPathFunction.apply(head_states.contiguous(), mix_logits, embedding.contiguous(), bias.contiguous(),
                                    targets.contiguous(), float(tau), int(seed), float(grad_scale),
                                    float(adv_logit_scale), config)


class FusedVocabPath(torch.nn.Module):
    """Thin module around `mlm_and_sample_triton` holding the sampling settings.

    The embedding and bias are arguments, not parameters: the model owns them (the embedding is tied to the input
    embedding). Under ZeRO-3 the embedding must be gathered when this runs: see the module docstring.
    """

    def __init__(self, tau: float = 0.3, grad_scale: float = -1.0, adv_logit_scale: float = 0.0,
                 config: KernelConfig | None = None):
        super().__init__()
        self.tau = tau
        self.grad_scale = grad_scale
        self.adv_logit_scale = adv_logit_scale
        self.config = config

    def forward(self, head_states: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor,
                bias: torch.Tensor, targets: torch.Tensor, seed: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mlm_and_sample_triton(head_states, mix_logits, embedding, bias, targets, self.tau, seed,
                                     self.grad_scale, self.adv_logit_scale, self.config)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, grad_scale={self.grad_scale}, adv_logit_scale={self.adv_logit_scale}"
