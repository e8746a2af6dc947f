"""The fine-tuning loop of the paper's Table 6: AdamW (eps 1e-6, betas 0.9/0.98), linear warm-up then linear decay,
dropout 0.1; the best epoch on dev (by the task's metric) gives a seed's scores; every learning rate x batch size of
the grid is trained with every seed, and the setting with the best median dev score gives the result (grid.py).

Each seed starts from the same source (pretrained weights, or a fresh random init drawn from that seed), with its
own head init, dropout and data order, so the arms of a comparison differ only in the encoder's start.
"""

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from amos_ds.config import ModelConfig
from amos_ds.errors import ConfigError
from amos_ds.finetune.classifier import SentenceClassifier
from amos_ds.finetune.grid import best_setting, default_grid, median_scores
from amos_ds.finetune.metrics import classification_metrics, regression_metrics
from amos_ds.finetune.pretrained import EncoderSource
from amos_ds.finetune.tasks import Task, batches, encode
from amos_ds.train.param_groups import parameter_groups

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("spearman", "pearson")
# A run whose last epoch's train loss is above this fraction of the best constant prediction's loss has not learned.
NOT_LEARNED_FRACTION = 0.95


@dataclass
class FinetuneConfig:
    epochs: int | None = None  # None: the default grid's, by the encoder's width (grid.py)
    lr: list[float] | None = None  # the learning rates searched; None: the default grid's
    batch_size: list[int] | None = None  # the batch sizes searched; None: the default grid's
    warmup: float = 0.06  # fraction of all steps
    weight_decay: float = 0.01
    dropout: float = 0.1
    max_len: int = 128
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    metric: str | None = None  # what picks the best epoch and setting; None: accuracy, or spearman for regression
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        for lr in self.lr or ():
            if not 0 < lr < math.inf:
                raise ConfigError(f"--lr {lr:g}: a learning rate must be positive and finite (e.g. 2e-5)")
        for batch_size in self.batch_size or ():
            if batch_size < 1:
                raise ConfigError(f"--batch-size {batch_size}: a batch size must be at least 1 (e.g. 32)")
        for flag, values in (("--lr", self.lr), ("--batch-size", self.batch_size), ("--seeds", self.seeds)):
            repeated = [value for i, value in enumerate(values or ()) if value in values[:i]]
            if repeated:
                raise ConfigError(f"{flag} {' '.join(f'{v:g}' for v in values)}: {repeated[0]:g} is given twice; "
                                  "list each value once")
        if self.max_len < 4:
            raise ConfigError(f"--max-len must leave room for [CLS] and two [SEP], got {self.max_len}")
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

    def with_defaults(self, model: ModelConfig) -> "FinetuneConfig":
        """This config with the epochs, learning rates and batch sizes left unset taken from `model`'s default
        grid."""
        grid = default_grid(model)
        return replace(self, epochs=self.epochs or grid.epochs, lr=self.lr or list(grid.lr),
                       batch_size=self.batch_size or list(grid.batch_size))

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
             batch_size: int, pad_id: int, device: str = "cpu") -> dict[str, float]:
    model.eval()
    predicted = []
    for batch in batches(encoded, batch_size, pad_id):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        predicted += (logits.squeeze(-1) if task.regression else logits.argmax(-1)).tolist()
    return scores(predicted, [label for _, label in encoded], task)


def trivial_baseline(task: Task, encoded: dict[str, list]) -> dict[str, dict[str, float]]:
    """What a model that ignores the text scores: the most frequent training label, or the mean training score."""
    train_labels = [label for _, label in encoded["train"]]
    guess = statistics.fmean(train_labels) if task.regression else statistics.mode(sorted(train_labels))
    return {split: scores([guess] * len(encoded[split]), [label for _, label in encoded[split]], task)
            for split in ("dev", "test")}


def trivial_train_loss(task: Task, train: list[tuple[list[int], int | float]]) -> float:
    """The training loss of the best prediction that ignores the text: the cross-entropy of always predicting the
    training label frequencies (their entropy), or the squared error of always predicting the mean (the variance)."""
    labels = [label for _, label in train]
    if task.regression:
        return statistics.pvariance(labels)
    return -sum(count / len(labels) * math.log(count / len(labels)) for count in Counter(labels).values())


