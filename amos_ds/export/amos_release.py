"""The authors' release format (`microsoft/amos`, microsoft/AMOS `huggingface/amos/`), both directions.

A release folder holds `pytorch_model.bin` (a state dict whose encoder entries are under `amos.`), `config.json`
(AMOSConfig's fields), and the tokenizer, `sp.model` + `dict.txt` (amos_ds/data/release_tokenizer.py). Its encoder
is amos-ds's discriminator under other names:
- `amos.embeddings.word_embeddings` is the token embedding; `position_embeddings` are absolute positions 0..T-1;
  `token_type_embeddings` (when type_vocab_size > 0) add their row 0 to every position, since the authors'
  run_glue.py passes no token types: amos-ds folds that row into the positions;
- each layer's `attention.self_attn.in_proj` is the fused q, k, v projection (q, k, v stacked on the output axis,
  heads inside each), as amos-ds's `attention.qkv`; post-LayerNorm layers with an exact-GELU feed-forward;
- one model-level `amos.relative_attention_bias` table [rel_pos_bins, heads] indexed by the signed T5 bucket minus
  its minimum over max_position_embeddings x max_position_embeddings positions: amos-ds's row order
  (amos_ds/model/relative_position.py) when that minimum is the bucket cap, which is checked here;
- padded keys get -inf in every layer's scores, as in amos-ds; the release also zeroes the padded positions'
  embeddings, which changes only the (unused) hidden states at padded positions.
"""

import json
import os
from pathlib import Path

import torch

from amos_ds.config import ModelConfig, get_preset
from amos_ds.errors import ConfigError
from amos_ds.model import Encoder
from amos_ds.model.relative_position import relative_position_bucket

WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"
PREFIX = "amos."
TOKEN_TYPES = "amos.embeddings.token_type_embeddings.weight"
# AMOSConfig's defaults (configuration_amos.py), which hold for a field config.json leaves out.
RELEASE_DEFAULTS = {"hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                    "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
                    "layer_norm_eps": 1e-12, "rel_pos_bins": 0, "max_rel_pos": 0, "layer_norm_type": "post"}
# ModelConfig field <- AMOSConfig field.
CONFIG_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                 "ffn_size": "intermediate_size", "disc_layers": "num_hidden_layers",
                 "max_positions": "max_position_embeddings", "rel_buckets": "rel_pos_bins",
                 "rel_max_distance": "max_rel_pos", "layer_norm_eps": "layer_norm_eps",
                 "dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
                 "init_std": "initializer_range"}
# amos-ds layer module <- the release's, inside discriminator.layers.{i} / amos.encoder.layer.{i}.
LAYER_MODULES = {"attention.qkv": "attention.self_attn.in_proj", "attention.out": "attention.self_attn.out_proj",
                 "attention_norm": "attention.LayerNorm", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
                 "ffn_norm": "output.LayerNorm"}
# What run_glue.py's classification head reads from config.json (AMOSClassificationHead.dropout).
CLASSIFIER_DROPOUT = 0.1


def release_names(config: ModelConfig) -> dict[str, str]:
    """amos-ds encoder state-dict name -> release name, for every encoder entry (token types aside)."""
    names = {"token_embedding": "amos.embeddings.word_embeddings.weight",
             "discriminator.embeddings.positions.weight": "amos.embeddings.position_embeddings.weight",
             "discriminator.embeddings.relative_bias.table.weight": "amos.relative_attention_bias.weight"}
    for kind in ("weight", "bias"):
        names[f"discriminator.embeddings.norm.{kind}"] = f"amos.embeddings.LayerNorm.{kind}"
        for layer in range(config.disc_layers):
            for ours, theirs in LAYER_MODULES.items():
                names[f"discriminator.layers.{layer}.{ours}.{kind}"] = f"amos.encoder.layer.{layer}.{theirs}.{kind}"
    return names


