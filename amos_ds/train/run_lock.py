"""One job per run directory: RUN_DIR/run.lock, held by rank 0 for the life of the job.

The lock file records who holds it (host, PID and that process's start time, start time of the job, scheduler job
id) and appears whole or not at all: it is written under a private name and hard-linked into place, which fails
when the file exists, on a local disk as on NFS or Lustre. While the job runs, a thread renews the lease (the
file's modification time) every RENEW_S seconds, and the job removes the file when it ends.

A second job into the same directory is refused with one line naming the holder. A lock whose holder is gone is
taken over with a warning: on the holder's own host when its process no longer exists (while it exists, the lock
is its own); from another host once the lease has not been renewed for LEASE_S seconds (a lost node, a job killed
with SIGKILL there). Clocks of the nodes must agree to well within LEASE_S (NTP does). A job on another host paused
for longer than LEASE_S (SIGSTOP, a frozen filesystem) can lose its lock to a newer job; it is not stopped by that.
"""

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch.distributed as dist

from amos_ds.errors import ConfigError

LOCK_FILE = "run.lock"
RENEW_S = 30.0
LEASE_S = 300.0
JOB_ID_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")  # Slurm, PBS, LSF, SGE


class RunLocked(ConfigError):
    """Another live job holds the run directory; the message is one line naming it."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), which tells a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def describe(holder: dict[str, Any]) -> str:
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"PID {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


class RunLock:
    """RUN_DIR/run.lock for this process; acquire() takes it (or raises RunLocked), release() gives it back."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "job_id": next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v)), None),
                       "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._created: list[Path] = []  # folders acquire() made, deepest first: removed again if left empty

    def acquire(self) -> None:
        self._created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            current = self._read()
            reason = self._why_stale(current)
            if reason is None:
                raise RunLocked(f"--run-dir {self.path.parent}: in use by another job ({describe(current)}; "
                                f"{self.path}); wait for it to end, or use another --run-dir")
            self._take_over(current)
            print(f"warning: --run-dir {self.path.parent}: took over the lock of a job that is gone "
                  f"({describe(current)}: {reason})", file=sys.stderr, flush=True)
        self._renewer = threading.Thread(target=self._renew, name="run-lock-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
            if self._read().get("token") == self.holder["token"]:
                self.path.unlink(missing_ok=True)
        for folder in self._created:  # a job refused before it wrote anything leaves no empty run directory
            try:
                folder.rmdir()
            except OSError:
                break

    def _create(self) -> bool:
        """Write the lock whole under a private name, then link it into place: False when one is already there."""
        private = self.path.with_name(f"{LOCK_FILE}.{self.holder['token']}")
        private.write_text(json.dumps(self.holder) + "\n")
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            private.unlink()

    def _read(self, path: Path | None = None) -> dict[str, Any]:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):  # not ours to judge: someone else's file; treated like an unknown holder
            return {"host": "?", "pid": "?", "started": "?"}

    def _why_stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it may still run."""
        if not holder:
            return "the lock was released meanwhile"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            start = _process_start(holder["pid"])
            if start is None or (holder.get("pid_start") and start != holder["pid_start"]):
                return "that process no longer exists"
            return None  # alive on this host, even if frozen: it may still write
        try:
            idle = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "the lock was released meanwhile"
        if idle > LEASE_S:
            return f"its lease was last renewed {idle:.0f} s ago, more than {LEASE_S:.0f} s"
        return None

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Move the stale lock aside and create ours. A job taking it over at the same moment wins or loses the
        rename; the loser (or one that moved a lock that is not the stale one) is refused."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{self.holder['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            pass
        else:
            moved = self._read(aside)
            if stale and moved.get("token") != stale.get("token"):
                os.rename(aside, self.path)  # a live job's fresh lock: put it back
                raise RunLocked(f"--run-dir {self.path.parent}: another job took it over just now "
                                f"({describe(moved)}); use another --run-dir")
            aside.unlink()
        if not self._create():
            raise RunLocked(f"--run-dir {self.path.parent}: another job took it over just now "
                            f"({describe(self._read())}); use another --run-dir")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                os.utime(self.path)
            except OSError:  # a filesystem hiccup: the next renewal tries again, well within the lease
                pass


def lock_run_dir(run_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 takes the run directory's lock and returns it; every rank raises RunLocked when it is held."""
    lock, refusal = None, None
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunLocked as err:
            lock, refusal = None, str(err)
        except OSError as err:  # a full disk or a read-only folder
            lock, refusal = None, f"--run-dir {run_dir}: cannot write its lock file ({err.strerror or err})"
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RunLocked(box[0])
    return lock