def learned(run: dict, trivial_loss: float) -> bool:
    """Whether a run's last-epoch train loss has left the constant prediction's (by more than 5% of it)."""
    return run["epochs"][-1]["train_loss"] < NOT_LEARNED_FRACTION * trivial_loss


def not_learned_warning(results: dict) -> str | None:
    """One line when some run of the chosen setting ended where it started: at the loss of ignoring the text."""
    runs, best = results["runs"], results["best"]
    stuck = [run for run in runs if not run["learned"]]
    if not stuck:
        return None
    loss = max(run["epochs"][-1]["train_loss"] for run in stuck)
    return (f"warning: {len(stuck)} of {len(runs)} seed(s) at the best setting (lr {best['lr']:g}, batch "
            f"{best['batch_size']}) ended with train loss {loss:.4f}, not {1 - NOT_LEARNED_FRACTION:.0%} below the "
            f"{results['trivial_train_loss']:.4f} of a prediction that ignores the text: they did not learn; try a "
            "higher --lr or more --epochs")


def finetune_seed(source: EncoderSource, task: Task, encoded: dict[str, list], config: FinetuneConfig, lr: float,
                  batch_size: int, seed: int, log: Callable[[str], None] = print) -> dict:
    """Train one seed at one learning rate and batch size for all epochs; dev and test scores after each epoch,
    and the best dev epoch's. `config` has its defaults filled in (FinetuneConfig.with_defaults)."""
    metric = config.selection_metric(task)
    torch.manual_seed(seed)
    model = SentenceClassifier(source.build(config.dropout), len(task.labels) or 1, config.dropout)
    model.to(config.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = -(-len(encoded["train"]) // batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(max(1, round(config.warmup * total_steps)), total_steps))
    order = torch.Generator().manual_seed(seed)
    epochs = []
    for epoch in range(1, config.epochs + 1):
        started, loss_sum = time.perf_counter(), 0.0
        model.train()
        for batch in batches(encoded["train"], batch_size, source.tokenizer.special.pad, order):
            batch = {name: tensor.to(config.device) for name, tensor in batch.items()}
            loss = task_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"], task.regression)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
        dev, test = (evaluate(model, encoded[split], task, 2 * batch_size, source.tokenizer.special.pad,
                              config.device) for split in ("dev", "test"))
        epochs.append({"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "dev": dev, "test": test})
        log(f"lr {lr:g} batch {batch_size} seed {seed} epoch {epoch}/{config.epochs} | train loss "
            f"{epochs[-1]['train_loss']:.4f} | dev {metric} {dev[metric]:.4f} | {time.perf_counter() - started:.0f} s")
    best = max(epochs, key=lambda e: e["dev"][metric])  # the first of equal ones
    return {"seed": seed, "best_epoch": best["epoch"], "dev": best["dev"], "test": best["test"], "epochs": epochs}


def finetune(source: EncoderSource, task: Task, config: FinetuneConfig, log: Callable[[str], None] = print) -> dict:
    """Every learning rate x batch size of the grid with every seed; each setting's medians; the setting with the
    best median dev score, whose medians are the result (the numbers the paper reports)."""
    if config.max_len > source.config.max_positions:
        raise ConfigError(f"--max-len {config.max_len} exceeds the model's {source.config.max_positions} positions")
    config = config.with_defaults(source.config)
    metric = config.selection_metric(task)
    encoded = {split: encode(getattr(task, split), source.tokenizer, task.labels, config.max_len)
               for split in ("train", "dev", "test")}
    trivial_loss = trivial_train_loss(task, encoded["train"])
    settings = []
    for lr in config.lr:
        for batch_size in config.batch_size:
            runs = [finetune_seed(source, task, encoded, config, lr, batch_size, seed, log) for seed in config.seeds]
            for run in runs:
                run["learned"] = learned(run, trivial_loss)
            settings.append({"lr": lr, "batch_size": batch_size, "median": median_scores(runs), "runs": runs})
    best = best_setting(settings, metric)
    return {"task": task.name, "labels": task.labels, "regression": task.regression, "metric": metric,
            "sizes": {split: len(e) for split, e in encoded.items()}, "encoder": source.description,
            "tokenizer_hash": source.tokenizer.hash, "config": asdict(config),
            "best": {"lr": best["lr"], "batch_size": best["batch_size"]}, "median": best["median"],
            "runs": best["runs"], "settings": settings, "baseline": trivial_baseline(task, encoded),
            "trivial_train_loss": trivial_loss}
