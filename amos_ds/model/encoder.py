"""The Transformer encoder both AMOS networks use: BERT-style post-LayerNorm layers with a T5 relative bias.

The token embedding matrix is not part of an encoder: AMOS shares one between the generator and the
discriminator, so encoders take token embeddings as input and add their own absolute positions.

Attention (ModelConfig.attention_impl):
- "sdpa": F.scaled_dot_product_attention with the relative bias (plus the padding term when the batch has padding)
  as one additive mask, contiguous with keys last: the form CUDA's memory-efficient kernel accepts (an additive mask
  that requires grad, whose gradient it returns, with attention dropout), while a mask whose last stride is not 1
  sends PyTorch to the math path. Without padding the mask is [1, heads, T, T], shared by the batch; with padding,
  [B, heads, T, T]. On the CPU, with a mask that requires grad, PyTorch runs the math path.
  `python bench/bench_attention.py` shows which kernels accept the call on a given machine.
- "flex": FlexAttention with the bias as a score_mod that reads the bucket table (no [heads, T, T] tensor), compiled
  on CUDA. It cannot drop attention probabilities, so ModelConfig requires attention_dropout 0 with it. PyTorch runs
  its backward only on CUDA; on the CPU it is forward-only (inference, tests).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from amos_ds.config import ModelConfig
from amos_ds.model.relative_position import RelativePositionBias


class FlexBias(NamedTuple):
    """What FlexAttention's score_mod reads: score + table[buckets[query, key], head] (+ padding[batch, key])."""

    table: torch.Tensor  # [buckets, heads], the learned relative-bias table
    buckets: torch.Tensor  # [T, T] long: the table row of each (query, key)
    padding: torch.Tensor | None  # [B, T]: 0 at tokens, -inf at padding; None for a batch without padding


# What a layer adds to its attention scores: the dense additive mask (sdpa) or the score_mod's tensors (flex).
AttentionBias = torch.Tensor | FlexBias

_compiled_flex_attention = None


def biased_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: FlexBias) -> torch.Tensor:
    """FlexAttention with the relative bias as a score_mod; compiled on CUDA (uncompiled it materialises the
    scores), plain on the CPU. The score_mod is built here, inside any compiled layer, so that a compiled layer
    sees tensors as inputs rather than a new closure each call."""
    global _compiled_flex_attention
    table, buckets, padding = bias

    def relative_bias(score, batch, head, query, key):
        return score + table[buckets[query, key], head].to(score.dtype)

    def relative_bias_and_padding(score, batch, head, query, key):
        return score + (table[buckets[query, key], head] + padding[batch, key]).to(score.dtype)

    score_mod = relative_bias if padding is None else relative_bias_and_padding
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, score_mod=score_mod)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, attention_bias: AttentionBias) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if isinstance(attention_bias, torch.Tensor):
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias,
                                                      dropout_p=self.attention_dropout if self.training else 0.0)
        else:
            attended = biased_flex_attention(q, k, v, attention_bias)
        return self.out(attended.transpose(1, 2).reshape(batch, seq_len, hidden))


class TransformerLayer(nn.Module):
    """Post-LayerNorm BERT layer: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, config: ModelConfig, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(config, attention_dropout)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.ffn_size)
        self.ffn_out = nn.Linear(config.ffn_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attention_bias: AttentionBias) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, attention_bias)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class EncoderEmbeddings(nn.Module):
    """Token embeddings (given) + learned absolute positions, LayerNorm, dropout; and the relative-bias table."""

    def __init__(self, config: ModelConfig, dropout: float) -> None:
        super().__init__()
        self.positions = nn.Embedding(config.max_positions, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.relative_bias = RelativePositionBias(config.rel_buckets, config.rel_max_distance, config.num_heads)
        self.attention_impl = config.attention_impl

    def forward(self, token_embeds: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, AttentionBias]:
        """Input hidden states [B, T, H] and what every layer adds to its attention scores: the relative bias, and
        -inf at padded keys when `attention_mask` (1 = token, 0 = padding) is given; None means no padding."""
        seq_len = token_embeds.shape[1]
        hidden = self.dropout(self.norm(token_embeds + self.positions.weight[:seq_len]))
        padding = None
        if attention_mask is not None:
            padding = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
            padding = padding.masked_fill(attention_mask == 0, float("-inf"))
        if self.attention_impl == "flex":
            return hidden, FlexBias(self.relative_bias.table.weight, self.relative_bias.bucket_index(seq_len), padding)
        attention_bias = self.relative_bias(seq_len).to(hidden.dtype)
        if padding is not None:
            attention_bias = attention_bias + padding[:, None, None, :]
        return hidden, attention_bias


class Encoder(nn.Module):
    """Embeddings and a stack of layers; `forward` returns the output of every layer."""

    def __init__(self, config: ModelConfig, num_layers: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.embeddings = EncoderEmbeddings(config, dropout)
        self.layers = nn.ModuleList(TransformerLayer(config, dropout, attention_dropout) for _ in range(num_layers))

    def forward(self, token_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                detach_after: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """Hidden states after each layer. `attention_mask` [B, T] (1 = token, 0 = padding), or None for a batch
        without padding. The input to the layer after each 1-based index in `detach_after` is detached (AMOS's
        stop-gradient between generator blocks); the returned outputs themselves are not."""
        hidden, attention_bias = self.embeddings(token_embeds, attention_mask)
        outputs = []
        for index, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, attention_bias)
            outputs.append(hidden)
            if index in detach_after:
                hidden = hidden.detach()
        return outputs
