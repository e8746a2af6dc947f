"""Checkpoints for week-long runs: complete or absent, pruned to the last K, resumable at any world size.

Layout of RUN_DIR/checkpoints/:
    step_00001000/      DeepSpeed's files (engine.save_checkpoint), then amos_meta.json, written last
    step_00001000/universal/   made on demand when a resume has another world size or ZeRO stage
    latest              the newest complete tag, for DeepSpeed's own tools (zero_to_fp32 and the like)

A checkpoint counts only once complete: every rank writes and fsyncs its own files and hashes them (SHA-256), the
ranks exchange the hashes (or the error that stopped a write), then rank 0 writes amos_meta.json, which records
every file's size and hash, and `latest` atomically (temporary file, fsync, rename). `--resume auto` takes the
newest step whose amos_meta.json is there and whose files still match it, so a run killed in the middle of a save
resumes from the one before, and a file truncated or corrupted afterwards costs one checkpoint interval and a
warning that names it. A save that fails (disk full, I/O error) leaves the checkpoints before it untouched and ends
the run with one CheckpointError line.

DeepSpeed saves the model, optimizer, scheduler and step counters; the client state adds what it lacks: the data
sampler's position, every rank's RNG states (Python, NumPy, torch CPU and CUDA), the configs, the tokenizer hash
and the code version. Nothing in them needs pickle's code execution: the engine loads them with
`torch.load(weights_only=True)` (WeightsOnlyCheckpointEngine), allowing only DeepSpeed's three plain record types.
Resuming at another world size (or ZeRO stage) converts the checkpoint once with DeepSpeed's `ds_to_universal` and
loads it with `load_universal`; the sampler then re-splits the remaining samples. (The converter and the universal
optimizer fragments use DeepSpeed's own torch.load(weights_only=False); the files they start from are hashed.)
"""

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from amos_ds.atomic import fsync, publish, write_atomically
from amos_ds.errors import CheckpointError, ConfigError

CHECKPOINTS = "checkpoints"
META = "amos_meta.json"
FILES = "files"  # amos_meta.json's {file name: {"bytes": size, "sha256": hex digest}} of the files the save wrote
LATEST = "latest"
UNIVERSAL = "universal"
RUN_TOKENIZER = "tokenizer"  # RUN_DIR/tokenizer: a copy of the data's tokenizer, so a run directory stands alone
_TAG = re.compile(r"step_(\d+)")
# ModelConfig fields that choose how, not what, the model computes: free to change on resume (e.g. CPU -> GPU).
IMPLEMENTATION_FIELDS = {"vocab_impl", "attention_impl"}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int:
    return int(_TAG.fullmatch(path.name).group(1))


