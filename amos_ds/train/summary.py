"""The last lines of a run: what it learned, in numbers a user can judge without plots.

From the last held-out evaluation (amos_ds/train/evaluate.py): the deepest generator head's MLM loss against the
unigram entropy of the training tokens (a generator that ignores context scores that entropy at best); the
discriminator's RTD AUC (0.5 = chance; at a 15% masking rate its accuracy at threshold 0.5 says little early in
training, the AUC does) and RTD loss against that of the best constant guess (the share of replaced tokens: a
discriminator that ignores context scores that at best); the probe against its majority-class baseline; the health
of the discriminator's token states (amos_ds/train/health.py). A run without a held-out evaluation gets the training
figures instead, averaged over the last logged steps; summary.json keeps both.
"""

import json
from pathlib import Path

import numpy as np

from amos_ds.atomic import write_atomically
from amos_ds.data import PackedDataset
from amos_ds.data.held_out import DatasetView
from amos_ds.train.health import COLLAPSE_EFFECTIVE_RANK, COLLAPSE_MEAN_COSINE, collapse_warning
from amos_ds.train.metrics import read_metrics

LAST_STEPS = 10
SUMMARY_FILE = "summary.json"  # the numbers of the two lines; `amos-ds plot` draws the entropy from it
ENTROPY_SAMPLES = 4096  # samples spread evenly over the dataset: all of a small corpus, a fair sample of a big one


def unigram_entropy(dataset: PackedDataset | DatasetView, max_samples: int = ENTROPY_SAMPLES) -> float:
    """Entropy (nats) of the ordinary tokens' frequencies, the ones MLM predicts, over up to `max_samples` samples."""
    indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(len(dataset), max_samples)).astype(np.int64))
    counts = np.zeros(dataset.vocab_size, dtype=np.int64)
    for index in indices:
        counts += np.bincount(dataset[index], minlength=dataset.vocab_size)
    counts[~dataset.special.is_ordinary(np.arange(dataset.vocab_size))] = 0
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def learning_summary(records: list[dict], entropy: float, last_steps: int = LAST_STEPS) -> dict:
    """The deepest head's MLM loss and the discriminator's RTD loss and accuracies, averaged over the last steps."""
    last = records[-last_steps:]

    def mean(name: str) -> float:
        return sum(record[name] for record in last) / len(last)

    deepest = max(int(name.removeprefix("mlm_loss_L")) for name in last[-1] if name.startswith("mlm_loss_L"))
    return {"first_step": last[0]["step"], "last_step": last[-1]["step"], "deepest_head": deepest,
            "mlm_loss": mean(f"mlm_loss_L{deepest}"), "unigram_entropy": entropy,
            "rtd_loss": mean("rtd_loss"), "rtd_loss_constant": mean("rtd_loss_constant"),
            "disc_acc_replaced": mean("disc_acc_replaced"), "disc_acc_original": mean("disc_acc_original"),
            "held_out": held_out_summary(records)}


def held_out_summary(records: list[dict]) -> dict | None:
    """The last held-out evaluation's figures (None when the run never evaluated)."""
    evaluated = [record for record in records if "eval_mlm_loss" in record]
    if not evaluated:
        return None
    last = evaluated[-1]
    deepest = max(int(name.removeprefix("eval_mlm_loss_L")) for name in last if name.startswith("eval_mlm_loss_L"))
    kept = {name: value for name, value in last.items() if name.startswith(("eval_rtd", "eval_disc", "health_",
                                                                              "probe_"))}
    return {"step": last["step"], "deepest_head": deepest, "mlm_loss": last[f"eval_mlm_loss_L{deepest}"],
            "mlm_acc": last[f"eval_mlm_acc_L{deepest}"], **kept}


def summary_lines(summary: dict) -> list[str]:
    """The held-out lines when the run evaluated, else the training ones."""
    return held_out_lines(summary) if summary.get("held_out") else training_lines(summary)


def held_out_lines(summary: dict) -> list[str]:
    held_out, entropy = summary["held_out"], summary["unigram_entropy"]
    where = f"held-out, step {held_out['step']}"
    mlm, rtd, constant = held_out["mlm_loss"], held_out["eval_rtd_loss"], held_out["eval_rtd_loss_constant"]
    auc = held_out["eval_rtd_auc"]
    lines = [f"summary ({where}): deepest generator head (layer {held_out['deepest_head']}) MLM loss {mlm:.3f} nats "
             f"(accuracy {held_out['mlm_acc']:.3f}), {abs(entropy - mlm):.3f} {_side(mlm, entropy)} the unigram "
             f"entropy of the training tokens ({entropy:.3f})",
             f"summary ({where}): discriminator RTD AUC {'n/a' if auc is None else f'{auc:.3f}'} (0.5 = chance); "
             f"RTD loss {rtd:.3f}, {abs(constant - rtd):.3f} {_side(rtd, constant)} the best constant guess "
             f"({constant:.3f}); accuracy on replaced tokens {held_out['eval_disc_acc_replaced']:.3f}, on original "
             f"tokens {held_out['eval_disc_acc_original']:.3f}"]
    if "probe_accuracy" in held_out:
        lines.append(f"summary ({where}): linear probe on frozen discriminator features, {held_out['probe_task']} "
                     f"dev accuracy {held_out['probe_accuracy']:.3f} against {held_out['probe_majority']:.3f} for the "
                     f"majority class")
    if "health_mean_cosine" in held_out:
        state = "COLLAPSED" if collapse_warning(held_out) else "not collapsed"
        lines.append(f"summary ({where}): discriminator token states {state}: mean cosine "
                     f"{held_out['health_mean_cosine']:.3f} (collapsed from {COLLAPSE_MEAN_COSINE}), effective rank "
                     f"{held_out['health_effective_rank']:.1f} (collapsed below {COLLAPSE_EFFECTIVE_RANK:g}), "
                     f"per-unit std {held_out['health_unit_std']:.3f}")
    return lines


def training_lines(summary: dict) -> list[str]:
    where = f"steps {summary['first_step']}-{summary['last_step']}"
    mlm, entropy = summary["mlm_loss"], summary["unigram_entropy"]
    rtd, constant = summary["rtd_loss"], summary["rtd_loss_constant"]
    return [f"summary ({where}): deepest generator head (layer {summary['deepest_head']}) MLM loss {mlm:.3f} nats, "
            f"{abs(entropy - mlm):.3f} {_side(mlm, entropy)} the unigram entropy of the training tokens "
            f"({entropy:.3f})",
            f"summary ({where}): discriminator RTD loss {rtd:.3f}, {abs(constant - rtd):.3f} {_side(rtd, constant)} "
            f"the best constant guess ({constant:.3f}); accuracy on replaced tokens "
            f"{summary['disc_acc_replaced']:.3f}, on original tokens {summary['disc_acc_original']:.3f}"]


def _side(loss: float, reference: float) -> str:
    return "below" if loss <= reference else "above"


def read_summary(run_dir: Path | str) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_summary(run_dir: Path, dataset: PackedDataset) -> None:
    """Print the two lines and keep their numbers in RUN_DIR/summary.json (written atomically)."""
    records = read_metrics(run_dir)
    if not records:
        return
    summary = learning_summary(records, unigram_entropy(dataset))
    write_atomically(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    print("\n".join(summary_lines(summary)), flush=True)
