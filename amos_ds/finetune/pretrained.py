"""The part of an AMOS checkpoint a user keeps: the discriminator, the token embedding it reads, and the tokenizer.

Sources of weights, all read without a GPU:
- a checkpoint tag folder (RUN_DIR/checkpoints/step_XXXXXXXX, with amos_meta.json), a checkpoints folder or a run
  directory (its newest complete checkpoint): ZeRO 1/2/3 files merged by DeepSpeed's zero_to_fp32;
- a file holding a `torch.save`d AMOSModel state dict, with `--model-config` JSON (ModelConfig fields);
- 'none': random init, the same architecture and initialisation pretraining starts from;
- the authors' release folder (`pytorch_model.bin`, `config.json`, `sp.model`, `dict.txt`: amos_ds/export/
  amos_release.py), read directly.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amos_ds.config import ModelConfig, get_preset
from amos_ds.data.tokenizer import SentencepieceTokenizer, load_tokenizer
from amos_ds.errors import ConfigError, DataError
from amos_ds.export.amos_release import is_release_folder, read_release
from amos_ds.model import AMOSModel, Encoder
from amos_ds.train.checkpoint import META, RUN_TOKENIZER, verified_checkpoint

KEPT_KEYS = ("token_embedding", "discriminator.")  # AMOSModel state-dict keys the encoder keeps (prefixes)
GENERATOR_KEYS = ("generators.0.", "mlm_head.")  # and those of the (one, shared) generator with its MLM head


class TextEncoder(nn.Module):
    """AMOS's discriminator with its token embedding: ids [B, T] -> the last layer's hidden states [B, T, H].

    Parameter names equal AMOSModel's, so a pretrained state dict loads strictly (nothing missing, nothing extra).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.discriminator = Encoder(config, config.disc_layers, config.dropout, config.attention_dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.discriminator(F.embedding(input_ids, self.token_embedding), attention_mask)[-1]


def encoder_state(amos_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The discriminator's and token embedding's entries of an AMOSModel state dict; the generator is dropped."""
    return {name: tensor for name, tensor in amos_state.items() if name.startswith(KEPT_KEYS)}


@dataclass
class Checkpoint:
    config: ModelConfig
    meta: dict  # amos_meta.json; empty for a plain state-dict file
    path: Path
    state: dict[str, torch.Tensor] | None = None  # the encoder's entries (see encoder_state), once loaded


def locate_checkpoint(path: str | os.PathLike, model_config: str | None = None,
                      flag: str = "--pretrained") -> Checkpoint:
    """The model config and metadata of a DeepSpeed checkpoint (its files verified against their recorded hashes) or
    a state-dict file, without reading the weights: enough to check a tokenizer before the (slow, for ZeRO-3) merge.
    `flag` names the option in the messages of the verification."""
    path = Path(path)
    if path.is_file():
        if not model_config:
            raise ConfigError(f"--pretrained {path}: a state-dict file needs --model-config FILE (ModelConfig JSON)")
        return Checkpoint(_read_model_config(Path(model_config)), {}, path)
    if not path.is_dir():
        raise ConfigError(f"--pretrained {path}: no such file or folder; give a checkpoint, a run directory or 'none'")
    tag = verified_checkpoint(path, flag)
    meta = json.loads((tag / META).read_text())
    return Checkpoint(_model_config(meta["model"], tag / META), meta, tag)


def load_weights(checkpoint: Checkpoint, with_generator: bool = False, everything: bool = False) -> Checkpoint:
    """`checkpoint` with the encoder's fp32 weights read (and the generator's, when asked; every AMOSModel weight
    with `everything`, for continued pretraining): ZeRO 1/2/3 files merged by DeepSpeed's zero_to_fp32."""
    if checkpoint.meta:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = checkpoint.path
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    else:
        try:
            state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a file that is not a state dict
            cause = str(err).strip().splitlines()
            raise ConfigError(f"--pretrained {checkpoint.path}: not a torch.save'd state dict "
                              f"({type(err).__name__}: {cause[0] if cause else 'no message'})") from err
    kept = KEPT_KEYS + GENERATOR_KEYS if with_generator else KEPT_KEYS
    checkpoint.state = {name: tensor for name, tensor in state.items() if everything or name.startswith(kept)}
    return checkpoint


