"""Sentence-classification tasks as TSV files: TASK_DIR/{train,dev,test}.tsv, a header naming `label` and `sentence`.

The Pang & Lee movie-review format (`id  label  sentence`) is one instance; other columns are ignored. Labels are
strings; their order is the sorted set of training labels.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from amos_ds.data.errors import DataError
from amos_ds.data.tokenizer import Tokenizer
from amos_ds.vocab import CLS_ID, PAD_ID, SEP_ID

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Example:
    label: str
    sentence: str


@dataclass
class Task:
    name: str
    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def read_tsv(path: str | Path) -> list[Example]:
    """Examples of one split; any malformed line fails with the file, the line number and what to fix."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; a task folder holds train.tsv, dev.tsv and test.tsv") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable as UTF-8 text ({err}); give a tab-separated text file") from None
    if not lines:
        raise DataError(f"{path}: empty; expected a header line with `label` and `sentence` columns")
    header = lines[0].split("\t")
    if "label" not in header or "sentence" not in header:
        raise DataError(f"{path}:1: header {header} lacks a `label` or `sentence` column; the first line must name "
                        "the tab-separated columns, e.g. `id<TAB>label<TAB>sentence`")
    label_col, sentence_col = header.index("label"), header.index("sentence")
    examples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{number}: {len(fields)} tab-separated fields, the header has {len(header)}; "
                            "tabs inside a sentence must be replaced by spaces")
        if not fields[label_col].strip() or not fields[sentence_col].strip():
            raise DataError(f"{path}:{number}: empty label or sentence; remove the line or fill it in")
        examples.append(Example(fields[label_col].strip(), fields[sentence_col]))
    if not examples:
        raise DataError(f"{path}: a header but no examples; add at least one line")
    return examples


def load_task(directory: str | Path) -> Task:
    """All three splits; dev and test labels must occur in train."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--task-dir {directory}: not a folder; give one holding train.tsv, dev.tsv and test.tsv")
    splits = {split: read_tsv(directory / f"{split}.tsv") for split in SPLITS}
    labels = sorted({example.label for example in splits["train"]})
    if len(labels) < 2:
        raise DataError(f"{directory / 'train.tsv'}: only label(s) {labels}; a classification task needs two or more")
    for split in ("dev", "test"):
        unknown = sorted({example.label for example in splits[split]} - set(labels))
        if unknown:
            raise DataError(f"{directory / f'{split}.tsv'}: label(s) {unknown} never occur in train.tsv "
                            f"(its labels: {labels}); fix the labels or the split")
    return Task(directory.name, labels, **splits)


def encode(examples: list[Example], tokenizer: Tokenizer, labels: list[str],
           max_len: int) -> list[tuple[list[int], int]]:
    """[CLS] sentence [SEP], the sentence cut to fit max_len tokens, with each label's index."""
    index = {label: i for i, label in enumerate(labels)}
    return [([CLS_ID, *tokenizer.encode(e.sentence)[:max_len - 2], SEP_ID], index[e.label]) for e in examples]


def batches(encoded: list[tuple[list[int], int]], batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in order, or shuffled by `generator`; each padded only to its own longest sentence."""
    order = torch.randperm(len(encoded), generator=generator).tolist() if generator else list(range(len(encoded)))
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask,
               "labels": torch.tensor([label for _, label in chunk])}
