"""Stale locks of torch's JIT extension builds, which would hang every later start.

DeepSpeed builds some ops on first use (on CPU, its shared-memory all-reduce) with torch.utils.cpp_extension, which
takes TORCH_EXTENSIONS_DIR/.../<op>/lock (torch's FileBaton) and every later load waits while that file exists. A
job killed during the build leaves the file behind, and then every start waits forever. The builder keeps the file
open while it builds, so a lock no process on this host holds open is a leftover, or a build on another node when
the extension folder is shared (a home directory on NFS): it is removed once it is STALE_AFTER_S old, with a warning.
"""

import os
import sys
import time
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root

STALE_AFTER_S = 300.0  # well above a build of DeepSpeed's CPU ops (about a minute on a loaded 2-core machine)


def extension_locks() -> list[Path]:
    """The build locks under torch's extension folder (TORCH_EXTENSIONS_DIR/<op>/lock, or
    ~/.cache/torch_extensions/<python>_<accelerator>/<op>/lock)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return sorted(Path(root).glob("*/lock") if root else Path(get_default_build_root()).glob("*/*/lock"))


def held_on_this_host(lock: Path) -> bool:
    """Whether a process on this host has `lock` open (/proc/PID/fd; the processes this user may inspect)."""
    target = os.path.realpath(lock)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return False


def clear_stale_extension_locks() -> None:
    """Remove every build lock that no process on this host holds, waiting until it is STALE_AFTER_S old (a build
    on another node sharing the folder finishes well within that); a lock held here is left to torch to wait on."""
    for lock in extension_locks():
        if held_on_this_host(lock):
            continue
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < STALE_AFTER_S:
            print(f"warning: {lock}: a build lock no process on this host holds; waiting up to "
                  f"{STALE_AFTER_S - age:.0f} s for a build on another node to release it", file=sys.stderr, flush=True)
            deadline = time.monotonic() + STALE_AFTER_S - age
            while lock.exists() and time.monotonic() < deadline:
                time.sleep(1.0)
        if lock.exists():
            lock.unlink(missing_ok=True)
            print(f"warning: removed {lock}, left by a build of a torch extension that was killed (no process "
                  "holds it)", file=sys.stderr, flush=True)
