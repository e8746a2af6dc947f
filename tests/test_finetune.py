"""Fine-tuning: loading the kept encoder exactly, the paper's head, learning a synthetic task, TSV errors, and
(when the trainer is there) fine-tuning from a real `amos_ds/pretrain.py` checkpoint."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amos_ds import cli
from amos_ds.config import get_preset
from amos_ds.data.tokenizer import Tokenizer, train_tokenizer
from amos_ds.errors import ConfigError, DataError
from amos_ds.finetune import metrics
from amos_ds.finetune.classifier import ClassificationHead, SentenceClassifier
from amos_ds.finetune.grid import PAPER_GRID, SMALL_MODEL_GRID, Grid, best_setting, default_grid, median_scores
from amos_ds.finetune.pretrained import EncoderSource, find_tokenizer, load_source, load_weights, locate_checkpoint
from amos_ds.finetune.run import FinetuneConfig, learned, trivial_train_loss
from amos_ds.finetune.tasks import Example, Task, batches, encode, load_task, read_tsv, truncate_pair
from amos_ds.model import AMOSModel
from amos_ds.vocab import AMOS_DS_CLS, AMOS_DS_PAD, AMOS_DS_SEP

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "amos_ds" / "pretrain.py"
FILLERS = ("the of and a to in is was it for on that with as this film story plot actors scene director music "
           "ending script movie cast one its by").split()
CUES = {"1": "splendid", "0": "dreadful"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine a second OpenMP thread waits on the other job's core (7-30x
    slower steps were measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_split(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """Filler sentences whose label is given by one cue word at a random position: easy to learn from scratch."""
    rows = []
    for _ in range(size):
        label = rng.choice("01")
        words = rng.choices(FILLERS, k=rng.randint(5, 12))
        words.insert(rng.randint(0, len(words)), CUES[label])
        rows.append((label, " ".join(words)))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("id\tlabel\tsentence\n" + "".join(f"{i}\t{label}\t{s}\n" for i, (label, s) in enumerate(rows)))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """(task folder, tokenizer folder) for the synthetic cue-word task."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    task = root / "cue"
    task.mkdir()
    for split, size in (("train", 480), ("dev", 120), ("test", 200)):
        write_tsv(task / f"{split}.tsv", synthetic_split(rng, size))
    text = root / "text.txt"
    text.write_text("\n".join(s for _, s in synthetic_split(rng, 2000)) + "\n")
    train_tokenizer([str(text)], 400, str(root / "tokenizer"))
    return task, root / "tokenizer"


def finetune_cli(*flags: str) -> int:
    return cli.main(["finetune", *flags])


def test_state_dict_file_reproduces_discriminator_hidden_states(tmp_path):
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = AMOSModel(config).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

    checkpoint = load_weights(locate_checkpoint(tmp_path / "model.pt", str(tmp_path / "config.json")))
    assert checkpoint.config == config
    assert set(checkpoint.state) == {"token_embedding"} | {f"discriminator.{k}" for k in
                                                           model.discriminator.state_dict()}
    encoder = EncoderSource(config, None, checkpoint.state, "file").build(dropout=0.1).eval()
    input_ids = torch.randint(5, config.vocab_size, (3, 17))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    with torch.no_grad():
        expected = model.discriminator(F.embedding(input_ids, model.token_embedding), attention_mask)[-1]
        assert torch.equal(encoder(input_ids, attention_mask), expected)


def test_classification_head_is_dropout_dense_tanh_dropout_out_on_cls():
    torch.manual_seed(0)
    config = get_preset("tiny")
    head = ClassificationHead(config.hidden_size, 3, dropout=0.1)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    assert head[0].p == head[3].p == 0.1
    assert head[4].weight.shape == (3, config.hidden_size) and not head[4].bias.any()

    model = SentenceClassifier(EncoderSource(config, None, None, "random").build(0.1), 3, dropout=0.1).eval()
    for layer in (model.head[1], model.head[4]):
        nn.init.normal_(layer.bias)  # non-zero, so the hand computation checks them too
    input_ids = torch.randint(5, config.vocab_size, (2, 9))
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        cls = model.encoder(input_ids, mask)[:, 0]
        dense, out = model.head[1], model.head[4]
        by_hand = torch.tanh(cls @ dense.weight.T + dense.bias) @ out.weight.T + out.bias
        assert torch.allclose(model(input_ids, mask), by_hand, atol=1e-6)
    model.train()  # dropout is active in training
    assert not torch.equal(model(input_ids, mask), model(input_ids, mask))


