"""`amos-ds launch --scheduler slurm` without a Slurm: the script's text, the flags and config file behind it, the
ETA in jobs, bad input, submission through a stand-in `sbatch`, and srun's variables in pretrain.py."""

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist
from torch.distributed import distributed_c10d

from amos_ds import pretrain
from amos_ds.cli import main
from amos_ds.errors import ConfigError
from amos_ds.train import launch, slurm

TINY = ["--", "--preset", "tiny", "--max-steps", "30"]


def script_of(out: str) -> str:
    return out[out.index("#!/bin/bash"):]


def test_dry_run_prints_a_commented_script_from_flags_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "base"
    code = main(["launch", "--scheduler", "slurm", "--nodes", "2", "--ranks-per-node", "1", "--partition", "gpu",
                 "--account", "proj", "--qos", "high", "--constraint", "a100", "--time", "1-00:00:00",
                 "--signal-lead-s", "600", "--sbatch=--mail-type=END", "--env", "NCCL_DEBUG=WARN", "--dry-run", "--",
                 "--preset", "tiny", "--max-steps", "30", "--run-dir", "runs/base", "--seed", "7"])
    out = capsys.readouterr().out
    assert code == 0 and not run_dir.exists()
    script = script_of(out)
    options = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert options == ["#SBATCH --job-name=base", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                       "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                       "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --time=1-00:00:00",
                       "#SBATCH --signal=USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                       f"#SBATCH --output={run_dir}/slurm/%j.out", f"#SBATCH --chdir={tmp_path}",
                       "#SBATCH --export=ALL", "#SBATCH --mail-type=END"]
    assert f"RUN_DIR={run_dir}\n" in script and "MAX_STEPS=30  #" in script
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n' in script
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    assert "export NCCL_DEBUG=WARN\nexport NCCL_SOCKET_IFNAME=ib0\nexport TORCH_NCCL_ASYNC_ERROR_HANDLING=1\n" in script
    assert (f"srun --kill-on-bad-exit=1 \\\n  {sys.executable} {launch.PRETRAIN} \\\n  --preset tiny --max-steps 30 "
            f"--run-dir runs/base --seed 7 \\\n  \"${{resume[@]}}\"\n") in script
    assert "hosts        2 node(s), 2 GPU(s) (a Slurm allocation)" in out
    assert "slurm        2 node(s) x 1 rank(s), 1 GPU(s) per node, partition gpu account proj qos high " \
           "constraint a100" in out
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # Every #SBATCH line that is not self-evident has its comment on the line above.
    lines = script.splitlines()
    for option in ("--ntasks-per-node", "--gpus-per-node", "--time", "--signal", "--requeue", "--open-mode",
                   "--output", "--chdir", "--export"):
        index = next(i for i, line in enumerate(lines) if line.startswith(f"#SBATCH {option}"))
        assert lines[index - 1].startswith("# "), option


def test_config_file_then_flags(tmp_path, capsys):
    (tmp_path / "cluster.json").write_text(json.dumps({"partition": "gpu", "time": "12:00:00", "ranks_per_node": 2,
                                                       "gpus_per_node": 0, "sbatch_lines": ["--exclusive"]}))
    code = main(["launch", "--scheduler", "slurm", "--slurm-config", str(tmp_path / "cluster.json"), "--partition",
                 "debug", "--sbatch=--mail-type=FAIL", "--master-addr", "node-ib0", "--master-port", "29600",
                 "--dry-run", *TINY, "--run-dir", str(tmp_path / "run")])
    script = script_of(capsys.readouterr().out)
    options = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --partition=debug" in options and "#SBATCH --time=12:00:00" in options
    assert "#SBATCH --ntasks-per-node=2" in options and not any("--gpus" in line for line in options)
    assert options[-2:] == ["#SBATCH --exclusive", "#SBATCH --mail-type=FAIL"]
    assert "export MASTER_ADDR=node-ib0\nexport MASTER_PORT=29600\n" in script
    assert code == 0


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("30:15", 1815), ("2:00:00", 7200), ("1-12", 129600),
                                           ("1-00:30", 88200), ("2-00:00:01", 172801)])
def test_slurm_time_formats(text, seconds):
    assert slurm.time_limit_s(text) == seconds


