"""Atomic writes: a file or folder is whole under its final name or absent, even after a crash or power loss.

The one rule, for every file and folder amos-ds writes in place of another or for another process to find: write it
under a temporary name in the same folder (a rename is atomic only within one file system), fsync what was written,
os.replace it onto the final name, then fsync the folder, so that the rename itself survives a power loss.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush one file's or folder's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temporary: Path, target: Path) -> None:
    """Rename `temporary` (a file, or a folder of files, written beside `target`) onto `target`, durably: everything
    in it is fsynced first, the parent folder after. A folder replaces only an absent or empty `target`."""
    if temporary.is_dir():
        for folder, _, files in os.walk(temporary):
            for name in files:
                fsync(Path(folder, name))
            fsync(Path(folder))
    else:
        fsync(temporary)
    os.replace(temporary, target)
    fsync(target.parent)


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` for the block to write a file or folder at (nothing is there yet); published
    onto `target` when the block ends without an error. Nothing temporary is left either way."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    _remove(temporary)  # left by a killed process that had the same id
    try:
        yield temporary
        publish(temporary, target)
    finally:
        _remove(temporary)


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write one file whole (text as UTF-8), under the rule above."""
    with staged(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