def model_config_from_release(values: dict, where: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a release config.json: its encoder shapes, the base preset's generator and criterion."""
    values = {**RELEASE_DEFAULTS, **values}
    unsupported = {"hidden_act": ("gelu",), "layer_norm_type": ("post",)}
    for name, allowed in unsupported.items():
        if values[name] not in allowed:
            raise ConfigError(f"{where}: {name} {values[name]!r} is not supported; amos-ds's encoder has "
                              f"{allowed[0]!r}")
    if values.get("num_ffn_layers", 1) > 1 or values["rel_pos_bins"] < 1:
        raise ConfigError(f"{where}: num_ffn_layers {values.get('num_ffn_layers', 1)}, rel_pos_bins "
                          f"{values['rel_pos_bins']}: amos-ds's encoder has one feed-forward per layer and a "
                          "relative bias")
    missing = sorted(theirs for theirs in CONFIG_FIELDS.values() if theirs not in values)
    if missing:
        raise ConfigError(f"{where}: lacks {missing}; give the release's config.json")
    try:
        config = get_preset("base").replace(**{ours: values[theirs] for ours, theirs in CONFIG_FIELDS.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: not a usable AMOS config ({err})") from None
    positions = torch.arange(config.max_positions)
    lowest = int(relative_position_bucket(positions[:1] - positions[-1:], config.rel_buckets,
                                          config.rel_max_distance))
    if lowest != -(config.rel_buckets // 2 - 1):  # the authors' row 0 would not be amos-ds's row 0
        raise ConfigError(f"{where}: max_position_embeddings {config.max_positions} does not reach the last relative "
                          f"bucket of rel_pos_bins {config.rel_buckets} / max_rel_pos {config.rel_max_distance}; "
                          "amos-ds cannot order its relative-bias rows")
    return config


def release_config(config: ModelConfig) -> dict:
    """config.json for the authors' AMOSConfig (no token types: amos-ds has none)."""
    values = {theirs: getattr(config, ours) for ours, theirs in CONFIG_FIELDS.items()}
    return {"architectures": ["AMOSModel"], "model_type": "amos", **RELEASE_DEFAULTS, **values,
            "type_vocab_size": 0, "cls_dropout_prob": CLASSIFIER_DROPOUT}


def encoder_from_release(state: dict[str, torch.Tensor], config: ModelConfig,
                         where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """amos-ds's encoder entries (fp32) from a release state dict; entries outside `amos.` (heads) are left out."""
    names = release_names(config)
    ours = {name for name in state if name.startswith(PREFIX)}
    missing = sorted(set(names.values()) - ours)
    unknown = sorted(ours - set(names.values()) - {TOKEN_TYPES})
    if missing or unknown:
        raise ConfigError(f"{where}: not the encoder config.json describes: missing {missing[:4]}, unexpected "
                          f"{unknown[:4]}{' ...' if len(missing) > 4 or len(unknown) > 4 else ''}")
    with torch.device("meta"):  # the shapes amos-ds's encoder has at this config, without its memory
        expected = {f"discriminator.{name}": tensor.shape for name, tensor in
                    Encoder(config, config.disc_layers, 0.0, 0.0).state_dict().items()}
    expected["token_embedding"] = torch.Size([config.vocab_size, config.hidden_size])
    wrong = [f"{names[mine]} {tuple(state[names[mine]].shape)} (expected {tuple(shape)})"
             for mine, shape in expected.items() if state[names[mine]].shape != shape]
    if wrong:
        raise ConfigError(f"{where}: shapes differ from config.json's: {', '.join(wrong[:3])}")
    encoder = {mine: state[theirs].float().clone() for mine, theirs in names.items()}
    if TOKEN_TYPES in state:
        encoder["discriminator.embeddings.positions.weight"] += state[TOKEN_TYPES][0].float()
    return encoder


def release_from_encoder(encoder: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A release state dict (`amos.` names) from amos-ds's encoder entries."""
    return {theirs: encoder[mine].detach().clone().contiguous() for mine, theirs in release_names(config).items()}


def read_release(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ModelConfig and amos-ds encoder entries of a release folder's config.json and pytorch_model.bin."""
    directory = Path(directory)
    try:
        values = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{directory / CONFIG_FILE}: not readable JSON ({err}); give the release folder") from None
    config = model_config_from_release(values, directory / CONFIG_FILE)
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a state dict
        raise ConfigError(f"{directory / WEIGHTS_FILE}: not a torch.save'd state dict ({type(err).__name__}); "
                          "give the release folder") from None
    return config, encoder_from_release(state, config, directory / WEIGHTS_FILE)


def is_release_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()
