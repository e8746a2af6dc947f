"""Masked-language-model corruption of a batch, vectorised, and a pure function of (seed, global sample index).

Exactly round(mask_prob * n) of each sample's n ordinary tokens are chosen (never a special token of the tokenizer);
of those, `split` gives the fractions that become [MASK], become a random ordinary token, or stay as they are.
Every random draw is a hash of (seed, sample index, position), so a resumed run, a different worker count or a
different batch composition masks each sample identically.
"""

import numpy as np

from amos_ds.data.permutation import mix64
from amos_ds.vocab import IGNORE_INDEX, SpecialIds

_SELECT, _ACTION, _RANDOM_TOKEN = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03),
                                   np.uint64(0x8CB92BA72F3D8DD7))


def mask_tokens(tokens: np.ndarray, sample_index: np.ndarray, seed: int, mask_prob: float,
                split: tuple[float, float, float], special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) for `tokens` [B, T] int64 (padded with the tokenizer's pad id), one global index per row;
    random replacements are drawn from the tokenizer's ordinary ids."""
    batch, length = tokens.shape
    row_key = mix64(mix64(np.asarray(sample_index, dtype=np.uint64) ^ mix64(np.uint64(seed % (1 << 64)))))[:, None]
    draws = mix64(row_key + np.arange(length, dtype=np.uint64)[None, :] * _SELECT)
    candidate = special.is_ordinary(tokens)
    # Rank the candidates by their draw; the k_b smallest of row b are masked.
    keys = np.where(candidate, draws >> np.uint64(1), np.uint64(np.iinfo(np.uint64).max))
    order = np.argsort(keys, axis=1)
    num_masked = np.floor(candidate.sum(axis=1) * mask_prob + 0.5).astype(np.int64)
    chosen = np.arange(length)[None, :] < num_masked[:, None]
    masked = np.zeros_like(candidate)
    masked[np.nonzero(chosen)[0], order[chosen]] = True

    labels = np.where(masked, tokens, IGNORE_INDEX)
    action = (mix64(draws ^ _ACTION) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    to_mask = masked & (action < split[0])
    to_random = masked & (action >= split[0]) & (action < split[0] + split[1])
    inputs = np.where(to_mask, special.mask, tokens)
    random_ids = (mix64(draws ^ _RANDOM_TOKEN) % np.uint64(special.num_ordinary)).astype(np.int64)
    inputs = np.where(to_random, random_ids + special.ordinary[0], inputs)
    return inputs, labels
