"""An amos-ds tokenizer (a sentencepiece BPE model with fixed special ids) as a Hugging Face tokenizer.

Ids equal amos-ds's `Tokenizer.encode` (each line encoded on its own); a sentence becomes [CLS] ids [SEP], a pair
[CLS] a [SEP] b [SEP], as amos-ds fine-tunes. The model has no segment embeddings, so no token_type_ids.
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class AmosDsTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, pad_token: str = "[PAD]", cls_token: str = "[CLS]", sep_token: str = "[SEP]",
                 mask_token: str = "[MASK]", unk_token: str = "[UNK]", **kwargs) -> None:
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        super().__init__(pad_token=pad_token, cls_token=cls_token, sep_token=sep_token, mask_token=mask_token,
                         unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [piece for line in text.split("\n") for piece in self.sp_model.encode(line, out_type=str)]

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = [self.cls_token_id, *token_ids_0, self.sep_token_id]
        return ids if token_ids_1 is None else [*ids, *token_ids_1, self.sep_token_id]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, *[0] * len(token_ids_0), 1]
        return mask if token_ids_1 is None else [*mask, *[0] * len(token_ids_1), 1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
