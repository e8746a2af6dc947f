"""`amos-ds export`: what transformers loads from the folder (trust_remote_code) computes what amos-ds computes, the
tokenizer gives amos-ds's ids, and a tokenizer that does not match the checkpoint is refused."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amos_ds.cli import main as cli_main
from amos_ds.config import get_preset
from amos_ds.data.tokenizer import Tokenizer, train_tokenizer
from amos_ds.finetune.pretrained import EncoderSource, load_weights, locate_checkpoint
from amos_ds.model import AMOSModel
from amos_ds.vocab import AMOS_DS_CLS, AMOS_DS_SEP

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n"
        "Sphinx of black quartz, judge my vow; 1234 -- naïve café, übergroße Äpfel.\n") * 40
SENTENCES = ["The lazy fox judges quartz.", "Five dozen jugs, my vow!", "naïve Äpfel\nover the dog", "zebra 999"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """Two different tokenizers of 400 pieces."""
    root = tmp_path_factory.mktemp("tokenizers")
    (root / "a.txt").write_text(TEXT)
    (root / "b.txt").write_text(TEXT.upper())
    train_tokenizer([str(root / "a.txt")], 400, str(root / "a"))
    train_tokenizer([str(root / "b.txt")], 400, str(root / "b"))
    return root / "a", root / "b"


def state_dict_checkpoint(root: Path) -> tuple[Path, Path, AMOSModel]:
    config = get_preset("tiny", vocab_size=400, disc_layers=3)
    torch.manual_seed(0)
    model = AMOSModel(config).eval()
    with torch.no_grad():  # make the relative bias and LayerNorm weights matter
        for name, param in model.named_parameters():
            if "norm" in name or "relative_bias" in name:
                param.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.3)
    torch.save(model.state_dict(), root / "model.pt")
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    return root / "model.pt", root / "config.json", model


def test_export_gives_amos_ds_hidden_states_and_ids(tokenizers, tmp_path):
    tokenizer_dir, _ = tokenizers
    weights, config_file, _ = state_dict_checkpoint(tmp_path)
    out = tmp_path / "hf"
    assert cli_main(["export", str(weights), str(out), "--model-config", str(config_file),
                     "--tokenizer", str(tokenizer_dir)]) == 0
    assert {"model.safetensors", "config.json", "modeling_amos_ds.py", "tokenization_amos_ds.py", "tokenizer.model",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    ours = Tokenizer(tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert (theirs.pad_token_id, theirs.cls_token_id, theirs.sep_token_id, theirs.mask_token_id,
            theirs.unk_token_id) == (0, 1, 2, 3, 4)
    for sentence in SENTENCES:
        assert theirs(sentence)["input_ids"] == [AMOS_DS_CLS, *ours.encode(sentence), AMOS_DS_SEP], sentence
    pair = theirs(SENTENCES[0], SENTENCES[1])["input_ids"]
    assert pair == [AMOS_DS_CLS, *ours.encode(SENTENCES[0]), AMOS_DS_SEP, *ours.encode(SENTENCES[1]), AMOS_DS_SEP]

    batch = theirs(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # padding is in the test
    checkpoint = load_weights(locate_checkpoint(weights, str(config_file)))
    encoder = EncoderSource(checkpoint.config, ours, checkpoint.state, "file").build(dropout=0.1).eval()
    with torch.no_grad():
        expected = encoder(batch["input_ids"], batch["attention_mask"])
        base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        hidden = base(**batch).last_hidden_state
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
            out, trust_remote_code=True, num_labels=3).eval()
        outputs = classifier(**batch, output_hidden_states=True)
        tagger = transformers.AutoModelForTokenClassification.from_pretrained(out, trust_remote_code=True,
                                                                              num_labels=5).eval()
    real = batch["attention_mask"].bool()
    assert torch.allclose(hidden[real], expected[real], atol=1e-5, rtol=0)
    assert torch.allclose(outputs.hidden_states[-1][real], expected[real], atol=1e-5, rtol=0)
    assert outputs.logits.shape == (4, 3) and tagger(**batch).logits.shape == (*batch["input_ids"].shape, 5)
    assert torch.equal(tagger.amos_ds.token_embedding.weight, checkpoint.state["token_embedding"])
    assert not (out / "generator").exists()


def test_generator_export_gives_the_deepest_heads_logits(tokenizers, tmp_path):
    tokenizer_dir, _ = tokenizers
    weights, config_file, model = state_dict_checkpoint(tmp_path)
    with torch.no_grad():
        model.mlm_head.bias.normal_()
    torch.save(model.state_dict(), weights)
    out = tmp_path / "hf"
    assert cli_main(["export", str(weights), str(out), "--model-config", str(config_file),
                     "--tokenizer", str(tokenizer_dir), "--generator"]) == 0
    generator = transformers.AutoModelForMaskedLM.from_pretrained(out / "generator", trust_remote_code=True).eval()
    batch = transformers.AutoTokenizer.from_pretrained(out / "generator", trust_remote_code=True)(
        SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.generator_features(batch["input_ids"], batch["attention_mask"])[-1]  # the deepest head's
        head = model.mlm_head
        expected = head.norm(F.gelu(head.dense(features))) @ model.token_embedding.t() + head.bias
        logits = generator(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], expected[real], atol=1e-5, rtol=0)


def test_mismatched_tokenizer_and_existing_output_are_refused_in_one_line(tokenizers, tmp_path, capsys):
    tokenizer_dir, other_dir = tokenizers
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    weights, config_file, _ = state_dict_checkpoint(tmp_path)
    # A plain state-dict file has no recorded tokenizer: the vocabulary size is what can be checked.
    assert cli_main(["export", str(weights), str(tmp_path / "small"), "--model-config", str(config_file),
                     "--tokenizer", str(REPO / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope: not a tokenizer folder" in err and err.count("\n") == 1, err
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "vocab_size": 512}))
    assert cli_main(["export", str(weights), str(tmp_path / "out"), "--model-config", str(config_file),
                     "--tokenizer", str(other_dir)]) == 2
    err = capsys.readouterr().err
    assert "400 pieces, but the model has vocab_size 512" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    assert cli_main(["export", str(weights), str(tmp_path / "taken"), "--tokenizer", str(tokenizer_dir)]) == 2
    assert "taken: already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_exports_a_zero3_run_with_its_own_tokenizer_and_refuses_another(tokenizers, tmp_path, capsys,
                                                                       pretrain_tiny):
    _, other_dir = tokenizers
    run_dir = pretrain_tiny(steps=1, zero_stage=3, vocab_size=400, batch=4)

    assert cli_main(["export", str(run_dir), str(tmp_path / "bad"), "--tokenizer", str(other_dir)]) == 2
    err = capsys.readouterr().err
    assert "was pretrained with" in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()

    assert cli_main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    checkpoint = load_weights(locate_checkpoint(run_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    encoder = EncoderSource(checkpoint.config, None, checkpoint.state, "run").build(dropout=0.1).eval()
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        expected = encoder(batch["input_ids"], batch["attention_mask"])
        hidden = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(hidden[real], expected[real], atol=1e-5, rtol=0)
