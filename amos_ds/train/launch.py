"""`amos-ds launch`: check the hostfile and the run's plan, write `.deepspeed_env`, then hand over to `deepspeed`.

    amos-ds launch --hostfile hostfiles/a100 --dry-run -- --deepspeed_config ds_configs/base.json --preset base --data D
    amos-ds launch --hostfile hostfiles/a100 -- --deepspeed_config ds_configs/base.json --preset base --data D
    amos-ds launch --hostfile hostfiles/localhost --no-ssh -- --preset small                  # one machine, no sshd
    amos-ds launch --hostfile hostfiles/localhost --no-ssh --launcher openmpi -- --preset small  # mpirun + mpi4py

Everything after `--` goes to amos_ds/pretrain.py unchanged, and is checked first (config files, batch split for
this GPU count), so a mistake costs seconds on the login node rather than a queue wait on 64 GPUs. Before a
multi-node start, every host must answer over ssh and report this machine's code version (`python -m
amos_ds.train.version` in this directory, with this PYTHONPATH); that replaces DeepSpeed's own ssh check.

The memory estimate per GPU (mixed-precision Adam, as in the ZeRO paper, Rajbhandari et al. 2020): weights w, grads
g and optimizer states o bytes per parameter (bf16: 2, 2, 12 = fp32 master + Adam m, v; fp32: 4, 4, 8), of which
ZeRO-1 partitions o, ZeRO-2 o and g, ZeRO-3 all three over the N data-parallel ranks; plus activations without
recomputation, b x T x H x (34 + 5 a T / H) bytes per layer in 16-bit (Korthikanti et al. 2022; twice that in fp32),
for the generator's and the discriminator's layers. The fused vocabulary path keeps no [tokens x vocabulary]
logits, so they are not counted; nor are the CUDA context and allocator slack (1-3 GiB).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from amos_ds.atomic import write_atomically
from amos_ds.errors import ConfigError
from amos_ds.train.hostfile import Host, parse_hostfile
from amos_ds.train.train_config import TrainConfig, build_parser, load_train_config
from amos_ds.train.version import code_version

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain.py"
# Environment variables that shape NCCL and the network; copied from the launching shell into .deepspeed_env so that
# every node's ranks see them (DeepSpeed forwards only PYTHON*, UCX*, MLFLOW*, MV2* on its own).
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "TP_SOCKET_IFNAME", "FI_", "CUDA_DEVICE_MAX_CONNECTIONS",
                      "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
# A hung collective should fail the job (so that it restarts from a checkpoint) instead of idling for days.
DEFAULT_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BYTES_PER_PARAMETER = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}  # weights, gradients, optimizer
GPU_MEMORY_GIB = {"A100-40GB": 40, "A100-80GB": 80}
THROUGHPUT_WINDOW = 20  # recent metrics records averaged for the measured throughput
SSH_TIMEOUT_S = 30


@dataclass
class LaunchPlan:
    hostfile: str
    nodes: int
    gpus: int
    preset: str
    parameters: int
    zero_stage: int
    precision: str
    global_batch: int
    micro_batch: int
    accumulation: int
    seq_len: int
    tokens_per_step: int
    total_steps: int
    done_steps: int
    state_gib: float
    activation_gib: float
    measured_tokens_per_s: float | None  # scaled to this plan's GPU count
    throughput_source: str
    eta_s: float | None

    @property
    def memory_gib(self) -> float:
        return self.state_gib + self.activation_gib


def memory_per_gpu(parameters: int, layers: int, hidden: int, heads: int, micro_batch: int, seq_len: int,
                   zero_stage: int, precision: str, data_parallel: int) -> tuple[float, float]:
    """(model state GiB, activation GiB) on one GPU; see the module docstring."""
    weights, grads, optimizer = BYTES_PER_PARAMETER[precision]
    partitioned = {0: 0, 1: optimizer, 2: grads + optimizer, 3: weights + grads + optimizer}[zero_stage]
    state = parameters * ((weights + grads + optimizer - partitioned) + partitioned / data_parallel)
    per_layer = micro_batch * seq_len * hidden * (34 + 5 * heads * seq_len / hidden)
    activations = layers * per_layer * (2 if precision == "fp32" else 1)
    return state / 2**30, activations / 2**30


def measured_throughput(run_dir: Path, gpus: int) -> tuple[float | None, str]:
    """Recent tokens/s of a run, scaled linearly from its rank count to `gpus`, and where it came from."""
    from amos_ds.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir)[-THROUGHPUT_WINDOW:] if r.get("tokens_per_s")]
    if not records:
        return None, f"no metrics.jsonl records in {run_dir}"
    per_rank = sum(r["tokens_per_s"] / r["world_size"] for r in records) / len(records)
    return per_rank * gpus, f"{run_dir}, last {len(records)} steps on {records[-1]['world_size']} rank(s)"


def data_vocab_size(config: TrainConfig) -> int:
    """The vocabulary size of the run's tokenizer, which sets the model's (as in pretrain.py), read without opening
    the data: the first --data folder's manifest, or the built-in corpus's tokenizer size."""
    from amos_ds.data.dataset import Corpus, parse_spec

    return Corpus(parse_spec(config.data[0])[0]).vocab_size if config.data else config.builtin_vocab_size


def make_plan(hostfile: str, hosts: list[Host], config: TrainConfig, throughput_from: Path | None) -> LaunchPlan:
    """Everything --dry-run prints, computed without touching a GPU or the data's shards."""
    import torch

    from amos_ds.model import AMOSModel
    from amos_ds.train.ds_config import (
        gradient_accumulation,
        load_ds_config,
        precision,
        scheduler_total_steps,
        zero_stage,
    )
    from amos_ds.train.metrics import read_metrics

    gpus = sum(host.slots for host in hosts)
    ds_path = config.deepspeed_config_path()
    ds_config = load_ds_config(ds_path)
    accumulation = gradient_accumulation(ds_config, gpus, ds_path)
    total_steps = config.max_steps or scheduler_total_steps(ds_config)
    if not total_steps:
        raise ConfigError(f"--max-steps: not given, and {ds_path} has no scheduler total_num_steps to default to")
    if config.init_from:  # the checkpoint's model, as pretrain.py builds it
        from amos_ds.train.init_from import init_model_config

        model_config = init_model_config(config.init_from, config.model)
    else:
        model_config = config.model_config(data_vocab_size(config))
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AMOSModel(model_config).parameters())
    dtype = "fp32" if config.fp32 else precision(ds_config)
    state_gib, activation_gib = memory_per_gpu(
        parameters, model_config.generator_layers_run + model_config.disc_layers, model_config.hidden_size,
        model_config.num_heads, ds_config["train_micro_batch_size_per_gpu"], config.seq_len, zero_stage(ds_config),
        dtype, gpus)
    tokens_per_step = ds_config["train_batch_size"] * config.seq_len
    run_dir = Path(config.run_dir)
    done_steps = max((r["step"] for r in read_metrics(run_dir)), default=0)
    tokens_per_s, source = measured_throughput(throughput_from or run_dir, gpus)
    eta = (total_steps - done_steps) * tokens_per_step / tokens_per_s if tokens_per_s else None
    return LaunchPlan(hostfile=hostfile, nodes=len(hosts), gpus=gpus, preset=config.preset, parameters=parameters,
                      zero_stage=zero_stage(ds_config), precision=dtype, global_batch=ds_config["train_batch_size"],
                      micro_batch=ds_config["train_micro_batch_size_per_gpu"], accumulation=accumulation,
                      seq_len=config.seq_len, tokens_per_step=tokens_per_step, total_steps=total_steps,
                      done_steps=done_steps, state_gib=state_gib, activation_gib=activation_gib,
                      measured_tokens_per_s=tokens_per_s, throughput_source=source, eta_s=eta)