@dataclass(frozen=True)
class ResumePoint:
    path: Path  # the tag folder, e.g. RUN_DIR/checkpoints/step_00001000
    meta: dict[str, Any]  # its amos_meta.json

    @property
    def step(self) -> int:
        return self.meta["step"]

    def needs_universal(self, world_size: int, zero_stage: int) -> bool:
        """DeepSpeed loads its ZeRO files only at the world size and stage that wrote them."""
        return (self.meta["world_size"], self.meta["zero_stage"]) != (world_size, zero_stage)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Tag folders with amos_meta.json, oldest first."""
    tags = [p for p in checkpoints.glob("step_*") if _TAG.fullmatch(p.name) and (p / META).is_file()]
    return sorted(tags, key=_step_of)


def find_resume(run_dir: Path, resume: str) -> ResumePoint | None:
    """Where `--resume` (auto, none, or a path to a tag folder or a run directory) says to continue from.

    `auto` skips, with a warning naming the file, complete checkpoints whose files no longer match their recorded
    hashes. A run never overwrites its own newer checkpoints: starting RUN_DIR afresh, or from an older checkpoint,
    while RUN_DIR holds later ones is an error (use another --run-dir to branch). Call it on every rank: the hashes
    are checked by the ranks together."""
    ours = complete_checkpoints(run_dir / CHECKPOINTS)
    if resume == "auto":
        for path in reversed(ours):
            problem = verify_checkpoint(path)
            if problem is None:
                return _resume_point(path)
            _warn(f"warning: --resume auto: {problem}; falling back to the previous complete checkpoint")
        if ours:
            raise ConfigError(f"--resume auto: none of the {len(ours)} complete checkpoints in {run_dir / CHECKPOINTS}"
                              " matches its recorded hashes (see the warnings above); restore one, or start another"
                              " --run-dir with --resume none")
        return None
    point = None if resume == "none" else _explicit_resume_point(resume)
    if ours and (point is None or _step_of(ours[-1]) > point.step):
        raise ConfigError(f"--resume {resume}: --run-dir {run_dir} already holds checkpoints up to step "
                          f"{_step_of(ours[-1])}, which this run would overwrite; use --resume auto to continue it, "
                          "or another --run-dir")
    if point is not None:
        problem = verify_checkpoint(point.path)
        if problem is not None:
            raise ConfigError(f"--resume {resume}: {problem}; give another checkpoint, or --resume auto")
    return point


def verify_checkpoint(path: Path) -> str | None:
    """None when every file amos_meta.json lists has its recorded size and SHA-256, else what is wrong (naming the
    file). With a process group, rank r hashes every world_size-th file and all ranks get the same answer.
    Checkpoints written before hashes were recorded have nothing to check."""
    try:
        recorded = json.loads((path / META).read_text()).get(FILES, {})
    except (OSError, ValueError) as err:
        return f"{path / META} is not readable JSON ({err})"
    names = sorted(recorded)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = [_file_problem(path / name, recorded[name], hash_it=index % world_size == rank)
                for index, name in enumerate(names)]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, problems)
        problems = [next((p[i] for p in everyone if p[i]), None) for i in range(len(names))]
    return next((problem for problem in problems if problem), None)


def _file_problem(file: Path, recorded: dict[str, Any], hash_it: bool) -> str | None:
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size != recorded["bytes"]:
        return f"{file} has {size} bytes, {recorded['bytes']} were saved (truncated or overwritten)"
    if hash_it and _sha256(file) != recorded["sha256"]:
        return f"{file} does not match the SHA-256 recorded when it was saved (corrupted)"
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _warn(message: str) -> None:
    """One line on stderr, from one rank (every rank reaches the same verdict)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def newest_checkpoint(path: Path) -> Path | None:
    """The complete tag folder that `path` names: itself, or the newest in a checkpoints folder or a run directory."""
    if (path / META).is_file():
        return path
    for folder in (path / CHECKPOINTS, path):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    return None


def _explicit_resume_point(resume: str) -> ResumePoint:
    found = newest_checkpoint(Path(resume))
    if found is None:
        raise ConfigError(f"--resume {resume}: no complete checkpoint there (give a checkpoints/step_* folder with "
                          f"{META}, a run directory, 'auto' or 'none')")
    return _resume_point(found)


def _resume_point(path: Path) -> ResumePoint:
    return ResumePoint(path=path, meta=json.loads((path / META).read_text()))


def check_compatible(point: ResumePoint, tokenizer_hash: str, model_config: dict[str, Any]) -> None:
    """A checkpoint continues only on the same tokenizer and model shape; say which differs and what to do."""
    if point.meta["tokenizer_hash"] != tokenizer_hash:
        raise ConfigError(f"--resume {point.path}: trained on tokenizer {point.meta['tokenizer_hash']}, --data has "
                          f"{tokenizer_hash}; use the same corpora, or --resume none / another --run-dir")
    saved = point.meta["model"]
    now = json.loads(json.dumps(model_config))
    changed = sorted(name for name in saved.keys() | now.keys()
                     if saved.get(name) != now.get(name) and name not in IMPLEMENTATION_FIELDS)
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)} -> {now.get(name)}" for name in changed)
        raise ConfigError(f"--resume {point.path}: model differs from the checkpoint's ({details}); use the same "
                          "--preset and config, or --resume none / another --run-dir")


