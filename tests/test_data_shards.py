"""Tokenizer ids, shard round trip, restartable/atomic preprocessing, and corrupt or mismatched shards."""

import builtins
import errno
import json
import os
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from amos_ds.data.dataset import Corpus
from amos_ds.data.indexed import HEADER, IndexedShard
from amos_ds.data.loader import open_corpora
from amos_ds.data.preprocess import preprocess
from amos_ds.data.tokenizer import Tokenizer, train_tokenizer
from amos_ds.errors import DataError
from amos_ds.vocab import AMOS_DS_MASK, AMOS_DS_SPECIAL_TOKENS, AMOS_DS_UNK


def topic_documents() -> list[str]:
    """Real English prose: the Python documentation topics, one document per topic."""
    return ["\n".join(line.strip() for line in topics[name].splitlines() if line.strip()) for name in sorted(topics)]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "topics.txt"
    path.write_text("\n\n".join(topic_documents()) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus_file, tmp_path_factory) -> Tokenizer:
    return train_tokenizer([str(corpus_file)], 1000, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_tokenizer_special_ids_and_hash(tokenizer, tmp_path):
    special = tokenizer.special
    assert [tokenizer.sp.piece_to_id(p) for p in AMOS_DS_SPECIAL_TOKENS] == [
        special.pad, special.cls, special.sep, special.mask, special.unk] == [0, 1, 2, 3, 4]
    assert special.ordinary == (5, 1000) and special.pair(["a"], ["b"]) == [1, "a", 2, "b", 2]
    assert (tokenizer.sp.pad_id(), tokenizer.sp.bos_id(), tokenizer.sp.eos_id(), tokenizer.sp.unk_id()) == (0, 1, 2, 4)
    assert tokenizer.vocab_size == 1000 and tokenizer.dtype == np.uint16
    assert AMOS_DS_MASK not in tokenizer.encode("[MASK] [CLS] [SEP] are plain text here")
    assert AMOS_DS_UNK not in tokenizer.encode("☃ ü 漢字")  # byte fallback: nothing is unknown
    assert tokenizer.decode(tokenizer.encode("☃ ü 漢字")) == "☃ ü 漢字"
    meta = json.loads((tokenizer.directory / "tokenizer.json").read_text())
    assert meta["hash"] == tokenizer.hash and len(tokenizer.hash) == 16 and meta["lowercase"] is False


def test_lowercase_tokenizer(corpus_file, tmp_path):
    tok = train_tokenizer([str(corpus_file)], 600, str(tmp_path / "uncased"), lowercase=True)
    assert tok.encode("The Python LANGUAGE") == tok.encode("the python language")
    assert tok.decode(tok.encode("The Python LANGUAGE")) == "the python language"


def test_tokenizer_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.txt: no text found"):
        train_tokenizer([str(tmp_path / "empty.txt")], 1000, str(tmp_path / "t"))
    with pytest.raises(DataError, match=r"--vocab-size 100 is too small"):
        train_tokenizer([str(tmp_path / "empty.txt")], 100, str(tmp_path / "t"))
    with pytest.raises(DataError, match=r"not a tokenizer folder"):
        Tokenizer(tmp_path)


def test_round_trip_over_a_real_corpus(tokenizer, corpus_file, tmp_path):
    manifest = preprocess([str(corpus_file)], str(tokenizer.directory), str(tmp_path / "out"), workers=2,
                          shard_mb=0.1, batch_mb=0.025, progress=False)
    docs = topic_documents()
    assert manifest["documents"] == len(docs) == 79
    assert len(manifest["shards"]) == 3
    shards = [IndexedShard(tmp_path / "out" / s["name"]) for s in manifest["shards"]]
    decoded = [tokenizer.decode(s.document(d)) for s in shards for d in range(s.num_docs)]
    for doc, text in zip(docs, decoded, strict=True):
        # sentencepiece normalises (NFKC, runs of spaces); line breaks are word breaks.
        assert text == " ".join(tokenizer.sp.normalize(line).replace("▁", " ").strip() for line in doc.split("\n"))
    assert sum(s.num_tokens for s in shards) == manifest["tokens"] == sum(
        len(tokenizer.encode(d)) + 1 for d in docs)
    for shard in shards:
        shard.verify(tokenizer.vocab_size, tokenizer.special.sep)
        assert shard.tokenizer_hash == tokenizer.hash


def test_workers_and_restart_give_identical_shards(tokenizer, corpus_file, tmp_path):
    kwargs = dict(shard_mb=0.1, batch_mb=0.025, progress=False)
    one = preprocess([str(corpus_file)], str(tokenizer.directory), str(tmp_path / "one"), workers=1, **kwargs)
    two = preprocess([str(corpus_file)], str(tokenizer.directory), str(tmp_path / "two"), workers=2, **kwargs)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    # An interrupted run: no manifest, one shard lost, one half-written temporary file.
    out = tmp_path / "two"
    (out / "manifest.json").unlink()
    (out / "shard-00001.bin").unlink()
    (out / "shard-00001.idx").unlink()
    (out / "shard-00002.bin.tmp").write_bytes(b"partial")
    mtime = (out / "shard-00000.bin").stat().st_mtime_ns
    again = preprocess([str(corpus_file)], str(tokenizer.directory), str(out), workers=2, **kwargs)
    assert again["shards"] == two["shards"]
    assert (out / "shard-00000.bin").stat().st_mtime_ns == mtime  # finished shards are not rewritten
    assert not list(out.glob("*.tmp"))
    with pytest.raises(DataError, match=r"holds shards of other inputs, tokenizer or settings"):
        preprocess([str(corpus_file)], str(tokenizer.directory), str(out), workers=1, shard_mb=0.1, progress=False)


def test_empty_corpus(tokenizer, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"blank.txt: no text found; point --input at non-empty text files"):
        preprocess([str(tmp_path / "blank.txt")], str(tokenizer.directory), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "blank.txt").write_text("Some text at last.\n")  # the input fixed, the same command works
    assert preprocess([str(tmp_path / "blank.txt")], str(tokenizer.directory), str(tmp_path / "out"),
                      progress=False)["documents"] == 1
    (tmp_path / "kept").mkdir()  # a folder the user made is kept, empty
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(DataError, match=r"no text found"):
        preprocess([str(tmp_path / "blank.txt")], str(tokenizer.directory), str(tmp_path / "kept"), progress=False)
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_full_disk_leaves_no_shard(tokenizer, corpus_file, tmp_path, monkeypatch):
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if str(file).endswith(".tmp") and "w" in mode else f

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"out: no space left on device while writing shards; fix that and rerun"):
        preprocess([str(corpus_file)], str(tokenizer.directory), str(out), workers=1, progress=False)
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()
    monkeypatch.undo()
    manifest = preprocess([str(corpus_file)], str(tokenizer.directory), str(out), workers=1, progress=False)
    assert manifest["documents"] == 79


