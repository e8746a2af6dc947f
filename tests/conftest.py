"""Test-wide settings: Triton kernels run in the interpreter where there is no GPU; the shared data folder; a
one-rank process group for the parts of the trainer that talk to their peers."""

import atexit
import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def one_process_group(tmp_path_factory):
    """A one-rank gloo group, torch.distributed's and DeepSpeed's comm over it, as a one-process run has. Made once
    per process and kept to its exit: DeepSpeed caches its groups, so a second pytest session in the same process
    (as mutation testing runs) must find the first one's group alive."""
    import deepspeed.comm

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("process_group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        atexit.register(dist.destroy_process_group)
