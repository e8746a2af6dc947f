"""Counter-based Gumbel noise: the same Philox-4x32-10 streams as Triton's `tl.randint4x` and `tl.rand`, in PyTorch.

The noise for (seed, row, vocabulary id) is a pure function of those three numbers, so the plain, chunked and
Triton implementations of the vocabulary path, with any chunking or tiling, draw the same tokens.

One Philox call gives four 32-bit words, so four consecutive vocabulary ids share a call (`tl.randint4x`, four
times fewer Philox rounds than one `tl.rand` per id): id v of row r takes word v % 4 of the call whose counter is
offset = r * ceil(V / 4) + v // 4, a 64-bit integer split into the Philox counter words c0 = its low 32 bits and
c1 = its high 32 bits (c2 = c3 = 0); the key is the 64-bit seed split into its low and high words. The word becomes
a uniform float in [0, 1) exactly as `triton.language.random.uint_to_uniform_float` does, and g = -log(-log(u)).
"""

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Largest float32 scale with (2**31 - 1) * scale < 1.0, as in Triton.
_UNIFORM_SCALE = 4.6566127342e-10


def philox_words(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The four output words of Philox-4x32-10 for each 64-bit counter offset: int64 in [0, 2**32), shape [..., 4].

    Each round multiplies a 32-bit word by a 32-bit constant; the product can exceed 2**63 and wraps around in int64,
    which keeps its low 64 bits exact (two's complement), so its high and low words are read off the wrapped
    product. In-place updates keep the temporaries to two per round. The Triton comparison tests hold this to the bit.
    """
    seed &= 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, seed >> 32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        product_b = c2 * _PHILOX_ROUND_B
        product_a = c0 * _PHILOX_ROUND_A
        c0 = (product_b >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (product_a >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = product_b.bitwise_and_(_MASK32)
        c3 = product_a.bitwise_and_(_MASK32)
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) from 32-bit words, as `triton.language.random.uint_to_uniform_float`."""
    x = words.to(torch.int32)  # the low 32 bits: Triton's bitcast to int32
    x ^= x >> 31  # negative x becomes -x - 1, as in Triton
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1), bit-identical to `tl.rand(seed, offsets)` for int64 offsets (the first word)."""
    return _uniform_from_words(philox_words(seed, offsets)[..., 0])


def gumbel_noise(seed: int, n_rows: int, vocab_size: int, row_offset: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Gumbel(0, 1) noise [n_rows, vocab_size] in float32 for rows row_offset .. row_offset + n_rows - 1."""
    quads = -(-vocab_size // 4)
    rows = torch.arange(row_offset, row_offset + n_rows, dtype=torch.int64, device=device)
    words = philox_words(seed, rows[:, None] * quads + torch.arange(quads, dtype=torch.int64, device=device))
    u = _uniform_from_words(words.reshape(n_rows, 4 * quads)[:, :vocab_size])
    return -torch.log(-torch.log(u))
