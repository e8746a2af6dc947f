"""Raw text sources: paths, directories and globs expanded to files, each file streamed as documents.

Formats are recognised by content, whatever the file is called: gzip, bz2 and xz compression (by magic bytes),
Wikipedia `pages-articles` XML (starts with `<mediawiki`), JSON Lines (`.jsonl`/`.json` name, a `text` field per line),
and plain UTF-8 text. In plain text a blank line ends a document (BERT's convention); any document is also cut at a
line boundary after `MAX_DOCUMENT_CHARS`, so that one file without blank lines never has to fit in memory.
Invalid UTF-8 bytes become U+FFFD and are counted, not fatal.
"""

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from amos_ds.data.wikipedia import iter_wikipedia_articles
from amos_ds.errors import DataError

MAX_DOCUMENT_CHARS = 1 << 20
_SNIFF_BYTES = 1 << 16
_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")

_replaced_bytes = 0


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    global _replaced_bytes
    _replaced_bytes += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("amos_ds.count_replace", _count_and_replace)


@dataclass
class SourceStats:
    """What reading the sources found; `disk_bytes` (compressed bytes consumed) drives the progress bar."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    disk_bytes: int = 0
    replaced_bytes: int = 0
    replaced_by_file: dict[str, int] = field(default_factory=dict)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by `inputs` (files, directories searched recursively, globs), sorted within each input."""
    files: list[Path] = []
    for spec in inputs:
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{spec}: the pattern matches no file; check the glob")
            files.extend(matches)
        elif os.path.isdir(spec):
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(f"{spec}: the directory holds no file; point --input at the text files")
            files.extend(found)
        elif os.path.exists(spec):
            files.append(Path(spec))
        else:
            raise DataError(f"{spec}: no such file or directory; check the path")
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _open_decompressed(path: Path, raw: io.BufferedReader) -> io.BufferedReader:
    head = raw.peek(8)[:8]
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return io.BufferedReader(opener(raw), buffer_size=1 << 20)
    return raw


def _text_format(path: Path, head: bytes) -> str:
    if head.lstrip().startswith((b"<mediawiki", b"<?xml")) and b"<mediawiki" in head:
        return "wikipedia"
    name = path.name
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def _plain_documents(stream: io.TextIOBase) -> Iterator[str]:
    lines: list[str] = []
    size = 0
    for line in stream:
        line = line.strip()
        if line:
            lines.append(line)
            size += len(line) + 1
        if lines and (not line or size >= MAX_DOCUMENT_CHARS):
            yield "\n".join(lines)
            lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(path: Path, stream: io.TextIOBase, text_field: str) -> Iterator[str]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{number}: no string field {text_field!r}; pass --text-field NAME")
        yield from _plain_documents(io.StringIO(record[text_field]))


def iter_documents(path: Path, stats: SourceStats, text_field: str = "text") -> Iterator[str]:
    """Documents of one file, as text with one line per paragraph (no blank lines), updating `stats` as it goes."""
    global _replaced_bytes
    try:
        raw = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    with raw:
        try:
            stream = _open_decompressed(path, raw)
            head = stream.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]
            if b"\x00" in head:
                raise DataError(f"{path}: looks binary (NUL bytes), not text; remove it from --input")
            kind = _text_format(path, head)
            _replaced_bytes = 0
            if kind == "wikipedia":
                documents = iter_wikipedia_articles(stream)
            else:
                text = io.TextIOWrapper(stream, encoding="utf-8", errors="amos_ds.count_replace", newline=None)
                documents = _jsonl_documents(path, text, text_field) if kind == "jsonl" else _plain_documents(text)
            stats.files += 1
            start = stats.disk_bytes
            for document in documents:
                stats.documents += 1
                stats.text_bytes += len(document) + 1
                stats.disk_bytes = start + raw.tell()
                yield document
            stats.disk_bytes = start + os.path.getsize(path)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"{path}: corrupt or truncated ({e}); re-download or remove it") from None
        except SyntaxError as e:  # xml.etree.ElementTree.ParseError
            raise DataError(f"{path}: malformed XML ({e}); re-download the dump") from None
        finally:
            if _replaced_bytes:
                stats.replaced_bytes += _replaced_bytes
                stats.replaced_by_file[str(path)] = _replaced_bytes
                _replaced_bytes = 0


def iter_sources(files: list[Path], stats: SourceStats, text_field: str = "text") -> Iterator[str]:
    """Documents of all files in order."""
    for path in files:
        yield from iter_documents(path, stats, text_field)
