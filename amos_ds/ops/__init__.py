"""The one door between the AMOS model and the kernels: the vocabulary path and its Gumbel noise.

```
mlm_and_sample(head_states[K,N,H], mix_logits[N,K], embedding[V,H], bias[V], targets[N],
               tau, seed, grad_scale=-1.0, impl="auto", adv_logit_scale=0.0)
    -> (head_losses[K], sampled_ids[N], sampled_embeds[N,H])
gumbel_noise(seed, n_rows, vocab_size, row_offset=0) -> Tensor[n_rows, vocab_size]
```
head_states: the shared MLM head transform's outputs of each of the K heads at the N masked positions.
head_losses[k]: mean cross-entropy of logits_k = head_states[k] @ embedding.T + bias against targets.
sampled_ids: argmax(sum_k softmax(mix_logits)_k * logits_k + g), an exact sample of the mixed distribution,
  with g = gumbel_noise(seed, N, V), a pure function of (seed, row, vocabulary id).
sampled_embeds: embedding[sampled_ids] in value; its gradient reaches embedding as a lookup and mix_logits through
  y = softmax((mixed + g) / tau) times grad_scale (-1: gradient reversal), per-head logits detached unless
  adv_logit_scale > 0 (the "+adv MLM" ablation: they then receive that gradient times adv_logit_scale).

impl: "torch" (plain reference, [K,N,V] logits in memory), "chunked" (same numbers, bounded memory), "triton"
(the fused kernel in amos_kernels), "auto" (triton for CUDA tensors when it imports; otherwise torch while the
[K,N,V] logits stay under AUTO_TORCH_MAX_LOGITS elements, chunked beyond).
"""

import torch

from amos_ds.config import VOCAB_IMPLS
from amos_ds.ops.gumbel import gumbel_noise, philox_uniform
from amos_ds.ops.vocab_path import mlm_and_sample_chunked, mlm_and_sample_torch

IMPLS = VOCAB_IMPLS  # ModelConfig.vocab_impl's choices, defined beside it (config.py imports no torch)
# "auto" without the kernel: the plain path while its logits fit in this many elements (1 GiB of fp32 with their
# gradient), since the chunked path computes the Gumbel noise twice and the logits twice.
AUTO_TORCH_MAX_LOGITS = 2**27


def _triton_impl():
    try:
        from amos_kernels import mlm_and_sample_triton
    except ImportError as err:
        raise RuntimeError(f"impl='triton' needs the amos_kernels package and Triton: {err}") from err
    return mlm_and_sample_triton


def triton_available() -> bool:
    """True when the fused kernel can run on CUDA tensors here."""
    if not torch.cuda.is_available():
        return False
    try:
        _triton_impl()
    except RuntimeError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device, num_logits: int = 0) -> str:
    """The concrete implementation that `impl` names for tensors on `device` and K x N x V = `num_logits`."""
    if impl not in IMPLS:
        raise ValueError(f"mlm_and_sample: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch" if num_logits <= AUTO_TORCH_MAX_LOGITS else "chunked"


def mlm_and_sample(head_states: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor, bias: torch.Tensor,
                   targets: torch.Tensor, tau: float, seed: int, grad_scale: float = -1.0, impl: str = "auto",
                   adv_logit_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head MLM losses and the mixed straight-through Gumbel-Softmax sample (see the module docstring)."""
    num_heads, num_rows, hidden = head_states.shape
    if embedding.numel() == 0:
        raise RuntimeError("mlm_and_sample: the embedding is empty, as a ZeRO-3 partitioned parameter is outside its "
                           "owner's forward; gather it (call from the owning module, or GatheredParameters)")
    if mix_logits.shape != (num_rows, num_heads) or embedding.shape[1] != hidden or bias.shape != embedding.shape[:1] \
            or targets.shape != (num_rows,):
        raise ValueError(f"mlm_and_sample: inconsistent shapes head_states {tuple(head_states.shape)}, mix_logits "
                         f"{tuple(mix_logits.shape)}, embedding {tuple(embedding.shape)}, bias {tuple(bias.shape)}, "
                         f"targets {tuple(targets.shape)}")
    chosen = resolve_impl(impl, head_states.device, num_heads * num_rows * embedding.shape[0])
    if chosen == "torch":
        function = mlm_and_sample_torch
    elif chosen == "chunked":
        function = mlm_and_sample_chunked
    else:
        function = _triton_impl()
    return function(head_states, mix_logits, embedding, bias, targets, tau, seed, grad_scale, adv_logit_scale)


__all__ = ["IMPLS", "gumbel_noise", "mlm_and_sample", "philox_uniform", "resolve_impl", "triton_available"]
