"""One job per run directory: a second job is refused naming the holder, a lock whose holder is gone is taken over
with a warning, the lease is renewed while the job runs, and two real runs racing for one directory (and a requeue
with changed settings) never mix their records."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PRETRAIN, REPO, cleanup, metrics, start, subprocess_env, write_configs

from amos_ds.train import run_lock
from amos_ds.train.run_lock import LOCK_FILE, RunLock, RunLocked


def foreign_lock(run_dir: Path, **holder) -> Path:
    """A lock file as another job wrote it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "pid_start": "99", "started": "2026-12-01T00:00:00",
                                "job_id": "777", "token": "theirs", **holder}))
    return path


def test_a_second_job_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    first = RunLock(tmp_path / "run")
    first.acquire()
    held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert (held["host"], held["pid"], held["job_id"]) == (socket.gethostname(), os.getpid(), "1234")
    with pytest.raises(RunLocked) as raised:
        RunLock(tmp_path / "run").acquire()
    assert str(raised.value) == (f"--run-dir {tmp_path / 'run'}: in use by another job (PID {os.getpid()} on "
                                 f"{socket.gethostname()}, job 1234, started {held['started']}; "
                                 f"{tmp_path / 'run' / LOCK_FILE}); wait for it to end, or use another --run-dir")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # no private file left behind
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    second = RunLock(tmp_path / "run")
    second.acquire()
    second.release()


def test_a_released_lock_leaves_no_folder_it_made(tmp_path):
    lock = RunLock(tmp_path / "new" / "run")
    lock.acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path, capsys):
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())  # never a live PID
    for holder in ({"pid": pid_max}, {"pid": os.getpid(), "pid_start": "0"}):  # gone; its PID reused by another
        foreign_lock(tmp_path, host=socket.gethostname(), **holder)
        lock = RunLock(tmp_path)
        lock.acquire()
        assert f"took over the lock of a job that is gone (PID {holder['pid']} on {socket.gethostname()}, job 777" \
            in capsys.readouterr().err
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.holder["token"]
        lock.release()


def test_a_lock_from_another_host_is_taken_over_only_once_its_lease_expires(tmp_path, capsys):
    path = foreign_lock(tmp_path)
    with pytest.raises(RunLocked, match="in use by another job \\(PID 4242 on node-17, job 777"):
        RunLock(tmp_path).acquire()
    expired = time.time() - run_lock.LEASE_S - 5
    os.utime(path, (expired, expired))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert re.search(r"warning: .*: took over the lock of a job that is gone \(PID 4242 on node-17, job 777, started "
                     r"2026-12-01T00:00:00: its lease was last renewed 30\d s ago, more than 300 s\)",
                     capsys.readouterr().err)
    lock.release()


def test_the_lease_is_renewed_while_the_lock_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "RENEW_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    lock.release()


def test_taking_over_never_removes_a_lock_that_is_not_the_stale_one(tmp_path):
    """Between reading a stale lock and moving it aside, another job took it over: the fresh lock stays."""
    foreign_lock(tmp_path, token="fresh")
    lock = RunLock(tmp_path)
    with pytest.raises(RunLocked, match="another job took it over just now"):
        lock._take_over({"token": "stale"})
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "fresh"


def wait_for(condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_two_jobs_racing_for_one_run_directory_and_a_requeue_with_changed_settings(tmp_path, corpus):
    run_dir = tmp_path / "run"
    flags = [*write_configs(tmp_path, corpus, zero_stage=1), "--fp32", "--run-dir", str(run_dir), "--save-every", "2"]
    first, port = start(1, [*flags, "--max-steps", "1000"])
    try:
        # Any checkpoint: a given one may come and go (keep_last) between two looks on a fast machine.
        wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file())
        second = subprocess.run([sys.executable, str(PRETRAIN), *flags, "--max-steps", "1000"], cwd=REPO,
                                env=subprocess_env(), capture_output=True, text=True, timeout=240)
        errors = [line for line in second.stderr.splitlines() if "error:" in line]
        assert second.returncode == 2, second.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: --run-dir {run_dir}: in use by another job (PID {first.pid} on {socket.gethostname()}"), errors
        assert first.poll() is None  # the first job runs on, undisturbed
        os.killpg(first.pid, signal.SIGKILL)  # a node lost: the lock stays behind, its holder gone
        first.wait()
    finally:
        cleanup(first, port)
    steps = [record["step"] for record in metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), steps

    # The scheduler requeues the job with another learning rate: the stale lock is taken over, the change refused.
    write_configs(tmp_path, corpus, zero_stage=1, lr=2e-3)
    requeued = subprocess.run([sys.executable, str(PRETRAIN), *flags, "--max-steps", "1000"], cwd=REPO,
                              env=subprocess_env(), capture_output=True, text=True, timeout=240)
    errors = [line for line in requeued.stderr.splitlines() if "error:" in line]
    assert requeued.returncode == 2, requeued.stderr[-3000:]
    assert f"warning: --run-dir {run_dir}: took over the lock of a job that is gone (PID {first.pid}" \
        in requeued.stderr
    assert len(errors) == 1 and "deepspeed.optimizer.params.lr: 0.001 -> 0.002" in errors[0], errors
    assert not (run_dir / LOCK_FILE).exists()


def test_a_live_process_on_this_host_keeps_its_lock_even_past_the_lease(tmp_path):
    path = foreign_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), pid_start=run_lock._process_start(
        os.getpid()))
    expired = time.time() - run_lock.LEASE_S - 5
    os.utime(path, (expired, expired))
    with pytest.raises(RunLocked, match=f"in use by another job \\(PID {os.getpid()} on"):
        RunLock(tmp_path).acquire()
