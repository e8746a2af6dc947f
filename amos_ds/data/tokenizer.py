"""Sentencepiece BPE tokenizers with amos-ds's fixed special ids, trained from raw sources, identified by a hash.

A tokenizer folder holds `tokenizer.model` (the sentencepiece model) and `tokenizer.json` (its metadata). The hash
is the first 16 hex digits of the model file's SHA-256: shards and checkpoints record it, so data encoded by one
tokenizer is never read with another. `load_tokenizer` also opens the authors' release format (`sp.model` +
`dict.txt`, amos_ds/data/release_tokenizer.py); both kinds give their special ids as `tokenizer.special`.
"""

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from amos_ds.atomic import staged
from amos_ds.data.sources import SourceStats, expand_inputs, iter_sources
from amos_ds.errors import DataError
from amos_ds.vocab import (
    AMOS_DS_CLS,
    AMOS_DS_MASK,
    AMOS_DS_PAD,
    AMOS_DS_SEP,
    AMOS_DS_SPECIAL_TOKENS,
    AMOS_DS_UNK,
    SpecialIds,
    amos_ds_special_ids,
)

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
# Byte fallback adds 256 pieces (<0x00>..<0xFF>) so that no character is ever [UNK].
MIN_VOCAB_SIZE = len(AMOS_DS_SPECIAL_TOKENS) + 256 + 64
_TRAINING_LINE_CHARS = 4096  # sentencepiece skips longer sentences; longer lines are cut at spaces


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _training_lines(documents: Iterator[str]) -> Iterator[str]:
    for document in documents:
        for line in document.split("\n"):
            while len(line) > _TRAINING_LINE_CHARS:
                cut = line.rfind(" ", 0, _TRAINING_LINE_CHARS)
                cut = cut if cut > 0 else _TRAINING_LINE_CHARS
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


class SentencepieceTokenizer:
    """What amos-ds needs of a tokenizer: its folder, hash, size, special ids, and text <-> ids."""

    directory: Path
    hash: str
    vocab_size: int
    dtype: np.dtype
    special: SpecialIds
    sp: spm.SentencePieceProcessor

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        """Ids of each line, without special tokens."""
        raise NotImplementedError

    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all documents in one flat array, each document followed by its [SEP]; and each one's length.

        Lines are encoded separately (sentencepiece is slow on very long strings); a line break acts as a space.
        """
        lines: list[str] = []
        line_counts = []
        for document in documents:
            split = document.split("\n")
            lines.extend(split)
            line_counts.append(len(split))
        encoded = self.encode_lines(lines)
        pieces: list[list[int]] = []
        lengths = np.empty(len(documents), dtype=np.int64)
        sep = [self.special.sep]
        start = 0
        for d, count in enumerate(line_counts):
            doc_lines = encoded[start:start + count]
            pieces.extend(doc_lines)
            pieces.append(sep)
            lengths[d] = sum(map(len, doc_lines)) + 1
            start += count
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens."""
        return [i for line in self.encode_lines(text.split("\n")) for i in line]


class Tokenizer(SentencepieceTokenizer):
    """A sentencepiece model trained by amos-ds: its ids are the model's, the specials at amos_ds.vocab's 0-4."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        model_path = self.directory / MODEL_FILE
        try:
            self.model_bytes = model_path.read_bytes()
            self.meta = json.loads((self.directory / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{self.directory}: not a tokenizer folder ({e}); train one with "
                            "`amos-ds tokenizer train`") from None
        self.hash = hashlib.sha256(self.model_bytes).hexdigest()[:16]
        if self.meta.get("hash") != self.hash:
            raise DataError(f"{model_path}: hash {self.hash} differs from {META_FILE}'s {self.meta.get('hash')}; "
                            "the model file was changed, retrain the tokenizer")
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        ids = {piece: self.sp.piece_to_id(piece) for piece in AMOS_DS_SPECIAL_TOKENS}
        if list(ids.values()) != list(range(len(AMOS_DS_SPECIAL_TOKENS))):
            raise DataError(f"{model_path}: special ids {ids} are not amos-ds's; train it with amos-ds")
        self.vocab_size = self.sp.vocab_size()
        self.dtype = token_dtype(self.vocab_size)
        self.special = amos_ds_special_ids(self.vocab_size)

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return self.sp.encode(lines)

    def decode(self, ids) -> str:
        """Text of `ids`; special ids are dropped."""
        return self.sp.decode([int(i) for i in ids if self.special.is_ordinary(int(i))])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


def load_tokenizer(directory: str | os.PathLike) -> SentencepieceTokenizer:
    """The tokenizer in `directory`: the release format when it holds a `dict.txt`, else amos-ds's own."""
    from amos_ds.data.release_tokenizer import DICT_FILE, ReleaseTokenizer

    if (Path(directory) / DICT_FILE).is_file():
        return ReleaseTokenizer(directory)
    return Tokenizer(directory)


