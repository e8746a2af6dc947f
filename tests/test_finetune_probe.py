"""Linear probes on frozen features: a task a linear model on the features must solve, and `amos-ds probe`."""

import pytest
import torch

from amos_ds.cli import main as amos_ds
from amos_ds.config import get_preset
from amos_ds.data.tokenizer import Tokenizer, train_tokenizer
from amos_ds.finetune.pretrained import TextEncoder, encoder_state
from amos_ds.finetune.probe import load_probe_task, probe_accuracy, score_discriminator
from amos_ds.model import AMOSModel

ANIMALS = ["cat", "dog", "bird", "horse", "fish", "mouse"]
PLACES = ["mat", "roof", "boat", "chair", "wall", "field", "river"]


def sentence(i: int) -> str:
    return f"the {ANIMALS[i % len(ANIMALS)]} sat on the {PLACES[i % len(PLACES)]} today"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Label = whether the animal is a cat or a dog: 2 of 6 animals, so the majority class (no) is right 2/3 of the
    time. Train holds every one of the 42 (animal, place) sentences that dev holds, so a linear model on features
    that tell the sentences apart (any encoder's, random init included) must be right on all of dev."""
    root = tmp_path_factory.mktemp("probe")
    (root / "text.txt").write_text("".join(f"{sentence(i)} number {i} of {i * 7}\n" for i in range(3000)))
    train_tokenizer([str(root / "text.txt")], 400, str(root / "tokenizer"))
    for split, numbers in (("train", range(0, 240)), ("dev", range(240, 330)), ("test", range(330, 360))):
        rows = [f"{'yes' if ANIMALS[i % 6] in ('cat', 'dog') else 'no'}\t{sentence(i)}" for i in numbers]
        (root / "mr").mkdir(exist_ok=True)
        (root / "mr" / f"{split}.tsv").write_text("label\tsentence\n" + "\n".join(rows) + "\n")
    return root


def test_probe_accuracy_of_separable_features_is_perfect_and_of_noise_near_chance():
    torch.manual_seed(0)
    labels = torch.arange(200) % 2
    features = torch.randn(200, 5, dtype=torch.float64) + 3.0 * labels[:, None]  # shifted along every unit
    assert probe_accuracy(features[:100], labels[:100], features[100:], labels[100:], 2) == 1.0
    noise = torch.randn(200, 5, dtype=torch.float64)
    assert probe_accuracy(noise[:100], labels[:100], noise[100:], labels[100:], 2) < 0.7


def test_probe_beats_majority_on_a_task_readable_off_the_features(task):
    tokenizer = Tokenizer(task / "tokenizer")
    sample = load_probe_task(task / "mr", tokenizer, max_len=32, max_train_examples=12)
    assert [ids for ids, _ in sample.train] == [ids for ids, _ in load_probe_task(
        task / "mr", tokenizer, max_len=32).train[::20]]  # spread over the file, not its first 12
    probe_task = load_probe_task(task / "mr", tokenizer, max_len=32)
    assert len(probe_task.train) == 240 and probe_task.majority == pytest.approx(60 / 90)
    torch.manual_seed(0)
    config = get_preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    encoder = TextEncoder(config)
    encoder.load_state_dict(encoder_state(AMOSModel(config).state_dict()))  # random init: the token tells
    scores = score_discriminator(encoder.eval(), probe_task)
    assert scores["probe_task"] == "mr" and scores["probe_majority"] == pytest.approx(60 / 90)
    assert scores["probe_accuracy"] == 1.0


def test_probe_command_prints_one_row_per_layer(task, capsys):
    assert amos_ds(["probe", "none", "--task", str(task / "mr"), "--tokenizer", str(task / "tokenizer"),
                    "--preset", "tiny", "--max-len", "32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| generator")
            or line.startswith("| discriminator")]
    tiny = get_preset("tiny")
    assert [row.split(" | ")[:2] for row in rows] == (
        [["| generator", str(layer)] for layer in range(1, tiny.gen_layers + 1)]
        + [["| discriminator", str(layer)] for layer in range(1, tiny.disc_layers + 1)])
    assert all(row.endswith("| 0.6667 |") and float(row.split(" | ")[2]) == 1.0 for row in rows)  # as above
    assert amos_ds(["probe", "none", "--task", str(task / "missing"), "--tokenizer", str(task / "tokenizer")]) == 2
    assert f"--task {task / 'missing'}: not a folder" in capsys.readouterr().err
