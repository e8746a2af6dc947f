"""Layout "stacked_slots" of the fused vocabulary path: each Triton program computes its logit tiles with tl.dot.

A program owns BLOCK_N rows and stacks the rows of all its slots into one [BLOCK_M = SLOTS * BLOCK_N, H] operand,
slot-major: tile row m is slot m // BLOCK_N of row m % BLOCK_N. In the forward the slots are the K heads; in the
backward they are the K heads plus grad_sampled (so gy = grad_sampled @ E^T comes out of the same matmul as the
logits). SLOTS is K, or K + 1, rounded up to a power of two (unused slots load zeros): for the paper's K = 3 the
backward has no padding and the forward pads to 4. Each vocabulary tile is then one [BLOCK_M, BLOCK_H] x
[BLOCK_H, BLOCK_V] matmul loop over H with fp32 accumulation, the embedding tile is read once for all heads, and
the logits never leave registers. The price: each program runs the matmul, then the whole per-tile arithmetic of
`tile_math` one after the other, so on an H200 that arithmetic, not the matmul, sets the pace (BENCHMARKS.md);
`chunked_logits` is the other layout.

Forward (`_forward_kernel`, grid = row blocks x vocabulary splits). Each program walks its vocabulary range tile by
tile and folds each tile into the running statistics (`tile_math.fold_forward_tile`). Splits write partial
statistics [splits, ...] that a few O(splits x N x K) PyTorch ops merge (log-sum-exp merge, best of the bests).

Backward (`_backward_kernel` over chunks of rows). Per (row block, vocabulary tile) the kernel recomputes the stacked
tile, writes the head-logit gradients into a [K, chunk, V] buffer in the embedding's dtype and per-tile partial sums
of A, B, S (no atomics: the backward is deterministic) that PyTorch adds up. With adv_logit_scale != 0 a first,
statistics-only launch computes S, which every d mixed needs. The chunk bounds the buffer to
`KernelConfig.buffer_bytes`.

Precision: bf16/fp16 operands go to tl.dot as they are on a GPU (fp32 operands with input_precision="ieee", no
TF32), and are converted to fp32 after loading under TRITON_INTERPRET=1 (the interpreter gets bf16 wrong).
"""

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from . import tile_math
from .config import KernelConfig, interpreting


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

    head_max, head_sum, target_logit, best_val, best_id, soft_max, soft_sum = (
        tile_math.initial_forward_statistics(BLOCK_M, BLOCK_N))

    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logits = _stacked_tile(x_ptr, e_ptr, b_ptr, slot, rows_m, cols, n_rows, hidden, vocab, stride_xs, stride_xn,
                               stride_ev, NUM_HEADS, NUM_HEADS, BLOCK_M, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        head_max, head_sum, target_logit, best_val, best_id, soft_max, soft_sum = tile_math.fold_forward_tile(
            logits, v0, vocab, rows, target_m, gamma_m, seed, inv_tau, head_max, head_sum, target_logit, best_val,
            best_id, soft_max, soft_sum, NUM_SLOTS, BLOCK_N, BLOCK_V)

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
    v0 = tile * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab

    tile_vals = _stacked_tile(x_ptr, e_ptr, b_ptr, slot, rows_m, cols, row_end, hidden, vocab, stride_xs, stride_xn,
                              stride_ev, NUM_HEADS, NUM_HEADS + 1, BLOCK_M, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
    gamma_m = tl.load(gamma_ptr + rows_m * NUM_HEADS + slot, mask=head_ok, other=0.0)
    center = tl.load(center_ptr + slot * n_rows + rows_m, mask=(slot <= NUM_HEADS) & (rows_m < row_end), other=0.0)
    soft_lse = tl.load(soft_lse_ptr + rows, mask=row_ok, other=0.0)
    shifted, grad_soft, soft = tile_math.soft_sample_tile(tile_vals, slot, gamma_m, center, rows, row_ok, v0, vocab,
                                                          soft_lse, seed, inv_tau, NUM_HEADS, NUM_SLOTS, BLOCK_N,
                                                          BLOCK_V)
    soft_grad = soft * grad_soft
    tl.store(part_s_ptr + tile * buffer_rows + rows - row_start, tl.sum(soft_grad, axis=1), mask=row_ok)

    if not STATS_ONLY:
        part_at = (tile * NUM_HEADS + slot) * buffer_rows + rows_m - row_start
        part_a, part_b = tile_math.mixture_sums(shifted, soft, soft_grad, NUM_SLOTS, BLOCK_N, BLOCK_V)
        tl.store(part_a_ptr + part_at, part_a, mask=head_ok)
        tl.store(part_b_ptr + part_at, part_b, mask=head_ok)
        head_lse = tl.load(head_lse_ptr + slot * n_rows + rows_m, mask=head_ok, other=0.0)
        target_m = tl.load(target_ptr + rows_m, mask=rows_m < row_end, other=-1)
        loss_scale = tl.load(loss_scale_ptr + slot, mask=slot < NUM_HEADS, other=0.0)
        if ADV:
            soft_dot = tl.load(soft_dot_ptr + rows, mask=row_ok, other=0.0)
        else:
            soft_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)  # unused without ADV
        grad = tile_math.head_logit_gradient(tile_vals, v0, target_m, head_lse, loss_scale, gamma_m, soft, grad_soft,
                                             soft_dot, mixed_scale, adv_logit_scale, ADV, NUM_SLOTS, BLOCK_N, BLOCK_V)
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
    settings = dict(BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_H=config.block_h, UPCAST=interpreting(),
                    PRECISION="ieee" if fp32 else "tf32", num_warps=config.num_warps,
                    num_stages=min(config.num_stages, 2) if fp32 else config.num_stages)
    if config.maxnreg is not None and not interpreting():
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


def forward(head_states: torch.Tensor, gamma: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
            targets: torch.Tensor, tau: float, seed: int, config: KernelConfig,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head_lse[K, N], target_logit[K, N], sampled_ids[N], soft_lse[N]) from one launch and a split merge."""
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
    winner = row_stats[0].argmax(dim=0, keepdim=True)  # first maximum: the lowest split, hence the lowest id
    sampled_ids = best_id.gather(0, winner).squeeze(0)
    soft_lse = _merge_logsumexp(row_stats[1], row_stats[2])
    return head_lse, stats[2].sum(dim=0), sampled_ids, soft_lse


def logit_gradients(head_states: torch.Tensor, grad_sampled: torch.Tensor, gamma: torch.Tensor,
                    embedding: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, head_lse: torch.Tensor,
                    soft_lse: torch.Tensor, center: torch.Tensor, loss_scale: torch.Tensor, tau: float, seed: int,
                    mixed_scale: float, adv_logit_scale: float, config: KernelConfig, soft_dot: torch.Tensor,
                    sums_ab: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The backward's chunks (the contract is in `vocab_path._backward`): per-tile partial sums that PyTorch adds."""
    num_heads, num_rows, hidden = head_states.shape
    vocab = embedding.shape[0]
    device = head_states.device
    stack = torch.cat([head_states, grad_sampled.unsqueeze(0)])
    adv = adv_logit_scale != 0.0
    row_bytes = num_heads * vocab * embedding.element_size()
    chunk = min(num_rows, max(config.block_n, config.buffer_bytes // row_bytes // config.block_n * config.block_n))
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    grad_logits = torch.empty(num_heads, chunk, vocab, dtype=embedding.dtype, device=device)
    part_ab = torch.empty(2, vocab_tiles, num_heads, chunk, dtype=torch.float32, device=device)
    part_s = torch.empty(vocab_tiles, chunk, dtype=torch.float32, device=device)
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
        yield start, end, grad_logits[:, :end - start]