def train_tokenizer(inputs: list[str], vocab_size: int, output: str, lowercase: bool = False,
                    max_sentences: int = 5_000_000, threads: int | None = None) -> Tokenizer:
    """Train a BPE tokenizer on `inputs` and write it to `output` (atomically: a temporary folder, then a rename).

    Sentencepiece samples `max_sentences` lines uniformly (reservoir sampling while streaming) from corpora larger
    than that, so memory stays bounded. `lowercase` folds case inside the model (rule nmt_nfkc_cf): text is never
    lowercased by hand.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small: use at least {MIN_VOCAB_SIZE}")
    if vocab_size > 1 << 32:
        raise DataError(f"--vocab-size {vocab_size} does not fit uint32 token ids")
    if max_sentences < 1:
        raise DataError(f"--max-sentences must be at least 1, got {max_sentences}")
    files = expand_inputs(inputs)
    stats = SourceStats()
    lines = _training_lines(iter_sources(files, stats))
    first = next(lines, None)
    if first is None:
        raise DataError(f"{', '.join(map(str, files))}: no text found; point --input at non-empty text files")
    model = tempfile.SpooledTemporaryFile()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=0.9999, byte_fallback=True,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            pad_id=AMOS_DS_PAD, bos_id=AMOS_DS_CLS, eos_id=AMOS_DS_SEP, unk_id=AMOS_DS_UNK,
            control_symbols=[AMOS_DS_SPECIAL_TOKENS[AMOS_DS_MASK]], pad_piece=AMOS_DS_SPECIAL_TOKENS[AMOS_DS_PAD],
            bos_piece=AMOS_DS_SPECIAL_TOKENS[AMOS_DS_CLS], eos_piece=AMOS_DS_SPECIAL_TOKENS[AMOS_DS_SEP],
            unk_piece=AMOS_DS_SPECIAL_TOKENS[AMOS_DS_UNK], input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=_TRAINING_LINE_CHARS * 4,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"{inputs[0]}: sentencepiece could not train ({str(e).splitlines()[-1]}); "
                        "use a smaller --vocab-size or more text") from None
    model.seek(0)
    model_bytes = model.read()
    meta = {
        "format": "amos-ds-tokenizer", "version": 1, "hash": hashlib.sha256(model_bytes).hexdigest()[:16],
        "vocab_size": vocab_size, "lowercase": lowercase, "model_type": "bpe",
        "special_tokens": list(AMOS_DS_SPECIAL_TOKENS), "sources": [str(f) for f in files],
        "documents": stats.documents, "text_bytes": stats.text_bytes, "replaced_bytes": stats.replaced_bytes,
    }
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged(out) as folder:
            folder.mkdir()
            (folder / MODEL_FILE).write_bytes(model_bytes)
            (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the tokenizer ({e.strerror}); check free space and permissions") from None
    return Tokenizer(out)


# Every file either kind of tokenizer reads (a release folder beside its tokenizer also holds the weights).
TOKENIZER_FILES = (MODEL_FILE, META_FILE, "sp.model", "dict.txt")


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a tokenizer folder's files to `target` unless it is there: a temporary name, then a rename, so that
    `target` is whole or absent."""
    target = Path(target)
    if target.is_dir():
        return
    with staged(target) as folder:
        folder.mkdir(parents=True)
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, folder / name)
