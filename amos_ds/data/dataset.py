"""Preprocessed corpora packed into fixed-length samples and blended by weight.

Packing (RoBERTa's FULL-SENTENCES, the fairseq setup AMOS and COCO-LM train with): each corpus is one token stream,
its documents in order, each ending with [SEP]. Sample j of a corpus is [CLS] + stream[j*L : (j+1)*L] + [SEP] with
L = seq_len - 2, so samples cross document boundaries, where the document's own [SEP] marks the boundary, and no
token is padding except in a corpus's last sample. (The closing [SEP] is not repeated when the slice already ends
with one.)

Blending: with no weights every sample of every corpus appears once per epoch. With weights (`DIR:WEIGHT`, all or
none), the epoch keeps the same total size, split across corpora in proportion to the weights: a corpus repeats
its samples (upsampling) or contributes a seeded random subset (downsampling). Item i of the blended dataset is a
pure function of (corpora, weights, seq_len, seed, i); the sampler does the shuffling.
"""

import json
import math
from pathlib import Path

import numpy as np

from amos_ds.data.indexed import IndexedShard
from amos_ds.data.permutation import Permutation
from amos_ds.data.preprocess import MANIFEST, TOKENIZER_DIR
from amos_ds.data.tokenizer import load_tokenizer
from amos_ds.errors import DataError


class Corpus:
    """One `amos-ds preprocess` output folder: its shards seen as one memory-mapped token stream."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise DataError(f"{self.directory}: no {MANIFEST}; run `amos-ds preprocess --output "
                            f"{self.directory}` (again, if it was interrupted)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{self.directory / MANIFEST}: unreadable ({e}); rerun `amos-ds preprocess`") from None
        self.tokenizer_hash: str = self.manifest["tokenizer_hash"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.tokenizer_dir = self.directory / TOKENIZER_DIR
        self.num_tokens: int = self.manifest["tokens"]
        counts = [entry["tokens"] for entry in self.manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._shards: list[IndexedShard] | None = None

    @property
    def shards(self) -> list[IndexedShard]:
        """Opened on first use (and again in each loader worker), checking each shard against the manifest."""
        if self._shards is None:
            shards = []
            for entry in self.manifest["shards"]:
                shard = IndexedShard(self.directory / entry["name"])
                if shard.tokenizer_hash != self.tokenizer_hash:
                    raise DataError(f"{shard.idx_path}: written with tokenizer {shard.tokenizer_hash}, the folder's "
                                    f"is {self.tokenizer_hash}; rerun `amos-ds preprocess` into a fresh folder")
                if (shard.num_tokens, shard.num_docs, shard.bin_sha256.hex()) != (
                        entry["tokens"], entry["documents"], entry["sha256"]):
                    raise DataError(f"{shard.idx_path}: does not match {MANIFEST}; rerun `amos-ds preprocess` "
                                    "into a fresh folder")
                shards.append(shard)
            self._shards = shards
        return self._shards

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop], which may span shards."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        shards = self.shards
        pieces = []
        while start < stop:
            local = start - int(self.starts[first])
            piece = shards[first].tokens[local:local + stop - start]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}  # memory maps are reopened, not pickled, in worker processes


def parse_spec(spec: str) -> tuple[str, float | None]:
    """"DIR" or "DIR:WEIGHT" -> (DIR, weight or None)."""
    directory, sep, weight = spec.rpartition(":")
    if sep and directory:
        try:
            value = float(weight)
        except ValueError:
            return spec, None
        if not (value > 0 and math.isfinite(value)):
            raise DataError(f"{spec}: the weight must be a positive number")
        return directory, value
    return spec, None


MIN_SEQ_LEN = 8  # [CLS], [SEP] and room for masked tokens


class PackedDataset:
    """Blended, packed samples: `len()` per epoch, `ds[i]` an int64 array of at most `seq_len` tokens."""

    def __init__(self, corpora: list[Corpus], weights: list[float] | None, seq_len: int, seed: int):
        if seq_len < MIN_SEQ_LEN:
            raise DataError(f"seq_len {seq_len} is too short: use at least {MIN_SEQ_LEN}")
        self.corpora = corpora
        self.seq_len = seq_len
        self.seed = seed
        self.span = seq_len - 2
        self.natural = np.array([math.ceil(c.num_tokens / self.span) for c in corpora], dtype=np.int64)
        total = int(self.natural.sum())
        if weights is None:
            self.counts = self.natural.copy()
        else:
            # Largest remainder: counts proportional to the weights, summing exactly to `total`.
            share = np.asarray(weights, dtype=np.float64) / sum(weights) * total
            self.counts = np.floor(share).astype(np.int64)
            order = np.argsort(-(share - self.counts), kind="stable")
            self.counts[order[:total - int(self.counts.sum())]] += 1
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.tokenizer_hash = corpora[0].tokenizer_hash
        self.vocab_size = corpora[0].vocab_size
        self.tokenizer_dir = corpora[0].tokenizer_dir
        self.special = load_tokenizer(self.tokenizer_dir).special  # the [CLS], [SEP] and padding of every sample

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(corpus number, packed sample number within that corpus) of blended item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        c = int(np.searchsorted(self.offsets, index, side="right")) - 1
        j = index - int(self.offsets[c])
        natural = int(self.natural[c])
        if self.counts[c] == natural:
            return c, j
        # Pass p over the corpus takes its samples in an order keyed by (seed, corpus, p).
        return c, int(Permutation(natural, (self.seed, c, j // natural))(j % natural)[0])

    def __getitem__(self, index: int) -> np.ndarray:
        c, j = self.locate(int(index))
        corpus = self.corpora[c]
        chunk = corpus.tokens(j * self.span, min((j + 1) * self.span, corpus.num_tokens))
        closed = chunk[-1] == self.special.sep
        sample = np.empty(len(chunk) + (1 if closed else 2), dtype=np.int64)
        sample[0] = self.special.cls
        sample[1:1 + len(chunk)] = chunk
        sample[-1] = self.special.sep
        return sample


def open_corpora(specs: list[str], seq_len: int, seed: int) -> PackedDataset:
    """Open `amos-ds preprocess` folders ("DIR" or "DIR:WEIGHT") as one packed, blended dataset."""
    if not specs:
        raise DataError("no data folder given; pass the output folder of `amos-ds preprocess`")
    parsed = [parse_spec(spec) for spec in specs]
    weights = [w for _, w in parsed]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataError(f"{' '.join(specs)}: give every folder a weight (DIR:WEIGHT) or none")
    corpora = [Corpus(d) for d, _ in parsed]
    for corpus in corpora[1:]:
        if corpus.tokenizer_hash != corpora[0].tokenizer_hash:
            raise DataError(f"{corpus.directory}: preprocessed with tokenizer {corpus.tokenizer_hash}, but "
                            f"{corpora[0].directory} with {corpora[0].tokenizer_hash}; preprocess every corpus "
                            "with the same tokenizer")
    for corpus in corpora:  # open and check every shard now, in the caller, not later in a loader worker
        if corpus.num_tokens == 0 or not corpus.shards:
            raise DataError(f"{corpus.directory}: holds no tokens; preprocess some text into it")
    return PackedDataset(corpora, None if weights[0] is None else weights, seq_len, seed)