@pytest.fixture
def shards(tokenizer, corpus_file, tmp_path) -> Path:
    out = tmp_path / "out"
    preprocess([str(corpus_file)], str(tokenizer.directory), str(out), workers=1, shard_mb=0.1, batch_mb=0.025,
               progress=False)
    return out


def test_checksum_mismatch(shards, tokenizer):
    with open(shards / "shard-00001.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    shard = IndexedShard(shards / "shard-00001")  # sizes still agree: only the checksum can tell
    with pytest.raises(DataError, match=r"shard-00001.bin: checksum mismatch: the tokens changed after writing; "
                                        r"delete this shard and rerun `amos-ds preprocess`"):
        shard.verify(tokenizer.vocab_size, tokenizer.special.sep)
    with pytest.raises(DataError, match=r"shard-00001.idx: does not match manifest.json"):
        open_corpora([str(shards)], 128, 0) if _rewrite_checksum(shards / "shard-00001") else None


def _rewrite_checksum(prefix: Path) -> bool:
    """Forge the index's token checksum so that only the manifest still knows the original."""
    raw = bytearray(prefix.with_suffix(".idx").read_bytes())
    raw[48:80] = bytes(32)
    prefix.with_suffix(".idx").write_bytes(bytes(raw))
    return True


def test_index_mismatch(shards):
    idx = shards / "shard-00000.idx"
    raw = idx.read_bytes()
    idx.write_bytes(raw[:-8])
    with pytest.raises(DataError, match=r"shard-00000.idx: index size \d+ does not match its \d+ documents"):
        IndexedShard(shards / "shard-00000")
    idx.write_bytes(raw)
    with open(shards / "shard-00000.bin", "ab") as f:
        f.write(b"\x05\x00")
    with pytest.raises(DataError, match=r"shard-00000.bin: holds \d+ bytes, its index says \d+ tokens of 2"):
        IndexedShard(shards / "shard-00000")
    idx.write_bytes(b"GARBAGE!" + raw[8:])
    with pytest.raises(DataError, match=r"shard-00000.idx: is not an amos-ds index"):
        IndexedShard(shards / "shard-00000")
    assert HEADER.size == 128


def test_shard_from_another_tokenizer(shards, corpus_file, tmp_path):
    other = train_tokenizer([str(corpus_file)], 900, str(tmp_path / "other_tok"))
    other_out = tmp_path / "other"
    preprocess([str(corpus_file)], str(other.directory), str(other_out), workers=1, shard_mb=0.1, batch_mb=0.025,
               progress=False)
    with pytest.raises(DataError, match=r"other: preprocessed with tokenizer [0-9a-f]{16}, but .* with "
                                        r"[0-9a-f]{16}; preprocess every corpus with the same tokenizer"):
        open_corpora([str(shards), str(other_out)], 128, 0)
    for suffix in (".bin", ".idx"):  # one shard swapped for another tokenizer's
        shutil.copy(other_out / f"shard-00001{suffix}", shards / f"shard-00001{suffix}")
    with pytest.raises(DataError, match=r"shard-00001.idx: written with tokenizer [0-9a-f]{16}, the folder's is"):
        assert Corpus(shards).shards


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=r"nothing: no manifest.json; run `amos-ds preprocess"):
        open_corpora([str(tmp_path / "nothing")], 128, 0)
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match=r"manifest.json: unreadable"):
        open_corpora([str(tmp_path / "x")], 128, 0)
