"""Test-wide settings and the helpers test modules share (no test module imports another): Triton kernels run in
the interpreter where there is no GPU; the shared data folder; a one-rank process group for the parts of the
trainer that talk to their peers; two-rank functions; the built-in corpus; pretraining runs in subprocesses.

Tests that start more than one process (two ranks, a launcher, subprocess training runs, daemons) or train for
hundreds of steps are marked `slow`; `pytest -m "not slow"` is the fast subset (README, TESTING.md)."""

import atexit
import contextlib
import datetime
import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from amos_ds.data.builtin import prepare_builtin_corpus

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(os.environ.get("AMOS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $AMOS_SHARED_DATA); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set AMOS_SHARED_DATA)")
    return SHARED_DATA


# What one_process_group puts in os.environ for the session (deepspeed.initialize reads it); a training run
# started as a subprocess gets an environment without them, so that it picks its own port.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in DIST_ENV}


def _remove_shared_memory_buffers(port: str) -> None:
    """DeepSpeed's CPU all-reduce buffers of the group on `port` (66 MB each in /dev/shm)."""
    from amos_ds.pretrain import shared_memory_buffer

    for buffer in glob.glob(str(shared_memory_buffer("*", "*", port, "*"))):
        os.remove(buffer)


@pytest.fixture(scope="session")
def one_process_group(tmp_path_factory):
    """A one-rank gloo group, torch.distributed's and DeepSpeed's comm over it, as a one-process run has, with the
    launcher's variables in os.environ for the session. The group is made once per process and kept to its exit:
    DeepSpeed caches its groups, so a second pytest session in the same process (as mutation testing runs) must
    find the first one's group alive."""
    import deepspeed.comm

    from amos_ds.pretrain import free_port

    saved = {key: os.environ.get(key) for key in DIST_ENV}
    if not dist.is_initialized():
        port = str(free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        store = tmp_path_factory.mktemp("process_group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        atexit.register(dist.destroy_process_group)
        atexit.register(_remove_shared_memory_buffers, port)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_on_two_ranks(function: Callable[..., Any], args_per_rank: list[tuple], folder: Path) -> list[tuple[Any, str]]:
    """function(*args_per_rank[rank]) in two spawned processes joined in a two-rank gloo group (a file store in
    `folder`, no port): what each rank returned and what it wrote on sys.stderr, rank 0 first. `function` and the
    arguments must be picklable (a module-level function)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(_run_as_rank, args=(function, args_per_rank, folder), nprocs=2)
    return [(pickle.loads((folder / f"rank_{rank}.pkl").read_bytes()), (folder / f"rank_{rank}.err").read_text())
            for rank in (0, 1)]


def _run_as_rank(rank: int, function: Callable[..., Any], args_per_rank: list[tuple], folder: Path) -> None:
    # A collective that one rank skips fails after a minute instead of hanging the test.
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    with open(folder / f"rank_{rank}.err", "w") as err, contextlib.redirect_stderr(err):
        result = function(*args_per_rank[rank])
    dist.destroy_process_group()
    (folder / f"rank_{rank}.pkl").write_bytes(pickle.dumps(result))
    os._exit(0)  # gloo sometimes aborts at interpreter exit after all work is done (ENVIRONMENT.md)


@pytest.fixture
def pretrain_tiny(tmp_path) -> Callable[..., Path]:
    """Run amos_ds/pretrain.py (one process, `tiny`, fp32, the built-in corpus) and return its run directory."""
    from amos_ds.pretrain import free_port

    def run(steps: int, zero_stage: int, vocab_size: int, batch: int = 8) -> Path:
        ds_config = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch,
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                               "torch_adam": True}},
                     "zero_optimization": {"stage": zero_stage}}
        train_config = {"builtin_cache": str(tmp_path / "cache"), "builtin_vocab_size": vocab_size, "seq_len": 32,
                        "num_workers": 0, "plot": False}
        (tmp_path / "ds.json").write_text(json.dumps(ds_config))
        (tmp_path / "train.json").write_text(json.dumps(train_config))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0",
               "WORLD_SIZE": "1", "MASTER_PORT": str(free_port())}
        run_dir = tmp_path / "run"
        repo = Path(__file__).resolve().parents[1]
        result = subprocess.run([sys.executable, str(repo / "amos_ds" / "pretrain.py"), "--deepspeed_config",
                                 str(tmp_path / "ds.json"), "--config", str(tmp_path / "train.json"), "--preset",
                                 "tiny", "--max-steps", str(steps), "--fp32", "--run-dir", str(run_dir)], cwd=repo,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return run_dir

    return run


# Training runs of amos_ds/pretrain.py in subprocesses, for the end-to-end and fault tests.
REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "amos_ds" / "pretrain.py"
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, VOCAB = 8, 4, 32, 1024
GLOO_EXIT_ABORT = "terminate called without an active exception"


def text_corpus(root: Path, text: str) -> Path:
    """`text` as a shard folder under `root`, with a 400-piece tokenizer trained on it."""
    from amos_ds.data.preprocess import preprocess
    from amos_ds.data.tokenizer import train_tokenizer

    (root / "text.txt").write_text(text)
    train_tokenizer([str(root / "text.txt")], 400, str(root / "tokenizer"))
    preprocess([str(root / "text.txt")], str(root / "tokenizer"), str(root / "data"), workers=1, progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The built-in corpus with a tiny-preset vocabulary, prepared once per session (tests only read it)."""
    cache = tmp_path_factory.mktemp("builtin")
    prepare_builtin_corpus(str(cache), VOCAB)
    return cache


def write_configs(directory: Path, corpus: Path, zero_stage: int, lr: float = 1e-3, bf16: bool = False,
                  vocab_impl: str = "auto") -> list[str]:
    """A DeepSpeed config and a training config for the tiny runs; returns the pretrain flags naming them."""
    ds_config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                          "warmup_num_steps": 2, "warmup_type": "linear",
                                                          "total_num_steps": 100}},
        "gradient_clipping": 2.0, "bf16": {"enabled": bf16}, "zero_optimization": {"stage": zero_stage},
    }
    train_config = {"builtin_cache": str(corpus), "builtin_vocab_size": VOCAB, "seq_len": SEQ_LEN,
                    "num_workers": 0, "plot": False, "log_samples": True, "model": {"vocab_impl": vocab_impl}}
    (directory / "ds.json").write_text(json.dumps(ds_config))
    (directory / "train.json").write_text(json.dumps(train_config))
    return ["--deepspeed_config", str(directory / "ds.json"), "--config", str(directory / "train.json"),
            "--preset", "tiny"]