def format_duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours:02d}:{rest // 60:02d}" if days else f"{hours:02d}:{rest // 60:02d}"


def format_count(count: float) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def format_plan(plan: LaunchPlan) -> str:
    fits = ", ".join(f"{gpu} {'fits' if plan.memory_gib <= gib else 'DOES NOT FIT'}"
                     for gpu, gib in GPU_MEMORY_GIB.items())
    if plan.measured_tokens_per_s:
        speed = (f"{plan.measured_tokens_per_s:,.0f} tokens/s ({plan.throughput_source}, scaled to {plan.gpus} GPUs)"
                 f" -> ETA {format_duration(plan.eta_s)} for {plan.total_steps - plan.done_steps:,} steps")
    else:
        speed = f"unknown ({plan.throughput_source})"
    return "\n".join([
        f"hosts        {plan.nodes} node(s), {plan.gpus} GPU(s) ({plan.hostfile})",
        f"model        {plan.preset}, {plan.parameters / 1e6:.1f}M parameters, ZeRO-{plan.zero_stage}, "
        f"{plan.precision}",
        f"batch        {plan.global_batch} sequences = micro-batch {plan.micro_batch} x accumulation "
        f"{plan.accumulation} x {plan.gpus} GPU(s)",
        f"tokens/step  {plan.tokens_per_step:,} (seq_len {plan.seq_len})",
        f"steps        {plan.total_steps:,} ({plan.done_steps:,} done), "
        f"{format_count(plan.total_steps * plan.tokens_per_step)} tokens",
        f"memory/GPU   {plan.memory_gib:.1f} GiB = model states {plan.state_gib:.1f} + activations "
        f"{plan.activation_gib:.1f} (estimate): {fits}",
        f"throughput   {speed}",
    ])


def launch_env(args: argparse.Namespace) -> dict[str, str]:
    """What .deepspeed_env carries to every rank: NCCL/network settings of this shell, defaults, and --env."""
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_PREFIXES)}
    env = {**DEFAULT_ENV, **env}
    # mpirun passes neither to the ranks, and DeepSpeed's MPI discovery would take the first interface's address.
    if args.launcher == "openmpi" and master_addr(args):
        env["MASTER_ADDR"] = master_addr(args)
    if args.launcher == "openmpi" and args.master_port:
        env["MASTER_PORT"] = str(args.master_port)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY.fullmatch(key) or "\n" in value:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE with KEY made of letters, digits and '_'")
        env[key] = value
    return env


