"""Linear probes on frozen features: how much of a task a linear classifier reads off an encoder's token states.

A probe mean-pools a layer's states over each example's real tokens, standardises the pooled features with the
training split's mean and deviation, and fits a ridge least-squares classifier (one-hot targets, closed form, so
the same features give the same score every time) on train.tsv; it reports accuracy on dev.tsv beside the
majority class's. The task is read and tokenised as `amos-ds finetune` does (`amos_ds.finetune.tasks`).

- During pretraining (`--probe-task DIR`): the discriminator's last layer at each evaluation (`probe_*` keys).
- `amos-ds probe RUN_DIR|CHECKPOINT --task DIR`: every layer of the generator and of the discriminator, the
  paper's Section 5.2 analysis, as a table.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amos_ds.config import ModelConfig
from amos_ds.data.tokenizer import SentencepieceTokenizer
from amos_ds.errors import DataError
from amos_ds.finetune.pretrained import TextEncoder, encoder_state
from amos_ds.finetune.tasks import batches, encode, load_task
from amos_ds.model import Encoder

RIDGE = 1.0  # L2 penalty on the standardised features' weights
BATCH_SIZE = 64

# ids [B, T], attention mask [B, T] -> the states of each probed layer, [B, T, H] each
LayerStates = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


@dataclass
class ProbeTask:
    name: str
    num_labels: int
    train: list[tuple[list[int], int]]
    dev: list[tuple[list[int], int]]
    pad_id: int  # the tokenizer's

    @property
    def majority(self) -> float:
        """Dev accuracy of always answering the most frequent training label."""
        guess = statistics.mode(sorted(label for _, label in self.train))
        return sum(label == guess for _, label in self.dev) / len(self.dev)


def load_probe_task(directory: str | Path, tokenizer: SentencepieceTokenizer, max_len: int,
                    max_train_examples: int | None = None, flag: str = "--probe-task") -> ProbeTask:
    """A classification task's train and dev splits, tokenised; of train, at most `max_train_examples` spread evenly
    over the file (task files are often sorted by label). `flag` names the folder in error messages."""
    if not Path(directory).is_dir():
        raise DataError(f"{flag} {directory}: not a folder; give one holding train.tsv, dev.tsv and test.tsv")
    task = load_task(directory)
    if task.regression:
        raise DataError(f"{flag} {directory}: a probe needs class labels")
    count = min(len(task.train), max_train_examples or len(task.train))
    train = encode([task.train[k * len(task.train) // count] for k in range(count)], tokenizer, task.labels, max_len)
    return ProbeTask(task.name, len(task.labels), train, encode(task.dev, tokenizer, task.labels, max_len),
                     tokenizer.special.pad)


@torch.no_grad()
def pooled_features(layer_states: LayerStates, encoded: list[tuple[list[int], int]], pad_id: int,
                    device: torch.device) -> list[torch.Tensor]:
    """Per probed layer, [examples, H] float64: the mean of its states over each example's real tokens."""
    per_layer: list[list[torch.Tensor]] = []
    for batch in batches(encoded, BATCH_SIZE, pad_id):
        mask = batch["attention_mask"].to(device)
        states = layer_states(batch["input_ids"].to(device), mask)
        weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1).double()
        pooled = [(layer.double() * weights).sum(1).cpu() for layer in states]
        per_layer = per_layer or [[] for _ in pooled]
        for kept, features in zip(per_layer, pooled):
            kept.append(features)
    return [torch.cat(kept) for kept in per_layer]


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, dev: torch.Tensor, dev_labels: torch.Tensor,
                   num_labels: int) -> float:
    """Dev accuracy of a ridge least-squares classifier fitted on standardised train features (float64)."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-8)

    def design(features: torch.Tensor) -> torch.Tensor:  # standardised, with a constant column for the bias
        return torch.cat([(features - mean) / std, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)

    x = design(train)
    penalty = RIDGE * torch.eye(x.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0.0  # the bias is not penalised
    targets = F.one_hot(train_labels, num_labels).double()
    weights = torch.linalg.solve(x.t() @ x + penalty, x.t() @ targets)
    return float(((design(dev) @ weights).argmax(1) == dev_labels).double().mean())


def probe_layers(layer_states: LayerStates, task: ProbeTask, device: torch.device) -> list[float]:
    """Dev accuracy of a linear probe on each probed layer."""
    train_labels = torch.tensor([label for _, label in task.train])
    dev_labels = torch.tensor([label for _, label in task.dev])
    train, dev = (pooled_features(layer_states, encoded, task.pad_id, device) for encoded in (task.train, task.dev))
    return [probe_accuracy(train_x, train_labels, dev_x, dev_labels, task.num_labels)
            for train_x, dev_x in zip(train, dev)]


def frozen_discriminator(model: nn.Module, config: ModelConfig, zero3: bool) -> TextEncoder:
    """A copy, in eval mode, of a training AMOSModel's discriminator and token embedding. Under ZeRO-3 every rank
    must call this (the parameters are gathered for the copy)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=zero3):
        state = {name: tensor.detach().clone() for name, tensor in encoder_state(model.state_dict()).items()}
    encoder = TextEncoder(config)
    encoder.load_state_dict(state)
    return encoder.to(next(iter(state.values())).device).eval()


def score_discriminator(encoder: TextEncoder, task: ProbeTask) -> dict[str, float | str]:
    """The `probe_*` figures of a discriminator's last layer."""
    device = encoder.token_embedding.device
    accuracy, = probe_layers(lambda ids, mask: [encoder(ids, mask)], task, device)
    return {"probe_task": task.name, "probe_accuracy": accuracy, "probe_majority": task.majority}


def all_layer_states(encoder: Encoder, embedding: torch.Tensor) -> LayerStates:
    """Every layer's states of an encoder that reads `embedding`."""
    return lambda ids, mask: encoder(F.embedding(ids, embedding), mask)
