"""Layout "chunked_logits" of the fused vocabulary path: cuBLAS writes a chunk's logits, one Triton pass reads them.

The layout of Liger-Kernel's fused linear cross-entropy and of Cut Cross-Entropy's backward, for the K heads, the
mixture and the sample. In `stacked_slots` every program runs its tensor-core matmul and then the long per-tile
arithmetic (online softmaxes, target pick, mixture, Philox noise, argmax, normaliser) one after the other. Here
cuBLAS does the matmuls at its own rate and the arithmetic runs in a separate pass that holds no matmul registers,
at the cost of writing and reading a bounded buffer of logits. Which layout is faster is for a GPU to measure
(`python -m amos_kernels.bench` times both); none has run this one yet.

The rows go in chunks sized so that a [K + 1, chunk, V] buffer in the operands' dtype stays within
`KernelConfig.buffer_bytes`. Forward and backward use the same chunks and the same cuBLAS call per chunk
(`_head_logits`), so the backward recomputes exactly the forward's logits.

Forward, per chunk: `torch.addmm` writes the chunk's [K, chunk, V] logits, bias included (one call over the K heads'
rows). Then `_forward_kernel` (one program per BLOCK_N rows, walking the whole vocabulary) reads them as stacked
tiles (`tile_math`: slot-major rows, the K heads padded to a power of two) and folds each tile into the running
statistics: each head's log-sum-exp and target logit, the Gumbel-max sample of the gamma-mixed logits (noise from
the same Philox stream, generated once per (row, id) for all heads; ties to the lower id) and the normaliser of
y = softmax((mixed + g) / tau). Only these O(N x K) statistics are kept: a program owns whole rows, so there is no
merge step.

Backward, per chunk: cuBLAS recomputes the head logits into slots 0..K-1 of the buffer and gy = grad_sampled @ E^T
into slot K (two calls: the bias goes to the heads only). Then `_backward_kernel`, one program per BLOCK_N rows over
the whole vocabulary, writes d logits in place over the head slots (operand dtype) and keeps, in registers, the row
sums A_k, B_k and S that give d gamma exactly (shifted by the values at the sampled id: the derivation is in the
`vocab_path` docstring), then stores them once per row: no atomics, no partial sums, deterministic. Only
adv_logit_scale != 0 needs S before the first d logit, so then the program first walks the row once for S alone.
cuBLAS then does grad_head_states = dlogits @ E and grad_embedding += dlogits^T @ head_states (`vocab_path`).

Precision: the logits and gy are rounded to the operands' dtype in the buffer, as F.linear rounds its output (so in
bf16 this layout matches the reference run in bf16, where `stacked_slots` keeps fp32 logits); all the arithmetic on
them is fp32. The Triton pass has no tl.dot, so the interpreter runs it as it is (bf16 loads are converted to fp32).
"""

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from . import tile_math
from .config import KernelConfig


@triton.jit
def _buffer_tile(buffer_ptr, slot, local_rows, cols, chunk_rows, vocab, NUM_LOADED: tl.constexpr):
    """(fp32 stacked tile, its offsets, its mask) in a [slots, chunk_rows, vocab] buffer.

    Padding slots (slot >= NUM_LOADED), rows past the chunk and ids >= vocab read zeros.
    """
    mask = ((slot < NUM_LOADED) & (local_rows < chunk_rows))[:, None] & (cols < vocab)[None, :]
    offsets = (slot.to(tl.int64) * chunk_rows + local_rows)[:, None] * vocab + cols[None, :]
    return tl.load(buffer_ptr + offsets, mask=mask, other=0.0).to(tl.float32), offsets, mask


