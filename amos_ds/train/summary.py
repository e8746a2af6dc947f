"""The last lines of a run: what it learned, in numbers a user can judge without plots.

The deepest generator head's MLM loss against the unigram entropy of the training tokens (a generator that ignores
context scores that entropy at best); the discriminator's RTD loss against that of the best constant guess (the share
of replaced tokens: a discriminator that ignores context scores that at best) and its accuracy on replaced tokens
(0 for one that calls every token original); all averaged over the last logged steps.
"""

import json
from pathlib import Path

import numpy as np

from amos_ds.atomic import write_atomically
from amos_ds.data import PackedDataset
from amos_ds.train.metrics import read_metrics

LAST_STEPS = 10
SUMMARY_FILE = "summary.json"  # the numbers of the two lines; `amos-ds plot` draws the entropy from it
ENTROPY_SAMPLES = 4096  # samples spread evenly over the dataset: all of a small corpus, a fair sample of a big one


def unigram_entropy(dataset: PackedDataset, max_samples: int = ENTROPY_SAMPLES) -> float:
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
            "disc_acc_replaced": mean("disc_acc_replaced"), "disc_acc_original": mean("disc_acc_original")}


def summary_lines(summary: dict) -> list[str]:
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
