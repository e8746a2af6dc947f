"""The AMOS vocabulary path as fused Triton kernels: K MLM heads, the mixture and straight-through Gumbel sampling.

`mlm_and_sample_triton(head_states, mix_logits, embedding, bias, targets, tau, seed, grad_scale=-1.0,
adv_logit_scale=0.0, config=None)` computes the vocabulary-path contract stated once in amos_ds/ops/__init__.py
(`amos_ds.ops.mlm_and_sample`, which calls this for impl="triton"; this package imports nothing from amos_ds), with
the same numbers as its plain PyTorch reference, head_losses in float32 and sampled_embeds in the embedding's dtype.
The Gumbel noise is g = -log(-log(u)), u from word id % 4 of tl.randint4x(seed, row * cdiv(V, 4) + id // 4), the
stream of `amos_ds.ops.gumbel_noise`. No [N, V] logits are kept: the forward keeps O(N x K) statistics and the
backward recomputes the logits.

Two layouts compute this, chosen by `KernelConfig.layout` (default `config.DEFAULT_LAYOUT`, "stacked_slots"):
- "stacked_slots" (`stacked_slots.py`): each Triton program computes its logit tiles with tl.dot, the K heads'
  rows stacked into one operand, and runs the per-tile arithmetic on them in registers.
- "chunked_logits" (`chunked_logits.py`, the layout of Liger-Kernel and Cut Cross-Entropy): cuBLAS writes a chunk of
  rows' logits into a bounded buffer, one Triton pass reads them.
Both run the same per-tile arithmetic (`tile_math.py`); this module holds what they share on the host: the autograd
glue, the backward's shifts and its cuBLAS steps.

Backward. d loss_k / d logits_k = (p_k - onehot) * dL_k / N needs only the saved log-sum-exp. The mixture's gradient
needs S = sum_v y * gy (gy = grad_sampled @ E^T), a full-row reduction, before d mixed = y (gy - S) grad_scale / tau
is known; but d gamma_k = sum_v d mixed * l_k = grad_scale / tau * (sum_v y gy l_k - S sum_v y l_k), so one pass
accumulating A_k = sum y gy l_k, B_k = sum y l_k and S gives it exactly, with no d mixed per element. To keep that
difference of two large sums accurate when y is peaked, l_k and gy are shifted by their value at the sampled id
(A - S B is invariant to per-row shifts, and y peaks at the sampled id). Only adv_logit_scale != 0 needs d mixed per
element, hence S first (two passes; the default is one). Each layout writes the head-logit gradients of a chunk of
rows into a buffer in the embedding's dtype; cuBLAS then does grad_head_states = dlogits @ E and grad_embedding +=
dlogits^T @ head_states; bias and the lookup gradient are PyTorch reductions. No atomics: the backward is
deterministic.

Precision: fp32 accumulation and fp32 arithmetic on the logits everywhere; each layout's docstring says where its
operands and logits are rounded. Triton 3.6 and 3.7 have the same Philox (triton/language/random.py is identical in
both), so the noise is the same stream as `amos_ds.ops.gumbel.gumbel_noise` on either.

DeepSpeed ZeRO-3: `embedding` must be the full, gathered [V, H] matrix when this runs. Call the op from inside the
forward of the module that owns the embedding parameter (DeepSpeed gathers a module's own parameters around its
forward), or register it with `deepspeed.zero.register_external_parameter(module, embedding)` in the module that calls
the op, or wrap the call in `deepspeed.zero.GatheredParameters(embedding)`. A partitioned parameter is seen as an
empty tensor: that raises a RuntimeError here instead of a silent wrong loss (a known failure of other fused losses).
"""

import torch

from . import chunked_logits, stacked_slots
from .config import KernelConfig, default_config, interpreting

__all__ = ["KernelConfig", "default_config", "mlm_and_sample_triton"]

LAYOUT_MODULES = {"stacked_slots": stacked_slots, "chunked_logits": chunked_logits}


def _backward(head_states: torch.Tensor, gamma: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
              targets: torch.Tensor, sampled_ids: torch.Tensor, head_lse: torch.Tensor, soft_lse: torch.Tensor,
              grad_losses: torch.Tensor, grad_sampled: torch.Tensor, tau: float, seed: int, grad_scale: float,
              adv_logit_scale: float, config: KernelConfig,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_head_states, grad_gamma[N, K] float32, grad_embedding, grad_bias), chunk by chunk of rows.

    The layout's `logit_gradients` yields (start, end, d head logits [K, end - start, V] in the embedding's dtype),
    having written the chunk's S into soft_dot[start:end] and A, B into sums_ab[:, :, start:end]; the yielded tensor
    is its chunk buffer, used here before the next chunk is asked for.
    """
    num_heads, num_rows, hidden = head_states.shape
    vocab = embedding.shape[0]
    device = head_states.device
    operand_grad_sampled = grad_sampled.to(head_states.dtype)
    # Per-row shifts (values at the sampled id) that keep A - S * B accurate; any constant per row is exact.
    picked = embedding[sampled_ids]
    center = torch.cat([torch.einsum("knh,nh->kn", head_states, picked).float() + bias[sampled_ids].float(),
                        torch.einsum("nh,nh->n", operand_grad_sampled, picked).float().unsqueeze(0)]).contiguous()
    loss_scale = (grad_losses.float() / num_rows).contiguous()
    mixed_scale = grad_scale / tau
    soft_dot = torch.empty(num_rows, dtype=torch.float32, device=device)
    sums_ab = torch.empty(2, num_heads, num_rows, dtype=torch.float32, device=device)
    grad_states = torch.empty_like(head_states)
    grad_embedding = torch.zeros(embedding.shape, dtype=torch.float32, device=device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device)
    chunks = LAYOUT_MODULES[config.layout].logit_gradients(
        head_states, operand_grad_sampled, gamma, embedding, bias, targets, head_lse, soft_lse, center, loss_scale,
        tau, seed, mixed_scale, adv_logit_scale, config, soft_dot, sums_ab)
    for start, end, chunk_grad in chunks:
        grad_states[:, start:end] = chunk_grad @ embedding
        rows_states = head_states[:, start:end].reshape(-1, hidden)
        grad_embedding += (chunk_grad.reshape(-1, vocab).t() @ rows_states).float()
        grad_bias += chunk_grad.sum(dim=(0, 1), dtype=torch.float32)
    grad_embedding.index_add_(0, sampled_ids, grad_sampled.float())
    # d gamma_k = grad_scale / tau * sum_v y (gy - S) l_k = grad_scale / tau * (A_k - S * B_k).
    grad_gamma = mixed_scale * (sums_ab[0] - soft_dot * sums_ab[1]).t()
    return grad_states, grad_gamma, grad_embedding.to(embedding.dtype), grad_bias.to(bias.dtype)


class _VocabPathFunction(torch.autograd.Function):
    """Autograd glue: the forward keeps O(N x K) statistics, the backward recomputes logits (module docstring)."""

    @staticmethod
    def forward(ctx, head_states, mix_logits, embedding, bias, targets, tau, seed, grad_scale, adv_logit_scale,
                config):
        gamma = torch.softmax(mix_logits.float(), dim=-1).contiguous()
        head_lse, target_logit, sampled_ids, soft_lse = LAYOUT_MODULES[config.layout].forward(
            head_states, gamma, embedding, bias, targets, tau, seed, config)
        head_losses = (head_lse - target_logit).mean(dim=1)
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
    if head_states.device.type != "cuda" and not interpreting():
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
