"""The DeepSpeed config of a run: the JSON file as written, plus what only the launch knows.

The files in ds_configs/ fix the global batch (`train_batch_size`, 2048 sequences in the paper) and the
micro-batch per GPU; gradient accumulation follows from the data-parallel size:
    train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel ranks,
so the same file serves 1 CPU and 64 GPUs, and a resume at another world size keeps the same batch.
"""

import copy
import json
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
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise ConfigError(f"--deepspeed_config {path}: needs a positive integer {key!r}")
    return config


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
    total = ds_config.get("scheduler", {}).get("params", {}).get("total_num_steps")
    return total if isinstance(total, int) else None


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
