"""Held-out evaluation during pretraining: the generator heads' MLM loss and accuracy, the discriminator's RTD loss
against the best constant guess, its AUC, its accuracies, and the representation health of its token states.

The held-out micro-batches come from the data layer (`amos_ds.data.held_out`): what micro-batch j holds, its masking
and its Gumbel noise (keyed by j) are the same at every world size, so that two evaluations of the same weights give
the same numbers on one rank or many. Each rank runs its share in eval mode (no dropout) without gradients; the
per-token results are gathered once and every metric is computed from all of them (so they are token means over
the whole held-out slice, not means of per-rank means).

Keys (in metrics.jsonl beside the training step's): `eval_mlm_loss` (sum over heads, as the training `mlm_loss`),
`eval_mlm_loss_L<d>` and `eval_mlm_acc_L<d>` per head layer d, `eval_rtd_loss`, `eval_rtd_loss_constant` (the RTD
loss of always guessing the share of replaced tokens), `eval_rtd_auc` (replaced vs original tokens; 0.5 = chance),
`eval_disc_acc_replaced`, `eval_disc_acc_original` (at threshold 0.5), `eval_replaced_frac` (replaced / masked
tokens), `eval_tokens`, `eval_time_s`, and the `health_*` figures of `amos_ds.train.health`.
"""

import hashlib
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from amos_ds.data import DataConfig, PackedDataset, open_corpora
from amos_ds.data.held_out import DatasetView, held_out_batches, split_held_out
from amos_ds.errors import DataError
from amos_ds.model import AMOSOutput
from amos_ds.train.health import representation_health
from amos_ds.train.model_inputs import model_inputs

EVAL_PREFIX = "eval_"
MAX_HELD_OUT_SHARE = 0.1  # the default held-out slice takes at most this share of --data


def held_out_split(dataset: PackedDataset, eval_specs: list[str], eval_batches: int, global_batch: int,
                   seed: int) -> tuple[DatasetView, DatasetView | None]:
    """(what training reads, what evaluation reads): `eval_batches` global batches of --eval-data, or else as many
    of them as fit in a tenth of `dataset`, held out of it (None, and training reads all, when not one fits or
    `eval_batches` is 0)."""
    if eval_specs and eval_batches:
        eval_dataset = open_corpora(eval_specs, dataset.seq_len, seed)
        if eval_dataset.tokenizer_hash != dataset.tokenizer_hash:
            raise DataError(f"--eval-data {' '.join(eval_specs)}: preprocessed with tokenizer "
                            f"{eval_dataset.tokenizer_hash}, the training data with {dataset.tokenizer_hash}; "
                            "preprocess it with the training data's tokenizer")
        if eval_batches * global_batch > len(eval_dataset):
            raise DataError(f"--eval-data {' '.join(eval_specs)}: {len(eval_dataset)} samples, fewer than "
                            f"--eval-batches {eval_batches} x train_batch_size {global_batch}; lower --eval-batches")
        return split_held_out(dataset, 0)[0], split_held_out(eval_dataset, eval_batches * global_batch)[1]
    batches = min(eval_batches, int(len(dataset) * MAX_HELD_OUT_SHARE) // global_batch)
    training, held_out = split_held_out(dataset, batches * global_batch)
    return training, held_out if batches else None


def noise_seed(run_seed: int, micro_batch_number: int) -> int:
    """The Gumbel-noise key of held-out micro-batch j: fixed for the run, distinct from every training step's."""
    digest = hashlib.blake2b(f"eval/{run_seed}/{micro_batch_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_part(output: AMOSOutput, batch: dict) -> dict[str, np.ndarray]:
    """What one evaluated micro-batch contributes, as host arrays: per head the summed MLM loss and the number of
    correct top predictions, the masked and replaced counts, and at every real token the RTD logit and label."""
    targets = batch["labels"].flatten()[batch["masked_positions"]]
    masked = len(targets)
    real = batch["attention_mask"].bool()
    return {"head_loss_sum": (output.head_losses.detach().double().cpu() * masked).numpy(),
            "head_correct": (output.head_predictions.cpu() == targets).sum(dim=1).numpy(),
            "masked": np.int64(masked),
            "replaced_masked": np.int64(output.replaced.cpu().flatten()[batch["masked_positions"]].sum()),
            "rtd_logits": output.rtd_logits.float().cpu()[real].numpy(),
            "replaced": output.replaced.cpu()[real].numpy()}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None without both classes."""
    positive = positive.astype(bool)
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if not num_positive or not num_negative:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct score
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def eval_metrics(parts: list[dict[str, np.ndarray]], head_layers: tuple[int, ...]) -> dict[str, float | None]:
    """The `eval_*` metrics of all micro-batches' parts together (token means over the whole slice)."""
    masked = sum(int(part["masked"]) for part in parts)
    loss_sum = np.sum([part["head_loss_sum"] for part in parts], axis=0)
    correct = np.sum([part["head_correct"] for part in parts], axis=0)
    logits = np.concatenate([part["rtd_logits"] for part in parts]).astype(np.float64)
    replaced = np.concatenate([part["replaced"] for part in parts]).astype(bool)
    metrics: dict[str, float | None] = {"eval_mlm_loss": float(loss_sum.sum() / masked)}
    for k, layer in enumerate(head_layers):
        metrics[f"eval_mlm_loss_L{layer}"] = float(loss_sum[k] / masked)
        metrics[f"eval_mlm_acc_L{layer}"] = float(correct[k] / masked)
    share = replaced.mean()
    constant = -(share * np.log(share) + (1 - share) * np.log(1 - share)) if 0 < share < 1 else 0.0
    guessed = logits > 0
    metrics.update(
        eval_rtd_loss=float(np.mean(np.logaddexp(0.0, logits) - replaced * logits)),  # binary cross-entropy
        eval_rtd_loss_constant=float(constant), eval_rtd_auc=roc_auc(logits, replaced),
        eval_disc_acc_replaced=float(guessed[replaced].mean()) if replaced.any() else 0.0,
        eval_disc_acc_original=float((~guessed[~replaced]).mean()) if (~replaced).any() else 0.0,
        eval_replaced_frac=sum(int(part["replaced_masked"]) for part in parts) / masked,
        eval_tokens=len(logits))
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, device: torch.device, held_out: DatasetView, micro_batch: int,
             data_config: DataConfig, head_layers: tuple[int, ...], progress: float) -> dict[str, float | None]:
    """Evaluate `model` (a DeepSpeed engine or an AMOSModel) on the held-out slice, every rank its share; returns the
    metrics on every rank, with the health figures on rank 0 (from held-out micro-batch 0, which it evaluates)."""
    started = time.perf_counter()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    was_training = model.training
    model.eval()
    parts, health = [], {}
    for number, batch in held_out_batches(held_out, micro_batch, rank, world_size, data_config):
        output = model(**model_inputs(batch, device), seed=noise_seed(data_config.seed, number), progress=progress,
                       predict=True)
        parts.append(batch_part(output, batch))
        if number == 0:
            health = representation_health(output.disc_states[batch["attention_mask"].bool().to(device)])
    model.train(was_training)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, parts)
    metrics = eval_metrics([part for rank_parts in gathered for part in rank_parts], head_layers)
    return {**metrics, **health, "eval_time_s": time.perf_counter() - started}
