"""Pretrain an AMOS text encoder with DeepSpeed, from one CPU process to many 8-GPU nodes.

    python amos_ds/pretrain.py --preset tiny --max-steps 20 --run-dir runs/try          # one process
    deepspeed --num_gpus 2 amos_ds/pretrain.py --run-dir runs/two                        # one machine, two ranks
    deepspeed --hostfile hostfiles/a100 amos_ds/pretrain.py --deepspeed_config ds_configs/base.json \
        --preset base --data data/wiki data/books --run-dir runs/base                   # many nodes
    torchrun --nproc_per_node 8 amos_ds/pretrain.py ...                                  # also works

One optimizer step = `gradient_accumulation_steps` micro-batches through the DeepSpeed engine on every rank, then
one metrics record (metrics.jsonl, TensorBoard, a console line). Checkpoints every --save-every steps, at the end,
and on SIGTERM/SIGUSR1 (then exit 0); `--resume auto` continues from the newest complete one, at any world size.
"""

import hashlib
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch.distributed import distributed_c10d

from amos_ds.data import DataConfig, PackedDataset, ResumableSampler, build_loader, open_corpora
from amos_ds.data.builtin import prepare_builtin_corpus
from amos_ds.data.tokenizer import copy_tokenizer, load_tokenizer
from amos_ds.errors import ConfigError, NonFiniteLoss, exit_code_of
from amos_ds.finetune.probe import frozen_discriminator, load_probe_task, score_discriminator
from amos_ds.model import AMOSModel
from amos_ds.train.checkpoint import (
    CHECKPOINTS,
    RUN_TOKENIZER,
    check_compatible,
    check_free_space,
    check_settings,
    find_resume,
    load_checkpoint,
    prepare_universal,
    restore_rng,
    run_settings,
    save_checkpoint,
    seed_rng,
    tag_for,
)
from amos_ds.train.ds_config import (
    derive_ds_config,
    gradient_accumulation,
    load_ds_config,
    precision,
    scheduler_total_steps,
    zero_stage,
)
from amos_ds.train.evaluate import evaluate, held_out_split
from amos_ds.train.extension_lock import clear_stale_extension_locks
from amos_ds.train.flops import device_peak_tflops, step_flops
from amos_ds.train.health import collapse_warning
from amos_ds.train.init_from import init_record, load_init, locate_init
from amos_ds.train.metrics import MetricsLog, average_over_ranks, memory_gib
from amos_ds.train.model_inputs import model_inputs
from amos_ds.train.nonfinite import NonFiniteGuard
from amos_ds.train.param_groups import parameter_groups
from amos_ds.train.run_lock import lock_run_dir
from amos_ds.train.signals import StopSignal
from amos_ds.train.summary import write_summary
from amos_ds.train.train_config import TrainConfig, build_parser, load_train_config
from amos_ds.train.version import code_version


