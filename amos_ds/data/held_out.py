"""A held-out slice of a dataset for evaluation, disjoint from the samples training reads.

    training, held_out = split_held_out(dataset, count)   # two views of `dataset`, numbered 0..len-1
    for index, batch in held_out_batches(held_out, micro_batch, rank, world_size, config): ...

The held-out samples are `count` samples spread evenly over the dataset (sample floor(k * N / count) for k < count),
so every blended corpus contributes in proportion. They are a function of the dataset and `count` only: the same on
every resume and at every world size. Training reads the other N - count samples; hand `training` to the sampler and
the loader in place of the dataset. (A held-out sample's neighbours in the packed token stream are training samples:
the slice holds out token windows, not whole documents.)
"""

from collections.abc import Iterator

import numpy as np
import torch

from amos_ds.data.dataset import PackedDataset
from amos_ds.data.loader import DataConfig, MaskedBatches
from amos_ds.errors import DataError


class DatasetView:
    """Some samples of a PackedDataset renumbered 0..len-1: the held-out ones, or all the others.

    Behaves as a dataset for the sampler, the loader and the summary (`len`, `[i]`, `seq_len`, `vocab_size`,
    tokenizer, special ids); `dataset_index(i)` is the number of sample i in the whole dataset.
    """

    def __init__(self, dataset: PackedDataset, held_out: np.ndarray, is_held_out: bool) -> None:
        self.dataset = dataset
        self.held_out = held_out
        self.is_held_out = is_held_out
        # Training samples before held-out sample k: held_out[k] - k. Training sample i sits after those held-out
        # samples whose count of preceding training samples is at most i.
        self._training_before = held_out - np.arange(len(held_out))
        self.seq_len = dataset.seq_len
        self.vocab_size = dataset.vocab_size
        self.tokenizer_hash = dataset.tokenizer_hash
        self.tokenizer_dir = dataset.tokenizer_dir
        self.special = dataset.special

    def __len__(self) -> int:
        return len(self.held_out) if self.is_held_out else len(self.dataset) - len(self.held_out)

    def dataset_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        if self.is_held_out:
            return int(self.held_out[index])
        return index + int(np.searchsorted(self._training_before, index, side="right"))

    def __getitem__(self, index: int) -> np.ndarray:
        return self.dataset[self.dataset_index(int(index))]


def split_held_out(dataset: PackedDataset, count: int) -> tuple[DatasetView, DatasetView]:
    """(training, held-out) views of `dataset`: `count` samples spread evenly over it are held out (none for 0)."""
    if not 0 <= count <= len(dataset):
        raise DataError(f"cannot hold out {count} of {len(dataset)} samples for evaluation; hold out fewer "
                        "(--eval-batches) or pass --eval-data")
    held_out = np.arange(count, dtype=np.int64) * len(dataset) // count
    return DatasetView(dataset, held_out, is_held_out=False), DatasetView(dataset, held_out, is_held_out=True)


def held_out_batches(held_out: DatasetView, micro_batch: int, rank: int, world_size: int,
                     config: DataConfig) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """This rank's evaluation micro-batches as (number, batch). Micro-batch j holds held-out samples
    j * micro_batch .. (j + 1) * micro_batch - 1 whatever the world size, masked as the loader masks (a function of
    the seed and the sample), and rank r takes j = r, r + world_size, ...: so what a micro-batch holds does not
    depend on how many ranks evaluate. `len(held_out)` must be a multiple of micro_batch * world_size, so that every
    rank runs as many forward passes (ZeRO-3 gathers parameters in each)."""
    if len(held_out) % (micro_batch * world_size):
        raise ValueError(f"{len(held_out)} held-out samples do not split into micro-batches of {micro_batch} on "
                         f"{world_size} rank(s)")
    batches = MaskedBatches(held_out, config)
    for number in range(rank, len(held_out) // micro_batch, world_size):
        yield number, batches[list(range(number * micro_batch, (number + 1) * micro_batch))]
