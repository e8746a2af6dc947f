"""A distributed sampler that resumes exactly, even at another world size.

The global order is an endless sequence of positions g = 0, 1, 2, ...; position g is sample perm_e(g mod N) of
epoch e = g // N, where perm_e is a seeded permutation of the N samples, new each epoch. One micro-step consumes
the next world_size * micro_batch_size positions: rank r reads the r-th slice of micro_batch_size of them. So
every rank reads a disjoint part of the same order, and an epoch boundary falls inside a micro-step where it must
rather than dropping samples.

The state is one number, `consumed_samples` (positions consumed by all ranks together). The trainer calls
`advance(n)` after each optimizer step with the number of samples that step consumed over all ranks
(world_size * micro_batch_size * gradient_accumulation_steps) and saves `state_dict()`; iteration itself does not
move the state, because a DataLoader prefetches batches that the trainer has not used yet. After
`load_state_dict()`, a new iterator starts at the first unconsumed position, whatever the world size now is.
"""

from collections.abc import Iterator

import numpy as np

from amos_ds.data.permutation import Permutation
from amos_ds.errors import DataError


class ResumableSampler:
    """Yields this rank's micro-batches (lists of global sample indices) forever, from `consumed_samples` on."""

    def __init__(self, num_samples: int, micro_batch_size: int, rank: int, world_size: int, seed: int):
        if num_samples < 1 or micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: num_samples={num_samples}, micro_batch_size={micro_batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.consumed_samples = 0
        self._permutations: dict[int, Permutation] = {}

    @property
    def samples_per_micro_step(self) -> int:
        """Positions of the global order one micro-batch on every rank consumes."""
        return self.world_size * self.micro_batch_size

    def _permutation(self, epoch: int) -> Permutation:
        if epoch not in self._permutations:
            self._permutations = {epoch: Permutation(self.num_samples, (self.seed, epoch))}
        return self._permutations[epoch]

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at positions start .. start+count-1 of the global order."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.num_samples
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self._permutation(int(epoch))(positions[here] % self.num_samples)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples + self.rank * self.micro_batch_size
        while True:
            yield self.global_indices(start, self.micro_batch_size).tolist()
            start += self.samples_per_micro_step

    def advance(self, num_global_samples: int) -> None:
        """Record that all ranks together consumed `num_global_samples` more positions (call after each step)."""
        if num_global_samples < 0 or num_global_samples % self.samples_per_micro_step:
            raise ValueError(f"advance({num_global_samples}) is not a whole number of micro-steps of "
                             f"{self.samples_per_micro_step} samples")
        self.consumed_samples += num_global_samples

    def state_dict(self) -> dict:
        """What resuming needs: the position, and the order's shape to check it against (world size and micro-batch
        size are free to change, so they are not kept)."""
        return {"consumed_samples": self.consumed_samples, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved run's order; world size and micro-batch size may differ from the saving run's."""
        if (state["num_samples"], state["seed"]) != (self.num_samples, self.seed):
            raise DataError(f"the checkpoint's data order is for {state['num_samples']} samples with seed "
                            f"{state['seed']}, this run has {self.num_samples} with seed {self.seed}; resume with "
                            "the same --data, sequence length and seed")
        self.consumed_samples = int(state["consumed_samples"])