def test_eta_in_time_limited_jobs(tmp_path, capsys):
    measured = tmp_path / "measured"
    measured.mkdir()
    # 1,000 tokens/s on 2 ranks, as in the plan: 30 steps of 32 x 128 tokens take 122.88 s.
    (measured / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens_per_s": 1000.0, "world_size": 2}) + "\n")
    main(["launch", "--scheduler", "slurm", "--ranks-per-node", "2", "--time", "3:00", "--signal-lead-s", "60",
          "--throughput-from", str(measured), "--dry-run", *TINY, "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    # Jobs of 180 s train 120 s each (SIGUSR1 60 s before the limit): 2 jobs.
    assert "jobs         2 job(s): each job of --time 3:00 trains for at most 00:02 (SIGUSR1 60 s before" in out


@pytest.mark.parametrize("flags, config, message", [
    (["--time", "2h"], None, "Slurm time limit '2h': expected MINUTES"),
    (["--time", "6"], None, "Slurm setting time 6 must be longer than signal_lead_s + 60 s (360 s)"),
    (["--partition", "gpu\n#SBATCH --x"], None, "Slurm setting partition 'gpu\\n#SBATCH --x': must be one word"),
    (["--sbatch", "mail-type=END"], None, "Slurm setting sbatch_lines 'mail-type=END': each must be one sbatch"),
    (["--nodes", "0"], None, "Slurm setting nodes must be at least 1, got 0"),
    ([], {"gpus": 8}, "--slurm-config {config}: unknown field(s) ['gpus']"),
    ([], {"nodes": "2"}, "--slurm-config {config}: nodes must be int, got '2'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, config, message):
    if config is not None:
        (tmp_path / "cluster.json").write_text(json.dumps(config))
        flags = ["--slurm-config", str(tmp_path / "cluster.json")]
    code = main(["launch", "--scheduler", "slurm", *flags, *TINY, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("amos-ds: error: " + message.format(config=tmp_path / "cluster.json")), err
    assert not (tmp_path / "run").exists()


def fake_sbatch(directory, body: str) -> None:
    """An `sbatch` on PATH that records its arguments, then runs `body`."""
    directory.mkdir()
    (directory / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" > {directory}/args\n{body}\n")
    (directory / "sbatch").chmod(0o755)


def test_submit_writes_the_script_and_prints_the_job(tmp_path, capsys, monkeypatch):
    fake_sbatch(tmp_path / "bin", "echo '4242;cluster'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    assert main(["launch", "--scheduler", "slurm", "--ranks-per-node", "2", *TINY, "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    script = run_dir / "slurm" / "job.sbatch"
    assert (tmp_path / "bin" / "args").read_text() == f"--parsable {script}\n"
    assert script.read_text().startswith("#!/bin/bash\n") and f"RUN_DIR={run_dir}\n" in script.read_text()
    assert f"script       {script}\n" in out
    assert f"submitted    job 4242; log {run_dir}/slurm/4242.out; watch with `squeue -j 4242`" in out


def test_a_refused_submission_leaves_nothing(tmp_path, capsys, monkeypatch):
    fake_sbatch(tmp_path / "bin", "echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    code = main(["launch", "--scheduler", "slurm", "--ranks-per-node", "2", "--partition", "gpu", *TINY, "--run-dir",
                 str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"sbatch refused {run_dir}/slurm/job.sbatch (sbatch: error: invalid partition specified: gpu)" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("step_id, expected", [("0", ("1", "2", "1")), (None, ("0", "1", "0"))])
def test_setup_distributed_maps_an_srun_task_not_the_batch_script(monkeypatch, step_id, expected):
    """Inside srun (SLURM_STEP_ID set) the task's place becomes RANK, WORLD_SIZE, LOCAL_RANK; the batch script's
    own shell, which has SLURM_PROCID too, gets a one-process run."""
    # A copy of the environment for setup_distributed to write into, without any launcher's variables.
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT") and not key.startswith(
                       ("SLURM_", "OMPI_"))}
    environment.update(MASTER_ADDR="node1", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1")
    if step_id is not None:
        environment["SLURM_STEP_ID"] = step_id
    monkeypatch.setattr(os, "environ", environment)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        monkeypatch.setattr(distributed_c10d, name, getattr(distributed_c10d, name))
    monkeypatch.setattr(pretrain.deepspeed, "init_distributed", lambda timeout: None)
    monkeypatch.setattr(dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
    assert pretrain.setup_distributed(60.0) == (int(expected[0]), int(expected[1]))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == expected
    assert distributed_c10d.default_pg_timeout == timedelta(seconds=60)


def test_slurm_config_rejects_a_lead_longer_than_slurm_allows():
    with pytest.raises(ConfigError, match="signal_lead_s must be at most 65535"):
        slurm.SlurmConfig(signal_lead_s=70000)
