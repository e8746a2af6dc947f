"""`amos-ds export --format amos-release`: a pretrained discriminator as the folder the authors' run_glue.py loads
(`--model_type amos --model_name_or_path OUT`): pytorch_model.bin under their names, config.json with their
fields, sp.model and dict.txt (amos_ds/export/amos_release.py has the names).

The tokenizer: a release tokenizer (a conversion, or a run continued from one) is copied as it is. An amos-ds
tokenizer is written in the release's id layout: its sentencepiece model as sp.model, its pieces (ids 5 and up) in
order as dict.txt, so that a piece's id drops by one, [CLS] [PAD] [SEP] [UNK] become <s> <pad> </s> <unk> (0-3) and
[MASK] becomes the appended <mask>; the embedding rows move with their ids. The release's pre-tokenizer then splits
punctuation off words before sentencepiece sees them, so text with punctuation can get other pieces than amos-ds
gives it (e.g. "(with" becomes "▁(" "▁with"): that is the release's tokenization, which its run_glue.py uses. A
piece a fairseq dictionary cannot hold (empty, with whitespace, or one of its special symbols) is refused.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from amos_ds.atomic import staged
from amos_ds.data.release_tokenizer import DICT_FILE, FAIRSEQ_SPECIALS, MASK_PIECE, SP_FILE, ReleaseTokenizer
from amos_ds.data.tokenizer import MODEL_FILE, SentencepieceTokenizer, Tokenizer
from amos_ds.errors import ConfigError
from amos_ds.export.amos_release import CONFIG_FILE, WEIGHTS_FILE, release_config, release_from_encoder
from amos_ds.finetune.pretrained import find_tokenizer, load_weights, locate_checkpoint

EMBEDDING = "token_embedding"


def release_ids(tokenizer: Tokenizer) -> torch.Tensor:
    """The release id of each amos-ds id: pieces (5 and up) one lower, the specials to fairseq's, [MASK] last."""
    special = tokenizer.special
    ids = torch.arange(tokenizer.vocab_size) - 1
    bos, pad, eos, unk = range(len(FAIRSEQ_SPECIALS))
    ids[[special.cls, special.pad, special.sep, special.unk]] = torch.tensor([bos, pad, eos, unk])
    ids[special.mask] = tokenizer.vocab_size - 1
    return ids


def dictionary_text(tokenizer: Tokenizer) -> str:
    """dict.txt of an amos-ds tokenizer: each ordinary piece in id order, with a count of 1."""
    pieces = [tokenizer.id_to_piece(i) for i in range(*tokenizer.special.ordinary)]
    reserved = {*FAIRSEQ_SPECIALS, MASK_PIECE}
    bad = [piece for piece in pieces if not piece or piece in reserved or any(c.isspace() for c in piece)]
    if bad:
        raise ConfigError(f"{tokenizer.directory}: piece(s) {bad[:3]} cannot be written to a fairseq dict.txt "
                          "(empty, with whitespace, or a fairseq special symbol); this tokenizer has no release form")
    return "".join(f"{piece} 1\n" for piece in pieces)


def export_release(source: str, output: str | os.PathLike, tokenizer: str | None = None,
                   model_config: str | None = None) -> Path:
    """Write `source`'s discriminator and tokenizer to the new folder `output` in the release format."""
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{output}: already exists; remove it or give a new folder")
    checkpoint = locate_checkpoint(source, model_config)
    found: SentencepieceTokenizer = find_tokenizer(checkpoint, tokenizer)
    dictionary = dictionary_text(found) if isinstance(found, Tokenizer) else None  # refused before the merge
    encoder = load_weights(checkpoint).state
    if dictionary is not None:
        embedding = torch.empty_like(encoder[EMBEDDING])
        embedding[release_ids(found)] = encoder[EMBEDDING]
        encoder = {**encoder, EMBEDDING: embedding}
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged(output) as folder:
            folder.mkdir()
            torch.save(release_from_encoder(encoder, checkpoint.config), folder / WEIGHTS_FILE)
            (folder / CONFIG_FILE).write_text(json.dumps(release_config(checkpoint.config), indent=2) + "\n")
            if isinstance(found, ReleaseTokenizer):
                for name in (SP_FILE, DICT_FILE):
                    shutil.copyfile(found.directory / name, folder / name)
            else:
                shutil.copyfile(found.directory / MODEL_FILE, folder / SP_FILE)
                (folder / DICT_FILE).write_text(dictionary)
    except OSError as err:
        raise ConfigError(f"{output}: cannot write the export ({err.strerror}); check free space and "
                          "permissions") from None
    return output
