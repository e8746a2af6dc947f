"""The DeepSpeed config of a run: the JSON file as written, plus what only the launch knows.

The files in ds_configs/ fix the global batch (`train_batch_size`, 2048 sequences in the paper) and the
micro-batch per GPU; gradient accumulation follows from the data-parallel size:
    train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel ranks,
so the same file serves 1 CPU and 64 GPUs, and a resume at another world size keeps the same batch.
"""

import copy
import json
import math
from pathlib import Path
from typing import Any

from amos_ds.errors import ConfigError


def load_ds_config(path: Path) -> dict[str, Any]:
    """The JSON file as a dict, with a one-line error naming the file when it cannot be used."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: file not found (see ds_configs/ for the shipped ones)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--deepspeed_config {path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object (see ds_configs/)")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not _is_int(config.get(key)) or config[key] < 1:
            raise ConfigError(f"--deepspeed_config {path}: needs a positive integer {key!r}")
    problem = _field_problem(config)
    if problem:
        raise ConfigError(f"--deepspeed_config {path}: {problem}")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the fields the trainer relies on, before DeepSpeed fails on them with a traceback."""
    sections = {name: config.get(name, {}) for name in ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16")}
    bad = next((name for name, section in sections.items() if not isinstance(section, dict)), None)
    if bad:
        return f"{bad} must be a JSON object"
    lr = sections["optimizer"].get("params", {}).get("lr")
    if lr is not None and not (_is_number(lr) and lr >= 0):  # 0 is allowed: a run that keeps its weights
        return f"optimizer.params.lr must be a number >= 0, got {lr!r}"
    if sections["zero_optimization"].get("stage", 0) not in (0, 1, 2, 3):
        return f"zero_optimization.stage must be 0, 1, 2 or 3, got {sections['zero_optimization']['stage']!r}"
    if sections["bf16"].get("enabled") and sections["fp16"].get("enabled"):
        return "bf16 and fp16 are both enabled; enable one (or neither, for fp32)"
    clipping = config.get("gradient_clipping", 0.0)
    if not (_is_number(clipping) and clipping >= 0):
        return f"gradient_clipping must be a number >= 0, got {clipping!r}"
    total = sections["scheduler"].get("params", {}).get("total_num_steps")
    if total is not None and not (_is_int(total) and total > 0):
        return f"scheduler.params.total_num_steps must be a positive integer, got {total!r}"
    return None


def gradient_accumulation(ds_config: dict[str, Any], world_size: int, path: Path | str) -> int:
    """Accumulation steps that make micro-batch x steps x world_size equal the global batch, or a clear error."""
    batch, micro = ds_config["train_batch_size"], ds_config["train_micro_batch_size_per_gpu"]
    if batch % (micro * world_size):
        raise ConfigError(f"--deepspeed_config {path}: train_batch_size {batch} is not divisible by "
                          f"train_micro_batch_size_per_gpu {micro} x {world_size} data-parallel ranks = "
                          f"{micro * world_size}; pick a micro-batch and rank count whose product divides {batch}")
    steps = batch // (micro * world_size)
    given = ds_config.get("gradient_accumulation_steps")
    if given is not None and given != steps:
        raise ConfigError(f"--deepspeed_config {path}: gradient_accumulation_steps {given} contradicts "
                          f"{batch} / ({micro} x {world_size} ranks) = {steps}; remove it, it is derived")
    return steps


def scheduler_total_steps(ds_config: dict[str, Any]) -> int | None:
    """The schedule's `total_num_steps`, which is the run's length when --max-steps is not given."""
    return ds_config.get("scheduler", {}).get("params", {}).get("total_num_steps")


def precision(ds_config: dict[str, Any]) -> str:
    """"bf16", "fp16" or "fp32": what the engine computes in."""
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled", False):
            return name
    return "fp32"


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def derive_ds_config(ds_config: dict[str, Any], path: Path | str, *, world_size: int, max_steps: int, fp32: bool,
                     run_dir: Path, load_universal: bool) -> dict[str, Any]:
    """The config handed to `deepspeed.initialize`: batch split for this world size, the decay ending at
    max_steps, fp32 when asked, TensorBoard events in run_dir, and universal loading when resuming at another size."""
    config = copy.deepcopy(ds_config)
    config["gradient_accumulation_steps"] = gradient_accumulation(config, world_size, path)
    if fp32:
        for name in ("bf16", "fp16"):
            config.pop(name, None)
    scheduler = config.get("scheduler", {})
    if "total_num_steps" in scheduler.get("params", {}):
        scheduler["params"]["total_num_steps"] = max_steps
    config["tensorboard"] = {"enabled": True, "output_path": str(run_dir), "job_name": "tensorboard"}
    config.setdefault("steps_per_print", 10**9)  # the trainer prints its own line per step
    if load_universal:
        config.setdefault("checkpoint", {})["load_universal"] = True
    return config
