"""Model FLOPs of one AMOS training step, and model FLOPs utilisation (MFU) against the device's peak.

Counted as in Megatron-LM and PaLM: the matrix multiplications only (2 FLOPs per multiply-add), no recomputation,
no elementwise work (softmax, LayerNorm, GELU, Gumbel noise). For one sequence of T tokens, hidden H, FFN width F,
vocabulary V, K generator heads and M = mask_prob x T masked positions (the expected count), the forward pass is

    one encoder layer   8TH^2 (Q, K, V, output projections) + 4THF (FFN) + 4T^2H (scores QK^T and their use on V)
    generator           its layers (with separate generators: the layers of all of them)
    MLM heads           K x (2MH^2 dense + 2MHV vocabulary projection against the shared embedding)
    mixture scorer      2MHK for v . f(d) (the adversarial mixture only)
    mixing              2KMV: the gamma-weighted sum of the K heads' logits
    discriminator       its layers, plus 2TH for the RTD head

The backward pass costs twice the forward for every trained matmul (gradients of inputs and of weights), so a
trained part costs 3x its forward. The mixture's per-head logits enter it detached: its backward is one more 2KMV
(the gradient reaching gamma), so mixing costs 2x its forward. The sampled tokens' embeddings are a lookup forward,
but their straight-through gradient to the mixed logits is a matmul, grad_sampled @ E^T: 2MHV in the backward only.
(The vocabulary path's matmuls are then 2MHV (3K + 1), the floor kernels/bench.py counts.)
"""

import os

import torch

from amos_ds.config import ModelConfig

# Dense peak TFLOP/s per device, from the vendors' data sheets (SXM parts; no sparsity). CPU: per core, a nominal
# AVX-512 core at about 3 GHz (16 fp32 FMA lanes x 2 units, bf16 dot products at twice that): a rough guide only.
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "cpu_core": {"bf16": 0.2, "fp16": 0.2, "fp32": 0.1},
}


def encoder_layer_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one transformer layer over one sequence."""
    t, h, f = seq_len, config.hidden_size, config.ffn_size
    return 8 * t * h * h + 4 * t * h * f + 4 * t * t * h


def forward_flops(config: ModelConfig, seq_len: int, mask_prob: float) -> dict[str, float]:
    """Forward FLOPs of one sequence, by part (see the module docstring)."""
    t, h, v, k = seq_len, config.hidden_size, config.vocab_size, config.num_generator_heads
    m = mask_prob * seq_len
    return {
        "generator": config.generator_layers_run * encoder_layer_flops(config, seq_len),
        "mlm_heads": k * (2 * m * h * h + 2 * m * h * v),
        "mixture_scorer": 2 * m * h * k if config.mixture == "adversarial" else 0.0,
        "mixing": 2 * k * m * v,
        "discriminator": config.disc_layers * encoder_layer_flops(config, seq_len) + 2 * t * h,
    }


def straight_through_backward_flops(config: ModelConfig, seq_len: int, mask_prob: float) -> float:
    """Backward FLOPs of grad_sampled @ E^T over one sequence's masked positions (no forward counterpart)."""
    return 2 * mask_prob * seq_len * config.hidden_size * config.vocab_size


def step_flops(config: ModelConfig, seq_len: int, mask_prob: float, num_sequences: int) -> float:
    """Training FLOPs (forward + backward) of one optimizer step over `num_sequences` sequences."""
    parts = forward_flops(config, seq_len, mask_prob)
    trained = sum(value for name, value in parts.items() if name != "mixing")
    straight_through = straight_through_backward_flops(config, seq_len, mask_prob)
    return num_sequences * (3 * trained + 2 * parts["mixing"] + straight_through)


def cpu_cores_per_rank() -> int:
    """Cores one CPU rank can use: its threads, but no more than its share of the machine's cores."""
    # Ranks on this machine, as torchrun, the deepspeed launcher and mpirun announce it.
    names = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
    local_ranks = next((int(os.environ[name]) for name in names if name in os.environ), 1)
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) // local_ranks))


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s of the device one rank drives, or None for a GPU not in PEAK_TFLOPS."""
    if device.type == "cpu":
        return PEAK_TFLOPS["cpu_core"][precision] * cpu_cores_per_rank()
    name = torch.cuda.get_device_name(device)
    for model, peaks in PEAK_TFLOPS.items():
        if model in name:
            return peaks[precision]
    return None
