"""`amos-ds convert`: the authors' release folder as an amos-ds run directory.

OUT gets `tokenizer/` (the release's sp.model and dict.txt) and `checkpoints/step_00000000/`, a DeepSpeed checkpoint
(ZeRO-1, fp32) written by the trainer's own save, with the same file hashes and amos_meta.json: so `amos-ds
finetune --pretrained OUT`, `amos-ds export OUT ...` and `pretrain.py --init-from OUT` read it as they read a
pretraining run. Its discriminator and token embedding are the release's; the generator, MLM head, mixture scorer
and RTD head, which the release does not have, are freshly initialised (the base preset's generator at the
release's width), and amos_meta.json says so under `converted_from`.
"""

import os
from pathlib import Path

import deepspeed

from amos_ds.atomic import staged
from amos_ds.data.release_tokenizer import ReleaseTokenizer
from amos_ds.data.tokenizer import copy_tokenizer, load_tokenizer
from amos_ds.errors import ConfigError
from amos_ds.export.amos_release import WEIGHTS_FILE, is_release_folder, read_release
from amos_ds.finetune.pretrained import KEPT_KEYS
from amos_ds.model import AMOSModel
from amos_ds.train.checkpoint import RUN_TOKENIZER, _sha256, save_checkpoint, seed_rng
from amos_ds.train.param_groups import parameter_groups
from amos_ds.train.version import code_version

# One rank, fp32, ZeRO-1: the layout DeepSpeed's zero_to_fp32 (and so every reader of checkpoints) merges. The
# optimizer state it saves is fresh; a run that starts from the conversion (--init-from) builds its own.
CONVERT_DS_CONFIG = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                     "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
                     "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}


def convert_release(source: str | os.PathLike, output: str | os.PathLike, seed: int = 1234) -> Path:
    """Write the release folder `source` as the run directory `output` (whole or not at all); needs a process group
    of one rank (CONVERT_DS_CONFIG's batch). `seed` draws the parts the release lacks."""
    source, output = Path(source), Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; remove it or give a new folder")
    if not is_release_folder(source):
        raise ConfigError(f"{source}: not a release folder; it needs {WEIGHTS_FILE}, config.json, sp.model and "
                          "dict.txt (the files of microsoft/amos)")
    tokenizer = load_tokenizer(source)
    if not isinstance(tokenizer, ReleaseTokenizer):
        raise ConfigError(f"{source}: no dict.txt beside sp.model; give the release's tokenizer files")
    config, encoder = read_release(source)
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(f"{source}: sp.model + dict.txt give {tokenizer.vocab_size} ids, config.json's vocab_size "
                          f"is {config.vocab_size}; the files are not of one release")
    seed_rng(seed)
    model = AMOSModel(config)
    fresh = sorted({name.split(".")[0] for name in model.load_state_dict(encoder, strict=False).missing_keys})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.0),
                                           config=CONVERT_DS_CONFIG)
    info = {"world_size": 1, "zero_stage": 1, "precision": "fp32", "tokenizer_hash": tokenizer.hash,
            "code_version": code_version(), "model": config.to_dict(), "train": {"seed": seed},
            "deepspeed": CONVERT_DS_CONFIG,
            "converted_from": {"path": str(source.resolve()), "weights_sha256": _sha256(source / WEIGHTS_FILE),
                               "from_release": list(KEPT_KEYS), "fresh": fresh}}
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged(output) as folder:
            folder.mkdir()
            copy_tokenizer(source, folder / RUN_TOKENIZER)
            save_checkpoint(engine, folder, 0, info, sampler_state={}, keep_last=1)
    except OSError as err:
        raise ConfigError(f"{output}: cannot write the conversion ({err.strerror}); check free space and "
                          "permissions") from None
    return output
