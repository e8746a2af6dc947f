"""Raw sources to shards: one reader, parallel tokenizing workers, one writer; restartable and memory-bounded.

The main process streams documents from the sources and groups them into batches of about `batch_mb` MB of text;
`shard_mb / batch_mb` consecutive batches make one shard, so the shard a document lands in depends only on the
input. Workers tokenize batches (at most two per worker in flight, whatever the corpus size); the main process
appends the results, in order, to the current shard. A rerun with the same inputs and tokenizer reads the sources
again but skips tokenizing the shards that are already whole. `manifest.json`, written last, marks the folder done.
"""

import ctypes
import errno
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from amos_ds.atomic import write_atomically
from amos_ds.data.indexed import IndexedShard, ShardWriter, shard_name
from amos_ds.data.sources import SourceStats, expand_inputs, iter_sources
from amos_ds.data.tokenizer import SentencepieceTokenizer, copy_tokenizer, load_tokenizer
from amos_ds.errors import DataError

MANIFEST = "manifest.json"
PLAN = "plan.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

_worker_tokenizer: SentencepieceTokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _fix_mmap_threshold()
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _fix_mmap_threshold() -> None:
    """Hold glibc's mmap threshold at its 128 KiB default in this (worker) process; a no-op without glibc.

    Each task moves buffers of about a batch (the pickled batch, its text, the token array). Once the first is freed,
    glibc raises its mmap threshold past that size and serves later ones from the heap, whose holes keep growing: a
    worker's resident memory crept from 47 to 75 MB over 160 batches. With the threshold fixed
    (mallopt(M_MMAP_THRESHOLD)), each such buffer goes back to the system when it is freed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _encode_batch(documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_tokenizer.encode_documents(documents)


class Progress:
    """A one-line progress report on stderr: input consumed, text MB/s, ETA, documents and tokens."""

    def __init__(self, total_bytes: int, enabled: bool, interval: float = 1.0):
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, stats: SourceStats, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.interval):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        fraction = min(stats.disk_bytes / self.total, 1.0)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        line = (f"preprocess {100 * fraction:5.1f}% | {stats.text_bytes / 1e6:,.1f} MB text at "
                f"{stats.text_bytes / 1e6 / elapsed:.2f} MB/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))} | "
                f"{stats.documents:,} docs, {tokens:,} tokens")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _plan(files: list[Path], tokenizer: SentencepieceTokenizer, shard_mb: float, batch_mb: float,
          text_field: str) -> dict:
    sources = []
    for path in files:
        stat = path.stat()
        sources.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"format": "amos-ds-shards", "version": FORMAT_VERSION, "tokenizer_hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size, "dtype": tokenizer.dtype.name, "shard_mb": shard_mb,
            "batch_mb": batch_mb, "text_field": text_field, "sources": sources}


def _write_json(path: Path, value: dict) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def _batches(documents, batch_bytes: int):
    batch, size = [], 0
    for document in documents:
        batch.append(document)
        size += len(document)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _finished_shard(output: Path, number: int, tokenizer_hash: str) -> dict | None:
    """The manifest entry of shard `number` if a previous run finished it, else None (partial files are removed)."""
    prefix = output / shard_name(number)
    for tmp in (prefix.with_suffix(".bin.tmp"), prefix.with_suffix(".idx.tmp")):
        tmp.unlink(missing_ok=True)
    if not prefix.with_suffix(".idx").exists():
        return None
    try:
        shard = IndexedShard(prefix)
    except DataError:
        return None
    if shard.tokenizer_hash != tokenizer_hash:
        return None
    return {"name": prefix.name, "documents": shard.num_docs, "tokens": shard.num_tokens,
            "sha256": shard.bin_sha256.hex()}


# --shard-mb's range: smaller shards turn one corpus into tens of thousands of files; larger ones, into one that
# no reader maps comfortably.
MIN_SHARD_MB, MAX_SHARD_MB = 0.01, 65536


def preprocess(inputs: list[str], tokenizer_dir: str, output: str, workers: int = 1, shard_mb: float = 64.0,
               batch_mb: float = 1.0, text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize `inputs` into shards under `output`; returns the manifest (also written to output/manifest.json)."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if not MIN_SHARD_MB <= shard_mb <= MAX_SHARD_MB:  # also refuses NaN
        raise DataError(f"--shard-mb must be in [{MIN_SHARD_MB}, {MAX_SHARD_MB}], got {shard_mb}")
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    batch_mb = min(batch_mb, shard_mb)
    out = Path(output)
    plan = _plan(files, tokenizer, shard_mb, batch_mb, text_field)
    if (out / MANIFEST).exists() and (out / PLAN).exists() and json.loads((out / PLAN).read_text()) == plan:
        return json.loads((out / MANIFEST).read_text())
    if (out / PLAN).exists() and json.loads((out / PLAN).read_text()) != plan:
        raise DataError(f"{out}: holds shards of other inputs, tokenizer or settings; use a new --output or delete it")
    if out.exists() and not (out / PLAN).exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an amos-ds shard folder; use a new --output")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / PLAN, plan)
        copy_tokenizer(tokenizer.directory, out / TOKENIZER_DIR)
    except OSError as e:
        raise DataError(f"{out}: cannot be written ({e.strerror}); check free space and permissions") from None

    batches_per_shard = max(1, round(shard_mb / batch_mb))
    stats = SourceStats()
    report = Progress(sum(f.stat().st_size for f in files), progress)
    shards: dict[int, dict] = {}  # by shard number: finished ones arrive out of order when a run resumes
    writer: ShardWriter | None = None
    total_tokens = 0
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.directory),))
    pending: deque = deque()
    skip_shard = False

    def write_result(batch_number: int, result) -> None:
        nonlocal writer, total_tokens
        tokens, lengths = result.get()
        if writer is None:
            writer = ShardWriter(out / shard_name(batch_number // batches_per_shard), tokenizer.dtype, tokenizer.hash)
        writer.add(tokens, lengths)
        total_tokens += len(tokens)
        if (batch_number + 1) % batches_per_shard == 0:
            shards[batch_number // batches_per_shard] = writer.finish()
            writer = None

    try:
        batch_number = -1
        for batch_number, batch in enumerate(_batches(iter_sources(files, stats, text_field), int(batch_mb * 1e6))):
            if batch_number % batches_per_shard == 0:
                done = _finished_shard(out, batch_number // batches_per_shard, tokenizer.hash)
                skip_shard = done is not None
                if done:
                    shards[batch_number // batches_per_shard] = done
                    total_tokens += done["tokens"]
            if skip_shard:
                continue
            pending.append((batch_number, pool.apply_async(_encode_batch, (batch,))))
            while len(pending) > 2 * workers or (pending and pending[0][1].ready()):
                write_result(*pending.popleft())
            report.update(stats, total_tokens)
        while pending:
            write_result(*pending.popleft())
        if writer is not None:
            shards[batch_number // batches_per_shard] = writer.finish()
            writer = None
    except OSError as e:
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise DataError(f"{out}: {what} while writing shards; fix that and rerun the same command "
                        "(finished shards are kept)") from None
    finally:
        pool.terminate()
        if writer is not None:
            writer.abort()
    report.update(stats, total_tokens, final=True)
    if batch_number < 0:  # leave nothing, so that the same --output takes the fixed input
        (out / PLAN).unlink(missing_ok=True)
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        if created:
            out.rmdir()
        raise DataError(f"{', '.join(map(str, files))}: no text found; point --input at non-empty text files")
    shard_list = [shards[number] for number in sorted(shards)]
    stray = {p.stem for p in out.glob("shard-*.idx")} - {s["name"] for s in shard_list}
    for name in stray:  # shards of an earlier, longer input: not part of this corpus
        for suffix in (".bin", ".idx"):
            (out / name).with_suffix(suffix).unlink(missing_ok=True)
    manifest = {
        "format": "amos-ds-shards", "version": FORMAT_VERSION, "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size, "dtype": tokenizer.dtype.name,
        "documents": sum(s["documents"] for s in shard_list), "tokens": total_tokens, "text_bytes": stats.text_bytes,
        "replaced_bytes": stats.replaced_bytes, "replaced_by_file": stats.replaced_by_file,
        "sources": plan["sources"], "shards": shard_list,
    }
    _write_json(out / MANIFEST, manifest)
    return manifest
