"""Triton device functions that both layouts of the fused vocabulary path run on a stacked tile of logits.

A stacked tile is [NUM_SLOTS * BLOCK_N, BLOCK_V], slot-major: tile row m is slot m // BLOCK_N of row m % BLOCK_N,
over the vocabulary ids v0 + arange(BLOCK_V). Slots 0..K-1 are the K heads' logits (bias included); in the backward
slot K is gy = grad_sampled @ E^T; further slots (padding to a power of two) hold zeros. Where the tile comes from
is the layout's business (stacked_slots: tl.dot in registers; chunked_logits: a cuBLAS buffer); what is computed
from it is here, once, so the two layouts do the same arithmetic.
"""

import triton
import triton.language as tl


@triton.jit
def gumbel(seed, rows, first_col, vocab, BLOCK_V: tl.constexpr):
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
def slot_sum(tile, weight, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum over slots of weight[m] * tile[m, :] for the stacked [NUM_SLOTS * BLOCK_N, BLOCK_V] tile -> [BLOCK_N, V]."""
    return tl.sum(tl.reshape(tile * weight[:, None], (NUM_SLOTS, BLOCK_N, BLOCK_V)), axis=0)


@triton.jit
def slot_broadcast(values, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_N, BLOCK_V] -> [NUM_SLOTS * BLOCK_N, BLOCK_V]: the same row values for every slot."""
    stacked = tl.broadcast_to(values[None, :, :], (NUM_SLOTS, BLOCK_N, BLOCK_V))
    return tl.reshape(stacked, (NUM_SLOTS * BLOCK_N, BLOCK_V))


@triton.jit
def initial_forward_statistics(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The seven running statistics of `fold_forward_tile` before the first tile."""
    head_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    head_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best_val = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_id = tl.zeros((BLOCK_N,), dtype=tl.int64)
    soft_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    soft_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return head_max, head_sum, target_logit, best_val, best_id, soft_max, soft_sum


@triton.jit
def fold_forward_tile(logits, v0, vocab, rows, target_m, gamma_m, seed, inv_tau, head_max, head_sum, target_logit,
                      best_val, best_id, soft_max, soft_sum,
                      NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Folds a stacked tile of head logits (ids v0 + arange(BLOCK_V)) into the forward's running statistics.

    Per stacked row: running max, running sum of exp(logit - max) (online softmax) and the target logit. Per row:
    the running best of mixed + g and its id (Gumbel-max; ties go to the lower id, like torch.argmax) and the online
    max and sum of exp of (mixed + g) / tau, the normaliser of y. The noise is keyed by (seed, row, id) alone and
    generated once per (row, id) for all the heads. Returns the seven updated statistics.
    """
    cols = v0 + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    # Per-head online softmax: rescale the running sum to the new running max.
    masked = tl.where(col_ok[None, :], logits, float("-inf"))
    new_max = tl.maximum(head_max, tl.max(masked, axis=1))
    head_sum = head_sum * tl.exp(head_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), axis=1)
    head_max = new_max
    target_logit += tl.sum(tl.where(cols[None, :] == target_m[:, None], logits, 0.0), axis=1)
    # Mixed logits, Gumbel-max sample and the online normaliser of y = softmax((mixed + g) / tau).
    mixed = slot_sum(logits, gamma_m, NUM_SLOTS, BLOCK_N, BLOCK_V)
    perturbed = tl.where(col_ok[None, :], mixed + gumbel(seed, rows, v0, vocab, BLOCK_V), float("-inf"))
    tile_best = tl.max(perturbed, axis=1)
    tile_id = tl.argmax(perturbed, axis=1).to(tl.int64) + v0
    better = tile_best > best_val
    best_id = tl.where(better, tile_id, best_id)
    best_val = tl.where(better, tile_best, best_val)
    scaled = perturbed * inv_tau
    new_soft_max = tl.maximum(soft_max, tl.max(scaled, axis=1))
    soft_sum = soft_sum * tl.exp(soft_max - new_soft_max) + tl.sum(tl.exp(scaled - new_soft_max[:, None]), axis=1)
    soft_max = new_soft_max
    return head_max, head_sum, target_logit, best_val, best_id, soft_max, soft_sum


@triton.jit
def soft_sample_tile(tile_vals, slot, gamma_m, center, rows, row_ok, v0, vocab, soft_lse, seed, inv_tau,
                     NUM_HEADS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(shifted, grad_soft, soft) of a backward stacked tile (heads, then gy in slot NUM_HEADS).

    shifted = tile - center (each slot's value at the sampled id, per row), grad_soft = gy' = gy - c_gy [BLOCK_N, V],
    soft = y = softmax((mixed + g) / tau) from the forward's normaliser soft_lse, zero outside the rows and the
    vocabulary.
    """
    cols = v0 + tl.arange(0, BLOCK_V)
    mixed = slot_sum(tile_vals, gamma_m, NUM_SLOTS, BLOCK_N, BLOCK_V)
    shifted = tile_vals - center[:, None]
    grad_soft = slot_sum(shifted, (slot == NUM_HEADS).to(tl.float32), NUM_SLOTS, BLOCK_N, BLOCK_V)
    soft = tl.exp((mixed + gumbel(seed, rows, v0, vocab, BLOCK_V)) * inv_tau - soft_lse[:, None])
    soft = tl.where(row_ok[:, None] & (cols < vocab)[None, :], soft, 0.0)
    return shifted, grad_soft, soft


@triton.jit
def mixture_sums(shifted, soft, soft_grad, NUM_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per stacked row, this tile's A = sum y gy' l' and B = sum y l' (soft_grad = y gy'): d gamma = A - S B."""
    part_a = tl.sum(shifted * slot_broadcast(soft_grad, NUM_SLOTS, BLOCK_N, BLOCK_V), axis=1)
    part_b = tl.sum(shifted * slot_broadcast(soft, NUM_SLOTS, BLOCK_N, BLOCK_V), axis=1)
    return part_a, part_b


@triton.jit
def head_logit_gradient(tile_vals, v0, target_m, head_lse, loss_scale, gamma_m, soft, grad_soft, soft_dot,
                        mixed_scale, adv_logit_scale, ADV: tl.constexpr, NUM_SLOTS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """d head logits of a stacked tile: (softmax - onehot) * loss_scale[k], the cross-entropy gradient of each head.

    With ADV ("+adv MLM") the heads also receive adv_logit_scale * gamma_k * d mixed, d mixed = y (gy' - S) *
    mixed_scale, S = soft_dot (the full row's sum of y gy').
    """
    cols = v0 + tl.arange(0, BLOCK_V)
    prob = tl.exp(tile_vals - head_lse[:, None])
    grad = (prob - tl.where(cols[None, :] == target_m[:, None], 1.0, 0.0)) * loss_scale[:, None]
    if ADV:
        grad_mixed = soft * (grad_soft - soft_dot[:, None]) * mixed_scale
        grad += adv_logit_scale * gamma_m[:, None] * slot_broadcast(grad_mixed, NUM_SLOTS, BLOCK_N, BLOCK_V)
    return grad