def free_port() -> int:
    """A free loopback port, so that single-process runs side by side do not collide on a fixed one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_distributed(collective_timeout_s: float = TrainConfig.collective_timeout_s) -> tuple[int, int]:
    """(rank, world size). Launchers set RANK/WORLD_SIZE; plain `python` gets a one-process group on loopback, and
    mpirun's variables are used directly when MASTER_ADDR is given (DeepSpeed's MPI discovery would take the
    machine's first interface address instead), as are those of an srun task (SLURM_STEP_ID tells it from the
    batch script, which has SLURM_PROCID too; amos_ds/train/slurm.py sets MASTER_ADDR).

    A collective that waits longer than `collective_timeout_s` for a hung or dead rank raises (gloo), or is aborted
    by the NCCL watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), so the rank exits non-zero and the
    launcher stops the job instead of leaving it idle until the scheduler's limit."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
    elif "RANK" not in os.environ and "SLURM_STEP_ID" in os.environ and "MASTER_ADDR" in os.environ:  # srun's task
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ["SLURM_LOCALID"])
    elif "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = timedelta(seconds=collective_timeout_s)
    # DeepSpeed's own groups (ZeRO's data-parallel group among them) come from dist.new_group() without a timeout,
    # which takes torch's module-wide default (30 min for gloo, 10 for NCCL), not the world group's.
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    clear_stale_extension_locks()  # DeepSpeed JIT-builds ops from here on; a killed build's lock would hang it
    deepspeed.init_distributed(timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def open_data(config: TrainConfig) -> PackedDataset:
    """The --data corpora, or the built-in corpus (prepared once per cache, under a lock shared by the ranks)."""
    specs = config.data or [prepare_builtin_corpus(os.path.expanduser(config.builtin_cache), config.builtin_vocab_size)]
    return open_corpora(specs, config.seq_len, config.seed)


def gumbel_seed(run_seed: int, step: int, micro_step: int, rank: int) -> int:
    """A distinct 63-bit key for the Gumbel noise of every (run, optimizer step, micro-step, data-parallel rank)."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{micro_step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def should_compile(choice: str, device_type: str, stage: int) -> bool:
    """TrainConfig.compile: "auto" compiles on CUDA below ZeRO-3 (whose parameter hooks run around every module)."""
    return choice == "on" or (choice == "auto" and device_type == "cuda" and stage < 3)


def train(config: TrainConfig) -> int:
    """The whole run, holding the run directory's lock (amos_ds/train/run_lock.py) from start to end."""
    with StopSignal() as stop:  # before the start-up, which a scheduler's signal may interrupt
        rank, world_size = setup_distributed(config.collective_timeout_s)
        lock = lock_run_dir(Path(config.run_dir), rank)
        try:
            return train_locked(config, rank, world_size, stop)
        finally:
            if lock:
                lock.release()


def train_locked(config: TrainConfig, rank: int, world_size: int, stop: StopSignal) -> int:
    run_dir = Path(config.run_dir)
    ds_path = config.deepspeed_config_path()
    ds_file = load_ds_config(ds_path)
    max_steps = config.max_steps or scheduler_total_steps(ds_file)
    if not max_steps:
        raise ConfigError(f"--max-steps: not given, and {ds_path} has no scheduler total_num_steps to default to")
    grad_accum = gradient_accumulation(ds_file, world_size, ds_path)  # fails before any data or model work
    micro_batch, global_batch = ds_file["train_micro_batch_size_per_gpu"], ds_file["train_batch_size"]

    # Data and model; the vocabulary size comes from the data's tokenizer.
    dataset = open_data(config)
    training, held_out = held_out_split(dataset, config.eval_data, config.eval_batches, global_batch, config.seed)
    probe_task = load_probe_task(config.probe_task, load_tokenizer(dataset.tokenizer_dir), config.seq_len,
                                 config.probe_train_examples) if config.probe_task and held_out else None
    init = locate_init(config.init_from, dataset.tokenizer_hash, config.model, config.seq_len) \
        if config.init_from else None
    model_config = init.config if init else config.model_config(dataset.vocab_size)

    # Where to continue from. Another world size or ZeRO stage goes through a universal checkpoint. Checked before
    # anything is written, so that a bad --resume leaves the disk as it was.
    resume = find_resume(run_dir, config.resume)
    check_free_space(run_dir, resume)
    changes = {}
    if resume:
        check_compatible(resume, dataset.tokenizer_hash, model_config.to_dict())
        changes = check_settings(resume, run_settings(config.to_dict(), ds_file), config.allow_config_change)
        if resume.step > max_steps:
            raise ConfigError(f"--max-steps {max_steps}: {resume.path} is already at step {resume.step}; give a "
                              "larger --max-steps to train further")
        if resume.step == max_steps:
            if rank == 0:
                print(f"nothing to do: {resume.path} is at step {max_steps} = --max-steps; give a larger "
                      "--max-steps to train further", flush=True)
            return 0
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(dataset.tokenizer_dir, run_dir / RUN_TOKENIZER)
    universal = resume is not None and resume.needs_universal(world_size, zero_stage(ds_file))
    if universal:
        prepare_universal(resume)
    ds_config = derive_ds_config(ds_file, ds_path, world_size=world_size, max_steps=max_steps, fp32=config.fp32,
                                 run_dir=run_dir, load_universal=universal)

    seed_rng(config.seed)  # the same initial weights on every rank
    model = AMOSModel(model_config)
    if init and not resume:
        load_init(init, model)
        if rank == 0:
            print(f"starting from {init.path}: {init_record(init)['loaded']}", flush=True)
    compiled = should_compile(config.compile, get_accelerator().device_name(), zero_stage(ds_file))
    if compiled:
        model.compile_layers()
    weight_decay = ds_file.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, weight_decay),
                                           config=ds_config)
    seed_rng(config.seed + rank)  # dropout differs between ranks
    sampler = ResumableSampler(len(training), micro_batch, rank, world_size, config.seed)
    client_state = load_checkpoint(engine, resume, universal) if resume else None
    if client_state:
        sampler.load_state_dict(client_state["sampler"])
    data_config = DataConfig(seq_len=config.seq_len, mask_prob=config.mask_prob, mask_split=config.mask_split,
                             seed=config.seed, num_workers=config.num_workers,
                             pin_memory=engine.device.type == "cuda")
    batches = iter(build_loader(training, sampler, data_config))
    if client_state:  # after iter(): starting a DataLoader iterator draws from torch's RNG
        restore_rng(client_state, config.seed, engine.global_steps)
        if rank == 0:
            print(f"resumed from {resume.path} at step {engine.global_steps}"
                  f"{' (universal checkpoint)' if universal else ''}", flush=True)

    info = {"world_size": world_size, "zero_stage": zero_stage(ds_file), "precision": precision(ds_config),
            "tokenizer_hash": dataset.tokenizer_hash, "code_version": code_version(),
            "model": model_config.to_dict(), "train": config.to_dict(), "deepspeed": ds_config,
            "init_from": init_record(init) if init else None,
            "config_changes": (resume.meta.get("config_changes", []) if resume else []) +
            ([{"step": resume.step, "changed": changes}] if changes else [])}
    flops_per_step = step_flops(model_config, config.seq_len, config.mask_prob, global_batch)
    peak_tflops = device_peak_tflops(engine.device, precision(ds_config))
    nonfinite = NonFiniteGuard(engine, ds_config, ds_path, config.max_nonfinite_steps)
    log = MetricsLog(run_dir, engine.monitor, engine.global_steps, enabled=rank == 0)
    if changes:
        log.note_config_change(changes)
    if rank == 0:
        print(f"training {config.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
              f"to step {max_steps} on {world_size} rank(s): batch {global_batch} = micro-batch {micro_batch} x "
              f"accumulation {grad_accum} x {world_size}, seq_len {config.seq_len}, {precision(ds_config)}, "
              f"ZeRO-{zero_stage(ds_file)}, {len(training)} training samples, "
              f"{len(held_out) if held_out else 'no'} held-out samples, "
              f"{'compiled' if compiled else 'eager'} layers", flush=True)

    def save(at_step: int) -> Path:
        return save_checkpoint(engine, run_dir, at_step, info, sampler.state_dict(), config.keep_last)

    step = saved = first_step = engine.global_steps
    compile_reported = False
    while step < max_steps and not stop.should_stop(engine.device):
        started, data_wait, sums, samples = time.perf_counter(), 0.0, {}, []
        lr = engine.get_lr()[0]
        for micro_step in range(grad_accum):
            waited = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited
            out = engine(**model_inputs(batch, engine.device),
                         seed=gumbel_seed(config.seed, step, micro_step, rank), progress=step / max_steps)
            engine.backward(nonfinite.guard(out.loss, last_micro_batch=micro_step == grad_accum - 1))
            engine.step()
            if compiled and rank == 0 and not compile_reported:
                compile_reported = True
                print(f"torch.compile: the first micro-batch, which builds the compiled layers, took "
                      f"{time.perf_counter() - waited:.1f} s", flush=True)
            for name, value in out.metrics.items():  # device tensors, read once per optimizer step
                sums[name] = sums.get(name, 0.0) + value
            if config.log_samples:
                samples += batch["sample_index"].tolist()
        sampler.advance(global_batch)
        step += 1

        record = {"step": step, **average_over_ranks(sums, grad_accum)}
        seconds = time.perf_counter() - started
        grad_norm = engine.get_global_grad_norm()
        tflops = flops_per_step / seconds / world_size / 1e12
        record.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else None,
                      tokens_per_s=global_batch * config.seq_len / seconds, tflops=tflops,
                      mfu=tflops / peak_tflops if peak_tflops else None, data_wait_s=data_wait, step_time_s=seconds,
                      mem_gib=memory_gib(engine.device), world_size=world_size, skipped_steps=engine.skipped_steps)
        if config.log_samples:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, samples)
            record["samples"] = [training.dataset_index(i) for rank_samples in gathered for i in rank_samples]
        evaluating = held_out is not None and (step % config.eval_every == 0 or step == max_steps)
        if evaluating:
            record.update(evaluate(engine, engine.device, held_out, micro_batch, data_config, model_config.head_layers,
                                   progress=step / max_steps))
            if probe_task:
                probe_started = time.perf_counter()
                encoder = frozen_discriminator(engine.module, model_config, zero_stage(ds_file) == 3)
                if rank == 0:
                    record.update(score_discriminator(encoder, probe_task),
                                  probe_time_s=time.perf_counter() - probe_started)
            warning = collapse_warning(record) if rank == 0 else None
            if warning:
                print(warning, flush=True)
            if config.log_samples:
                record["eval_samples"] = held_out.held_out.tolist()
        if step % config.log_every == 0 or step == max_steps or evaluating:
            log.log(record, max_steps)
        if step % config.save_every == 0 or step == max_steps:
            save(step)
            saved = step
        if nonfinite.after_step():  # save the state (its weights are the last applied step's) and stop
            path = run_dir / CHECKPOINTS / tag_for(step) if saved == step else save(step)
            in_a_row = config.max_nonfinite_steps
            raise NonFiniteLoss(f"steps {step - in_a_row + 1}-{step}: {in_a_row} non-finite losses in a row "
                                f"(TrainConfig.max_nonfinite_steps), all skipped; saved the last good weights in "
                                f"{path}; lower the learning rate or check the data, then --resume auto")
    if step == first_step and step < max_steps:  # stopped by SIGTERM/SIGUSR1 during the start-up: no step to save
        log.close()
        if rank == 0:
            print(f"stop signal received before step {step + 1}: nothing new to save, exiting", flush=True)
        return 0
    if saved != step:  # stopped by SIGTERM/SIGUSR1
        path = save(step)
        if rank == 0:
            print(f"stop signal received: saved {path}, exiting", flush=True)
    log.close()
    if rank == 0:
        write_summary(run_dir, training)
    if rank == 0 and config.plot:
        from amos_ds.train.plot import plot_run

        plot_run(run_dir)
    return 0


def shared_memory_buffer(uid: object, master_addr: object, master_port: object, local_rank: object) -> Path:
    """The /dev/shm buffer (66 MB) of one rank's DeepSpeed CPU all-reduce, named as DeepSpeed's shm.cpp names it;
    "*" for a field gives a glob pattern."""
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{uid}_{master_addr}_{master_port}_{local_rank}")


def release_shared_memory() -> None:
    """DeepSpeed leaves this rank's all-reduce buffer behind at exit: remove it."""
    env = os.environ
    shared_memory_buffer(os.getuid(), env["MASTER_ADDR"], env["MASTER_PORT"], env["LOCAL_RANK"]).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: train(load_train_config(args)), prefix="")


if __name__ == "__main__":
    try:
        exit_code = main()
    except Exception:
        traceback.print_exc()
        exit_code = 1
    # Leave without running interpreter teardown: gloo can abort there after all the work is done.
    if dist.is_initialized():
        dist.destroy_process_group()
        release_shared_memory()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
