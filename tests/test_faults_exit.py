"""A run that ends, or is killed, leaves no process behind and frees its port at once: a preemption script that
restarts on the same MASTER_PORT right away must not meet EADDRINUSE from the first run's data-loader workers."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, command, write_configs

from amos_ds.pretrain import free_port

pytestmark = pytest.mark.slow  # every test here starts training processes or daemons


def processes_left(session: int) -> list[int]:
    """Live processes of the process group (session) a run was started in."""
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return []
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(session)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split()[1][0] != "Z"]


def test_back_to_back_runs_on_one_fixed_port_with_loader_workers(tmp_path, corpus):
    flags = write_configs(tmp_path, corpus, zero_stage=1)
    train_config = json.loads((tmp_path / "train.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps({**train_config, "num_workers": 2}))
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    train = [*flags, "--run-dir", str(tmp_path / "run"), "--save-every", "100"]

    # Killed mid-run (SIGKILL to the trainer only, as the OOM killer does): its workers must not keep the port.
    first = subprocess.Popen(command(1, port, [*train, "--max-steps", "100"]), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "metrics.jsonl").is_file() or not (tmp_path / "run" / "metrics.jsonl").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.1)
    assert len(processes_left(first.pid)) == 3  # the trainer and its two loader workers
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(0.5)
    assert processes_left(first.pid) == []

    for attempt in range(2):  # then two complete runs back to back, same port, each leaving nothing behind
        result = subprocess.Popen(command(1, port, [*train, "--max-steps", str(2 + attempt), "--resume", "none",
                                                    "--run-dir", str(tmp_path / f"run{attempt}")]),
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        output, _ = result.communicate(timeout=240)
        assert result.returncode == 0, output[-3000:]
        assert processes_left(result.pid) == []
