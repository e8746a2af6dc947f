"""The vocabulary path of AMOS in plain PyTorch: per-head MLM losses and the mixed Gumbel-Softmax sample.

Two implementations of the contract stated in amos_ds/ops/__init__.py (`amos_ds.ops.mlm_and_sample`):
- `mlm_and_sample_torch`: the reference. Materialises the [K, N, V] logits and lets autograd differentiate.
- `mlm_and_sample_chunked`: the same numbers, but a hand-written autograd Function that walks N in chunks of
  `chunk_rows` rows, keeps only O(N x K) statistics from the forward and recomputes logits in the backward, so
  no more than chunk_rows x V logits (per head) are alive at once.
"""

import torch
import torch.nn.functional as F

from amos_ds.ops.gumbel import gumbel_noise


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward; multiplies the gradient by `scale` in the backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in value; multiplies the gradient by `scale` (scale 0 detaches)."""
    if scale == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, scale)


def _head_logits(head_states: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[K, n, V] float32 logits: the matmul runs in the inputs' dtype, the softmax maths in float32."""
    return F.linear(head_states, embedding, bias).float()


def mlm_and_sample_torch(head_states: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor,
                         bias: torch.Tensor, targets: torch.Tensor, tau: float, seed: int, grad_scale: float = -1.0,
                         adv_logit_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation: [K, N, V] logits in memory, gradients by autograd."""
    num_heads, num_rows, _ = head_states.shape
    vocab_size = embedding.shape[0]
    logits = _head_logits(head_states, embedding, bias)
    head_losses = F.cross_entropy(logits.reshape(num_heads * num_rows, vocab_size), targets.repeat(num_heads),
                                  reduction="none").view(num_heads, num_rows).mean(dim=1)

    gamma = torch.softmax(mix_logits.float(), dim=-1)
    mixed = torch.einsum("nk,knv->nv", gamma, _scale_grad(logits, adv_logit_scale))
    mixed = _scale_grad(mixed, grad_scale)
    noise = gumbel_noise(seed, num_rows, vocab_size, device=head_states.device)
    perturbed = mixed + noise
    sampled_ids = perturbed.detach().argmax(dim=-1)
    soft = torch.softmax(perturbed / tau, dim=-1)
    straight_through = (soft - soft.detach()).to(embedding.dtype) @ embedding.detach()
    sampled_embeds = F.embedding(sampled_ids, embedding) + straight_through
    return head_losses, sampled_ids, sampled_embeds


class _ChunkedVocabPath(torch.autograd.Function):
    """Forward and backward of the vocabulary path over row chunks; logits are recomputed, never stored."""

    @staticmethod
    def forward(ctx, head_states, mix_logits, embedding, bias, targets, tau, seed, grad_scale, adv_logit_scale,
                chunk_rows):
        num_heads, num_rows, _ = head_states.shape
        vocab_size = embedding.shape[0]
        gamma = torch.softmax(mix_logits.float(), dim=-1)
        loss_sums = torch.zeros(num_heads, dtype=torch.float32, device=head_states.device)
        sampled_ids = torch.empty(num_rows, dtype=torch.int64, device=head_states.device)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            logits = _head_logits(head_states[:, rows], embedding, bias)
            target_logits = logits.gather(2, targets[rows].view(1, -1, 1).expand(num_heads, -1, 1)).squeeze(2)
            loss_sums += (torch.logsumexp(logits, dim=2) - target_logits).sum(dim=1)
            mixed = torch.einsum("nk,knv->nv", gamma[rows], logits)
            noise = gumbel_noise(seed, mixed.shape[0], vocab_size, row_offset=start, device=mixed.device)
            sampled_ids[rows] = (mixed + noise).argmax(dim=-1)
        ctx.save_for_backward(head_states, gamma, embedding, bias, targets, sampled_ids)
        ctx.settings = (tau, seed, grad_scale, adv_logit_scale, chunk_rows, mix_logits.dtype)
        ctx.mark_non_differentiable(sampled_ids)
        sampled_embeds = F.embedding(sampled_ids, embedding)
        return loss_sums / num_rows, sampled_ids, sampled_embeds

    @staticmethod
    def backward(ctx, grad_losses, _grad_ids, grad_sampled):
        # grad_sampled is never None: autograd passes zeros for an output the loss does not use (materialize_grads).
        head_states, gamma, embedding, bias, targets, sampled_ids = ctx.saved_tensors
        tau, seed, grad_scale, adv_logit_scale, chunk_rows, mix_dtype = ctx.settings
        num_heads, num_rows, _ = head_states.shape
        vocab_size = embedding.shape[0]
        grad_states = torch.zeros(head_states.shape, dtype=torch.float32, device=head_states.device)
        grad_embedding = torch.zeros(embedding.shape, dtype=torch.float32, device=embedding.device)
        grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=bias.device)
        grad_gamma = torch.zeros_like(gamma)
        loss_scale = (grad_losses.float() / num_rows).view(num_heads, 1, 1)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            logits = _head_logits(head_states[:, rows], embedding, bias)
            # Cross-entropy: d loss_k / d logits_k = (softmax - onehot(target)) / N, times the incoming gradient.
            grad_logits = torch.softmax(logits, dim=2)
            grad_logits[:, torch.arange(logits.shape[1]), targets[rows]] -= 1.0
            grad_logits *= loss_scale
            # Straight-through Gumbel-Softmax: d/dmixed of <grad_sampled @ E^T, y>, y = softmax((mixed + g)/tau).
            mixed = torch.einsum("nk,knv->nv", gamma[rows], logits)
            noise = gumbel_noise(seed, mixed.shape[0], vocab_size, row_offset=start, device=mixed.device)
            soft = torch.softmax((mixed + noise) / tau, dim=-1)
            grad_soft = (grad_sampled[rows] @ embedding.t()).float()
            grad_mixed = soft * (grad_soft - (soft * grad_soft).sum(dim=-1, keepdim=True)) / tau * grad_scale
            grad_gamma[rows] = torch.einsum("nv,knv->nk", grad_mixed, logits)
            if adv_logit_scale:
                grad_logits += adv_logit_scale * gamma[rows].t().unsqueeze(2) * grad_mixed.unsqueeze(0)
            grad_logits = grad_logits.to(embedding.dtype)
            grad_states[:, rows] = (grad_logits @ embedding).float()
            grad_embedding += torch.einsum("knv,knh->vh", grad_logits, head_states[:, rows]).float()
            grad_bias += grad_logits.float().sum(dim=(0, 1))
        grad_embedding.index_add_(0, sampled_ids, grad_sampled.float())
        grad_mix_logits = gamma * (grad_gamma - (gamma * grad_gamma).sum(dim=-1, keepdim=True))
        return (grad_states.to(head_states.dtype), grad_mix_logits.to(mix_dtype), grad_embedding.to(embedding.dtype),
                grad_bias.to(bias.dtype), None, None, None, None, None, None)


def mlm_and_sample_chunked(head_states: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor,
                           bias: torch.Tensor, targets: torch.Tensor, tau: float, seed: int, grad_scale: float = -1.0,
                           adv_logit_scale: float = 0.0, chunk_rows: int = 1024,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same results as `mlm_and_sample_torch`, holding at most `chunk_rows` rows of logits per head at once."""
    return _ChunkedVocabPath.apply(head_states, mix_logits, embedding, bias, targets, tau, seed, grad_scale,
                                   adv_logit_scale, chunk_rows)
