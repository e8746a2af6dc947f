"""Sentencepiece BPE tokenizers with amos-ds's fixed special ids, trained from raw sources, identified by a hash.

A tokenizer folder holds `tokenizer.model` (the sentencepiece model) and `tokenizer.json` (its metadata). The hash
is the first 16 hex digits of the model file's SHA-256: shards and checkpoints record it, so data encoded by one
tokenizer is never read with another.
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
from amos_ds.vocab import CLS_ID, MASK_ID, NUM_SPECIAL_TOKENS, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
# Byte fallback adds 256 pieces (<0x00>..<0xFF>) so that no character is ever [UNK].
MIN_VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256 + 64
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


class Tokenizer:
    """A trained sentencepiece model whose special ids equal amos_ds.vocab's."""

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
        ids = {piece: self.sp.piece_to_id(piece) for piece in SPECIAL_TOKENS}
        if list(ids.values()) != list(range(NUM_SPECIAL_TOKENS)):
            raise DataError(f"{model_path}: special ids {ids} are not amos_ds.vocab's; train it with amos-ds")
        self.vocab_size = self.sp.vocab_size()
        self.dtype = token_dtype(self.vocab_size)

    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all documents in one flat array, each document followed by [SEP]; and each one's length.

        Lines are encoded separately (sentencepiece is slow on very long strings); a line break acts as a space.
        """
        lines: list[str] = []
        line_counts = []
        for document in documents:
            split = document.split("\n")
            lines.extend(split)
            line_counts.append(len(split))
        encoded = self.sp.encode(lines)
        pieces: list[list[int]] = []
        lengths = np.empty(len(documents), dtype=np.int64)
        sep = [SEP_ID]
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
        return [i for line in text.split("\n") for i in self.sp.encode(line)]

    def decode(self, ids) -> str:
        """Text of `ids`; special ids are dropped."""
        return self.sp.decode([int(i) for i in ids if i >= NUM_SPECIAL_TOKENS])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


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
            pad_id=PAD_ID, bos_id=CLS_ID, eos_id=SEP_ID, unk_id=UNK_ID, control_symbols=[SPECIAL_TOKENS[MASK_ID]],
            pad_piece=SPECIAL_TOKENS[PAD_ID], bos_piece=SPECIAL_TOKENS[CLS_ID], eos_piece=SPECIAL_TOKENS[SEP_ID],
            unk_piece=SPECIAL_TOKENS[UNK_ID], input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=_TRAINING_LINE_CHARS * 4, num_threads=threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"{inputs[0]}: sentencepiece could not train ({str(e).splitlines()[-1]}); "
                        "use a smaller --vocab-size or more text") from None
    model.seek(0)
    model_bytes = model.read()
    meta = {
        "format": "amos-ds-tokenizer", "version": 1, "hash": hashlib.sha256(model_bytes).hexdigest()[:16],
        "vocab_size": vocab_size, "lowercase": lowercase, "model_type": "bpe", "special_tokens": list(SPECIAL_TOKENS),
        "sources": [str(f) for f in files], "documents": stats.documents, "text_bytes": stats.text_bytes,
        "replaced_bytes": stats.replaced_bytes,
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


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a tokenizer folder to `target` unless it is there: a temporary name, then a rename, so that `target`
    is whole or absent."""
    target = Path(target)
    if target.is_dir():
        return
    with staged(target) as folder:
        shutil.copytree(source, folder)
