"""Keyed pseudo-random permutations of range(n) computed index by index, in O(1) memory (no shuffled index array).

A balanced Feistel network over the smallest even number of bits covering n, with cycle walking: indices that land
outside [0, n) are encrypted again until they fall inside, which keeps the map a bijection on [0, n). This lets a
160 GB corpus (hundreds of millions of samples) be reshuffled every epoch without holding or writing an index.
"""

import numpy as np

_ROUNDS = 6


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed hash of uint64 values (wrapping arithmetic)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.uint64))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """perm(i) for i in [0, n): a bijection determined by `key` (ints, e.g. (seed, epoch))."""

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.shift = np.uint64(half_bits)
        self.mask = np.uint64((1 << half_bits) - 1)
        self.round_keys = np.random.SeedSequence([int(k) for k in key]).generate_state(_ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.shift, x & self.mask
        for round_key in self.round_keys:
            left, right = right, left ^ (mix64(right ^ round_key) & self.mask)
        return (left << self.shift) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        x = np.array(index, dtype=np.uint64, ndmin=1)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} out of range for a permutation of {self.n}")
        x = self._encrypt(x)
        outside = x >= self.n
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)