def master_addr(args: argparse.Namespace) -> str | None:
    return args.master_addr or ("127.0.0.1" if args.no_ssh else None)


def uses_ssh(args: argparse.Namespace, hosts: list[Host]) -> bool:
    """DeepSpeed's pdsh launcher reaches the nodes over ssh when there is more than one."""
    return args.launcher == "pdsh" and not args.no_ssh and len(hosts) > 1


def ssh_options(args: argparse.Namespace) -> list[str]:
    return ["-F", str(args.ssh_config.resolve())] if args.ssh_config else []


def check_hosts(hosts: list[Host], args: argparse.Namespace) -> None:
    """Every host answers over ssh (no password) and runs the code version of this machine, or a ConfigError.

    The hostnames passed parse_hostfile's check (no shell syntax) and go to ssh as one argument each; the remote
    command quotes every path it holds."""
    local = code_version()
    pythonpath = os.environ.get("PYTHONPATH")
    remote = (f"cd {shlex.quote(os.getcwd())} && " + (f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else "")
              + f"{shlex.quote(sys.executable)} -m amos_ds.train.version")
    for host in hosts:
        command = ["ssh", *ssh_options(args), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}",
                   host.name, remote]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=2 * SSH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"host {host.name}: no answer over ssh in {2 * SSH_TIMEOUT_S} s; check the node and "
                              "the network") from None
        if result.returncode:
            reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            raise ConfigError(f"host {host.name}: `ssh {host.name} python -m amos_ds.train.version` failed "
                              f"({reason}); set up passwordless ssh and the same install on every node "
                              "(docs/TRAINING.md)")
        if result.stdout.strip() != local:
            raise ConfigError(f"host {host.name} runs amos-ds {result.stdout.strip()!r}, this machine {local!r}: "
                              "deploy the same commit on every node")


