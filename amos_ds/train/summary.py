"""The last lines of a run: what it learned, in numbers a user can judge without plots.

The deepest generator head's MLM loss against the unigram entropy of the training tokens (a generator that ignores
context scores that entropy at best), and the discriminator's accuracy on replaced tokens (0 for one that calls every
token original), both averaged over the last logged steps.
"""

from pathlib import Path

import numpy as np

from amos_ds.data import PackedDataset
from amos_ds.train.metrics import read_metrics
from amos_ds.vocab import NUM_SPECIAL_TOKENS

LAST_STEPS = 10
ENTROPY_SAMPLES = 4096  # samples spread evenly over the dataset: all of a small corpus, a fair sample of a big one


def unigram_entropy(dataset: PackedDataset, max_samples: int = ENTROPY_SAMPLES) -> float:
    """Entropy (nats) of the ordinary tokens' frequencies, the ones MLM predicts, over up to `max_samples` samples."""
    indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(len(dataset), max_samples)).astype(np.int64))
    counts = np.zeros(dataset.vocab_size, dtype=np.int64)
    for index in indices:
        counts += np.bincount(dataset[index], minlength=dataset.vocab_size)
    counts[:NUM_SPECIAL_TOKENS] = 0
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def learning_summary(records: list[dict], entropy: float, last_steps: int = LAST_STEPS) -> list[str]:
    """Two lines: the deepest head's MLM loss against `entropy`, and the discriminator's accuracies."""
    last = records[-last_steps:]

    def mean(name: str) -> float:
        return sum(record[name] for record in last) / len(last)

    deepest = max(int(name.removeprefix("mlm_loss_L")) for name in last[-1] if name.startswith("mlm_loss_L"))
    mlm = mean(f"mlm_loss_L{deepest}")
    where = f"steps {last[0]['step']}-{last[-1]['step']}"
    side = "below" if mlm <= entropy else "above"
    return [f"summary ({where}): deepest generator head (layer {deepest}) MLM loss {mlm:.3f} nats, "
            f"{abs(entropy - mlm):.3f} {side} the unigram entropy of the training tokens ({entropy:.3f})",
            f"summary ({where}): discriminator accuracy on replaced tokens {mean('disc_acc_replaced'):.3f}, "
            f"on original tokens {mean('disc_acc_original'):.3f}"]


def print_summary(run_dir: Path, dataset: PackedDataset) -> None:
    records = read_metrics(run_dir)
    if records:
        print("\n".join(learning_summary(records, unigram_entropy(dataset))), flush=True)
