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
from amos_ds.train.ds_config import precision

CHECKPOINTS = "checkpoints"
META = "amos_meta.json"
FILES = "files"  # amos_meta.json's {file name: {"bytes": size, "sha256": hex digest}} of the files the save wrote
LATEST = "latest"
UNIVERSAL = "universal"
MIN_FREE_BYTES = 64 * 2**20  # a start needs room for the tokenizer copy, logs and a small checkpoint at least
RUN_TOKENIZER = "tokenizer"  # RUN_DIR/tokenizer: a copy of the data's tokenizer, so a run directory stands alone
_TAG = re.compile(r"step_(\d+)")
# ModelConfig fields that choose how, not what, the model computes: free to change on resume (e.g. CPU -> GPU).
IMPLEMENTATION_FIELDS = {"vocab_impl", "attention_impl"}


# How torch.save's C++ zip writer reports a write the disk refused (it raises RuntimeError, not OSError).
TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


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
        return _resume_point(_newest_intact(ours, "--resume auto", run_dir / CHECKPOINTS)) if ours else None
    point = None if resume == "none" else _resume_point(verified_checkpoint(resume, "--resume"))
    if ours and (point is None or _step_of(ours[-1]) > point.step):
        raise ConfigError(f"--resume {resume}: --run-dir {run_dir} already holds checkpoints up to step "
                          f"{_step_of(ours[-1])}, which this run would overwrite; use --resume auto to continue it, "
                          "or another --run-dir")
    return point


def verified_checkpoint(source: Path | str, flag: str) -> Path:
    """The checkpoint `source` names, with its files checked against the hashes recorded when it was saved: what
    every reader of checkpoints (resume, export, finetune, initialising from one) calls first.

    A tag folder (RUN_DIR/checkpoints/step_*) must be intact, else a ConfigError names the damaged file; a run
    directory or checkpoints folder gives its newest intact checkpoint, skipping damaged ones with a warning each,
    as `--resume auto` does. `flag` names the option in the messages. In a process group, call it on every rank:
    the ranks share the hashing."""
    source = Path(source)
    if (source / META).is_file():
        problem = verify_checkpoint(source)
        if problem is not None:
            raise ConfigError(f"{flag} {source}: {problem}; give another checkpoint, or its run directory (which "
                              "falls back to the newest intact one)")
        return source
    for folder in (source / CHECKPOINTS, source):
        found = complete_checkpoints(folder)
        if found:
            return _newest_intact(found, f"{flag} {source}", folder)
    raise ConfigError(f"{flag} {source}: no complete checkpoint there (give a checkpoints/step_* folder with {META} "
                      "or a run directory)")


def _newest_intact(tags: list[Path], what: str, folder: Path) -> Path:
    for path in reversed(tags):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        _warn(f"warning: {what}: {problem}; falling back to the previous complete checkpoint")
    raise ConfigError(f"{what}: none of the {len(tags)} complete checkpoints in {folder} matches its recorded "
                      "hashes (see the warnings above); restore one, or start another --run-dir with --resume none")


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


# TrainConfig fields that change what is trained (the model is checked by check_compatible); the others (paths,
# logging, checkpointing, workers, timeouts, --max-steps) may change on resume.
# eval_data and eval_batches choose the held-out slice, which training then never reads.
RUN_TRAIN_FIELDS = ("preset", "ablation", "data", "builtin_vocab_size", "seq_len", "mask_prob", "mask_split", "seed",
                    "eval_data", "eval_batches")
# DeepSpeed config sections that do; batch splits and ZeRO follow the world size, and total_num_steps is --max-steps.
RUN_DEEPSPEED_FIELDS = ("train_batch_size", "optimizer", "scheduler", "gradient_clipping")