def deepspeed_command(args: argparse.Namespace, pretrain_args: list[str]) -> list[str]:
    command = ["deepspeed", "--hostfile", args.hostfile]
    if args.launcher == "openmpi":
        command += ["--launcher", "openmpi", "--force_multi"]
        launcher_args = [args.launcher_args] if args.launcher_args else []
        if args.no_ssh:  # every rank here: more ranks than cores is fine, and MPI talks over loopback
            command += ["--no_ssh_check"]
            launcher_args = ["--oversubscribe --mca btl_tcp_if_include lo", *launcher_args]
            if os.geteuid() == 0:
                launcher_args.insert(0, "--allow-run-as-root")
        if launcher_args:
            command += ["--launcher_args", " ".join(launcher_args)]
    else:
        if args.no_ssh:
            command += ["--no_ssh", "--node_rank", "0"]
        else:
            command += ["--no_ssh_check"]  # check_hosts has done it, through --ssh-config too
        if args.launcher_args:
            command += ["--launcher_args", args.launcher_args]
    if master_addr(args):
        command += ["--master_addr", master_addr(args)]
    if args.master_port:
        command += ["--master_port", str(args.master_port)]
    return command + [str(PRETRAIN), *pretrain_args]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hostfile", default="hostfiles/localhost", help="DeepSpeed hostfile: 'HOST slots=N' lines")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")
    parser.add_argument("--launcher", choices=("pdsh", "openmpi"), default="pdsh",
                        help="pdsh (DeepSpeed's default, over ssh) or openmpi (mpirun; ranks found through mpi4py)")
    parser.add_argument("--no-ssh", action="store_true",
                        help="one machine without an ssh server: everything runs here, over loopback")
    parser.add_argument("--master-addr", help="address of the first node (default: DeepSpeed's choice)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: DeepSpeed's 29500)")
    parser.add_argument("--launcher-args", default="", help="extra arguments for pdsh or mpirun, one string")
    parser.add_argument("--ssh-config", type=Path, metavar="FILE",
                        help="ssh client config for reaching the nodes (ssh -F; given to pdsh's ssh too)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="also put this in .deepspeed_env (repeatable)")
    parser.add_argument("--throughput-from", type=Path, metavar="RUN_DIR",
                        help="take the measured tokens/s for the ETA from this run (default: the run's --run-dir)")
    parser.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="-- then the flags of amos_ds/pretrain.py")


def run_launch(args: argparse.Namespace) -> int:
    pretrain_args = args.pretrain_args[1:] if args.pretrain_args[:1] == ["--"] else args.pretrain_args
    hosts = parse_hostfile(args.hostfile)
    config = load_train_config(build_parser().parse_args(pretrain_args))
    plan = make_plan(args.hostfile, hosts, config, args.throughput_from)
    env = launch_env(args)
    command = deepspeed_command(args, pretrain_args)
    env_file = Path(config.run_dir).resolve() / ".deepspeed_env"
    print(format_plan(plan))
    print(f"env          {env_file}: {' '.join(f'{k}={shlex.quote(v)}' for k, v in sorted(env.items()))}")
    print(f"command      {shlex.join(command)}", flush=True)
    if args.dry_run:
        return 0
    if uses_ssh(args, hosts):
        check_hosts(hosts, args)
    env_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(env_file, "".join(f"{key}={value}\n" for key, value in sorted(env.items())))
    process_env = {**os.environ, **env, "DS_ENV_FILE": str(env_file)}
    if uses_ssh(args, hosts) and args.ssh_config:
        process_env["PDSH_SSH_ARGS_APPEND"] = (f"{process_env.get('PDSH_SSH_ARGS_APPEND', '')} "
                                               f"-F {shlex.quote(str(args.ssh_config.resolve()))}")
    if args.launcher == "openmpi" and os.geteuid() == 0:
        process_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    os.execvpe(command[0], command, process_env)
