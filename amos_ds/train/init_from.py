"""`pretrain.py --init-from CHECKPOINT`: a new run that starts from another run's weights, or from the authors'
release converted by `amos-ds convert`.

The model is the checkpoint's (its ModelConfig, with the run's `model` overrides on top, e.g. another generator);
the data must be encoded with the checkpoint's tokenizer. From an amos-ds checkpoint the run takes every weight
(discriminator, token embedding, generator, heads); from a conversion only what came from the release (the
discriminator and token embedding), the rest drawn fresh from the run's seed. The optimizer, schedule and data
position start anew. The run records where it started (`init_from` in every amos_meta.json); `--resume` of the run
itself continues from its own checkpoints, as any run does.
"""

from pathlib import Path
from typing import Any

from torch import nn

from amos_ds.config import ModelConfig
from amos_ds.errors import ConfigError
from amos_ds.export.amos_release import is_release_folder
from amos_ds.finetune.pretrained import KEPT_KEYS, Checkpoint, load_weights, locate_checkpoint


def locate_init(path: str, tokenizer_hash: str, overrides: dict[str, Any], seq_len: int) -> Checkpoint:
    """The checkpoint `path` names (a tag folder or a run directory), with `overrides` applied to its model config,
    after checking that it fits the run's data; the weights are read later, by load_init."""
    if is_release_folder(path):
        raise ConfigError(f"--init-from {path}: the authors' release folder; convert it first with `amos-ds convert "
                          f"{path} OUT` and give OUT")
    if not Path(path).is_dir():
        raise ConfigError(f"--init-from {path}: no such folder; give a checkpoints/step_* folder or a run directory "
                          "(`amos-ds convert` makes one from the authors' release)")
    checkpoint = locate_checkpoint(path, flag="--init-from")  # verified: a damaged file is named, or skipped
    checkpoint.config = with_overrides(checkpoint.config, overrides, path)
    if checkpoint.meta["tokenizer_hash"] != tokenizer_hash:
        raise ConfigError(f"--init-from {path}: pretrained with tokenizer {checkpoint.meta['tokenizer_hash']}, --data "
                          f"is encoded with {tokenizer_hash}; preprocess the data with the checkpoint's tokenizer "
                          "(RUN_DIR/tokenizer)")
    if seq_len > checkpoint.config.max_positions:
        raise ConfigError(f"--init-from {path}: seq_len {seq_len} exceeds its max_positions "
                          f"{checkpoint.config.max_positions}; set seq_len in --config")
    return checkpoint


def with_overrides(config: ModelConfig, overrides: dict[str, Any], path: str) -> ModelConfig:
    """The checkpoint's model with the run's `model` overrides: the model the trainer builds."""
    try:
        return config.replace(**overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--init-from {path}: the model overrides do not fit its model ({err})") from None


def init_model_config(path: str, overrides: dict[str, Any]) -> ModelConfig:
    """The model a run with `--init-from path` builds, without reading weights or data (for `amos-ds launch`)."""
    return with_overrides(locate_checkpoint(path, flag="--init-from").config, overrides, path)


def converted(checkpoint: Checkpoint) -> bool:
    return "converted_from" in checkpoint.meta


def load_init(checkpoint: Checkpoint, model: nn.Module) -> None:
    """Copy the checkpoint's weights into the freshly initialised `model` (before DeepSpeed takes it)."""
    load_weights(checkpoint, everything=True)
    state = checkpoint.state
    if converted(checkpoint):
        state = {name: tensor for name, tensor in state.items() if name.startswith(KEPT_KEYS)}
    try:
        result = model.load_state_dict(state, strict=not converted(checkpoint))
    except RuntimeError as err:
        raise ConfigError(f"--init-from {checkpoint.path}: its weights do not fit the model "
                          f"({str(err).strip().splitlines()[-1].strip()}); drop the model overrides that change "
                          "shapes") from None
    if result.unexpected_keys or any(name.startswith(KEPT_KEYS) for name in result.missing_keys):
        raise ConfigError(f"--init-from {checkpoint.path}: not an AMOS encoder ({result})")


def init_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """What the run's amos_meta.json says about where it started."""
    return {"path": str(checkpoint.path.resolve()), "step": checkpoint.meta["step"],
            "code_version": checkpoint.meta.get("code_version"),
            "converted_from": checkpoint.meta.get("converted_from", {}).get("path"),
            "loaded": "the discriminator and token embedding (the generator and heads drawn from the run's seed)"
            if converted(checkpoint) else "every weight"}
