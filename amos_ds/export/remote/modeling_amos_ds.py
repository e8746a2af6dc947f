"""An amos-ds discriminator as a Hugging Face model: AutoModel, AutoModelForSequenceClassification and
AutoModelForTokenClassification with `trust_remote_code=True`; its generator (to the deepest head, with the MLM head)
as AutoModelForMaskedLM.

The encoder is amos-ds's (`amos_ds/model/encoder.py`): token embedding + learned absolute positions, LayerNorm,
post-LayerNorm Transformer layers with a T5-style relative bias shared by all layers (rows in the order of the
authors' code: bucket minus its minimum). Parameter names follow amos-ds's, so the weights map one to one; amos-ds's
tests check that both give the same hidden states.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


class AmosDsConfig(PretrainedConfig):
    model_type = "amos_ds"

    def __init__(self, vocab_size: int = 32768, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
                 relative_buckets: int = 64, relative_max_distance: int = 128, hidden_dropout_prob: float = 0.1,
                 attention_probs_dropout_prob: float = 0.1, classifier_dropout: float = 0.1,
                 layer_norm_eps: float = 1e-5, initializer_range: float = 0.02, pad_token_id: int = 0,
                 **kwargs) -> None:
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.relative_buckets = relative_buckets
        self.relative_max_distance = relative_max_distance
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Signed T5 bucket: |r| below a quarter of the buckets is exact, farther ones share logarithmic buckets."""
    sign = torch.sign(relative_position)
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative_position.abs()
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log((max_distance - 1) / max_exact)
    large = (max_exact + torch.ceil(log_ratio * (half - 1 - max_exact)).long()).clamp(max=half - 1)
    return torch.where(distance < max_exact, distance, large) * sign


class RelativePositionBias(nn.Module):
    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__()
        self.num_buckets = config.relative_buckets
        self.max_distance = config.relative_max_distance
        self.table = nn.Embedding(config.relative_buckets, config.num_attention_heads)

    def forward(self, seq_len: int) -> torch.Tensor:
        positions = torch.arange(seq_len, device=self.table.weight.device)
        relative = positions[None, :] - positions[:, None]
        rows = relative_position_bucket(relative, self.num_buckets, self.max_distance) + self.num_buckets // 2 - 1
        return self.table(rows).permute(2, 0, 1).unsqueeze(0)


class Embeddings(nn.Module):
    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__()
        self.positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.relative_bias = RelativePositionBias(config)

    def forward(self, token_embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = token_embeds.shape[1]
        hidden = self.dropout(self.norm(token_embeds + self.positions.weight[:seq_len]))
        padding = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
        padding = padding.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]
        return hidden, self.relative_bias(seq_len).to(hidden.dtype) + padding


class SelfAttention(nn.Module):
    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias,
                                                  dropout_p=self.attention_dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(batch, seq_len, hidden))


class Layer(nn.Module):
    """Post-LayerNorm: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, attention_bias)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class AmosDsPreTrainedModel(PreTrainedModel):
    config_class = AmosDsConfig
    base_model_prefix = "amos_ds"

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation, as amos-ds's: used for the task heads that the export does not hold."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class AmosDsModel(AmosDsPreTrainedModel):
    """ids [B, T] (starting with [CLS]) -> last_hidden_state [B, T, H]; `hidden_states` on request."""

    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_embedding = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **unused) -> BaseModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, attention_bias = self.embeddings(self.token_embedding(input_ids), attention_mask)
        all_hidden = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, attention_bias)
            all_hidden.append(hidden)
        return BaseModelOutput(last_hidden_state=hidden,
                               hidden_states=tuple(all_hidden) if output_hidden_states else None)


class AmosDsForSequenceClassification(AmosDsPreTrainedModel):
    """The paper's head on [CLS]: dropout, dense, tanh, dropout, out. One label: regression (MSE)."""

    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.amos_ds = AmosDsModel(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
            nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, config.num_labels))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **unused) -> SequenceClassifierOutput:
        encoded = self.amos_ds(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        logits = self.classifier(encoded.last_hidden_state[:, 0])
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states)


class AmosDsForTokenClassification(AmosDsPreTrainedModel):
    """dropout, then a linear layer on every token's hidden state; labels of -100 are ignored."""

    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.amos_ds = AmosDsModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **unused) -> TokenClassifierOutput:
        encoded = self.amos_ds(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(encoded.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states)


class MaskedLMHead(nn.Module):
    """amos-ds's MLM head: dense, GELU, LayerNorm, then the (shared) token embedding and a bias per vocabulary id."""

    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden))) @ embedding.t() + self.bias


class AmosDsForMaskedLM(AmosDsPreTrainedModel):
    """The generator up to its deepest head: ids with [MASK]s -> logits over the vocabulary at every position."""

    def __init__(self, config: AmosDsConfig) -> None:
        super().__init__(config)
        self.amos_ds = AmosDsModel(config)
        self.lm_head = MaskedLMHead(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **unused) -> MaskedLMOutput:
        encoded = self.amos_ds(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        logits = self.lm_head(encoded.last_hidden_state, self.amos_ds.token_embedding.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=encoded.hidden_states)
