"""The Transformer encoder both AMOS networks use: BERT-style post-LayerNorm layers with a T5 relative bias.

The token embedding matrix is not part of an encoder: AMOS shares one between the generator and the
discriminator, so encoders take token embeddings as input and add their own absolute positions.
"""

import torch
import torch.nn.functional as F
from torch import nn

from amos_ds.config import ModelConfig
from amos_ds.model.relative_position import RelativePositionBias


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # PyTorch's fused attention with the relative bias (and padding) as one additive mask: on CUDA it runs the
        # memory-efficient kernel, which takes a learned bias and returns its gradient; on the CPU, the math path.
        # FlexAttention would avoid materialising [B, heads, T, T] but needs torch.compile, which the CPU path and
        # the GPU machine's older PyTorch do not give us reliably; at T = 512 the bias is small next to the FFN.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias,
                                                  dropout_p=self.attention_dropout if self.training else 0.0)
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

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
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

    def forward(self, token_embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input hidden states [B, T, H] and the additive attention bias [B, heads, T, T] (padded keys at -inf)."""
        seq_len = token_embeds.shape[1]
        hidden = self.dropout(self.norm(token_embeds + self.positions.weight[:seq_len]))
        padding = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
        padding = padding.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]
        attention_bias = self.relative_bias(seq_len).to(hidden.dtype) + padding
        return hidden, attention_bias


class Encoder(nn.Module):
    """Embeddings and a stack of layers; `forward` returns the output of every layer."""

    def __init__(self, config: ModelConfig, num_layers: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.embeddings = EncoderEmbeddings(config, dropout)
        self.layers = nn.ModuleList(TransformerLayer(config, dropout, attention_dropout) for _ in range(num_layers))

    def forward(self, token_embeds: torch.Tensor, attention_mask: torch.Tensor,
                detach_after: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """Hidden states after each layer. The input to the layer after each 1-based index in `detach_after` is
        detached (AMOS's stop-gradient between generator blocks); the returned outputs themselves are not."""
        hidden, attention_bias = self.embeddings(token_embeds, attention_mask)
        outputs = []
        for index, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, attention_bias)
            outputs.append(hidden)
            if index in detach_after:
                hidden = hidden.detach()
        return outputs
