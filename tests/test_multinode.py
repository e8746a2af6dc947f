"""Real multi-node launches on one machine: two hostnames on loopback addresses (127.0.0.2, 127.0.0.3 in /etc/hosts),
an sshd with a key made here, Debian's pdsh, `amos-ds launch` -> `deepspeed --hostfile` with one rank per node; and
the openmpi launcher with two ranks. Needs root, openssh-server and pdsh (.ci/run installs them); skipped without.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    REPO,
    cleanup,
    complete_steps,
    finish,
    logged_steps,
    metrics,
    subprocess_env,
    wait_until,
    write_configs,
)

from amos_ds.pretrain import free_port

pytestmark = pytest.mark.slow  # every test here starts training processes or daemons

NODES = {"amos-node1": "127.0.0.2", "amos-node2": "127.0.0.3"}
SSHD = Path("/usr/sbin/sshd")


def add_hosts_entries() -> None:
    """Append the two node names to /etc/hosts once (nothing else there changes)."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    missing = [f"{address} {name}\n" for name, address in NODES.items() if f" {name}\n" not in text]
    if missing:
        with hosts.open("a") as f:
            f.write(("" if text.endswith("\n") else "\n") + "".join(missing))


@pytest.fixture(scope="module")
def ssh_config(tmp_path_factory) -> Path:
    """An sshd on a free port of both node addresses, and the client config that reaches it with this key."""
    if os.geteuid() != 0 or not SSHD.exists() or not shutil.which("pdsh"):
        pytest.skip("needs root, openssh-server and pdsh (.ci/run installs them)")
    add_hosts_entries()
    directory = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    port = free_port()
    (directory / "sshd_config").write_text("".join(f"ListenAddress {address}\n" for address in NODES.values()) + f"""\
Port {port}
HostKey {directory / 'host_key'}
AuthorizedKeysFile {directory / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
""")
    (directory / "ssh_config").write_text(f"""Host {' '.join(NODES)}
    Port {port}
    User root
    IdentityFile {directory / 'client_key'}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(directory / "sshd_config")], stderr=subprocess.PIPE,
                            text=True)
    ssh_works = ["ssh", "-F", str(directory / "ssh_config"), "amos-node2", "true"]
    wait_until(lambda: subprocess.run(ssh_works).returncode == 0, sshd, timeout=30, poll=0.2)
    yield directory / "ssh_config"
    sshd.terminate()
    sshd.wait()


def launch(hostfile: Path, launch_flags: list[str], pretrain_flags: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "amos_ds.cli", "launch", "--hostfile", str(hostfile), *launch_flags, "--",
               *pretrain_flags]
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def node_processes(port: int, node_rank: int) -> list[int]:
    """The deepspeed launcher that pdsh started over ssh for one node of the job on `port`, and its rank."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    launchers = [int(pid) for pid, _, args in rows
                 if "deepspeed.launcher.launch" in args and f"--node_rank={node_rank}" in args
                 and f"--master_port={port}" in args]
    return launchers + [int(pid) for pid, ppid, _ in rows if int(ppid) in launchers]


def test_two_nodes_train_lose_one_and_resume_on_the_other(tmp_path, corpus, ssh_config):
    (tmp_path / "two").write_text("amos-node1 slots=1\namos-node2 slots=1\n")
    (tmp_path / "one").write_text("amos-node1 slots=1\n")
    run_dir = tmp_path / "run"
    flags = [*write_configs(tmp_path, corpus, zero_stage=1), "--fp32", "--run-dir", str(run_dir), "--max-steps", "6",
             "--save-every", "2"]
    port = free_port()
    launch_flags = ["--ssh-config", str(ssh_config), "--master-addr", "amos-node1", "--master-port", str(port)]

    job = launch(tmp_path / "two", launch_flags, flags)
    try:
        wait_until(lambda: logged_steps(run_dir) >= 3, job, timeout=300, poll=0.1)
        for pid in node_processes(port, node_rank=1):  # node 2 is lost
            os.kill(pid, signal.SIGKILL)
        output, _ = job.communicate(timeout=120)
    finally:
        cleanup(job, port)
    assert "amos-node1,amos-node2" in output or "amos-node1, amos-node2" in output, output[-4000:]
    assert job.returncode != 0
    records = metrics(run_dir)
    assert {r["world_size"] for r in records} == {2} and 2 in complete_steps(run_dir) and 6 not in complete_steps(
        run_dir)

    job = launch(tmp_path / "one", ["--master-addr", "amos-node1", "--master-port", str(port)], flags)
    output = finish(job, port, timeout=300)
    assert job.returncode == 0, output[-4000:]
    assert "(universal checkpoint)" in output
    records = metrics(run_dir)
    resumed = json.loads((run_dir / "checkpoints" / "step_00000006" / "amos_meta.json").read_text())
    assert [r["step"] for r in records] == list(range(1, 7)) and records[-1]["world_size"] == 1
    assert resumed["world_size"] == 1


def test_launch_refuses_an_unreachable_node_before_starting_anything(tmp_path, corpus, ssh_config):
    (tmp_path / "hosts").write_text("amos-node1 slots=1\nno-such-node.invalid slots=1\n")
    flags = [*write_configs(tmp_path, corpus, zero_stage=1), "--run-dir", str(tmp_path / "run")]
    job = launch(tmp_path / "hosts", ["--ssh-config", str(ssh_config)], flags)
    output, _ = job.communicate(timeout=120)
    errors = [line for line in output.splitlines() if line.startswith("amos-ds: error:")]
    assert job.returncode == 2
    assert len(errors) == 1 and errors[0].startswith("amos-ds: error: host no-such-node.invalid: `ssh "
                                                     "no-such-node.invalid python -m amos_ds.train.version` failed")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not shutil.which("mpirun"), reason="needs Open MPI (.ci/run installs it)")
def test_openmpi_launcher_with_two_ranks(tmp_path, corpus):
    pytest.importorskip("mpi4py")
    run_dir = tmp_path / "run"
    flags = [*write_configs(tmp_path, corpus, zero_stage=1), "--run-dir", str(run_dir), "--max-steps", "2"]
    port = free_port()
    job = launch(REPO / "hostfiles" / "localhost", ["--no-ssh", "--launcher", "openmpi", "--master-port", str(port)],
                 flags)
    try:
        output, _ = job.communicate(timeout=300)
    finally:
        cleanup(job, port)
    assert job.returncode == 0, output[-4000:]
    assert [(r["step"], r["world_size"]) for r in metrics(run_dir)] == [(1, 2), (2, 2)]
    assert complete_steps(run_dir) == [2]