def run_settings(train: dict[str, Any], deepspeed: dict[str, Any]) -> dict[str, Any]:
    """The settings a resume must keep, flattened to {"train.seq_len": 128, "deepspeed.optimizer.params.lr": ...}:
    from a TrainConfig.to_dict() and a DeepSpeed config (the file, or the derived one a checkpoint records)."""
    kept = {"train": {name: train[name] for name in RUN_TRAIN_FIELDS if name in train},
            "deepspeed": {name: deepspeed.get(name) for name in RUN_DEEPSPEED_FIELDS}}
    kept = json.loads(json.dumps(kept))  # tuples as lists, as the checkpoint's JSON has them
    if isinstance(kept["deepspeed"]["scheduler"], dict):
        kept["deepspeed"]["scheduler"].get("params", {}).pop("total_num_steps", None)
    kept["deepspeed"]["precision"] = "fp32" if train.get("fp32") else precision(deepspeed)
    return _flatten(kept, "")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat = {}
    for name, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{name}" if prefix else name))
    return flat


def check_settings(point: ResumePoint, settings: dict[str, Any], allow_change: bool) -> dict[str, list]:
    """The run settings (run_settings) that differ from the checkpoint's, as {name: [old, new]}: refused in one line
    listing them all, unless `allow_change` (--allow-config-change). Checkpoints that record no settings pass, and
    TrainConfig fields newer than the checkpoint (absent from what it records) are not compared."""
    if "train" not in point.meta or "deepspeed" not in point.meta:
        return {}
    saved = run_settings(point.meta["train"], point.meta["deepspeed"])
    names = saved.keys() | {name for name in settings if name.startswith("deepspeed.")}  # TrainConfig may grow
    changed = {name: [saved.get(name), settings.get(name)] for name in sorted(names)
               if saved.get(name) != settings.get(name)}
    if changed and not allow_change:
        details = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise ConfigError(f"--resume {point.path}: {len(changed)} setting(s) differ from the checkpoint's "
                          f"({details}); restore them, pass --allow-config-change to continue with the change "
                          "recorded, or use another --run-dir")
    return changed


def check_free_space(run_dir: Path, point: ResumePoint | None) -> None:
    """Refuse to start where the next checkpoint cannot fit, so that a full disk fails here in one line rather than
    inside DeepSpeed: it needs about as much as the one resumed from, and at least MIN_FREE_BYTES."""
    needed = max(MIN_FREE_BYTES, sum(entry["bytes"] for entry in point.meta.get(FILES, {}).values()) if point else 0)
    existing = next(folder for folder in (run_dir, *run_dir.absolute().parents) if folder.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(f"--run-dir {run_dir}: {free / 2**20:.1f} MiB free on its filesystem, a checkpoint needs "
                          f"about {needed / 2**20:.1f} MiB; free space, then start again")


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
        raise CheckpointError(box[0])


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
        raise CheckpointError(f"DeepSpeed found no checkpoint at {load_dir / tag}; give another --resume")
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
    written, error, bug = {}, None, None
    try:
        engine.save_checkpoint(str(checkpoints), tag=path.name, client_state=client_state, save_latest=False)
        for file in _files_written_by(path, rank):
            fsync(file)
            written[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    except OSError as err:
        error = f"{err.filename or path}: {err.strerror or err}"
    except Exception as err:
        if isinstance(err, RuntimeError) and TORCH_WRITE_FAILED.search(str(err)):
            error = f"{path}: a write failed ({str(err).splitlines()[0]})"
        else:  # a bug, not the disk: it keeps its traceback, after the ranks have agreed to stop
            error, bug = f"{path}: {type(err).__name__}: {err}", err
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (written, error, bug is not None))
    failed = next(((e, is_bug) for _, e, is_bug in everyone if e), None)
    if failed:
        if rank == 0:  # the partial folder would keep a full disk full
            shutil.rmtree(path, ignore_errors=True)
        if bug is not None:
            raise bug
        if failed[1]:
            raise RuntimeError(f"saving checkpoint {path} failed on another rank: {failed[0]}")
        previous = complete_checkpoints(checkpoints)
        raise CheckpointError(f"saving checkpoint {path} failed: {failed[0]}; removed the partial {path.name}, and "
                              f"the previous complete checkpoint ({previous[-1] if previous else 'none'}) is intact: "
                              "free space or fix the disk, then resume with --resume auto")
    if rank == 0:
        files = {name: entry for rank_files, _, _ in everyone for name, entry in rank_files.items()}
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
