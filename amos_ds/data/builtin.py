"""The zero-download corpus: English prose every Python install carries, tokenized and sharded once per cache.

Text: the Python documentation topics (`pydoc_data.topics`, about 0.5 MB) and the docstrings of the standard
library's modules, classes and functions longer than 200 characters (about 1.1 MB), read with `ast` (nothing is
imported). Small, but real language: enough to smoke-test pretraining end to end without any download.
"""

import ast
import fcntl
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from amos_ds.atomic import staged
from amos_ds.data.preprocess import MANIFEST, preprocess
from amos_ds.data.tokenizer import train_tokenizer

BUILTIN_VERSION = 1
_SKIPPED_PACKAGES = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "tkinter", "turtledemo"}


def _paragraphs(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def builtin_documents() -> Iterator[str]:
    """The documents of the built-in corpus, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield _paragraphs(topics[name])
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_PACKAGES & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield _paragraphs(doc)


def prepare_builtin_corpus(cache_dir: str, vocab_size: int = 8192) -> str:
    """Path of a preprocessed folder (tokenizer + shards) of the built-in corpus, built on first use.

    Idempotent and safe when several ranks call it at once: one builds under a file lock, in a temporary folder
    renamed into place when done; the others wait and reuse it.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"builtin-v{BUILTIN_VERSION}-vocab{vocab_size}"
    if (final / MANIFEST).exists():
        return str(final)
    with open(cache / ".builtin.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).exists():
            return str(final)
        work = Path(tempfile.mkdtemp(prefix=".builtin-build.", dir=cache))
        try:
            text = work / "builtin.txt"
            with open(text, "w", encoding="utf-8") as f:
                for document in builtin_documents():
                    f.write(document + "\n\n")
            tokenizer = work / "tokenizer"
            train_tokenizer([str(text)], vocab_size, str(tokenizer))
            with staged(final) as data:
                preprocess([str(text)], str(tokenizer), str(data), workers=min(2, os.cpu_count() or 1),
                           progress=False)
                if final.exists():
                    shutil.rmtree(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return str(final)
