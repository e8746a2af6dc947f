"""Test-wide settings: Triton kernels run in the interpreter where there is no GPU; the shared data folder; a
one-rank process group for the parts of the trainer that talk to their peers; a short real pretraining run."""

import atexit
import contextlib
import datetime
import glob
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

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
    for buffer in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
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