def _read_model_config(path: Path) -> ModelConfig:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--model-config {path}: not readable JSON ({err})") from None
    return _model_config(values, path)


def _model_config(values: dict, where: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: not a valid model config ({err})") from None


def find_tokenizer(checkpoint: Checkpoint, tokenizer: str | None) -> SentencepieceTokenizer:
    """--tokenizer, or the tokenizer the checkpoint was pretrained with; its hash and size must match the model's."""
    expected = checkpoint.meta.get("tokenizer_hash")
    if tokenizer:
        found = load_tokenizer(tokenizer)
        if expected and found.hash != expected:
            raise ConfigError(f"--tokenizer {tokenizer}: hash {found.hash}, but {checkpoint.path} was pretrained with "
                              f"{expected}; give the tokenizer/ folder of the corpus it was pretrained on")
    else:
        if not checkpoint.meta:
            raise ConfigError(f"--pretrained {checkpoint.path}: a state-dict file needs --tokenizer DIR")
        where = checkpoint.path.parent.parent / RUN_TOKENIZER  # RUN_DIR/checkpoints/step_N -> RUN_DIR/tokenizer
        found = _try_tokenizer(where)
        if found is None or found.hash != expected:
            raise ConfigError(f"--pretrained {checkpoint.path}: its tokenizer ({expected or 'hash unknown'}) is not "
                              f"at {where}; pass --tokenizer DIR")
    if found.vocab_size != checkpoint.config.vocab_size:
        raise ConfigError(f"--tokenizer {found.directory}: {found.vocab_size} pieces, but the model has "
                          f"vocab_size {checkpoint.config.vocab_size}; use the tokenizer it was pretrained with")
    return found


def _try_tokenizer(directory: Path) -> SentencepieceTokenizer | None:
    try:
        return load_tokenizer(directory)
    except DataError:
        return None


@dataclass
class EncoderSource:
    """What every fine-tuning seed starts from: pretrained weights, or (state None) a fresh random init per seed."""

    config: ModelConfig
    tokenizer: SentencepieceTokenizer
    state: dict[str, torch.Tensor] | None  # the encoder's entries, and the generator's when loaded with_generator
    description: str

    def build(self, dropout: float) -> TextEncoder:
        """A new encoder with fine-tuning dropout. Random init draws from torch's global RNG: seed it first."""
        config = self.config.replace(dropout=dropout, attention_dropout=dropout)
        state = self.state if self.state is not None else AMOSModel(config).state_dict()
        encoder = TextEncoder(config)
        encoder.load_state_dict(encoder_state(state))
        return encoder


def load_source(pretrained: str, tokenizer: str | None = None, model_config: str | None = None,
                preset: str = "small", with_generator: bool = False) -> EncoderSource:
    """Resolve `--pretrained` (a checkpoint, run directory, state-dict file, release folder, or 'none') and its
    tokenizer; with the generator's weights too when asked (`amos-ds probe`; a release folder has none)."""
    if is_release_folder(pretrained):
        config, state = read_release(pretrained)
        found = load_tokenizer(tokenizer or pretrained)
        if found.vocab_size != config.vocab_size:
            raise ConfigError(f"--tokenizer {found.directory}: {found.vocab_size} ids, but {pretrained} has "
                              f"vocab_size {config.vocab_size}; use the release's own sp.model and dict.txt")
        return EncoderSource(config, found, state, f"the release {pretrained}")
    if pretrained == "none":
        if not tokenizer:
            raise ConfigError("--pretrained none: random init needs --tokenizer DIR (it sets the vocabulary)")
        found = load_tokenizer(tokenizer)
        if model_config:
            base = _read_model_config(Path(model_config))
        else:
            try:
                base = get_preset(preset)
            except ValueError as err:
                raise ConfigError(f"--preset: {err}") from None
        config = base.replace(vocab_size=found.vocab_size)
        return EncoderSource(config, found, None, f"random init ({model_config or preset})")
    checkpoint = locate_checkpoint(pretrained, model_config)
    found = find_tokenizer(checkpoint, tokenizer)
    load_weights(checkpoint, with_generator)
    return EncoderSource(checkpoint.config, found, checkpoint.state, str(checkpoint.path))
