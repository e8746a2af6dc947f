"""Packing, blending, the resumable sampler, masking, and the loader the trainer calls."""

import json
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from amos_ds.data import DataConfig, ResumableSampler, build_loader, open_corpora
from amos_ds.data.dataset import Corpus
from amos_ds.data.masking import mask_tokens
from amos_ds.data.permutation import Permutation
from amos_ds.data.preprocess import preprocess
from amos_ds.data.tokenizer import train_tokenizer
from amos_ds.errors import DataError
from amos_ds.vocab import (
    AMOS_DS_CLS,
    AMOS_DS_MASK,
    AMOS_DS_PAD,
    AMOS_DS_SEP,
    AMOS_DS_SPECIAL_TOKENS,
    IGNORE_INDEX,
    amos_ds_special_ids,
)

SEQ = 64


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[str, str]:
    """Two corpora sharing one tokenizer: the first and the second half of the Python documentation topics."""
    root = tmp_path_factory.mktemp("corpora")
    names = sorted(topics)
    halves = [names[:40], names[40:]]
    for i, half in enumerate(halves):
        (root / f"{i}.txt").write_text("\n\n".join(topics[n] for n in half))
    tok = train_tokenizer([str(root / "0.txt"), str(root / "1.txt")], 800, str(root / "tok"))
    outs = []
    for i in range(2):
        preprocess([str(root / f"{i}.txt")], str(tok.directory), str(root / f"data{i}"), workers=1, shard_mb=0.05,
                   batch_mb=0.01, progress=False)
        outs.append(str(root / f"data{i}"))
    return outs[0], outs[1]


def stream(directory: str) -> np.ndarray:
    corpus = Corpus(directory)
    return np.concatenate([np.asarray(s.tokens) for s in corpus.shards]).astype(np.int64)


def test_packing(corpora):
    ds = open_corpora([corpora[0]], SEQ, seed=7)
    tokens = stream(corpora[0])
    assert len(Corpus(corpora[0]).shards) > 2  # samples cross shard boundaries below
    assert len(ds) == -(-len(tokens) // (SEQ - 2))
    interior = []
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == np.int64 and len(sample) <= SEQ
        assert sample[0] == AMOS_DS_CLS and sample[-1] == AMOS_DS_SEP
        chunk = tokens[i * (SEQ - 2):(i + 1) * (SEQ - 2)]
        expected = np.concatenate([[AMOS_DS_CLS], chunk] + ([] if chunk[-1] == AMOS_DS_SEP else [[AMOS_DS_SEP]]))
        np.testing.assert_array_equal(sample, expected)
        interior.append(chunk)
    np.testing.assert_array_equal(np.concatenate(interior), tokens)
    assert sum(len(ds[i]) == SEQ for i in range(len(ds) - 1)) > 0.8 * (len(ds) - 1)


def test_blending_proportions(corpora):
    plain = open_corpora(list(corpora), SEQ, seed=7)
    sizes = [len(open_corpora([c], SEQ, seed=7)) for c in corpora]
    assert len(plain) == sum(sizes)
    weighted = open_corpora([f"{corpora[0]}:3", f"{corpora[1]}:1"], SEQ, seed=7)
    assert len(weighted) == sum(sizes)
    n0 = int(weighted.counts[0])
    assert abs(n0 - 0.75 * sum(sizes)) <= 0.5 and int(weighted.counts[1]) == sum(sizes) - n0
    origins = [weighted.locate(i) for i in range(len(weighted))]
    assert sum(c == 0 for c, _ in origins) == n0
    # Corpus 0 is upsampled: every one of its samples appears, none more than twice; corpus 1 is downsampled to a
    # subset without repeats.
    from0 = np.bincount([j for c, j in origins if c == 0], minlength=sizes[0])
    assert from0.min() >= 1 and from0.max() <= 2 + (n0 > 2 * sizes[0])
    from1 = [j for c, j in origins if c == 1]
    assert len(set(from1)) == len(from1) == sum(sizes) - n0
    assert from1 != sorted(from1)[:len(from1)] or len(from1) == sizes[1]
    np.testing.assert_array_equal(weighted[n0], open_corpora([f"{corpora[0]}:3", f"{corpora[1]}:1"], SEQ,
                                                              seed=7)[n0])
    with pytest.raises(DataError, match=r"give every folder a weight \(DIR:WEIGHT\) or none"):
        open_corpora([f"{corpora[0]}:3", corpora[1]], SEQ, seed=7)
    with pytest.raises(DataError, match=r"the weight must be a positive number"):
        open_corpora([f"{corpora[0]}:0"], SEQ, seed=7)


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 10, 1000, 4097):
        values = Permutation(n, (5, 1))(np.arange(n))
        assert sorted(values.tolist()) == list(range(n))
    assert not np.array_equal(Permutation(1000, (5, 1))(np.arange(1000)), Permutation(1000, (5, 2))(np.arange(1000)))
    with pytest.raises(IndexError):
        Permutation(10, (0,))(10)