def test_padding_changes_no_classifier_logit():
    """A padded batch gives each sentence the logits and hidden states it gets alone, whatever the padding holds."""
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = SentenceClassifier(EncoderSource(config, None, None, "random").build(0.1), 3, dropout=0.1).eval()
    lengths = (14, 6)
    sentences = [torch.cat([torch.tensor([1]), torch.randint(5, config.vocab_size, (n - 1,))]) for n in lengths]
    with torch.no_grad():
        alone = [(model(ids[None], torch.ones(1, len(ids), dtype=torch.long)),
                  model.encoder(ids[None], torch.ones(1, len(ids), dtype=torch.long))) for ids in sentences]
        attention_mask = torch.stack([(torch.arange(20) < n).long() for n in lengths])
        for filler in (torch.zeros(20, dtype=torch.long), torch.randint(5, config.vocab_size, (20,))):
            input_ids = torch.stack([torch.cat([ids, filler[len(ids):]]) for ids in sentences])
            logits, hidden = model(input_ids, attention_mask), model.encoder(input_ids, attention_mask)
            for row, (n, (single_logits, single_hidden)) in enumerate(zip(lengths, alone)):
                torch.testing.assert_close(logits[row], single_logits[0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(hidden[row, :n], single_hidden[0], rtol=1e-5, atol=1e-5)


def test_batches_pad_each_batch_to_its_longest_sentence_and_mask_the_padding():
    encoded = [([1, 7, 8, 2], 0), ([1, 9, 2], 1), ([1, 5, 6, 7, 8, 2], 1)]
    first, second = batches(encoded, batch_size=2, pad_id=AMOS_DS_PAD)
    assert first["input_ids"].tolist() == [[1, 7, 8, 2], [1, 9, 2, AMOS_DS_PAD]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert first["labels"].tolist() == [0, 1]
    assert second["attention_mask"].tolist() == [[1] * 6] and second["labels"].tolist() == [1]


def test_lr_grid_picks_the_rate_that_learns_and_warns_only_when_none_did(synthetic, tmp_path, capsys):
    """In three epochs lr 1e-6 leaves random-init tiny at the loss of a constant prediction (ln 2 here), lr 1e-3 learns
    the cue word: the grid must pick 1e-3 by median dev accuracy, and warn only when 1e-6 is all it was given."""
    task, tokenizer = synthetic
    common = ("--pretrained", "none", "--preset", "tiny", "--tokenizer", str(tokenizer), "--task-dir", str(task),
              "--batch-size", "16", "--warmup", "0.1", "--max-len", "32")
    assert finetune_cli(*common, "--lr", "1e-6", "1e-3", "--epochs", "3", "--seeds", "1", "2",
                        "--output", str(tmp_path / "grid")) == 0
    out, err = capsys.readouterr()
    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert results["sizes"] == {"train": 480, "dev": 120, "test": 200}
    assert [(s["lr"], s["batch_size"]) for s in results["settings"]] == [(1e-6, 16), (1e-3, 16)]
    stuck, learning = results["settings"]
    assert results["best"] == {"lr": 1e-3, "batch_size": 16}
    assert results["median"] == learning["median"] and results["runs"] == learning["runs"]
    assert [run["learned"] for run in stuck["runs"]] == [False, False]
    assert [run["learned"] for run in learning["runs"]] == [True, True]
    trivial = results["trivial_train_loss"]
    assert 0.69 < trivial <= math.log(2)  # 480 labels drawn half and half
    assert all(run["epochs"][-1]["train_loss"] > 0.95 * trivial for run in stuck["runs"])
    for run in learning["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [1, 2, 3]
        best = max(run["epochs"], key=lambda e: e["dev"]["accuracy"])
        assert (run["best_epoch"], run["dev"], run["test"]) == (best["epoch"], best["dev"], best["test"])
    assert results["metric"] == "accuracy" and set(results["median"]["test"]) == {"accuracy", "f1", "matthews"}
    seeds = [run["test"]["accuracy"] for run in results["runs"]]
    assert results["median"]["test"]["accuracy"] == pytest.approx(sum(seeds) / 2)  # the median of two is their mean
    assert results["median"]["dev"]["accuracy"] >= 0.95 and results["median"]["test"]["accuracy"] >= 0.95, results
    assert stuck["median"]["dev"]["accuracy"] < 0.8
    table = out.splitlines()
    assert [line.split()[:2] for line in table if line.endswith("<- best")] == [["0.001", "16"]]
    assert "best setting lr 0.001, batch 16; median over 2 seed(s)" in out
    assert "warning:" not in err

    assert finetune_cli(*common, "--lr", "1e-6", "--epochs", "1", "--seeds", "1",
                        "--output", str(tmp_path / "stuck")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: 1 of 1 seed(s) at the best setting (lr 1e-06, batch 16)")
    assert "did not learn; try a higher --lr" in warnings[0] and "more --epochs" in warnings[0]


def test_median_best_setting_and_trivial_loss_match_hand_computed_values():
    def run(dev: float, test: float, loss: float = 0.1) -> dict:
        return {"dev": {"accuracy": dev}, "test": {"accuracy": test}, "epochs": [{"train_loss": loss}]}

    # Each metric's median on its own: dev of (0.9, 0.5, 0.7) is 0.7, test of (0.6, 0.8, 0.2) is 0.6.
    assert median_scores([run(0.9, 0.6), run(0.5, 0.8), run(0.7, 0.2)]) == {"dev": {"accuracy": 0.7},
                                                                            "test": {"accuracy": 0.6}}
    assert median_scores([run(0.2, 0), run(0.8, 0), run(0.4, 0), run(0.6, 1)])["dev"]["accuracy"] == 0.5
    # The median, not the mean, ranks settings: (0.1, 0.9, 0.9) has median 0.9 and mean 0.63, beating a steady 0.8.
    steady = {"lr": 1e-5, "median": median_scores([run(0.8, 0.8)] * 3)}
    erratic = {"lr": 2e-5, "median": median_scores([run(0.1, 0.1), run(0.9, 0.7), run(0.9, 0.5)])}
    tied = {"lr": 3e-5, "median": median_scores([run(0.9, 0.1)])}
    assert best_setting([steady, erratic, tied], "accuracy") is erratic  # the first of the two at 0.9
    assert erratic["median"]["test"]["accuracy"] == 0.5

    three_to_one = [([1], 0), ([1], 0), ([1], 0), ([1], 1)]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623
    assert trivial_train_loss(Task("c", ["a", "b"], [], [], []), three_to_one) == pytest.approx(entropy)
    assert trivial_train_loss(Task("r", [], [], [], []), [([1], 1.0), ([1], 2.0), ([1], 3.0)]) == pytest.approx(2 / 3)
    assert learned(run(0, 0, loss=0.94 * entropy), entropy) and not learned(run(0, 0, loss=0.96 * entropy), entropy)


def test_default_grid_follows_the_encoders_width():
    assert default_grid(get_preset("base")) == PAPER_GRID == Grid((1e-5, 2e-5, 3e-5, 4e-5, 5e-5), (16, 32), 3)
    for preset in ("tiny", "small"):
        assert default_grid(get_preset(preset)) == SMALL_MODEL_GRID
    assert SMALL_MODEL_GRID.lr[0] > PAPER_GRID.lr[-1]
    config = FinetuneConfig(lr=[3e-4], seeds=[7]).with_defaults(get_preset("tiny"))
    assert (config.lr, config.batch_size, config.epochs, config.seeds) == ([3e-4], [16, 32], 10, [7])
    config = FinetuneConfig(epochs=2, batch_size=[8]).with_defaults(get_preset("base"))
    assert (config.lr, config.batch_size, config.epochs) == ([1e-5, 2e-5, 3e-5, 4e-5, 5e-5], [8], 2)


@pytest.mark.parametrize("content, message", [
    (None, "train.tsv: file not found"),
    ("", "train.tsv: empty"),
    ("id\tsentence\n1\tgood\n", "train.tsv:1: header ['id', 'sentence'] lacks the column(s) ['label']"),
    ("id\tlabel\ttext\n1\t1\tgood\n", "train.tsv:1: header ['id', 'label', 'text'] has neither `sentence` nor"),
    ("id\tlabel\tsentence\n1\t1\tgood\n2\t0\tbad\textra\n", "train.tsv:3: 4 tab-separated fields, the header has 3"),
    ("id\tlabel\tsentence\n1\t1\t \n", "train.tsv:2: empty label or text"),
    ("id\tlabel\tsentence\n", "train.tsv: a header but no examples"),
])
def test_tsv_errors_are_one_line_naming_file_and_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(DataError) as err:
        read_tsv(tmp_path / "train.tsv")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_dev_label_and_bad_flags_exit_2_with_one_line(synthetic, tmp_path, capsys):
    task, tokenizer = synthetic
    for split in ("train", "test"):
        (tmp_path / f"{split}.tsv").write_text((task / f"{split}.tsv").read_text())
    (tmp_path / "dev.tsv").write_text("id\tlabel\tsentence\n1\tneutral\tso so\n")
    with pytest.raises(DataError, match=r"dev.tsv: label\(s\) \['neutral'\] never occur in train.tsv"):
        load_task(tmp_path)
    cases = [(["--pretrained", "none", "--task-dir", str(task)], "--pretrained none: random init needs --tokenizer"),
             (["--pretrained", str(tmp_path / "nope"), "--task-dir", str(task)], "nope: no such file or folder"),
             (["--pretrained", "none", "--tokenizer", str(tokenizer), "--task-dir", str(tmp_path)], "dev.tsv"),
             (["--pretrained", "none", "--tokenizer", str(tokenizer), "--task-dir", str(task), "--max-len", "999",
               "--preset", "tiny"], "--max-len 999 exceeds the model's 128 positions")]
    for flags, message in cases:
        assert finetune_cli(*flags, "--output", str(tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_tokenizer_must_match_checkpoint(synthetic, tmp_path):
    _, tokenizer = synthetic
    config = get_preset("tiny", vocab_size=400)
    torch.save(AMOSModel(config).state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    checkpoint = load_weights(locate_checkpoint(tmp_path / "model.pt", str(tmp_path / "config.json")))
    assert find_tokenizer(checkpoint, str(tokenizer)).vocab_size == 400
    with pytest.raises(ConfigError, match="a state-dict file needs --tokenizer DIR"):
        find_tokenizer(checkpoint, None)
    checkpoint.meta = {"tokenizer_hash": "0123456789abcdef"}
    checkpoint.path = tmp_path / "run" / "checkpoints" / "step_00000001"
    with pytest.raises(ConfigError, match="hash .* but .* was pretrained with 0123456789abcdef"):
        find_tokenizer(checkpoint, str(tokenizer))
    with pytest.raises(ConfigError, match=f"is not at {tmp_path / 'run' / 'tokenizer'}; pass --tokenizer DIR"):
        find_tokenizer(checkpoint, None)
    checkpoint.meta = {}
    checkpoint.config = get_preset("tiny")
    with pytest.raises(ConfigError, match="400 pieces, but the model has vocab_size 1024"):
        find_tokenizer(checkpoint, str(tokenizer))


def test_reads_real_movie_reviews(shared_data):
    task = load_task(shared_data / "eval" / "mr")
    assert task.labels == ["0", "1"]
    assert (len(task.train), len(task.dev), len(task.test)) == (8501, 1044, 1060)


@pytest.mark.skipif(not PRETRAIN.exists(), reason="the trainer amos_ds/pretrain.py is not there yet")
@pytest.mark.slow
def test_finetunes_from_a_pretrain_checkpoint(synthetic, tmp_path, pretrain_tiny):
    task, _ = synthetic
    run_dir = pretrain_tiny(steps=2, zero_stage=1, vocab_size=1024)

    assert (run_dir / "tokenizer" / "tokenizer.model").is_file()
    source = load_source(str(run_dir))  # the newest checkpoint, and the tokenizer the run keeps in RUN_DIR/tokenizer
    assert source.description.endswith("checkpoints/step_00000002")
    assert source.tokenizer.hash == json.loads(Path(source.description, "amos_meta.json").read_text())["tokenizer_hash"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000002")
    loaded = source.build(dropout=0.1).state_dict()
    assert all(torch.equal(loaded[name], saved[name]) for name in loaded)
    assert finetune_cli("--pretrained", str(run_dir), "--task-dir", str(task), "--epochs", "1", "--seeds", "1",
                        "--lr", "1e-3", "--batch-size", "32", "--max-len", "32", "--output", str(tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["encoder"] == source.description


def cue_pairs(rng: random.Random, size: int) -> list[tuple[str, str, str]]:
    """(label, sentence1, sentence2): the label is the cue word in sentence2; sentence1 is filler only."""
    rows = []
    for label, sentence in synthetic_split(rng, size):
        rows.append((label, " ".join(rng.choices(FILLERS, k=rng.randint(4, 9))), sentence))
    return rows


def cue_counts(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """(score, sentence): the score is how many times `splendid` occurs (0 to 4), as a float."""
    rows = []
    for _ in range(size):
        count = rng.randint(0, 4)
        words = rng.choices(FILLERS, k=rng.randint(4, 8))
        for _ in range(count):
            words.insert(rng.randint(0, len(words)), "splendid")
        rows.append((f"{count:.1f}", " ".join(words)))
    return rows


def test_pair_and_regression_tasks_beat_the_trivial_baseline(synthetic, tmp_path):
    _, tokenizer = synthetic
    rng = random.Random(1)
    pairs, scores = tmp_path / "pairs", tmp_path / "scores"
    pairs.mkdir()
    scores.mkdir()
    for split, size in (("train", 480), ("dev", 100), ("test", 150)):
        (pairs / f"{split}.tsv").write_text("label\tsentence1\tsentence2\n" + "".join(
            f"{label}\t{a}\t{b}\n" for label, a, b in cue_pairs(rng, size)))
        (scores / f"{split}.tsv").write_text("index\tscore\ttext\n" + "".join(
            f"{i}\t{score}\t{text}\n" for i, (score, text) in enumerate(cue_counts(rng, size))))
    task = load_task(pairs)
    assert task.train[0].text_pair is not None and task.labels == ["0", "1"]
    common = ("--pretrained", "none", "--preset", "tiny", "--tokenizer", str(tokenizer), "--epochs", "3", "--lr",
              "1e-3", "--batch-size", "16", "--warmup", "0.1", "--seeds", "1", "--max-len", "48")
    assert finetune_cli(*common, "--task-dir", str(pairs), "--metric", "f1", "--output", str(tmp_path / "p")) == 0
    result = json.loads((tmp_path / "p" / "results.json").read_text())
    assert result["metric"] == "f1" and result["baseline"]["test"]["matthews"] == 0.0
    assert result["median"]["test"]["accuracy"] >= result["baseline"]["test"]["accuracy"] + 0.3, result["median"]

    assert finetune_cli(*common, "--task-dir", str(scores), "--regression", "--label-column", "score",
                        "--text-columns", "text", "--output", str(tmp_path / "r")) == 0
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["regression"] and result["metric"] == "spearman" and result["baseline"]["test"]["spearman"] == 0.0
    # The mean-score baseline correlates with nothing; three short epochs get the order of the scores right.
    assert result["median"]["test"]["spearman"] >= 0.8 and result["median"]["test"]["pearson"] >= 0.8, result


def test_pairs_are_cls_a_sep_b_sep_cut_longest_first(synthetic):
    _, tokenizer_dir = synthetic
    tokenizer = Tokenizer(tokenizer_dir)
    a, b = "the film story plot actors scene", "music"
    ids_a, ids_b = tokenizer.encode(a), tokenizer.encode(b)
    [(ids, label)] = encode([Example("2.5", a, b)], tokenizer, [], max_len=64)
    assert ids == [AMOS_DS_CLS, *ids_a, AMOS_DS_SEP, *ids_b, AMOS_DS_SEP] and label == 2.5
    [(ids, label)] = encode([Example("1", a, b)], tokenizer, ["0", "1"], max_len=len(ids_b) + 5)
    assert ids == [AMOS_DS_CLS, *ids_a[:2], AMOS_DS_SEP, *ids_b, AMOS_DS_SEP] and label == 1
    assert truncate_pair([1, 2, 3, 4], [5, 6, 7], 4) == ([1, 2], [5, 6])


def test_glue_metrics_match_hand_computed_values():
    predicted, gold = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    assert metrics.accuracy(predicted, gold) == 4 / 6
    assert metrics.f1(predicted, gold) == 0.75  # TP 3, 4 predicted positive, 4 gold positive: 2 * 3 / 8
    assert metrics.matthews(predicted, gold) == pytest.approx(0.25)  # (TP TN - FP FN) / sqrt(4 4 2 2) = 2 / 8
    assert metrics.matthews([0, 1, 2, 0, 1, 2], [0, 1, 1, 0, 2, 2]) == pytest.approx(0.5)  # (4*6 - 12) / (36 - 12)
    assert metrics.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # one predicted class: undefined, reported as 0
    # x - 2.5 = (-1.5, -.5, .5, 1.5), y - 2.75 = (-1.75, .25, -.75, 2.25): 5.5 / sqrt(5 * 8.75)
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 5]) == pytest.approx(5.5 / 43.75 ** 0.5)
    # ranks with ties averaged: (1, 2.5, 2.5, 4, 5) and (2, 1, 4.5, 4.5, 3); their Pearson r is 3.75 / 9.5
    assert metrics.ranks([1, 2, 2, 3, 5]) == [1, 2.5, 2.5, 4, 5]
    assert metrics.spearman([1, 2, 2, 3, 5], [2, 1, 4, 4, 3]) == pytest.approx(3.75 / 9.5)
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_a_file_that_is_not_a_state_dict_is_refused_with_its_cause(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny", vocab_size=400).to_dict()))
    (tmp_path / "model.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ConfigError) as raised:
        load_weights(locate_checkpoint(tmp_path / "model.pt", str(tmp_path / "config.json")))
    assert str(raised.value).startswith(f"--pretrained {tmp_path / 'model.pt'}: not a torch.save'd state dict "
                                        "(UnpicklingError: ")
    assert raised.value.__cause__ is not None
