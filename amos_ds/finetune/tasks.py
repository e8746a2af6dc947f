"""Sentence and sentence-pair tasks in GLUE's TSV format: TASK_DIR/{train,dev,test}.tsv, a header naming the columns.

The text is one column (`sentence`, as in SST-2, CoLA or Pang & Lee's movie reviews) or two (`sentence1` and
`sentence2`, as in MRPC, RTE or STS-B); `--text-columns` names others (e.g. `question sentence` for QNLI). Labels
are in `label` (or `--label-column`): strings for classification, whose order is the sorted set of training labels,
or floats for regression (STS-B). Other columns are ignored.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from amos_ds.data.tokenizer import SentencepieceTokenizer
from amos_ds.errors import DataError

SPLITS = ("train", "dev", "test")
SINGLE, PAIR = ("sentence",), ("sentence1", "sentence2")


@dataclass(frozen=True)
class Example:
    label: str
    text: str
    text_pair: str | None = None


@dataclass
class Task:
    name: str
    labels: list[str]  # classification: the label strings, in class-index order; regression: empty
    train: list[Example]
    dev: list[Example]
    test: list[Example]

    @property
    def regression(self) -> bool:
        return not self.labels


def text_columns_of(header: list[str], path: Path) -> tuple[str, ...]:
    """`sentence1 sentence2` when the header has both, else `sentence`."""
    if set(PAIR) <= set(header):
        return PAIR
    if SINGLE[0] in header:
        return SINGLE
    raise DataError(f"{path}:1: header {header} has neither `sentence` nor `sentence1`/`sentence2`; name the text "
                    "columns with --text-columns")


def read_tsv(path: str | Path, text_columns: tuple[str, ...] | None = None,
             label_column: str = "label") -> list[Example]:
    """Examples of one split; any malformed line fails with the file, the line number and what to fix."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; a task folder holds train.tsv, dev.tsv and test.tsv") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable as UTF-8 text ({err}); give a tab-separated text file") from None
    if not lines:
        raise DataError(f"{path}: empty; expected a header line naming the `{label_column}` and text columns")
    header = lines[0].split("\t")
    text_columns = tuple(text_columns or text_columns_of(header, path))
    missing = [name for name in (label_column, *text_columns) if name not in header]
    if missing:
        raise DataError(f"{path}:1: header {header} lacks the column(s) {missing}; the first line must name the "
                        "tab-separated columns, e.g. `id<TAB>label<TAB>sentence`, or use --label-column and "
                        "--text-columns")
    label_at, text_at = header.index(label_column), [header.index(name) for name in text_columns]
    examples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{number}: {len(fields)} tab-separated fields, the header has {len(header)}; "
                            "tabs inside a sentence must be replaced by spaces")
        texts = [fields[i] for i in text_at]
        if not fields[label_at].strip() or not all(text.strip() for text in texts):
            raise DataError(f"{path}:{number}: empty label or text; remove the line or fill it in")
        examples.append(Example(fields[label_at].strip(), *texts))
    if not examples:
        raise DataError(f"{path}: a header but no examples; add at least one line")
    return examples


def load_task(directory: str | Path, text_columns: tuple[str, ...] | None = None, label_column: str = "label",
              regression: bool = False) -> Task:
    """All three splits; classification labels of dev and test must occur in train, regression labels be numbers."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--task-dir {directory}: not a folder; give one holding train.tsv, dev.tsv and test.tsv")
    if text_columns is not None and len(text_columns) not in (1, 2):
        raise DataError(f"--text-columns {' '.join(text_columns)}: give one column, or two for sentence pairs")
    splits = {split: read_tsv(directory / f"{split}.tsv", text_columns, label_column) for split in SPLITS}
    if regression:
        for split, examples in splits.items():
            for number, example in enumerate(examples, start=2):
                try:
                    float(example.label)
                except ValueError:
                    raise DataError(f"{directory / f'{split}.tsv'}:{number}: label {example.label!r} is not a "
                                    "number; --regression needs float labels") from None
        return Task(directory.name, [], **splits)
    labels = sorted({example.label for example in splits["train"]})
    if len(labels) < 2:
        raise DataError(f"{directory / 'train.tsv'}: only label(s) {labels}; a classification task needs two or more "
                        "(float scores: pass --regression)")
    for split in ("dev", "test"):
        unknown = sorted({example.label for example in splits[split]} - set(labels))
        if unknown:
            raise DataError(f"{directory / f'{split}.tsv'}: label(s) {unknown} never occur in train.tsv "
                            f"(its labels: {labels}); fix the labels or the split")
    return Task(directory.name, labels, **splits)


def truncate_pair(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the end of the longer text until both fit `budget` (BERT's longest-first truncation)."""
    first, second = list(first), list(second)
    while len(first) + len(second) > budget:
        (first if len(first) >= len(second) else second).pop()
    return first, second


def encode(examples: list[Example], tokenizer: SentencepieceTokenizer, labels: list[str],
           max_len: int) -> list[tuple[list[int], int | float]]:
    """The tokenizer's layout of one text or a pair ([CLS] A [SEP] or [CLS] A [SEP] B [SEP] for amos-ds's, <s> A </s>
    </s> B </s> for the release's), cut to max_len tokens; each label's index (classification) or value (regression,
    when `labels` is empty)."""
    special = tokenizer.special
    index = {label: i for i, label in enumerate(labels)}
    encoded = []
    for example in examples:
        target = index[example.label] if labels else float(example.label)
        ids = tokenizer.encode(example.text)
        if example.text_pair is None:
            encoded.append((special.single(ids[:max_len - 2]), target))
        else:
            first, second = truncate_pair(ids, tokenizer.encode(example.text_pair), max_len - special.pair_overhead)
            encoded.append((special.pair(first, second), target))
    return encoded


def batches(encoded: list[tuple[list[int], int | float]], batch_size: int, pad_id: int,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches in order, or shuffled by `generator`; each padded (with the tokenizer's `pad_id`) only to its
    own longest input."""
    order = torch.randperm(len(encoded), generator=generator).tolist() if generator else list(range(len(encoded)))
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask,
               "labels": torch.tensor([label for _, label in chunk])}
