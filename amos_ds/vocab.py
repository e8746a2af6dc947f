"""Special-token ids as a property of a tokenizer: every part of amos-ds (data, masking, loader, fine-tuning, export)
reads them from the tokenizer it works with, never from constants.

amos-ds's own tokenizers put [PAD] [CLS] [SEP] [MASK] [UNK] at ids 0-4 (AMOS_DS_*); the authors' release
(amos_ds/data/release_tokenizer.py) has fairseq's <s> <pad> </s> <unk> at 0-3 and <mask> after its dictionary.
"""

from dataclasses import dataclass

import numpy as np

# The ids amos-ds's own tokenizers are trained with (amos_ds/data/tokenizer.py).
AMOS_DS_SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
AMOS_DS_PAD, AMOS_DS_CLS, AMOS_DS_SEP, AMOS_DS_MASK, AMOS_DS_UNK = range(5)

# Label value for positions that carry no MLM target (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    """A tokenizer's special ids, which ids are ordinary text pieces, and how it lays out one text or a pair."""

    pad: int
    cls: int
    sep: int
    mask: int
    unk: int
    ordinary: tuple[int, int]  # [first, end): the ids of text pieces, the only ones MLM masks or samples
    pair_separator: tuple[int, ...]  # what stands between the two texts of a pair

    def is_ordinary(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens >= self.ordinary[0]) & (tokens < self.ordinary[1])

    @property
    def num_ordinary(self) -> int:
        return self.ordinary[1] - self.ordinary[0]

    def single(self, ids: list[int]) -> list[int]:
        return [self.cls, *ids, self.sep]

    def pair(self, first: list[int], second: list[int]) -> list[int]:
        return [self.cls, *first, *self.pair_separator, *second, self.sep]

    @property
    def pair_overhead(self) -> int:
        """Special tokens a pair adds to its two texts."""
        return 2 + len(self.pair_separator)


def amos_ds_special_ids(vocab_size: int) -> SpecialIds:
    """amos-ds's layout: specials at 0-4, every id from 5 up a text piece; pairs as [CLS] A [SEP] B [SEP]."""
    return SpecialIds(pad=AMOS_DS_PAD, cls=AMOS_DS_CLS, sep=AMOS_DS_SEP, mask=AMOS_DS_MASK, unk=AMOS_DS_UNK,
                      ordinary=(len(AMOS_DS_SPECIAL_TOKENS), vocab_size), pair_separator=(AMOS_DS_SEP,))
