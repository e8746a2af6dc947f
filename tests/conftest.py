"""Test-wide settings: Triton kernels run in the interpreter where there is no GPU; the shared data folder."""

import glob
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(os.environ.get("AMOS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $AMOS_SHARED_DATA); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set AMOS_SHARED_DATA)")
    return SHARED_DATA


# What one_rank_process_group puts in os.environ for the session (deepspeed.initialize reads it); a training run
# started as a subprocess gets an environment without them, so that it picks its own port.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in DIST_ENV}


@pytest.fixture(scope="session")
def one_rank_process_group():
    """A one-rank gloo group in the test process, as `python amos_ds/pretrain.py` makes it; made once per session,
    because DeepSpeed keeps its process groups for the life of the process."""
    import deepspeed
    import torch.distributed as dist

    from amos_ds.pretrain import free_port

    port = str(free_port())
    saved = {key: os.environ.get(key) for key in DIST_ENV}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    deepspeed.init_distributed()
    yield
    dist.destroy_process_group()
    for buffer in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.remove(buffer)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