def prepare_universal(point: ResumePoint) -> None:
    """Rank 0 converts the checkpoint to DeepSpeed's universal format (once; reused later); all ranks wait."""
    error = None
    if dist.get_rank() == 0 and not (point.path / UNIVERSAL).is_dir():
        partial = point.path / f"{UNIVERSAL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(point.path),
                   "--output_folder", str(partial), "--inject_missing_state"]
        print(f"converting {point.path} for world size {dist.get_world_size()}: {' '.join(command)}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            lines = (result.stderr or result.stdout).strip().splitlines()
            error = f"converting {point.path} to a universal checkpoint failed: {lines[-1] if lines else '?'}"
        else:
            (point.path / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we name the folder
            publish(partial, point.path / UNIVERSAL)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise RuntimeError(box[0])


# The non-tensor types DeepSpeed pickles into its checkpoint files (ZeRO 0-3, fp32 and bf16, checked one by one).
DEEPSPEED_CHECKPOINT_TYPES = [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (same state, same saving) whose load() unpickles with weights_only=True:
    a checkpoint file that asks for any other global fails to load instead of running code."""

    def __init__(self, engine: TorchCheckpointEngine) -> None:
        self.__dict__.update(vars(engine))

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_TYPES):
            return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(engine: Any, point: ResumePoint, universal: bool) -> dict[str, Any]:
    """Load weights, optimizer and schedule into the engine; return the client state.

    DeepSpeed's own torch checkpoint engine loads with weights_only=False; ours replaces it (other engines, e.g.
    Nebula or the decoupled one, are left as configured). The universal path's optimizer fragments are read by
    DeepSpeed's loader directly, with weights_only=False, out of our reach."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    load_dir, tag = (point.path, UNIVERSAL) if universal else (point.path.parent, point.path.name)
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint at {load_dir / tag}")
    return client_state


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types that torch.load(weights_only=True) reads (NumPy's key as a list)."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng(client_state: dict[str, Any], seed: int, step: int) -> None:
    """This rank's saved RNG states; at another world size there is no such thing, so seed from (seed, step, rank)."""
    states = client_state["rng"]
    if len(states) == dist.get_world_size():
        set_rng_state(states[dist.get_rank()])
    else:
        seed_rng(hash((seed, step, dist.get_rank())) & 0x7FFFFFFF)


def save_checkpoint(engine: Any, run_dir: Path, step: int, info: dict[str, Any], sampler_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Save on every rank, fsync and hash, then mark complete (amos_meta.json, `latest`) and prune to the last K.

    A write that fails on any rank (disk full, I/O error) raises CheckpointError on every rank, before anything is
    marked complete or pruned. (A rank that fails inside DeepSpeed's own barriers leaves the others waiting there:
    the collective timeout, TrainConfig.collective_timeout_s, ends them.)"""
    rank = dist.get_rank()
    checkpoints = run_dir / CHECKPOINTS
    path = checkpoints / tag_for(step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # the leftover of a run that crashed while saving this step
    dist.barrier()
    rng_states = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(rng_state(), rng_states, dst=0)
    client_state = {"info": info, "sampler": sampler_state, "rng": rng_states}
    written, error = {}, None
    try:
        engine.save_checkpoint(str(checkpoints), tag=path.name, client_state=client_state, save_latest=False)
        for file in _files_written_by(path, rank):
            fsync(file)
            written[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    except OSError as err:
        error = f"{err.filename or path}: {err.strerror or err}"
    except RuntimeError as err:  # torch.save reports a failed write from its C++ zip writer this way
        error = f"{path}: a write failed ({str(err).splitlines()[0]})"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (written, error))
    failed = next((e for _, e in everyone if e), None)
    if failed:
        previous = complete_checkpoints(checkpoints)
        raise CheckpointError(f"saving checkpoint {path} failed: {failed}; the previous complete checkpoint "
                              f"({previous[-1] if previous else 'none'}) is intact: free space or fix the disk, "
                              "then resume with --resume auto")
    if rank == 0:
        files = {name: entry for rank_files, _ in everyone for name, entry in rank_files.items()}
        write_atomically(path / META, json.dumps({"step": step, **info, FILES: files}, indent=2))
        write_atomically(checkpoints / LATEST, path.name)
        _prune(checkpoints, keep_last)
    dist.barrier()
    return path


def _files_written_by(path: Path, rank: int) -> list[Path]:
    """DeepSpeed names each rank's ZeRO files `..._pp_rank_{rank}_mp_rank_...`; the rest are rank 0's."""
    files = [f for f in path.iterdir() if f.is_file()]
    mine = [f for f in files if f"pp_rank_{rank}_mp_rank" in f.name]
    if rank == 0:
        mine += [f for f in files if "pp_rank_" not in f.name]
    return mine


def _prune(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and leftovers of interrupted saves."""
    kept = set(complete_checkpoints(checkpoints)[-keep_last:])
    for tag in checkpoints.glob("step_*"):
        if _TAG.fullmatch(tag.name) and tag not in kept:
            shutil.rmtree(tag)
