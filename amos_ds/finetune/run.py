"""The fine-tuning loop of the paper's Table 6: AdamW (eps 1e-6, betas 0.9/0.98), linear warm-up then linear decay,
dropout 0.1; the best epoch on dev (by the task's metric) gives the reported test score; the median over seeds is
the result.

Each seed starts from the same source (pretrained weights, or a fresh random init drawn from that seed), with its
own head init, dropout and data order, so the arms of a comparison differ only in the encoder's start.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from amos_ds.errors import ConfigError
from amos_ds.finetune.classifier import SentenceClassifier
from amos_ds.finetune.metrics import classification_metrics, regression_metrics
from amos_ds.finetune.pretrained import EncoderSource
from amos_ds.finetune.tasks import Task, batches, encode
from amos_ds.train.param_groups import parameter_groups

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("spearman", "pearson")


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 32
    warmup: float = 0.06  # fraction of all steps
    weight_decay: float = 0.01
    dropout: float = 0.1
    max_len: int = 128
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    metric: str | None = None  # what picks the best epoch; None: accuracy, or spearman for regression
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_len < 4:
            raise ConfigError(f"--max-len must leave room for [CLS] and two [SEP], got {self.max_len}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be at least 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        if self.metric is not None and self.metric not in CLASSIFICATION_METRICS + REGRESSION_METRICS:
            raise ConfigError(f"--metric {self.metric}: choose one of {CLASSIFICATION_METRICS + REGRESSION_METRICS}")

    def selection_metric(self, task: Task) -> str:
        """The dev metric that picks each seed's best epoch; it must suit the task."""
        allowed = REGRESSION_METRICS if task.regression else CLASSIFICATION_METRICS
        metric = self.metric or allowed[0]
        if metric not in allowed or (metric == "f1" and len(task.labels) != 2):
            raise ConfigError(f"--metric {metric} does not apply to {task.name} "
                              f"({'regression' if task.regression else f'{len(task.labels)} classes'})")
        return metric


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over the warm-up steps, then linearly to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy over the classes, or the squared error of the one output for regression."""
    return F.mse_loss(logits.squeeze(-1), labels.float()) if regression else F.cross_entropy(logits, labels)


def scores(predicted: list, gold: list, task: Task) -> dict[str, float]:
    if task.regression:
        return regression_metrics(predicted, gold)
    return classification_metrics(predicted, gold, len(task.labels))


@torch.no_grad()
def evaluate(model: SentenceClassifier, encoded: list[tuple[list[int], int | float]], task: Task,
             batch_size: int, device: str = "cpu") -> dict[str, float]:
    model.eval()
    predicted = []
    for batch in batches(encoded, batch_size):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        predicted += (logits.squeeze(-1) if task.regression else logits.argmax(-1)).tolist()
    return scores(predicted, [label for _, label in encoded], task)


def trivial_baseline(task: Task, encoded: dict[str, list]) -> dict[str, dict[str, float]]:
    """What a model that ignores the text scores: the most frequent training label, or the mean training score."""
    train_labels = [label for _, label in encoded["train"]]
    guess = statistics.fmean(train_labels) if task.regression else statistics.mode(sorted(train_labels))
    return {split: scores([guess] * len(encoded[split]), [label for _, label in encoded[split]], task)
            for split in ("dev", "test")}


def finetune_seed(source: EncoderSource, task: Task, encoded: dict[str, list], config: FinetuneConfig, seed: int,
                  log: Callable[[str], None] = print) -> dict:
    """Train one seed for all epochs; dev and test scores after each epoch, and the best dev epoch's."""
    metric = config.selection_metric(task)
    torch.manual_seed(seed)
    model = SentenceClassifier(source.build(config.dropout), len(task.labels) or 1, config.dropout)
    model.to(config.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    steps_per_epoch = -(-len(encoded["train"]) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(max(1, round(config.warmup * total_steps)), total_steps))
    order = torch.Generator().manual_seed(seed)
    epochs = []
    for epoch in range(1, config.epochs + 1):
        started, loss_sum = time.perf_counter(), 0.0
        model.train()
        for batch in batches(encoded["train"], config.batch_size, order):
            batch = {name: tensor.to(config.device) for name, tensor in batch.items()}
            loss = task_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], task.regression)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
        dev, test = (evaluate(model, encoded[split], task, 2 * config.batch_size, config.device)
                     for split in ("dev", "test"))
        epochs.append({"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "dev": dev, "test": test})
        log(f"seed {seed} epoch {epoch}/{config.epochs} | train loss {loss_sum / steps_per_epoch:.4f} | "
            f"dev {metric} {dev[metric]:.4f} | {time.perf_counter() - started:.0f} s")
    best = max(epochs, key=lambda e: e["dev"][metric])  # the first of equal ones
    return {"seed": seed, "best_epoch": best["epoch"], "dev": best["dev"], "test": best["test"], "epochs": epochs}


def finetune(source: EncoderSource, task: Task, config: FinetuneConfig, log: Callable[[str], None] = print) -> dict:
    """Every seed of `config`, then the medians of every metric: the numbers the paper reports."""
    if config.max_len > source.config.max_positions:
        raise ConfigError(f"--max-len {config.max_len} exceeds the model's {source.config.max_positions} positions")
    metric = config.selection_metric(task)
    encoded = {split: encode(getattr(task, split), source.tokenizer, task.labels, config.max_len)
               for split in ("train", "dev", "test")}
    runs = [finetune_seed(source, task, encoded, config, seed, log) for seed in config.seeds]
    median = {split: {name: statistics.median(run[split][name] for run in runs) for name in runs[0][split]}
              for split in ("dev", "test")}
    return {"task": task.name, "labels": task.labels, "regression": task.regression, "metric": metric,
            "sizes": {split: len(e) for split, e in encoded.items()}, "encoder": source.description,
            "tokenizer_hash": source.tokenizer.hash, "config": asdict(config), "median": median,
            "baseline": trivial_baseline(task, encoded), "runs": runs}
