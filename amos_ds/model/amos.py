"""AMOS: a multi-layer MLM generator, an adversarially learned mixture of its heads, and an RTD discriminator.

One forward pass, top to bottom (notation of the paper and ../shared/AMOS_SPEC.md):
1. The generator reads the masked sequence; f(d) is its raw output at each head layer d in D.
2. At the N masked positions, the shared MLM head turns each f(d) into h(d); the vocabulary path
   (`amos_ds.ops.mlm_and_sample`) gives each head's cross-entropy, and samples one replacement token per position
   from softmax(sum_d gamma_d * logits_d), gamma = softmax(v . f(d)), with straight-through Gumbel-Softmax
   (tau 0.3) whose gradient into gamma is reversed.
3. The discriminator reads the original tokens with the samples at masked positions and predicts, for every
   non-padding token, whether it was replaced (a sample equal to the original counts as original).
Loss = sum_d L_MLM(d) + rtd_weight * L_RTD.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from amos_ds import ops
from amos_ds.config import ModelConfig
from amos_ds.model.encoder import Encoder
from amos_ds.vocab import IGNORE_INDEX

# Seeds of the per-position head choice (random-layer ablation) are the Gumbel seed plus this odd constant, so the
# two streams never share a Philox key.
_HEAD_CHOICE_SEED_SHIFT = 0x9E3779B97F4A7C15


class AMOSOutput(NamedTuple):
    """`loss` is what the trainer backpropagates; `metrics` holds detached float scalars for logging.

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the output tensors to hook its backward parameter
    gathering on only inside tuples, lists and dicts; it would miss them in a dataclass and leave the shared token
    embedding (a parameter of this top-level module) partitioned during the backward.
    """

    loss: torch.Tensor
    head_losses: torch.Tensor  # [K] mean MLM cross-entropy of each head, in the graph
    rtd_loss: torch.Tensor  # mean RTD binary cross-entropy over non-padding tokens, in the graph
    replaced: torch.Tensor  # [B, T] bool: the discriminator's labels
    metrics: dict[str, torch.Tensor]
    rtd_logits: torch.Tensor  # [B, T] float32: the discriminator's scores (> 0: replaced), detached
    disc_states: torch.Tensor  # [B, T, H]: the discriminator's last layer, detached
    head_predictions: torch.Tensor | None = None  # [K, N] each head's most likely token, when asked (predict=True)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm, shared by every head layer, then the vocabulary path with its own bias b."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.config = config

    def states(self, features: torch.Tensor) -> torch.Tensor:
        """h(d) [K, N, H] of the raw layer outputs f(d) [K, N, H]."""
        return self.norm(F.gelu(self.dense(features)))

    def forward(self, features: torch.Tensor, mix_logits: torch.Tensor, embedding: torch.Tensor,
                targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features [K, N, H] (raw layer outputs at masked positions) -> (head_losses, sampled_ids, sampled_embeds)."""
        head_states = self.states(features)
        return ops.mlm_and_sample(head_states, mix_logits, embedding, self.bias, targets, tau=self.config.gumbel_tau,
                                  seed=seed, grad_scale=-1.0, impl=self.config.vocab_impl,
                                  adv_logit_scale=self.config.adv_mlm_scale)

    @torch.no_grad()
    def predictions(self, features: torch.Tensor, embedding: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
        """Each head's most likely token [K, N], from logits of at most `rows_per_chunk` rows at a time (so that
        evaluation never holds [K, N, V] logits)."""
        head_states = self.states(features)
        return torch.cat([(chunk @ embedding.t().to(chunk.dtype) + self.bias.to(chunk.dtype)).argmax(-1)
                          for chunk in head_states.split(rows_per_chunk, dim=1)], dim=1)


class AMOSModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # The token embedding E is shared by the generator input, the MLM output layer and the discriminator input.
        # It is a direct parameter of this module so that DeepSpeed ZeRO-3 gathers it for the whole forward.
        self.token_embedding = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        if config.separate_generators:
            self.generators = nn.ModuleList(Encoder(config, depth, 0.0, 0.0) for depth in config.head_layers)
        else:
            self.generators = nn.ModuleList([Encoder(config, config.gen_layers, 0.0, 0.0)])
        self.mlm_head = MLMHead(config)
        self.mixture_scorer = nn.Linear(config.hidden_size, 1, bias=False) if config.mixture == "adversarial" else None
        self.discriminator = Encoder(config, config.disc_layers, config.dropout, config.attention_dropout)
        self.rtd_head = nn.Linear(config.hidden_size, 1)
        self.apply(self._init_weights)
        nn.init.normal_(self.token_embedding, std=config.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def compile_layers(self) -> int:
        """torch.compile every encoder layer in place (regional compilation: identical layers share one compiled
        graph, so building it takes seconds, not minutes); parameter names and checkpoints are unchanged. Returns
        the number of layers compiled."""
        layers = [layer for encoder in [*self.generators, self.discriminator] for layer in encoder.layers]
        for layer in layers:
            layer.compile()
        return len(layers)

    def generator_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """f(d) [B, T, H] for each head layer d: the generator's raw outputs, before the MLM head."""
        token_embeds = F.embedding(input_ids, self.token_embedding)
        if self.config.separate_generators:
            return [generator(token_embeds, attention_mask)[-1] for generator in self.generators]
        detach_after = self.config.head_layers[:-1] if self.config.stop_gradient else ()
        outputs = self.generators[0](token_embeds, attention_mask, detach_after=detach_after)
        return [outputs[layer - 1] for layer in self.config.head_layers]

    def mixture_logits(self, features: torch.Tensor, seed: int, progress: float) -> torch.Tensor:
        """Scores [N, K] whose softmax is gamma, per the configured mixture."""
        num_heads, num_rows, _ = features.shape
        mixture = self.config.mixture
        if mixture == "adversarial":
            return self.mixture_scorer(features).squeeze(-1).t().float()
        if mixture == "uniform":
            return features.new_zeros(num_rows, num_heads, dtype=torch.float32)
        if mixture == "random_layer":
            rows = torch.arange(num_rows, device=features.device)
            uniform = ops.philox_uniform((seed + _HEAD_CHOICE_SEED_SHIFT) & 0xFFFFFFFFFFFFFFFF, rows)
            chosen = (uniform * num_heads).long().clamp(max=num_heads - 1)
        else:  # layer_switch: head k from progress switch_points[k - 1] on
            stage = sum(progress >= point for point in self.config.switch_points)
            chosen = torch.full((num_rows,), stage, dtype=torch.long, device=features.device)
        one_hot = F.one_hot(chosen, num_heads).bool()
        return torch.zeros(num_rows, num_heads, device=features.device).masked_fill(~one_hot, float("-inf"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, seed: int,
                progress: float = 0.0, masked_positions: torch.Tensor | None = None,
                predict: bool = False) -> AMOSOutput:
        """input_ids [B, T] with masked positions already corrupted; attention_mask [B, T] (1 = token, 0 = padding),
        or None for a batch without padding; labels [B, T] hold the original token at masked positions and
        IGNORE_INDEX elsewhere; seed keys the Gumbel noise; progress in [0, 1] drives layer switch.

        masked_positions [N]: the flat indices (row * T + position) of the masked tokens in row-major order, as the
        loader gives them. With them (and attention_mask None when there is no padding) the forward never waits for
        the device: every shape is known on the host. None derives them from labels, which costs one host
        synchronisation (the count N). predict=True adds each head's most likely token (evaluation).
        """
        config = self.config
        batch, seq_len = input_ids.shape
        if masked_positions is None:
            masked_positions = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        targets = labels.flatten()[masked_positions]
        features = torch.stack([f.flatten(0, 1)[masked_positions]
                                for f in self.generator_features(input_ids, attention_mask)])
        mix_logits = self.mixture_logits(features, seed, progress)
        if targets.numel():
            head_losses, sampled_ids, sampled_embeds = self.mlm_head(features, mix_logits, self.token_embedding,
                                                                     targets, seed)
        else:  # no masked token in this micro-batch: keep every parameter in the graph with zero loss
            head_losses = features.sum(dim=(1, 2)).float() * 0.0
            sampled_ids = targets
            sampled_embeds = features.new_zeros(0, config.hidden_size, dtype=self.token_embedding.dtype)

        original_ids = input_ids.flatten().index_copy(0, masked_positions, targets)
        disc_embeds = F.embedding(original_ids, self.token_embedding)
        disc_embeds = disc_embeds.index_copy(0, masked_positions, sampled_embeds.to(disc_embeds.dtype))
        disc_hidden = self.discriminator(disc_embeds.view(batch, seq_len, -1), attention_mask)[-1]
        rtd_logits = self.rtd_head(disc_hidden).squeeze(-1).float()

        is_replaced = sampled_ids != targets
        replaced = torch.zeros(batch * seq_len, dtype=torch.bool, device=input_ids.device)
        replaced = replaced.index_copy(0, masked_positions, is_replaced).view(batch, seq_len)
        if attention_mask is None:
            real = torch.ones_like(replaced)
            rtd_loss = F.binary_cross_entropy_with_logits(rtd_logits, replaced.float())
        else:  # mean over real tokens, as weights rather than a boolean selection (which would wait for the device)
            real = attention_mask.bool()
            token_losses = F.binary_cross_entropy_with_logits(rtd_logits, replaced.float(), reduction="none")
            rtd_loss = token_losses.masked_fill(~real, 0.0).sum() / real.sum()
        mlm_loss = head_losses.sum()
        loss = mlm_loss + config.rtd_weight * rtd_loss
        metrics = self._metrics(loss, mlm_loss, head_losses, rtd_loss, rtd_logits, replaced, real, is_replaced,
                                mix_logits)
        predictions = self.mlm_head.predictions(features, self.token_embedding) if predict else None
        return AMOSOutput(loss=loss, head_losses=head_losses, rtd_loss=rtd_loss, replaced=replaced, metrics=metrics,
                          rtd_logits=rtd_logits.detach(), disc_states=disc_hidden.detach(),
                          head_predictions=predictions)

    @torch.no_grad()
    def _metrics(self, loss, mlm_loss, head_losses, rtd_loss, rtd_logits, replaced, real, is_replaced, mix_logits):
        """Detached float32 scalars on the model's device (read by the trainer once per optimizer step). Counts
        and sums instead of boolean selections, so that computing them never waits for the device."""
        correct = (rtd_logits > 0) == replaced
        zero = rtd_logits.new_tensor(0.0)

        def accuracy(where: torch.Tensor) -> torch.Tensor:  # 0 where there is nothing to count
            return (correct & where).sum() / where.sum().clamp(min=1)

        # The RTD loss of the best constant guess (the share of replaced tokens): a discriminator below it has learned
        # something from the context even while its accuracy on replaced tokens, at threshold 0.5, is still 0.
        share = (real & replaced).sum() / real.sum().clamp(min=1)
        metrics = {"loss": loss, "mlm_loss": mlm_loss, "rtd_loss": rtd_loss,
                   "rtd_loss_constant": F.binary_cross_entropy(share, share),
                   "disc_acc_replaced": accuracy(real & replaced), "disc_acc_original": accuracy(real & ~replaced),
                   "replaced_frac": is_replaced.float().mean() if is_replaced.numel() else zero}
        gamma = torch.softmax(mix_logits, dim=-1)
        for k, layer in enumerate(self.config.head_layers):
            metrics[f"mlm_loss_L{layer}"] = head_losses[k]
            metrics[f"mix_weight_L{layer}"] = gamma[:, k].mean() if gamma.shape[0] else zero
        return {name: value.detach().float() for name, value in metrics.items()}
