"""The shard format: a flat token file (`.bin`) and its index (`.idx`), memory-mapped for reading.

See docs/DATA_FORMAT.md. A shard is whole exactly when its `.idx` exists: the writer streams tokens to temporary
files, then renames the `.bin` and, last, the `.idx` into place. The index records the SHA-256 of the tokens and of
the document offsets, so `verify()` detects any bit that changed.
"""

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from amos_ds.atomic import publish
from amos_ds.errors import DataError

MAGIC = b"AMOSIDX\x00"
VERSION = 1
# magic, version, token itemsize, num_docs, num_tokens, tokenizer hash, sha256(bin), sha256(offsets), reserved.
HEADER = struct.Struct("<8sIB3xQQ16s32s32s16x")
assert HEADER.size == 128
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


class ShardWriter:
    """Streams documents into `<prefix>.bin.tmp`; `finish()` writes the index and renames both into place."""

    def __init__(self, prefix: Path, dtype: np.dtype, tokenizer_hash: str):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokenizer_hash = tokenizer_hash
        self.bin_tmp = self.prefix.with_suffix(".bin.tmp")
        self.idx_tmp = self.prefix.with_suffix(".idx.tmp")
        self.lengths: list[np.ndarray] = []
        self.num_tokens = 0
        self.bin_hash = hashlib.sha256()
        self.file = open(self.bin_tmp, "wb")

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` concatenated (each ending with [SEP]), `lengths` their token counts."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).data
        self.file.write(data)
        self.bin_hash.update(data)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.num_tokens += len(tokens)

    def finish(self) -> dict:
        """Make the shard whole; returns its manifest entry."""
        offsets = np.zeros(sum(map(len, self.lengths)) + 1, dtype="<u8")
        np.cumsum(np.concatenate(self.lengths) if self.lengths else [], out=offsets[1:])
        self.file.close()
        bin_sha = self.bin_hash.digest()
        offsets_sha = hashlib.sha256(offsets.data).digest()
        header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, len(offsets) - 1, self.num_tokens,
                             self.tokenizer_hash.encode("ascii"), bin_sha, offsets_sha)
        with open(self.idx_tmp, "wb") as f:
            f.write(header)
            f.write(offsets.data)
        publish(self.bin_tmp, self.prefix.with_suffix(".bin"))
        publish(self.idx_tmp, self.prefix.with_suffix(".idx"))
        return {"name": self.prefix.name, "documents": len(offsets) - 1, "tokens": self.num_tokens,
                "sha256": bin_sha.hex()}

    def abort(self) -> None:
        """Remove the temporary files (after an error): nothing of this shard is left."""
        self.file.close()
        for path in (self.bin_tmp, self.idx_tmp):
            path.unlink(missing_ok=True)


class IndexedShard:
    """A finished shard, memory-mapped. Opening checks the header and the file sizes; `verify()` the checksums."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.bin_path = self.prefix.with_suffix(".bin")
        self.idx_path = self.prefix.with_suffix(".idx")
        try:
            with open(self.idx_path, "rb") as f:
                raw = f.read(HEADER.size)
            idx_size = os.path.getsize(self.idx_path)
            bin_size = os.path.getsize(self.bin_path)
        except OSError as e:
            raise self._error(f"cannot be read ({e.strerror})") from None
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise self._error("is not an amos-ds index (bad magic or truncated)", self.idx_path)
        (_, version, itemsize, self.num_docs, self.num_tokens, tok_hash, self.bin_sha256,
         self.offsets_sha256) = HEADER.unpack(raw)
        if version != VERSION:
            raise self._error(f"has format version {version}, this amos-ds reads {VERSION}", self.idx_path)
        if itemsize not in DTYPES:
            raise self._error(f"has an unknown token size {itemsize}", self.idx_path)
        self.dtype = DTYPES[itemsize]
        self.tokenizer_hash = tok_hash.decode("ascii", "replace")
        if idx_size != HEADER.size + 8 * (self.num_docs + 1):
            raise self._error(f"index size {idx_size} does not match its {self.num_docs} documents", self.idx_path)
        if bin_size != self.num_tokens * itemsize:
            raise self._error(f"holds {bin_size} bytes, its index says {self.num_tokens} tokens of {itemsize}")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.num_tokens else \
            np.empty(0, self.dtype)
        self.offsets = np.memmap(self.idx_path, dtype="<u8", mode="r", offset=HEADER.size)
        if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens:
            raise self._error("document offsets do not span the tokens", self.idx_path)

    def _error(self, what: str, path: Path | None = None) -> DataError:
        return DataError(f"{path or self.bin_path}: {what}; delete this shard and rerun `amos-ds preprocess`")

    def document(self, d: int) -> np.ndarray:
        """Tokens of document `d`, its trailing [SEP] included."""
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]

    def verify(self, vocab_size: int, sep_id: int, chunk_tokens: int = 1 << 24) -> None:
        """Full check: both checksums, offsets increasing, every document ending with `sep_id` (the tokenizer's
        [SEP]), ids below vocab_size."""
        digest = hashlib.sha256()
        for start in range(0, self.num_tokens, chunk_tokens):
            chunk = np.asarray(self.tokens[start:start + chunk_tokens])
            digest.update(chunk.data)
            if len(chunk) and int(chunk.max()) >= vocab_size:
                raise self._error(f"holds token id {int(chunk.max())} >= vocabulary size {vocab_size}")
        if digest.digest() != self.bin_sha256:
            raise self._error("checksum mismatch: the tokens changed after writing")
        if hashlib.sha256(np.asarray(self.offsets).data).digest() != self.offsets_sha256:
            raise self._error("checksum mismatch: the document offsets changed after writing", self.idx_path)
        ends = np.asarray(self.offsets[1:])
        if self.num_docs and (np.any(np.diff(self.offsets) <= 0) or np.any(self.tokens[ends - 1] != sep_id)):
            raise self._error("document offsets do not match the tokens", self.idx_path)