@triton.jit
def _program_rows(NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(slot, chunk row) of each stacked tile row and the BLOCK_N chunk rows of this program."""
    m = tl.arange(0, NUM_SLOTS * BLOCK_N)
    first = tl.program_id(0) * BLOCK_N
    return m // BLOCK_N, first + m % BLOCK_N, first + tl.arange(0, BLOCK_N)


@triton.jit
def _forward_kernel(logits_ptr, gamma_ptr, target_ptr, head_lse_ptr, target_logit_ptr, sampled_ptr, soft_lse_ptr,
                    row_start, chunk_rows, n_rows, vocab, seed, inv_tau,
                    NUM_HEADS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Statistics of BLOCK_N rows of the chunk [row_start, row_start + chunk_rows) over the whole vocabulary.

    Reads the [K, chunk_rows, V] logits; writes head_lse and target_logit at [head, row], the sampled id and the
    log-normaliser of y at [row].
    """
    BLOCK_M: tl.constexpr = NUM_SLOTS * BLOCK_N
    slot, local_m, local = _program_rows(NUM_SLOTS, BLOCK_N)
    rows_m = row_start + local_m
    rows = row_start + local
    head_ok = (slot < NUM_HEADS) & (local_m < chunk_rows)
    target_m = tl.load(target_ptr + rows_m, mask=local_m < chunk_rows, other=-1)
    gamma_m = tl.load(gamma_ptr + rows_m * NUM_HEADS + slot, mask=head_ok, other=0.0)
    head_max, head_sum, target_logit, best_val, best_id, soft_max, soft_sum = (
        tile_math.initial_forward_statistics(BLOCK_M, BLOCK_N))
    for v0 in range(0, vocab, BLOCK_V):
        logits, _, _ = _buffer_tile(logits_ptr, slot, local_m, v0 + tl.arange(0, BLOCK_V), chunk_rows, vocab,
                                    NUM_HEADS)
        head_max, head_sum, target_logit, best_val, best_id, soft_max, soft_sum = tile_math.fold_forward_tile(
            logits, v0, vocab, rows, target_m, gamma_m, seed, inv_tau, head_max, head_sum, target_logit, best_val,
            best_id, soft_max, soft_sum, NUM_SLOTS, BLOCK_N, BLOCK_V)

    head_at = slot * n_rows + rows_m
    tl.store(head_lse_ptr + head_at, head_max + tl.log(head_sum), mask=head_ok)
    tl.store(target_logit_ptr + head_at, target_logit, mask=head_ok)
    row_ok = local < chunk_rows
    tl.store(sampled_ptr + rows, best_id, mask=row_ok)
    tl.store(soft_lse_ptr + rows, soft_max + tl.log(soft_sum), mask=row_ok)


@triton.jit
def _backward_kernel(buffer_ptr, gamma_ptr, target_ptr, head_lse_ptr, soft_lse_ptr, center_ptr, loss_scale_ptr,
                     soft_dot_ptr, sum_a_ptr, sum_b_ptr, row_start, chunk_rows, n_rows, vocab, seed, inv_tau,
                     mixed_scale, adv_logit_scale,
                     NUM_HEADS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     ADV: tl.constexpr):
    """The backward of BLOCK_N rows of the chunk over the whole vocabulary (see the module docstring).

    buffer is [K + 1, chunk_rows, V]: the head logits, then gy. Overwrites the head slots with d logits =
    (softmax - onehot) * loss_scale[k] (+ adv_logit_scale * gamma_k * d mixed when ADV) and writes S = sum y gy' at
    soft_dot[row], A = sum y gy' l' and B = sum y l' at [head, row].
    """
    BLOCK_M: tl.constexpr = NUM_SLOTS * BLOCK_N
    slot, local_m, local = _program_rows(NUM_SLOTS, BLOCK_N)
    rows_m = row_start + local_m
    rows = row_start + local
    row_ok = local < chunk_rows
    head_ok = (slot < NUM_HEADS) & (local_m < chunk_rows)
    gamma_m = tl.load(gamma_ptr + rows_m * NUM_HEADS + slot, mask=head_ok, other=0.0)
    center = tl.load(center_ptr + slot * n_rows + rows_m, mask=(slot <= NUM_HEADS) & (local_m < chunk_rows),
                     other=0.0)
    soft_lse = tl.load(soft_lse_ptr + rows, mask=row_ok, other=0.0)
    head_lse = tl.load(head_lse_ptr + slot * n_rows + rows_m, mask=head_ok, other=0.0)
    target_m = tl.load(target_ptr + rows_m, mask=local_m < chunk_rows, other=-1)
    loss_scale = tl.load(loss_scale_ptr + slot, mask=slot < NUM_HEADS, other=0.0)

    soft_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if ADV:  # first walk over the row: S, which every d mixed needs
        for v0 in range(0, vocab, BLOCK_V):
            tile_vals, _, _ = _buffer_tile(buffer_ptr, slot, local_m, v0 + tl.arange(0, BLOCK_V), chunk_rows, vocab,
                                           NUM_HEADS + 1)
            _, grad_soft, soft = tile_math.soft_sample_tile(tile_vals, slot, gamma_m, center, rows, row_ok, v0, vocab,
                                                            soft_lse, seed, inv_tau, NUM_HEADS, NUM_SLOTS, BLOCK_N,
                                                            BLOCK_V)
            soft_dot += tl.sum(soft * grad_soft, axis=1)

    sum_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        tile_vals, offsets, mask = _buffer_tile(buffer_ptr, slot, local_m, v0 + tl.arange(0, BLOCK_V), chunk_rows,
                                                vocab, NUM_HEADS + 1)
        shifted, grad_soft, soft = tile_math.soft_sample_tile(tile_vals, slot, gamma_m, center, rows, row_ok, v0,
                                                              vocab, soft_lse, seed, inv_tau, NUM_HEADS, NUM_SLOTS,
                                                              BLOCK_N, BLOCK_V)
        soft_grad = soft * grad_soft
        sum_s += tl.sum(soft_grad, axis=1)
        part_a, part_b = tile_math.mixture_sums(shifted, soft, soft_grad, NUM_SLOTS, BLOCK_N, BLOCK_V)
        sum_a += part_a
        sum_b += part_b
        grad = tile_math.head_logit_gradient(tile_vals, v0, target_m, head_lse, loss_scale, gamma_m, soft, grad_soft,
                                             soft_dot, mixed_scale, adv_logit_scale, ADV, NUM_SLOTS, BLOCK_N, BLOCK_V)
        tl.store(buffer_ptr + offsets, grad.to(buffer_ptr.dtype.element_ty), mask=mask & head_ok[:, None])

    tl.store(soft_dot_ptr + rows, sum_s, mask=row_ok)
    tl.store(sum_a_ptr + slot * n_rows + rows_m, sum_a, mask=head_ok)
    tl.store(sum_b_ptr + slot * n_rows + rows_m, sum_b, mask=head_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------


def _chunk_rows(num_heads: int, num_rows: int, vocab: int, element_size: int, config: KernelConfig) -> int:
    """Rows per chunk: the backward's [K + 1, chunk, V] buffer within buffer_bytes (the forward uses the same)."""
    return max(1, min(num_rows, config.buffer_bytes // ((num_heads + 1) * vocab * element_size)))


def _head_logits(head_states: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor, start: int, end: int,
                 out: torch.Tensor) -> None:
    """out[K * (end - start), V] = the K heads' logits of rows [start, end), bias included, in one cuBLAS call."""
    hidden = head_states.shape[2]
    torch.addmm(bias, head_states[:, start:end].reshape(-1, hidden), embedding.t(), out=out)


def _launch_settings(config: KernelConfig) -> dict:
    return dict(BLOCK_N=config.block_n, BLOCK_V=config.block_v, num_warps=config.num_warps,
                num_stages=config.num_stages)


def forward(head_states: torch.Tensor, gamma: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
            targets: torch.Tensor, tau: float, seed: int, config: KernelConfig,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head_lse[K, N], target_logit[K, N], sampled_ids[N], soft_lse[N]), chunk by chunk of rows."""
    num_heads, num_rows, _ = head_states.shape
    vocab = embedding.shape[0]
    device = head_states.device
    chunk = _chunk_rows(num_heads, num_rows, vocab, embedding.element_size(), config)
    buffer = torch.empty(num_heads * chunk * vocab, dtype=embedding.dtype, device=device)
    head_stats = torch.empty(2, num_heads, num_rows, dtype=torch.float32, device=device)
    sampled_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
    soft_lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        logits = buffer[:num_heads * (end - start) * vocab].view(num_heads * (end - start), vocab)
        _head_logits(head_states, embedding, bias, start, end, logits)
        _forward_kernel[(triton.cdiv(end - start, config.block_n),)](
            logits, gamma, targets, head_stats[0], head_stats[1], sampled_ids, soft_lse, start, end - start, num_rows,
            vocab, seed, 1.0 / tau, NUM_HEADS=num_heads, NUM_SLOTS=triton.next_power_of_2(num_heads),
            **_launch_settings(config))
    return head_stats[0], head_stats[1], sampled_ids, soft_lse


def logit_gradients(head_states: torch.Tensor, grad_sampled: torch.Tensor, gamma: torch.Tensor,
                    embedding: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, head_lse: torch.Tensor,
                    soft_lse: torch.Tensor, center: torch.Tensor, loss_scale: torch.Tensor, tau: float, seed: int,
                    mixed_scale: float, adv_logit_scale: float, config: KernelConfig, soft_dot: torch.Tensor,
                    sums_ab: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The backward's chunks (the contract is in `vocab_path._backward`): cuBLAS logits and gy, one Triton pass."""
    num_heads, num_rows, _ = head_states.shape
    vocab = embedding.shape[0]
    chunk = _chunk_rows(num_heads, num_rows, vocab, embedding.element_size(), config)
    buffer = torch.empty((num_heads + 1) * chunk * vocab, dtype=embedding.dtype, device=head_states.device)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        chunk_buffer = buffer[:(num_heads + 1) * (end - start) * vocab].view(num_heads + 1, end - start, vocab)
        _head_logits(head_states, embedding, bias, start, end, chunk_buffer[:num_heads].view(-1, vocab))
        torch.mm(grad_sampled[start:end], embedding.t(), out=chunk_buffer[num_heads])
        _backward_kernel[(triton.cdiv(end - start, config.block_n),)](
            chunk_buffer, gamma, targets, head_lse, soft_lse, center, loss_scale, soft_dot, sums_ab[0], sums_ab[1],
            start, end - start, num_rows, vocab, seed, 1.0 / tau, mixed_scale, adv_logit_scale,
            NUM_HEADS=num_heads, NUM_SLOTS=triton.next_power_of_2(num_heads + 1), ADV=adv_logit_scale != 0.0,
            **_launch_settings(config))
        yield start, end, chunk_buffer[:num_heads]
