"""A real Slurm on this machine: munged, slurmctld and slurmd on loopback with a slurm.conf generated here (one node,
two CPUs), a two-rank run submitted with `amos-ds launch --scheduler slurm`, preempted mid-run with
`scancel --signal=USR1`, requeued by its own script and finished from its checkpoint, bit for bit like an
uninterrupted run. Needs root and Debian's slurmctld, slurmd, slurm-client and munge (.ci/run installs them).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, complete_steps, logged_steps, metrics, run, subprocess_env, write_configs

from amos_ds.pretrain import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
STEPS = 40
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def slurm_conf(directory: Path, host: str) -> str:
    """One node (this machine, by its hostname, which resolves to loopback) with two CPUs, no cgroups, no
    accounting; ports picked free; a requeued job may restart 5 s after its requeue (cred_expire, 120 s by
    default) and the scheduler looks at pending jobs every second (sched_interval, 60 s by default)."""
    return f"""\
ClusterName=amostest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={directory / 'munge.socket'},cred_expire=5
StateSaveLocation={directory / 'state'}
SlurmdSpoolDir={directory / 'spool'}
SlurmctldPidFile={directory / 'slurmctld.pid'}
SlurmdPidFile={directory / 'slurmd.pid'}
SlurmctldLogFile={directory / 'slurmctld.log'}
SlurmdLogFile={directory / 'slurmd.log'}
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """The three daemons of a one-node Slurm, started in the foreground as children of the test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        host = socket.gethostname()
        directory.chmod(0o700)
        for name in ("state", "spool"):
            (directory / name).mkdir()
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (directory / "slurm.conf").write_text(slurm_conf(directory, host))
        self.env = {**subprocess_env(), "SLURM_CONF": str(directory / "slurm.conf")}
        self.processes: dict[str, subprocess.Popen] = {}
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={directory / 'munge.socket'}", f"--pid-file={directory / 'munged.pid'}",
                               f"--seed-file={directory / 'munged.seed'}", f"--log-file={directory / 'munged.log'}"])
        self._wait(lambda: (directory / "munge.socket").exists(), "munged's socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i"])
        self._start("slurmd", ["slurmd", "-D"])
        self._wait(lambda: self.query(["sinfo", "-h", "-o", "%T"]) == "idle", "the node to be idle in sinfo")

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.directory / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, done, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited {process.returncode}: {self.logs()}"
            assert time.monotonic() < deadline, f"{timeout} s passed waiting for {what}: {self.logs()}"
            time.sleep(0.2)

    def logs(self) -> str:
        return "".join(f"\n--- {path.name}\n{path.read_text()[-2000:]}" for path in sorted(self.directory.glob("*.out"))
                       + sorted(self.directory.glob("*.log")))

    def query(self, command: list[str]) -> str:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30).stdout.strip()

    def job_state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as KEY: VALUE (Slurm keeps a finished job there for MinJobAge, 300 s)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.query(["scontrol", "show", "job", job])))

    def stop(self) -> None:
        """Cancel what is left, then end the daemons, slurmd first (it ends its job steps), munged last."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.query(["scancel", "--user=root"])
        for name in reversed(DAEMONS):
            process = self.processes.get(name)
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def cluster(tmp_path):
    missing = [name for name in (*DAEMONS, *CLIENTS) if not shutil.which(name)]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root and Debian's slurmctld, slurmd, slurm-client and munge (.ci/run installs them); "
                    f"{'not root' if os.geteuid() else 'missing ' + ', '.join(missing)}")
    try:
        loopback = socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        loopback = False
    if not loopback:
        pytest.skip(f"the hostname {socket.gethostname()!r} must resolve to a loopback address (/etc/hosts): the "
                    "test's node is this machine by its name")
    directory = tmp_path / "slurm"
    directory.mkdir()
    cluster = Cluster(directory)
    try:
        yield cluster
    finally:
        cluster.stop()


def processes_of(text: str) -> list[str]:
    """Command lines of the live processes that mention `text` (zombies excluded)."""
    out = subprocess.run(["ps", "-ww", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and not line.startswith("Z")]


@pytest.mark.slow
def test_preempted_job_requeues_and_finishes_like_an_uninterrupted_run(tmp_path, corpus, cluster,
                                                                       monkeypatch):
    # One thread per rank in both runs (another count changes the order of float sums), and data-loader workers:
    # Slurm signals every process of the job step, the workers too.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = [*write_configs(tmp_path, corpus, zero_stage=1), "--fp32", "--max-steps", str(STEPS),
             "--save-every", "1000"]
    train_config = json.loads((tmp_path / "train.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps({**train_config, "num_workers": 2}))
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run(2, [*flags, "--run-dir", str(reference)])

    submit = subprocess.run(
        [sys.executable, "-m", "amos_ds.cli", "launch", "--scheduler", "slurm", "--ranks-per-node", "2",
         "--gpus-per-node", "0", "--master-port", str(free_port()), "--", *flags, "--run-dir", str(run_dir)],
        cwd=REPO, env={**cluster.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:] + cluster.logs()
    job = re.search(r"submitted    job (\d+)", submit.stdout).group(1)
    log = run_dir / "slurm" / f"{job}.out"

    def job_log() -> str:
        return log.read_text() if log.exists() else ""

    def wait(done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{timeout} s passed waiting for {what}; job log:\n" \
                                                f"{job_log()[-4000:]}{cluster.logs()}"
            time.sleep(0.05)

    wait(lambda: logged_steps(run_dir) >= 3, "the job's third step", timeout=180)
    cluster.query(["scancel", "--signal=USR1", job])  # what --signal=USR1@LEAD does before the time limit
    wait(lambda: cluster.job_state(job).get("JobState") in FINAL_STATES, "the requeued job to end", 240)
    assert cluster.job_state(job)["JobState"] == "COMPLETED", job_log()[-4000:]

    output = job_log()
    stopped = re.search(r"amos-ds: stopped at step (\d+) of 40: requeueing", output)
    assert stopped, output[-4000:]
    preempted_at = int(stopped.group(1))
    assert 3 <= preempted_at < STEPS, "the job was not stopped mid-run: nothing was tested"
    assert f"stop signal received: saved {run_dir}/checkpoints/step_{preempted_at:08d}" in output
    assert f"job {job}, start 1, from step {preempted_at} of 40" in output
    assert f"resumed from {run_dir}/checkpoints/step_{preempted_at:08d} at step {preempted_at}" in output
    assert "amos-ds: done, step 40 of 40" in output
    assert cluster.job_state(job)["Restarts"] == "1"
    assert complete_steps(run_dir) == [preempted_at, STEPS]

    # One clean step sequence, each step's losses and samples those of the uninterrupted run.
    records, expected = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {r["world_size"] for r in records} == {2}
    for name in ("loss", "mlm_loss", "rtd_loss", "samples"):
        assert [r[name] for r in records] == [r[name] for r in expected], name
    final = [torch.load(directory / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"] for directory in (run_dir, reference)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])

    cluster.stop()
    assert {name: process.returncode is not None for name, process in cluster.processes.items()} == \
        dict.fromkeys(DAEMONS, True)
    assert processes_of("slurmstepd") == [] and processes_of(str(tmp_path)) == []
