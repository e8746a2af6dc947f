"""`amos-ds launch --scheduler slurm`: a run as a chain of Slurm jobs that stop before their time limit, requeue
themselves and continue from their last checkpoint until --max-steps.

    amos-ds launch --scheduler slurm --nodes 8 --partition gpu --time 2-00:00:00 --dry-run -- \
        --deepspeed_config ds_configs/base_plus_plus.json --preset base_plus_plus --data D --run-dir runs/bpp

writes RUN_DIR/slurm/job.sbatch and submits it with `sbatch`; --dry-run prints it instead. The script starts one
`srun` task per rank (per GPU), and pretrain.py maps SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS to RANK,
LOCAL_RANK and WORLD_SIZE, with MASTER_ADDR the allocation's first node: no ssh, no hostfile.

How one job of the chain ends, and how the script tells "stopped early, requeue me" from "done":
- `#SBATCH --signal=USR1@LEAD` has Slurm send SIGUSR1 to every rank LEAD seconds before the time limit
  (`scancel --signal=USR1 JOB` does the same at once); pretrain.py saves a checkpoint at the end of its step and
  exits 0 (amos_ds/train/signals.py), as it does when it reaches --max-steps.
- pretrain.py exits 0 in both cases, so the script compares the step of RUN_DIR/checkpoints/latest with the run's
  total steps (resolved when the script is written): below it, and advanced during this job, the job requeues
  itself (`scontrol requeue`); Slurm starts the same script again, with `--resume auto`. A job that saved nothing
  new is not requeued (a time limit shorter than the start-up would loop forever).
- pretrain.py exiting non-zero (1 a crash or failed save, 2 bad input or a run directory held by another job,
  3 non-finite losses) ends the chain with that code: a requeue would repeat the failure.
- `scancel JOB` (and preemption) sends SIGTERM to the ranks and to the script: the ranks save if they can within
  Slurm's KillWait, and the script does not requeue; under PreemptMode=REQUEUE Slurm requeues the job itself.
"""

import argparse
import math
import re
import shlex
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from amos_ds.atomic import write_atomically
from amos_ds.errors import ConfigError
from amos_ds.train.hostfile import Host
from amos_ds.train.launch import PRETRAIN, format_duration, format_plan, launch_env, make_plan
from amos_ds.train.train_config import build_parser, load_train_config, read_config_file
from amos_ds.train.version import code_version

SCRIPT = Path("slurm") / "job.sbatch"  # in the run directory, beside the job logs slurm/<job id>.out
# Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds.
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
SIGNAL_LEAD_MAX_S = 65535  # the largest sig_time sbatch accepts
SIGNAL_EARLY_S = 60  # Slurm may send the --signal up to this much before the time asked for (sbatch(1))
# A MASTER_PORT per job, from the job id, unless --master-port: two jobs sharing a node must not collide.
JOB_PORT_BASE, JOB_PORT_RANGE = 20000, 20000


