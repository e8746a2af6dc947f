"""The tokenizer of the authors' released checkpoint (`microsoft/amos`): `sp.model` + a fairseq `dict.txt`.

Its ids are a fairseq dictionary's, not sentencepiece's: <s> <pad> </s> <unk> at 0-3, then `dict.txt`'s pieces in
file order, then <mask> appended. Text goes through the release's pre-tokenizer (quotes and dashes folded to ASCII,
punctuation split off the ends of words, English clitics joined again), sentencepiece's pieces, minus a lone "▁"
before punctuation or at the end; a piece missing from the dictionary is <unk>. Pairs are <s> A </s> </s> B </s>.
"""

import hashlib
import os
import re
import unicodedata
from pathlib import Path

import sentencepiece as spm

from amos_ds.data.tokenizer import SentencepieceTokenizer, token_dtype
from amos_ds.errors import DataError
from amos_ds.vocab import SpecialIds

SP_FILE = "sp.model"
DICT_FILE = "dict.txt"
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq's Dictionary: bos, pad, eos, unk at 0-3
MASK_PIECE = "<mask>"
OVERWRITE_FLAG = "#fairseq:overwrite"
WORD_START = "\u2581"  # sentencepiece's "▁"

# The pre-tokenizer's character folding: curly quotes and the acute accent to ', curly double quotes to ", dashes to -.
_FOLD = str.maketrans("\u2018\u2019\u00b4\u201c\u201d\u2014\u2013", "'''\"\"--")
# A quote split from an English clitic ("don ' t" after splitting, "it ' s") is joined to it again; the upper-case
# long forms keep a space after them, as the release does.
_CLITIC = re.compile(r"' ([smdSMDtT]|ll|re|ve)\b")
_UPPER_CLITIC = re.compile(r"' (LL|RE|VE)\b")


def is_punctuation(char: str) -> bool:
    """Every ASCII character that is neither a letter, a digit nor a space, and Unicode's P* categories."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _split_word(word: str) -> list[str]:
    """A word's leading and trailing runs of punctuation become words of their own; an all-punctuation word stays."""
    inner = [i for i, char in enumerate(word) if not is_punctuation(char)]
    if not inner:
        return [word]
    start, end = inner[0], inner[-1] + 1
    return [part for part in (word[:start], word[start:end], word[end:]) if part]


def pre_tokenize(line: str) -> str:
    """The release's pre-tokenizer: the line as space-separated words, ready for sentencepiece."""
    line = line.strip().replace("``", '"').replace("''", '"').translate(_FOLD)
    words = [part for word in line.split() for part in _split_word(word)]
    joined = _UPPER_CLITIC.sub(r"'\1 ", _CLITIC.sub(r"'\1", " ".join(words)))
    return " ".join(joined.split())


def drop_lone_spaces(pieces: list[str]) -> list[str]:
    """Without the pieces that are a bare "▁" followed by punctuation or by nothing (the release's skip_space)."""
    return [piece for i, piece in enumerate(pieces)
            if piece != WORD_START or (i + 1 < len(pieces) and not is_punctuation(pieces[i + 1][0]))]


def read_dictionary(path: Path) -> list[str]:
    """The symbols of a fairseq dictionary file, by id: the four specials, then one `PIECE COUNT` per line (a piece
    already there only with `#fairseq:overwrite`, which gives it a new id), then <mask> appended."""
    symbols = list(FAIRSEQ_SPECIALS)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable as UTF-8 text ({err}); give the release's dict.txt") from None
    known = set(symbols)
    for number, line in enumerate(lines, start=1):
        piece, _, count = line.rstrip().rpartition(" ")
        overwrite = count == OVERWRITE_FLAG
        if overwrite:
            piece, _, count = piece.rpartition(" ")
        if not piece or not count.lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: {line!r} is not `PIECE COUNT`; give a fairseq dictionary file")
        if piece in known and not overwrite:
            raise DataError(f"{path}:{number}: {piece!r} appears twice (fairseq refuses that without "
                            f"{OVERWRITE_FLAG}); fix the dictionary")
        if piece == MASK_PIECE:
            raise DataError(f"{path}:{number}: holds {MASK_PIECE}, which the release appends itself; remove the line")
        symbols.append(piece)
        known.add(piece)
    symbols.append(MASK_PIECE)
    return symbols


class ReleaseTokenizer(SentencepieceTokenizer):
    """`sp.model` + `dict.txt` in `directory`, with the release's ids, pre-tokenizer and pair layout."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        try:
            model_bytes = (self.directory / SP_FILE).read_bytes()
            dict_bytes = (self.directory / DICT_FILE).read_bytes()
        except OSError as err:
            raise DataError(f"{self.directory}: not a release tokenizer folder ({err}); it needs {SP_FILE} and "
                            f"{DICT_FILE}") from None
        self.hash = hashlib.sha256(model_bytes + b"\0" + dict_bytes).hexdigest()[:16]
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError:
            raise DataError(f"{self.directory / SP_FILE}: not a sentencepiece model") from None
        self.symbols = read_dictionary(self.directory / DICT_FILE)
        self.index = {symbol: i for i, symbol in enumerate(self.symbols)}  # an overwritten piece: its last id
        self.vocab_size = len(self.symbols)
        self.dtype = token_dtype(self.vocab_size)
        bos, pad, eos, unk = range(len(FAIRSEQ_SPECIALS))
        mask = self.vocab_size - 1
        self.special = SpecialIds(pad=pad, cls=bos, sep=eos, mask=mask, unk=unk,
                                  ordinary=(len(FAIRSEQ_SPECIALS), mask), pair_separator=(eos, eos))

    def pieces(self, line: str) -> list[str]:
        return drop_lone_spaces(self.sp.encode(pre_tokenize(line), out_type=str))

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        unk = self.special.unk
        return [[self.index.get(piece, unk) for piece in self.pieces(line)] for line in lines]

    def decode(self, ids) -> str:
        """Text of `ids` as the release decodes it ("▁" a space); special ids are dropped."""
        pieces = [self.symbols[int(i)] for i in ids if self.special.is_ordinary(int(i))]
        return "".join(pieces).replace(" ", "").replace(WORD_START, " ").strip()

    def id_to_piece(self, token_id: int) -> str:
        return self.symbols[int(token_id)]

