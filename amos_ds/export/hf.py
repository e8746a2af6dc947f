"""Write a pretrained AMOS encoder as a Hugging Face model folder: safetensors weights, config.json, the modeling
and tokenizer code for `trust_remote_code=True`, and the tokenizer; on request the generator too, in OUT/generator
(AutoModelForMaskedLM).

The weights come from wherever `amos-ds finetune` reads them (`amos_ds.finetune.pretrained`): a checkpoint of any
ZeRO stage merged by DeepSpeed's zero_to_fp32, a run directory, or a state-dict file; the tokenizer must be the one
the checkpoint was pretrained with.
"""

import json
import os
import shutil
from pathlib import Path

from amos_ds.atomic import staged
from amos_ds.config import ModelConfig
from amos_ds.data.tokenizer import Tokenizer
from amos_ds.errors import ConfigError
from amos_ds.finetune.pretrained import find_tokenizer, load_weights, locate_checkpoint

REMOTE_CODE = Path(__file__).resolve().parent / "remote"
MODELING_FILE = "modeling_amos_ds.py"
TOKENIZATION_FILE = "tokenization_amos_ds.py"
AUTO_MAP = {
    "AutoConfig": "modeling_amos_ds.AmosDsConfig",
    "AutoModel": "modeling_amos_ds.AmosDsModel",
    "AutoModelForSequenceClassification": "modeling_amos_ds.AmosDsForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_amos_ds.AmosDsForTokenClassification",
    "AutoModelForMaskedLM": "modeling_amos_ds.AmosDsForMaskedLM",
}
GENERATOR_DIR = "generator"


def hf_config_values(config: ModelConfig, pad_token_id: int, generator: bool = False) -> dict:
    """AmosDsConfig's fields for an amos-ds ModelConfig's discriminator, or its generator (no dropout)."""
    dropout = 0.0 if generator else config.dropout
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                num_hidden_layers=config.gen_layers if generator else config.disc_layers,
                num_attention_heads=config.num_heads, intermediate_size=config.ffn_size,
                max_position_embeddings=config.max_positions, relative_buckets=config.rel_buckets,
                relative_max_distance=config.rel_max_distance, hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=0.0 if generator else config.attention_dropout,
                classifier_dropout=dropout, layer_norm_eps=config.layer_norm_eps, initializer_range=config.init_std,
                pad_token_id=pad_token_id)


def hf_state_dict(state: dict) -> dict:
    """amos-ds's encoder entries (`token_embedding`, `discriminator.*`) under AmosDsModel's names."""
    return {("token_embedding.weight" if name == "token_embedding" else name.removeprefix("discriminator.")): tensor
            for name, tensor in state.items() if name == "token_embedding" or name.startswith("discriminator.")}


def hf_generator_state_dict(state: dict) -> dict:
    """amos-ds's generator entries (`token_embedding`, `generators.0.*`, `mlm_head.*`) under AmosDsForMaskedLM's."""
    renamed = {"amos_ds.token_embedding.weight": state["token_embedding"]}
    for name, tensor in state.items():
        if name.startswith("generators.0."):
            renamed["amos_ds." + name.removeprefix("generators.0.")] = tensor
        elif name.startswith("mlm_head."):
            renamed["lm_head." + name.removeprefix("mlm_head.")] = tensor
    return renamed


def export_encoder(source: str, output: str | os.PathLike, tokenizer: str | None = None,
                   model_config: str | None = None, generator: bool = False) -> Path:
    """Write `source`'s discriminator (and generator) to the new folder `output` (whole or not at all)."""
    try:
        from amos_ds.export.remote.modeling_amos_ds import AmosDsConfig, AmosDsForMaskedLM, AmosDsModel
        from amos_ds.export.remote.tokenization_amos_ds import AmosDsTokenizer
    except ImportError as err:
        raise ConfigError(f"amos-ds export needs transformers and safetensors ({err}); "
                          "install them with pip install -e '.[hf]'") from None
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; remove it or give a new folder")
    checkpoint = locate_checkpoint(source, model_config)
    if generator and checkpoint.config.separate_generators:
        raise ConfigError(f"--generator: {checkpoint.path} has separate generators (one per head); only a shared "
                          "generator is exported")
    found = find_tokenizer(checkpoint, tokenizer)  # before the merge of the weights, which can take minutes
    if not isinstance(found, Tokenizer):  # the shipped tokenizer code reads amos-ds's sentencepiece layout only
        raise ConfigError(f"{source}: its tokenizer ({found.directory}) is the release's sp.model + dict.txt, which "
                          "the Hugging Face folder's tokenizer cannot express; use --format amos-release")
    load_weights(checkpoint, with_generator=generator)
    hf_tokenizer = AmosDsTokenizer(vocab_file=str(found.directory / "tokenizer.model"),
                                   model_max_length=checkpoint.config.max_positions)
    provenance = dict(amos_ds_tokenizer_hash=found.hash, amos_ds_model_config=checkpoint.config.to_dict())
    pad = found.special.pad
    model = AmosDsModel(AmosDsConfig(**hf_config_values(checkpoint.config, pad), architectures=["AmosDsModel"],
                                     auto_map=AUTO_MAP, **provenance))
    model.load_state_dict(hf_state_dict(checkpoint.state), strict=True)

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged(output) as staging:
            write_folder(model, hf_tokenizer, staging)
            if generator:
                masked_lm = AmosDsForMaskedLM(AmosDsConfig(**hf_config_values(checkpoint.config, pad, generator=True),
                                                           architectures=["AmosDsForMaskedLM"], auto_map=AUTO_MAP,
                                                           **provenance))
                masked_lm.load_state_dict(hf_generator_state_dict(checkpoint.state), strict=True)
                write_folder(masked_lm, hf_tokenizer, staging / GENERATOR_DIR)
    except OSError as err:
        raise ConfigError(f"{output}: cannot write the export ({err.strerror}); check free space and "
                          "permissions") from None
    return output


def write_folder(model, tokenizer, folder: Path) -> None:
    """One Hugging Face folder: weights, config, tokenizer, and the remote code both need."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text())
    settings.update(tokenizer_class="AmosDsTokenizer",
                    auto_map={"AutoTokenizer": [f"{TOKENIZATION_FILE[:-3]}.AmosDsTokenizer", None]})
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    for name in (MODELING_FILE, TOKENIZATION_FILE):
        shutil.copyfile(REMOTE_CODE / name, folder / name)