@dataclass
class SlurmConfig:
    """The allocation and the sbatch options; fields of --slurm-config FILE (JSON), then the flags."""

    nodes: int = 1
    ranks_per_node: int = 8  # srun tasks (training ranks) per node: one per GPU
    gpus_per_node: int | None = None  # None: one per rank; 0: CPU ranks (no GPU requested)
    cpus_per_task: int | None = None  # None: the partition's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str | None = None  # Slurm's format, e.g. 2-00:00:00; None: the partition's default limit
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: time to finish a step and save
    job_name: str | None = None  # None: the run directory's name
    sbatch_lines: list[str] = field(default_factory=list)  # more sbatch options, e.g. "--mail-type=END,FAIL"

    def __post_init__(self) -> None:
        for name in ("nodes", "ranks_per_node", "signal_lead_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Slurm setting {name} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ConfigError(f"Slurm setting gpus_per_node must be 0 or more, got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"Slurm setting cpus_per_task must be at least 1, got {self.cpus_per_task}")
        if self.signal_lead_s > SIGNAL_LEAD_MAX_S:
            raise ConfigError(f"Slurm setting signal_lead_s must be at most {SIGNAL_LEAD_MAX_S}, got "
                              f"{self.signal_lead_s}")
        for name in ("partition", "account", "qos", "constraint", "time", "job_name"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[^\s#'\"\\]+", value):
                raise ConfigError(f"Slurm setting {name} {value!r}: must be one word without quotes, '#' or "
                                  "backslashes")
        for line in self.sbatch_lines:
            if not re.fullmatch(r"--[A-Za-z][^\n\r]*", line):
                raise ConfigError(f"Slurm setting sbatch_lines {line!r}: each must be one sbatch option on one "
                                  "line, starting with '--'")
        if self.time is not None and time_limit_s(self.time) <= self.signal_lead_s + SIGNAL_EARLY_S:
            raise ConfigError(f"Slurm setting time {self.time} must be longer than signal_lead_s + {SIGNAL_EARLY_S} s "
                              f"({self.signal_lead_s + SIGNAL_EARLY_S} s): Slurm may send the signal that much earlier")

    @property
    def gpus(self) -> int:
        return self.ranks_per_node if self.gpus_per_node is None else self.gpus_per_node


def time_limit_s(text: str) -> int:
    """Seconds in a Slurm time limit (`sbatch --time`), or a ConfigError."""
    match = SLURM_TIME.fullmatch(text)
    if not match:
        raise ConfigError(f"Slurm time limit {text!r}: expected MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                          "D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is None:  # MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS
        hours, minutes, seconds = (0, int(first), int(second or 0)) if third is None else \
            (int(first), int(second), int(third))
    else:  # DAYS-HOURS[:MINUTES[:SECONDS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def load_slurm_config(args: argparse.Namespace) -> SlurmConfig:
    """SlurmConfig defaults, overridden by --slurm-config FILE, overridden by the flags that were given."""
    values = read_config_file(args.slurm_config, SlurmConfig, "--slurm-config") if args.slurm_config else {}
    for name in (f.name for f in fields(SlurmConfig)):
        if name == "sbatch_lines":
            values[name] = [*values.get(name, []), *args.sbatch]
        elif getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return SlurmConfig(**values)


def sbatch_script(slurm: SlurmConfig, pretrain_args: list[str], run_dir: Path, max_steps: int,
                  env: dict[str, str], master_addr: str | None, master_port: int | None) -> str:
    """The job script, top to bottom, with a comment on every line that is not self-evident."""
    run_dir = run_dir.resolve()
    q = shlex.quote
    options = [
        ("the run directory's name in squeue", f"--job-name={slurm.job_name or run_dir.name}"),
        (None, f"--nodes={slurm.nodes}"),
        ("one task per training rank", f"--ntasks-per-node={slurm.ranks_per_node}"),
    ]
    if slurm.gpus:
        options.append(("one GPU per rank", f"--gpus-per-node={slurm.gpus}"))
    if slurm.cpus_per_task:
        options.append(("CPU cores per rank: data loader workers and OMP_NUM_THREADS", f"--cpus-per-task="
                        f"{slurm.cpus_per_task}"))
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, name):
            options.append((None, f"--{name}={getattr(slurm, name)}"))
    if slurm.time:
        options.append(("the job's time limit; the chain continues in a requeued job", f"--time={slurm.time}"))
    options += [
        (f"SIGUSR1 to every rank {slurm.signal_lead_s} s before the time limit (Slurm may send it up to "
         f"{SIGNAL_EARLY_S} s earlier): the ranks save a checkpoint and exit 0",
         f"--signal=USR1@{slurm.signal_lead_s}"),
        ("the job may be requeued: by the script below, or by Slurm on preemption", "--requeue"),
        ("every requeued start appends to the same log", "--open-mode=append"),
        ("stdout and stderr of the script and of every rank", f"--output={run_dir / 'slurm' / '%j.out'}"),
        ("relative paths in the flags below are from where `amos-ds launch` ran", f"--chdir={Path.cwd()}"),
        ("the submitting shell's environment (PATH, PYTHONPATH, a virtualenv) reaches every rank", "--export=ALL"),
        *((None, line) for line in slurm.sbatch_lines),
    ]
    lines = [
        "#!/bin/bash",
        f"# amos-ds pretraining as a chain of Slurm jobs, written by `amos-ds launch --scheduler slurm` "
        f"(amos-ds {code_version()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).",
        "# Submit: sbatch THIS_FILE. Each job trains until Slurm's warning signal, saves, and requeues itself until",
        f"# step {max_steps}; docs/TRAINING.md, section Slurm, explains how to watch and stop it.",
    ]
    for comment, option in options:
        lines += ([f"# {comment}"] if comment else []) + [f"#SBATCH {option}"]
    lines += [
        "",
        f"RUN_DIR={q(str(run_dir))}",
        f"MAX_STEPS={max_steps}  # the run's last step (--max-steps, or the DeepSpeed config's total_num_steps)",
        "",
        "# The ranks meet on the allocation's first node; pretrain.py maps SLURM_PROCID, SLURM_LOCALID and",
        "# SLURM_NTASKS to RANK, LOCAL_RANK and WORLD_SIZE.",
        f"export MASTER_ADDR={q(master_addr)}" if master_addr else
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={master_port}" if master_port else
        f"export MASTER_PORT=$(({JOB_PORT_BASE} + SLURM_JOB_ID % {JOB_PORT_RANGE}))  # per job: jobs may share a "
        "node",
        "# torch's threads per rank: the cores Slurm gave each task (the variables below may override it)",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "# NCCL and network settings of the submitting shell, the defaults and --env (docs/TRAINING.md, Many nodes)",
        *(f"export {key}={q(value)}" for key, value in sorted(env.items())),
        "",
        "# The step of the newest complete checkpoint (checkpoints/latest names it), 0 before the first.",
        "saved_step() {",
        '  local tag=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo step_0)',
        "  echo $((10#${tag#step_}))  # base 10: step_00000900 is not octal",
        "}",
        "",
        "# scancel and preemption send SIGTERM to this script too: wait for the ranks to save, then end without a",
        "# requeue (bash runs a trap once srun has returned). `scancel --signal=USR1 --full` must not end it either.",
        "cancelled=0",
        "trap 'cancelled=1' TERM",
        "trap : USR1",
        "",
        "start_step=$(saved_step)",
        "resume=()",
        "# A requeued start continues from the newest complete checkpoint, whatever --resume the first start had.",
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=(--resume auto); fi',
        'echo "amos-ds: job $SLURM_JOB_ID, start ${SLURM_RESTART_COUNT:-0}, from step $start_step of $MAX_STEPS,'
        ' on $SLURM_JOB_NODELIST, $(date -u +%FT%TZ)"',
        "",
        "# One task per rank on every node; --kill-on-bad-exit: a rank that fails ends the others at once.",
        "srun --kill-on-bad-exit=1 \\",
        f"  {q(sys.executable)} {q(str(PRETRAIN))} \\",
        f"  {shlex.join(pretrain_args)} \\",
        '  "${resume[@]}"',
        "status=$?",
        "end_step=$(saved_step)",
        "",
        'if [ "$status" -ne 0 ]; then',
        '  echo "amos-ds: pretrain.py exited $status at step $end_step: not requeued (docs/TRAINING.md, Faults)"',
        '  exit "$status"',
        'elif [ "$end_step" -ge "$MAX_STEPS" ]; then',
        '  echo "amos-ds: done, step $end_step of $MAX_STEPS"',
        'elif [ "$cancelled" -eq 1 ]; then',
        '  echo "amos-ds: cancelled or preempted at step $end_step: Slurm decides whether the job runs again"',
        'elif [ "$end_step" -le "$start_step" ]; then',
        '  echo "amos-ds: no new checkpoint in this job (step $end_step): not requeued, a requeue would loop"',
        "  exit 1",
        "else",
        '  echo "amos-ds: stopped at step $end_step of $MAX_STEPS: requeueing job $SLURM_JOB_ID, $(date -u +%FT%TZ)"',
        "  # Slurm ends this script now and starts it again once the job's credential has expired (cred_expire).",
        '  scontrol requeue "$SLURM_JOB_ID" || exit 1',
        "fi",
    ]
    return "\n".join(lines) + "\n"


def format_slurm_plan(slurm: SlurmConfig, eta_s: float | None) -> str:
    """The allocation, and the run's ETA as a number of time-limited jobs."""
    gpus = f"{slurm.gpus} GPU(s)" if slurm.gpus else "no GPUs"
    where = " ".join(f"{name} {getattr(slurm, name)}" for name in ("partition", "account", "qos", "constraint")
                     if getattr(slurm, name))
    lines = [f"slurm        {slurm.nodes} node(s) x {slurm.ranks_per_node} rank(s), {gpus} per node"
             f"{', ' + where if where else ''}"]
    if slurm.time is None:
        lines.append("jobs         time limit: the partition's default (--time not given)")
    else:
        training_s = time_limit_s(slurm.time) - slurm.signal_lead_s
        count = f"{math.ceil(eta_s / training_s)} job(s)" if eta_s else "job count unknown (no measured throughput)"
        lines.append(f"jobs         {count}: each job of --time {slurm.time} trains for at most "
                     f"{format_duration(training_s)} (SIGUSR1 {slurm.signal_lead_s} s before its limit) less its "
                     "start-up; each requeue waits for Slurm's cred_expire (120 s by default) and the queue")
    return "\n".join(lines)


# A flag per SlurmConfig field, named after it (sbatch_lines is --sbatch, below).
SLURM_HELP = {
    "nodes": "nodes (default 1)",
    "ranks_per_node": "training ranks (srun tasks) per node, one per GPU (default 8)",
    "gpus_per_node": "GPUs to request per node (default: one per rank; 0: CPU ranks)",
    "cpus_per_task": "CPU cores per rank (default: the partition's)",
    "partition": "sbatch --partition",
    "account": "sbatch --account",
    "qos": "sbatch --qos",
    "constraint": "sbatch --constraint (node features, e.g. a100-80gb)",
    "time": "time limit of each job of the chain, e.g. 2-00:00:00 (default: the partition's)",
    "signal_lead_s": "seconds before the time limit at which the ranks save and stop (default 300)",
    "job_name": "job name (default: the run directory's name)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--scheduler slurm", "the allocation and sbatch options (SlurmConfig fields "
                                      "in amos_ds/train/slurm.py; flags override --slurm-config)")
    group.add_argument("--scheduler", choices=("slurm",),
                       help="slurm: write RUN_DIR/slurm/job.sbatch and submit it with sbatch; srun starts the ranks "
                            "(--hostfile, --launcher, --no-ssh, --ssh-config and --launcher-args do not apply)")
    group.add_argument("--slurm-config", type=Path, metavar="FILE", help="JSON object of SlurmConfig fields")
    hints = typing.get_type_hints(SlurmConfig)
    for name, text in SLURM_HELP.items():
        kind = int if int in (hints[name], *typing.get_args(hints[name])) else str
        group.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="one more sbatch option, e.g. --sbatch=--mail-type=END (repeatable)")


def run_slurm_launch(args: argparse.Namespace) -> int:
    """Print the plan and the script; unless --dry-run, write the script into the run directory and sbatch it."""
    pretrain_args = args.pretrain_args[1:] if args.pretrain_args[:1] == ["--"] else args.pretrain_args
    slurm = load_slurm_config(args)
    config = load_train_config(build_parser().parse_args(pretrain_args))
    hosts = [Host(f"node{i}", slurm.ranks_per_node) for i in range(slurm.nodes)]
    plan = make_plan("a Slurm allocation", hosts, config, args.throughput_from)
    run_dir = Path(config.run_dir).resolve()
    script = sbatch_script(slurm, pretrain_args, run_dir, plan.total_steps, launch_env(args), args.master_addr,
                           args.master_port)
    print(format_plan(plan))
    print(format_slurm_plan(slurm, plan.eta_s))
    path = run_dir / SCRIPT
    if args.dry_run:
        print(f"script       {path} (not written: --dry-run)\n{script}", end="", flush=True)
        return 0
    if not shutil.which("sbatch"):
        raise ConfigError("--scheduler slurm: sbatch not found on PATH; run amos-ds launch on a Slurm login node")
    created = [p for p in (run_dir, path.parent) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, script)
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode:
        path.unlink()
        for directory in reversed(created):
            directory.rmdir()
        reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise ConfigError(f"--scheduler slurm: sbatch refused {path} ({reason}); fix the Slurm flags or "
                          "--slurm-config")
    job = result.stdout.strip().split(";")[0]
    print(f"script       {path}\nsubmitted    job {job}; log {run_dir / 'slurm' / f'{job}.out'}; watch with "
          f"`squeue -j {job}`; stop for good with `scancel {job}`", flush=True)
    return 0

