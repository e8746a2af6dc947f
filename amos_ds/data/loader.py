"""What the trainer calls: DataConfig, open_corpora, ResumableSampler and build_loader.

    dataset = open_corpora(["data/wiki:3", "data/books:1"], seq_len=512, seed=1234)
    sampler = ResumableSampler(len(dataset), micro_batch_size, rank, world_size, seed=1234)
    sampler.load_state_dict(checkpoint["sampler"])      # when resuming
    for batch in build_loader(dataset, sampler, config):  # endless; one micro-batch per item
        ...                                               # after each optimizer step:
        sampler.advance(world_size * micro_batch_size * grad_accum); checkpoint["sampler"] = sampler.state_dict()
"""

import ctypes
import os
import signal
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from amos_ds.data.dataset import PackedDataset, open_corpora
from amos_ds.data.masking import mask_tokens
from amos_ds.data.sampler import ResumableSampler
from amos_ds.vocab import IGNORE_INDEX


@dataclass
class DataConfig:
    seq_len: int = 512
    mask_prob: float = 0.15
    mask_split: tuple[float, float, float] = (1.0, 0.0, 0.0)  # (to [MASK], to a random token, kept)
    seed: int = 1234
    num_workers: int = 2
    pin_memory: bool = False  # page-locked batches, so that copies to a GPU can run asynchronously (non_blocking)

    def __post_init__(self) -> None:
        self.mask_split = tuple(self.mask_split)
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"DataConfig.mask_prob: must be in (0, 1), got {self.mask_prob}")
        if len(self.mask_split) != 3 or min(self.mask_split) < 0 or abs(sum(self.mask_split) - 1.0) > 1e-6:
            raise ValueError(f"DataConfig.mask_split: three non-negative fractions summing to 1, got {self.mask_split}")


class MaskedBatches:
    """Item = one micro-batch: `batch[indices]` reads, packs, pads, masks and collates (in a loader worker).

    Besides the [B, T] tensors, a batch carries what the model would otherwise have to ask the device for: the flat
    indices (row * T + position) of its masked tokens in row-major order, and whether any token is padding.
    """

    def __init__(self, dataset: PackedDataset, config: DataConfig):
        self.dataset = dataset
        self.config = config

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.dataset[i] for i in indices]
        special = self.dataset.special
        tokens = np.full((len(samples), max(map(len, samples))), special.pad, dtype=np.int64)
        for row, sample in enumerate(samples):
            tokens[row, :len(sample)] = sample
        index = np.asarray(indices, dtype=np.int64)
        inputs, labels = mask_tokens(tokens, index, self.config.seed, self.config.mask_prob, self.config.mask_split,
                                     special)
        real = tokens != special.pad
        return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(real).long(),
                "labels": torch.from_numpy(labels), "sample_index": torch.from_numpy(index),
                "masked_positions": torch.from_numpy(np.flatnonzero(labels != IGNORE_INDEX)),
                "has_padding": not real.all()}


def build_loader(dataset: PackedDataset, sampler: ResumableSampler, config: DataConfig) -> DataLoader:
    """An endless loader of this rank's micro-batches; create it after `sampler.load_state_dict()`.

    Batches are padded to their longest sample (every sample but a corpus's last has seq_len tokens).
    """
    if config.seq_len != dataset.seq_len:
        raise ValueError(f"DataConfig.seq_len {config.seq_len} differs from the dataset's {dataset.seq_len}")
    workers = config.num_workers
    return DataLoader(MaskedBatches(dataset, config), sampler=sampler, batch_size=None, num_workers=workers,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=partial(_bind_worker_to_trainer, os.getpid()) if workers > 0 else None,
                      pin_memory=config.pin_memory)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _bind_worker_to_trainer(trainer_pid: int, worker_id: int) -> None:
    """A loader worker dies with its trainer and holds none of the trainer's sockets.

    Workers are forked after the process group exists, so they inherit its sockets, rank 0's MASTER_PORT listener
    among them; and they notice a dead trainer only after seconds of polling. The trainer leaves through os._exit
    (or a SIGKILL): without this, an immediate restart on the same port met EADDRINUSE from the orphaned workers.
    The worker talks to the trainer through pipes, never through an inherited socket.

    A scheduler signals every process of a job (Slurm's --signal and scancel), the workers too: a worker ignores
    the trainer's stop signals (SIGTERM, SIGUSR1), which would kill it and so the trainer before it could save.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    if os.getppid() != trainer_pid:  # the trainer died before prctl took effect
        os._exit(0)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.close(int(fd))
        except OSError:  # the fd of the listdir itself, closed by now
            pass


__all__ = ["DataConfig", "PackedDataset", "ResumableSampler", "build_loader", "open_corpora"]