def command(ranks: int, port: int, flags: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(PRETRAIN), *flags]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(PRETRAIN), *flags]


def start(ranks: int, flags: list[str]) -> tuple[subprocess.Popen, int]:
    from amos_ds.pretrain import free_port

    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    process = subprocess.Popen(command(ranks, port, flags), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return process, port


def finish(process: subprocess.Popen, port: int, timeout: float = 240) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        cleanup(process, port)
    return output


def cleanup(process: subprocess.Popen, port: int) -> None:
    """Kill what is left of the run's process group and remove DeepSpeed's shared-memory buffers for its port."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    _remove_shared_memory_buffers(str(port))


def run(ranks: int, flags: list[str]) -> str:
    """Run to completion; fail with the output unless it exited 0 (or hit the known gloo abort at exit)."""
    process, port = start(ranks, flags)
    output = finish(process, port)
    assert process.returncode == 0 or GLOO_EXIT_ABORT in output, output[-4000:]
    return output


def run_pretrain(argv: list[str]) -> int:
    """amos_ds/pretrain.py's main() in this process (one rank), with os.environ as it was before."""
    from amos_ds import pretrain

    environment = dict(os.environ)
    try:
        return pretrain.main(argv)
    finally:  # pretrain.main sets RANK, MASTER_PORT and the like for its one-process group
        os.environ.clear()
        os.environ.update(environment)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_steps(run_dir: Path) -> int:
    """How many step records a run has written to metrics.jsonl so far."""
    log = run_dir / "metrics.jsonl"
    return log.read_text().count("\n") if log.is_file() else 0


def wait_until(done: Callable[[], bool], process: subprocess.Popen, timeout: float = 240, poll: float = 0.05) -> None:
    """Poll `done()` while `process` runs; fail with its last output if it exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is None and time.monotonic() < deadline:
            time.sleep(poll)
            continue
        ended = process.poll() is not None
        process.kill()
        pytest.fail(f"{'the run ended' if ended else f'{timeout} s passed'} before the awaited state; its output:\n"
                    f"{''.join(part or '' for part in process.communicate())[-4000:]}")


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step_")) for p in run_dir.glob("checkpoints/step_*/amos_meta.json"))


def unread(read_end: int) -> str:
    """What has reached a non-blocking pipe so far."""
    try:
        return os.read(read_end, 4096).decode()
    except BlockingIOError:
        return ""
