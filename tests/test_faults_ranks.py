"""A rank that hangs inside a collective: the job ends non-zero within a bounded time (bench/faults.py also resumes
such runs, and checks the weights).

The bound: TrainConfig.collective_timeout_s (gloo raises on the live rank, which exits 1), then the deepspeed
launcher's SIGTERM to the other ranks and its 30 s wait before SIGKILL (a stopped process cannot act on SIGTERM).
"""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import cleanup, complete_steps, logged_steps, start, wait_until, write_configs

pytestmark = pytest.mark.slow  # every test here starts training processes or daemons

TIMEOUT_S = 5
LAUNCHER_GRACE_S = 30  # deepspeed.launcher.launch: terminate, wait 30 s, kill


def rank_pids(session: int) -> dict[int, int]:
    """{local rank: pid} of the pretrain.py processes in a launcher's process group."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "-g", str(session)], capture_output=True, text=True).stdout
    return {int(line.split("--local_rank=")[1].split()[0]): int(line.split()[0])
            for line in out.splitlines() if "pretrain.py" in line and "--local_rank=" in line}


def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path, corpus):
    flags = write_configs(tmp_path, corpus, zero_stage=1)
    train_config = json.loads((tmp_path / "train.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps({**train_config, "collective_timeout_s": TIMEOUT_S}))
    run_dir = tmp_path / "run"
    flags += ["--fp32", "--run-dir", str(run_dir), "--max-steps", "6", "--save-every", "2"]

    process, port = start(2, flags)
    try:
        wait_until(lambda: logged_steps(run_dir) >= 3, process)
        os.kill(rank_pids(process.pid)[1], signal.SIGSTOP)  # rank 1 hangs; rank 0 waits in its next collective
        hung = time.monotonic()
        output, _ = process.communicate(timeout=TIMEOUT_S + LAUNCHER_GRACE_S + 60)
        detected = time.monotonic() - hung
    finally:
        cleanup(process, port)
    assert process.returncode != 0
    # gloo words a collective's timeout in one of two ways, depending on where the rank waits (both seen here).
    assert (f"Timed out waiting {TIMEOUT_S * 1000}ms" in output
            or "Application timeout caused pair closure" in output), output[-3000:]
    assert detected < TIMEOUT_S + LAUNCHER_GRACE_S + 15, detected
    assert 2 in complete_steps(run_dir) and 6 not in complete_steps(run_dir)