def run_ranks(num_samples: int, micro: int, world: int, steps: int, state: dict | None = None) -> tuple[list, dict]:
    """Global order seen by `world` ranks over `steps` micro-steps (concatenated rank by rank per step)."""
    samplers = [ResumableSampler(num_samples, micro, r, world, seed=3) for r in range(world)]
    for s in samplers:
        if state:
            s.load_state_dict(json.loads(json.dumps(state)))
    iters = [iter(s) for s in samplers]
    order = []
    for _ in range(steps):
        for it in iters:
            order.extend(next(it))
        for s in samplers:
            s.advance(world * micro)
    assert all(s.state_dict() == samplers[0].state_dict() for s in samplers)
    return order, samplers[0].state_dict()


def test_sampler_global_order_across_world_sizes_and_resume():
    n = 103  # not a multiple of any batch: epochs end inside a micro-step
    reference, _ = run_ranks(n, 4, 1, 3 * n // 4)
    epoch0 = reference[:n]
    assert sorted(epoch0) == list(range(n)) and epoch0 != list(range(n))
    assert sorted(reference[n:2 * n]) == list(range(n)) and reference[n:2 * n] != epoch0
    for world in (2, 4):
        order, _ = run_ranks(n, 4, world, 3 * n // (4 * world))
        assert order == reference[:len(order)]
    # Save at world size 4 after 10 steps, resume at 2, then at 1 and 3 with another micro-batch size.
    first, state = run_ranks(n, 4, 4, 10)
    assert state["consumed_samples"] == 160  # into the second epoch of 103
    second, state = run_ranks(n, 4, 2, 7, state)
    third, state = run_ranks(n, 3, 1, 5, state)
    fourth, state = run_ranks(n, 2, 3, 4, state)
    assert first + second + third + fourth == reference[:160 + 56 + 15 + 24]
    assert state["consumed_samples"] == 255


def test_sampler_rank_slices_and_errors():
    s0, s1 = (ResumableSampler(50, 3, r, 2, seed=1) for r in (0, 1))
    b0, b1 = next(iter(s0)), next(iter(s1))
    assert b0 + b1 == s0.global_indices(0, 6).tolist() and not set(b0) & set(b1)
    assert all(type(index) is int for index in b0)  # plain ints, as the dataset and the metrics log take them
    with pytest.raises(ValueError, match="not a whole number of micro-steps"):
        s0.advance(5)
    s0.advance(0)
    s0.advance(12)
    assert s0.state_dict() == {"consumed_samples": 12, "num_samples": 50, "seed": 1}
    ResumableSampler(1, 1, 0, 1, seed=0)  # the smallest valid shape
    for shape in ((0, 1, 0, 1), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 1, 1), (1, 1, -1, 1)):
        with pytest.raises(ValueError) as err:
            ResumableSampler(*shape, seed=0)
        num_samples, micro, rank, world = shape
        assert str(err.value) == (f"bad sampler shape: num_samples={num_samples}, micro_batch_size={micro}, "
                                  f"rank={rank}, world_size={world}")
    with pytest.raises(DataError, match="resume with the same --data, sequence length and seed"):
        ResumableSampler(51, 3, 0, 2, seed=1).load_state_dict(s0.state_dict())


def test_masking_is_exact_and_reproducible():
    rng = np.random.default_rng(0)
    tokens = rng.integers(len(AMOS_DS_SPECIAL_TOKENS), 1000, size=(4, 200))
    tokens[:, 0], tokens[:, 99], tokens[:, -1] = AMOS_DS_CLS, AMOS_DS_SEP, AMOS_DS_SEP
    tokens[3, 150:] = AMOS_DS_PAD
    index = np.array([10, 11, 12, 13])
    inputs, labels = mask_tokens(tokens, index, 42, 0.15, (1.0, 0.0, 0.0), amos_ds_special_ids(1000))
    masked = labels != IGNORE_INDEX
    assert masked.sum(axis=1).tolist() == [30, 30, 30, 22]  # round(0.15 * 197) and round(0.15 * 147)
    assert np.all(inputs[masked] == AMOS_DS_MASK) and np.all(labels[masked] == tokens[masked])
    assert np.all(inputs[~masked] == tokens[~masked]) and not masked[tokens < len(AMOS_DS_SPECIAL_TOKENS)].any()
    # Same (seed, index) -> same masks, whatever else is in the batch; another seed -> other masks.
    again, _ = mask_tokens(tokens[[2, 0]], index[[2, 0]], 42, 0.15, (1.0, 0.0, 0.0), amos_ds_special_ids(1000))
    np.testing.assert_array_equal(again, inputs[[2, 0]])
    other, _ = mask_tokens(tokens, index, 43, 0.15, (1.0, 0.0, 0.0), amos_ds_special_ids(1000))
    assert not np.array_equal(other, inputs)


def test_masks_of_a_known_seed_and_index_are_pinned():
    """The masks are a pure function of (seed, sample index, position): pinned here, so that a change of the hash,
    which would break bit-exact resume of existing checkpoints, is a deliberate one. Row 0 is all [MASK]; row 1 has
    a kept token (39), two random replacements (36 -> 52, 38 -> 34) and one [MASK]."""
    tokens = np.array([[AMOS_DS_CLS, *range(10, 24), AMOS_DS_SEP],
                       [AMOS_DS_CLS, *range(30, 40), AMOS_DS_SEP, *[AMOS_DS_PAD] * 4]])
    special = amos_ds_special_ids(60)
    inputs, labels = mask_tokens(tokens, np.array([3, 10**12 + 7]), 2026, 0.4, (0.5, 0.25, 0.25), special)
    assert inputs.tolist() == [[1, 10, 3, 12, 3, 14, 15, 3, 3, 18, 19, 3, 21, 3, 23, 2],
                               [1, 30, 31, 32, 33, 34, 3, 52, 37, 34, 39, 2, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 11, -100, 13, -100, -100, 16, 17, -100, -100, 20, -100, 22, -100, -100],
                               [-100, -100, -100, -100, -100, -100, 35, 36, -100, 38, 39, -100, -100, -100, -100, -100]]
    # Any integer seed is taken modulo 2**64.
    again = mask_tokens(tokens, np.array([3, 10**12 + 7]), 2026 - 2**64, 0.4, (0.5, 0.25, 0.25), special)
    np.testing.assert_array_equal(again[0], inputs)


def test_masking_split():
    tokens = np.full((64, 512), 500, dtype=np.int64)
    inputs, labels = mask_tokens(tokens, np.arange(64), 1, 0.15, (0.7, 0.2, 0.1), amos_ds_special_ids(1000))
    masked = labels != IGNORE_INDEX
    assert masked.sum() == 64 * 77
    to_mask = (inputs == AMOS_DS_MASK).sum() / masked.sum()
    kept = (inputs[masked] == 500).sum() / masked.sum()  # kept, or (1 in 996) replaced by itself
    assert abs(to_mask - 0.7) < 0.02 and abs(kept - 0.1) < 0.02
    replaced = inputs[masked & (inputs != AMOS_DS_MASK) & (inputs != 500)]
    assert replaced.min() >= len(AMOS_DS_SPECIAL_TOKENS) and replaced.max() < 1000


def test_loader_batches_and_worker_independence(corpora):
    ds = open_corpora(list(corpora), SEQ, seed=7)
    batches = {}
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), 8, 1, 2, seed=7)
        sampler.advance(16)
        loader = build_loader(ds, sampler, DataConfig(seq_len=SEQ, num_workers=workers, seed=9))
        it = iter(loader)
        batches[workers] = [next(it) for _ in range(5)]
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a.keys() == {"input_ids", "attention_mask", "labels", "sample_index", "masked_positions", "has_padding"}
        assert a["has_padding"] == b["has_padding"]
        for key in a.keys() - {"has_padding"}:
            assert torch.equal(a[key], b[key])
    first = batches[0][0]
    assert first["input_ids"].shape == (8, SEQ) and first["input_ids"].dtype == torch.int64
    expected_index = ResumableSampler(len(ds), 8, 1, 2, seed=7).global_indices(16 + 8, 8)
    assert first["sample_index"].tolist() == expected_index.tolist()
    for row, i in enumerate(expected_index):
        sample = torch.from_numpy(ds[int(i)])
        restored = torch.where(first["labels"][row, :len(sample)] >= 0, first["labels"][row, :len(sample)],
                               first["input_ids"][row, :len(sample)])
        assert torch.equal(restored, sample)
        assert first["attention_mask"][row].sum() == len(sample)
    masked = (first["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    candidates = [int((ds[int(i)] >= len(AMOS_DS_SPECIAL_TOKENS)).sum()) for i in expected_index]
    assert masked == [int(0.15 * c + 0.5) for c in candidates] and min(masked) > 0
    # The model's static inputs: flat row-major indices of the masked tokens, and whether any token is padding.
    for batch in batches[0]:
        assert torch.equal(batch["masked_positions"], (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1))
        assert batch["has_padding"] == bool((batch["attention_mask"] == 0).any())


def test_loader_masks_the_padding_of_short_samples(corpora):
    """Each corpus's last sample is short: over one epoch the loader pads it and its attention mask marks exactly
    the sample's own tokens."""
    ds = open_corpora(list(corpora), SEQ, seed=7)
    sampler = ResumableSampler(len(ds), 8, 0, 1, seed=7)
    loader = iter(build_loader(ds, sampler, DataConfig(seq_len=SEQ, num_workers=0, seed=9)))
    padded_rows = 0
    for _ in range(-(-len(ds) // 8)):
        batch = next(loader)
        width = batch["input_ids"].shape[1]
        for row, index in enumerate(batch["sample_index"].tolist()):
            length = len(ds[index])
            assert batch["attention_mask"][row].tolist() == [int(t < length) for t in range(width)]
            assert (batch["input_ids"][row, length:] == AMOS_DS_PAD).all()
            assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
            padded_rows += length < width
    assert padded_rows >= 2
