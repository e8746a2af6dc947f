"""The authors' release format (microsoft/amos): its tokenizer's ids, its weights read into amos-ds's discriminator,
`amos-ds convert`, fine-tuning the release folder directly, and export back to it.

The release folder here is built in the test at a small config: a state dict with the release's names and shapes
(random weights), an sp.model trained here, a dict.txt in fairseq's format. What the release computes is written
below from the authors' definitions (microsoft/AMOS huggingface/amos/modeling_amos.py, tokenization_amos.py), not
with amos-ds's code.
"""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from conftest import PRETRAIN, REPO, subprocess_env

from amos_ds.data.release_tokenizer import ReleaseTokenizer, pre_tokenize
from amos_ds.data.tokenizer import load_tokenizer
from amos_ds.errors import ConfigError, DataError
from amos_ds.export.amos_release import encoder_from_release, model_config_from_release, read_release
from amos_ds.finetune.pretrained import TextEncoder, load_source
from amos_ds.finetune.tasks import Example, encode

TEXT = """The film opens in a quiet town, where nothing seems to happen.
He said, "it's fine" -- isn't it? She didn't answer; they'll see.
"Don't stop," she said - 'twas the dog's bone... (really!)
We'll meet at 10:30 a.m. in the U.S.A. office, won't we?
Prices rose 5% in 2021: bread, milk, and eggs cost more.
I'm sure they're right, but you've got to check what we'd do.
The story is simple; the actors are good and the music is loud.
Quoted text (with parentheses) and stuff... a [bracket] and {brace}.
WE'LL SEE WHAT THEY'RE DOING, AND WHAT THEY'VE DONE.""".splitlines()

RELEASE_CONFIG = {"vocab_size": None, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                  "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 64, "type_vocab_size": 2,
                  "initializer_range": 0.02, "layer_norm_eps": 1e-5, "rel_pos_bins": 16, "max_rel_pos": 32,
                  "layer_norm_type": "post", "model_type": "amos"}
LEFT_OUT = "bone"  # dict.txt leaves out this word's pieces: the release maps them to <unk>


def release_state_dict(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under the release's names and shapes, with a classification head outside `amos.`."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]

    def randn(*shape, scale=0.5, center=0.0):
        return center + scale * torch.randn(*shape, generator=generator)

    state = {"amos.embeddings.word_embeddings.weight": randn(config["vocab_size"], hidden),
             "amos.embeddings.position_embeddings.weight": randn(config["max_position_embeddings"], hidden),
             "amos.embeddings.token_type_embeddings.weight": randn(config["type_vocab_size"], hidden),
             "amos.embeddings.LayerNorm.weight": randn(hidden, center=1.0),
             "amos.embeddings.LayerNorm.bias": randn(hidden),
             "amos.relative_attention_bias.weight": randn(config["rel_pos_bins"], config["num_attention_heads"],
                                                          scale=2.0),
             "classifier.dense.weight": randn(hidden, hidden), "classifier.dense.bias": randn(hidden)}
    shapes = {"attention.self_attn.in_proj": (3 * hidden, hidden), "attention.self_attn.out_proj": (hidden, hidden),
              "intermediate.dense": (ffn, hidden), "output.dense": (hidden, ffn)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"amos.encoder.layer.{layer}."
        for name, (rows, columns) in shapes.items():
            state[prefix + name + ".weight"] = randn(rows, columns, scale=1 / math.sqrt(columns))
            state[prefix + name + ".bias"] = randn(rows, scale=0.1)
        for norm in ("attention.LayerNorm", "output.LayerNorm"):
            state[prefix + norm + ".weight"] = randn(hidden, center=1.0, scale=0.2)
            state[prefix + norm + ".bias"] = randn(hidden, scale=0.2)
    return state


def build_release_folder(folder: Path, seed: int = 0) -> Path:
    """A release-format folder: sp.model trained on TEXT, dict.txt (its pieces in reversed order, fairseq format,
    those of LEFT_OUT missing), config.json and pytorch_model.bin."""
    folder.mkdir(parents=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 3), model_writer=model, vocab_size=120,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2)
    (folder / "sp.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    left_out = set(sp.encode(LEFT_OUT, out_type=str))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size() - 1, 2, -1)]  # 0-2: <unk> <s> </s>
    pieces = [piece for piece in pieces if piece not in left_out]
    (folder / "dict.txt").write_text("".join(f"{piece} {1000 - i}\n" for i, piece in enumerate(pieces)))
    config = {**RELEASE_CONFIG, "vocab_size": 4 + len(pieces) + 1}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(release_state_dict(config, torch.Generator().manual_seed(seed)), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return build_release_folder(tmp_path_factory.mktemp("release") / "amos")


# ---- the tokenizer ----------------------------------------------------------------------------------------------

# What the release's pre-tokenizer makes of each line, worked out by hand from its rules: `` and '' become ", curly
# quotes and the acute accent become ', curly double quotes ", em and en dashes -; each whitespace-separated word
# loses its leading and trailing runs of punctuation to words of their own (an all-punctuation word stays whole);
# "' s", "' m", "' d", "' t" (either case), "' ll", "' re", "' ve" and their upper-case forms are joined again.
PRE_TOKENIZED = {
    'He said, "it\'s fine" -- isn\'t it?': 'He said , " it\'s fine " -- isn\'t it ?',
    "\u201cDon\u2019t stop,\u201d she said \u2014 \u2018twas the dog\u2019s bone\u2026":
        "\" Don't stop ,\" she said - ' twas the dog's bone \u2026",
    "I ' m sure they ' ll come , won ' t they ? WE ' LL SEE.": "I 'm sure they 'll come , won 't they ? WE 'LL SEE .",
    "``Quoted'' text (with parentheses) and U.S.A. stuff...":
        "\" Quoted \" text ( with parentheses ) and U.S.A . stuff ...",
    "  spaces\tand\ttabs  ,at the ends  ": "spaces and tabs , at the ends",
    "'s ' S 'twas": "'s 'S ' twas",
}


def expected_ids(folder: Path, line: str) -> list[int]:
    """The release's ids of `line`, from its rules: sentencepiece pieces of the pre-tokenized line, minus each lone
    "▁" that ends the line or precedes punctuation; a fairseq dictionary's ids (<s> <pad> </s> <unk>, dict.txt's
    lines in order, <mask>); pieces not in it are <unk> (3)."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    pieces = sp.encode(PRE_TOKENIZED[line], out_type=str)
    punctuation = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\u2026")
    kept = [piece for i, piece in enumerate(pieces)
            if piece != "\u2581" or (i + 1 < len(pieces) and pieces[i + 1][0] not in punctuation)]
    dictionary = ["<s>", "<pad>", "</s>", "<unk>"] + [line.split(" ")[0] for line in
                                                      (folder / "dict.txt").read_text().splitlines()]
    return [dictionary.index(piece) if piece in dictionary else 3 for piece in kept]


@pytest.mark.parametrize("line", list(PRE_TOKENIZED))
def test_pre_tokenizer_follows_the_release_rules(line):
    assert pre_tokenize(line) == PRE_TOKENIZED[line]


def test_release_tokenizer_gives_the_release_ids(release):
    tokenizer = load_tokenizer(release)
    assert isinstance(tokenizer, ReleaseTokenizer)
    dict_lines = len((release / "dict.txt").read_text().splitlines())
    special = tokenizer.special
    assert (special.cls, special.pad, special.sep, special.unk) == (0, 1, 2, 3)
    assert special.mask == 4 + dict_lines == tokenizer.vocab_size - 1 and special.ordinary == (4, special.mask)
    unknown = 0
    for line in PRE_TOKENIZED:
        ids = tokenizer.encode(line)
        assert ids == expected_ids(release, line), line
        unknown += ids.count(3)
    assert unknown > 0  # a line has "bone", whose pieces dict.txt leaves out
    assert tokenizer.decode(tokenizer.encode("the film opens")) == "the film opens"


def test_release_pairs_and_documents(release):
    tokenizer = load_tokenizer(release)
    first, second = "Is it fine?", "Yes, it's fine."
    ids_a, ids_b = tokenizer.encode(first), tokenizer.encode(second)
    [(pair, _), (single, _)] = encode([Example("1", first, second), Example("0", first)], tokenizer, ["0", "1"], 64)
    assert pair == [0, *ids_a, 2, 2, *ids_b, 2] and single == [0, *ids_a, 2]
    # Cut to max_len with the pair's four special tokens, longest first.
    [(cut, _)] = encode([Example("1", first, second)], tokenizer, ["0", "1"], len(ids_a) + len(ids_b) + 3)
    assert len(cut) == len(ids_a) + len(ids_b) + 3 and cut[-1] == 2 and cut.count(2) == 3
    tokens, lengths = tokenizer.encode_documents(["Is it fine?\nYes.", "No."])
    assert tokens.tolist() == [*ids_a, *tokenizer.encode("Yes."), 2, *tokenizer.encode("No."), 2]
    assert lengths.tolist() == [len(ids_a) + len(tokenizer.encode("Yes.")) + 1, len(tokenizer.encode("No.")) + 1]


def test_bad_dictionary_is_one_clear_error(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 3), model_writer=model, vocab_size=100,
                                   minloglevel=2)
    (folder / "sp.model").write_bytes(model.getvalue())
    for text, message in (("a 1\nb\n", r"dict.txt:2: 'b' is not `PIECE COUNT`"),
                          ("a 1\na 2\n", r"dict.txt:2: 'a' appears twice"),
                          ("<mask> 1\n", r"dict.txt:1: holds <mask>")):
        (folder / "dict.txt").write_text(text)
        with pytest.raises(DataError, match=message):
            ReleaseTokenizer(folder)
    (folder / "dict.txt").write_text("a 1\n<unk> 5 #fairseq:overwrite\n")  # fairseq gives the piece a new id
    assert ReleaseTokenizer(folder).index["<unk>"] == 5


# ---- the weights ------------------------------------------------------------------------------------------------

def authors_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """modeling_amos.relative_position_bucket: half the buckets per sign; below half of those exact, above that
    logarithmic up to max_distance, capped."""
    sign = torch.sign(relative)
    half = num_buckets // 2
    n = relative.abs()
    max_exact = half // 2
    large = max_exact + torch.ceil(torch.log(n.float().clamp(min=1) / max_exact)
                                   / math.log((max_distance - 1) / max_exact) * (half - 1 - max_exact)).long()
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return torch.where(n < max_exact, n, large) * sign


def release_forward(state: dict, config: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """AMOSModel.forward of the release, fp32, eval mode, token_type_ids None (as run_glue.py passes)."""
    def w(name):
        return state["amos." + name]

    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    batch, length = input_ids.shape
    x = w("embeddings.word_embeddings.weight")[input_ids] + w("embeddings.position_embeddings.weight")[:length]
    x = x + w("embeddings.token_type_embeddings.weight")[0]
    x = F.layer_norm(x, (hidden,), w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
    x = x * attention_mask.unsqueeze(-1).float()
    positions = torch.arange(config["max_position_embeddings"])
    rp_bucket = authors_bucket(positions[None, :] - positions[:, None], config["rel_pos_bins"], config["max_rel_pos"])
    rp_bucket -= rp_bucket.min()
    bias = w("relative_attention_bias.weight")[rp_bucket[:length, :length]].permute(2, 0, 1)  # [heads, T, T]
    bias = bias.unsqueeze(0).repeat(batch, 1, 1, 1)
    bias = bias.masked_fill((attention_mask == 0)[:, None, None, :], float("-inf"))
    head_dim = hidden // heads
    for layer in range(config["num_hidden_layers"]):
        def p(name, layer=layer):
            return w(f"encoder.layer.{layer}.{name}.weight"), w(f"encoder.layer.{layer}.{name}.bias")

        q, k, v = F.linear(x, *p("attention.self_attn.in_proj")).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q * head_dim ** -0.5) @ k.transpose(-1, -2) + bias
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        attended = F.linear(attended, *p("attention.self_attn.out_proj"))
        attended[attended != attended] = 0
        x = F.layer_norm(x + attended, (hidden,), *p("attention.LayerNorm"), eps)
        ffn = F.linear(F.gelu(F.linear(x, *p("intermediate.dense"))), *p("output.dense"))
        x = F.layer_norm(x + ffn, (hidden,), *p("output.LayerNorm"), eps)
    return x


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
def test_converted_weights_give_the_release_hidden_states(release, padded):
    config, encoder_state = read_release(release)
    encoder = TextEncoder(config)
    encoder.load_state_dict(encoder_state)
    encoder.eval()
    state = torch.load(release / "pytorch_model.bin", weights_only=True)
    values = json.loads((release / "config.json").read_text())
    ids = torch.randint(4, values["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 25:] = 0
        mask[2, 7:] = 0
        ids[mask == 0] = 1
    expected = release_forward(state, values, ids, mask)
    with torch.no_grad():
        got = encoder(ids, mask if padded else None)
    real = mask.bool()
    assert expected.abs().max() > 0.5  # not a degenerate comparison
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


def test_release_config_errors_name_the_field(release):
    values = json.loads((release / "config.json").read_text())
    for change, message in (({"layer_norm_type": "pre"}, "layer_norm_type 'pre' is not supported"),
                            ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
                            ({"rel_pos_bins": 0}, "rel_pos_bins 0"),
                            ({"max_position_embeddings": 8}, "does not reach the last relative bucket")):
        with pytest.raises(ConfigError, match=message):
            model_config_from_release({**values, **change}, "config.json")
    config = model_config_from_release(values, "config.json")
    state = torch.load(release / "pytorch_model.bin", weights_only=True)
    del state["amos.encoder.layer.1.output.dense.bias"]
    with pytest.raises(ConfigError, match=r"missing \['amos.encoder.layer.1.output.dense.bias'\]"):
        encoder_from_release(state, config, "pytorch_model.bin")
    state = torch.load(release / "pytorch_model.bin", weights_only=True)
    state["amos.embeddings.position_embeddings.weight"] = state["amos.embeddings.position_embeddings.weight"][:10]
    with pytest.raises(ConfigError, match=r"position_embeddings.weight \(10, 32\) \(expected \(64, 32\)\)"):
        encoder_from_release(state, config, "pytorch_model.bin")


def test_finetune_reads_the_release_folder_directly(release):
    source = load_source(str(release))
    assert isinstance(source.tokenizer, ReleaseTokenizer) and source.config.vocab_size == source.tokenizer.vocab_size
    encoder = source.build(dropout=0.1)
    assert torch.equal(encoder.token_embedding,
                       torch.load(release / "pytorch_model.bin", weights_only=True)[
                           "amos.embeddings.word_embeddings.weight"])


# ---- amos-ds convert --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(release, tmp_path_factory, one_process_group) -> Path:
    from amos_ds.export.convert import convert_release

    return convert_release(release, tmp_path_factory.mktemp("converted") / "run")


def test_convert_writes_a_checkpoint_every_reader_accepts(release, converted):
    from amos_ds.train.checkpoint import META, verified_checkpoint

    tag = verified_checkpoint(converted, "--init-from")
    assert tag == converted / "checkpoints" / "step_00000000"
    meta = json.loads((tag / META).read_text())
    tokenizer = load_tokenizer(release)
    assert meta["tokenizer_hash"] == tokenizer.hash and meta["files"]
    assert meta["converted_from"]["fresh"] == ["generators", "mixture_scorer", "mlm_head", "rtd_head"]
    assert sorted(p.name for p in (converted / "tokenizer").iterdir()) == ["dict.txt", "sp.model"]
    source = load_source(str(converted))  # what `amos-ds finetune --pretrained` and `amos-ds export` read
    _, expected = read_release(release)
    assert source.state.keys() == expected.keys()
    assert all(torch.equal(source.state[name], expected[name]) for name in expected)
    assert source.tokenizer.hash == tokenizer.hash and source.config == read_release(release)[0]


def test_convert_refuses_bad_input_and_leaves_nothing(release, tmp_path, one_process_group):
    from amos_ds.export.convert import convert_release

    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="taken: already exists"):
        convert_release(release, tmp_path / "taken")
    with pytest.raises(ConfigError, match="not a release folder; it needs pytorch_model.bin"):
        convert_release(tmp_path / "taken", tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "sp.model", "dict.txt"):
        (broken / name).write_bytes((release / name).read_bytes())
    (broken / "pytorch_model.bin").write_text("not a state dict")
    with pytest.raises(ConfigError, match="pytorch_model.bin: not a torch.save'd state dict"):
        convert_release(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]


# ---- continued pretraining: pretrain.py --init-from --------------------------------------------------------------

def pretrain(tmp_path: Path, name: str, converted: Path, data: Path, steps: int, lr: float = 1e-3,
             seed: int = 1234) -> Path:
    """amos_ds/pretrain.py (one process, fp32, ZeRO-1, constant lr) from the conversion, on `data`."""
    ds_config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                           "torch_adam": True}}}
    (tmp_path / f"{name}.ds.json").write_text(json.dumps(ds_config))
    (tmp_path / f"{name}.train.json").write_text(json.dumps({"seq_len": 32, "num_workers": 0, "plot": False}))
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / name
    result = subprocess.run([sys.executable, str(PRETRAIN), "--deepspeed_config",
                             str(tmp_path / f"{name}.ds.json"), "--config", str(tmp_path / f"{name}.train.json"),
                             "--data", str(data), "--init-from", str(converted), "--max-steps", str(steps),
                             "--save-every", "2", "--seed", str(seed), "--fp32", "--run-dir", str(run_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


def weights(tag: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_conversion_and_resumes_exactly(converted, tmp_path):
    from amos_ds.data.preprocess import preprocess

    (tmp_path / "text.txt").write_text("\n".join(TEXT * 25))
    data = tmp_path / "data"
    preprocess([str(tmp_path / "text.txt")], str(converted / "tokenizer"), str(data), workers=1, progress=False)
    start = weights(converted / "checkpoints" / "step_00000000")

    # With lr 0 the weights after a step are the ones it started from: the release's encoder, the run's generator.
    still = weights(pretrain(tmp_path, "still", converted, data, steps=1, lr=0.0, seed=7) /
                    "checkpoints" / "step_00000001")
    for name, tensor in start.items():
        if name.startswith(("token_embedding", "discriminator.")):
            assert torch.equal(still[name], tensor), name
        elif tensor.ndim == 2:  # random matrices (norms and biases start at 1 and 0 in both)
            assert not torch.equal(still[name], tensor), name
    meta = json.loads((tmp_path / "still" / "checkpoints" / "step_00000001" / "amos_meta.json").read_text())
    assert meta["init_from"]["path"] == str((converted / "checkpoints" / "step_00000000").resolve())
    assert meta["init_from"]["converted_from"] == json.loads(
        (converted / "checkpoints" / "step_00000000" / "amos_meta.json").read_text())["converted_from"]["path"]

    # Four steps at once, and two then two more (a resume), give the same weights, bit for bit.
    whole = weights(pretrain(tmp_path, "whole", converted, data, steps=4) / "checkpoints" / "step_00000004")
    pretrain(tmp_path, "halves", converted, data, steps=2)
    halves = weights(pretrain(tmp_path, "halves", converted, data, steps=4) / "checkpoints" / "step_00000004")
    assert whole.keys() == halves.keys() and all(torch.equal(whole[k], halves[k]) for k in whole)
    assert not torch.equal(whole["discriminator.layers.0.ffn_in.weight"], start["discriminator.layers.0.ffn_in.weight"])


# ---- export --format amos-release ------------------------------------------------------------------------------

def test_export_of_a_conversion_gives_the_release_back(release, converted, tmp_path):
    from amos_ds.export.to_release import export_release

    out = export_release(str(converted), tmp_path / "again")
    for name in ("sp.model", "dict.txt"):
        assert (out / name).read_bytes() == (release / name).read_bytes()
    config, encoder = read_release(out)
    original_config, original = read_release(release)  # its token types are folded into the positions
    assert config == original_config and encoder.keys() == original.keys()
    assert all(torch.equal(encoder[name], original[name]) for name in original)
    values = json.loads((out / "config.json").read_text())
    assert values["type_vocab_size"] == 0 and values["cls_dropout_prob"] == 0.1 and values["model_type"] == "amos"
    assert "amos.embeddings.token_type_embeddings.weight" not in torch.load(out / "pytorch_model.bin",
                                                                             weights_only=True)


def test_hf_export_of_a_conversion_refuses_the_release_tokenizer(converted, tmp_path, capsys):
    pytest.importorskip("transformers")
    from amos_ds.cli import main as cli_main

    assert cli_main(["export", str(converted), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "is the release's sp.model + dict.txt" in err and "use --format amos-release" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "hf").exists()

def test_export_of_an_amos_ds_model_and_tokenizer_to_the_release_and_back(tmp_path):
    from amos_ds.config import get_preset
    from amos_ds.data.tokenizer import train_tokenizer
    from amos_ds.export.to_release import export_release
    from amos_ds.finetune.pretrained import encoder_state
    from amos_ds.model import AMOSModel

    (tmp_path / "text.txt").write_text("\n".join(TEXT * 20))
    ours = train_tokenizer([str(tmp_path / "text.txt")], 400, str(tmp_path / "tok"))
    config = get_preset("tiny", vocab_size=400)
    torch.manual_seed(0)
    state = AMOSModel(config).state_dict()
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(config.to_dict()))
    out = export_release(str(tmp_path / "model.pt"), tmp_path / "release", str(tmp_path / "tok"),
                         str(tmp_path / "model.json"))
    theirs = load_tokenizer(out)
    back_config, back = read_release(out)
    assert isinstance(theirs, ReleaseTokenizer) and theirs.vocab_size == back_config.vocab_size == 400
    # Ids: [CLS] [PAD] [SEP] [UNK] -> 0-3, piece i -> i - 1, [MASK] -> 399; the embedding rows move with them.
    moved = torch.tensor([1, 0, 2, 399, 3, *range(4, 399)])
    kept = encoder_state(state)
    assert torch.equal(back["token_embedding"][moved], kept["token_embedding"])
    assert all(torch.equal(back[name], kept[name]) for name in kept if name != "token_embedding")
    assert back_config.to_dict() == {**config.to_dict(), "head_layers": back_config.head_layers,
                                     "gen_layers": back_config.gen_layers}
    # On text without punctuation the release's tokenizer gives the same pieces, so the same hidden states.
    line = "the film opens in a quiet town where nothing seems to happen"
    ids = ours.encode(line)
    assert theirs.encode(line) == moved[ids].tolist()
    before, after = TextEncoder(config).eval(), TextEncoder(back_config).eval()
    before.load_state_dict(kept)
    after.load_state_dict(back)
    with torch.no_grad():
        expected = before(torch.tensor([ours.special.single(ids)]), None)
        got = after(torch.tensor([theirs.special.single(theirs.encode(line))]), None)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_piece_fairseq_cannot_hold_is_refused(tmp_path):
    from types import SimpleNamespace

    from amos_ds.export.to_release import dictionary_text
    from amos_ds.vocab import amos_ds_special_ids

    pieces = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "\u2581the", "a b", "<s>"]
    tokenizer = SimpleNamespace(special=amos_ds_special_ids(len(pieces)), id_to_piece=pieces.__getitem__,
                                directory=tmp_path)
    with pytest.raises(ConfigError, match=r"piece\(s\) \['a b', '<s>'\] cannot be written to a fairseq dict.txt"):
        dictionary_text(tokenizer)
    assert dictionary_text(SimpleNamespace(special=amos_ds_special_ids(6), id_to_piece=pieces.__getitem__,
                                           directory=tmp_path)) == "\u2581the 1\n"


@pytest.mark.slow
def test_convert_command_line(release, tmp_path):
    """`amos-ds convert` in its own process (it starts its one-rank group), then again onto the same OUT: one line,
    exit code 2, the first conversion untouched."""
    env = subprocess_env()
    command = [sys.executable, "-m", "amos_ds.cli", "convert", str(release), str(tmp_path / "run")]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"wrote {tmp_path / 'run'}: fine-tune it with `amos-ds finetune --pretrained" in first.stdout
    meta = (tmp_path / "run" / "checkpoints" / "step_00000000" / "amos_meta.json").read_bytes()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f"amos-ds: error: {tmp_path / 'run'}: already exists; remove it or give a new folder")
    assert (tmp_path / "run" / "checkpoints" / "step_00000000" / "amos_meta.json").read_bytes() == meta


def test_init_from_refuses_what_does_not_fit_the_run(release, converted, tmp_path):
    from amos_ds.train.init_from import locate_init

    token_hash = load_tokenizer(release).hash
    found = locate_init(str(converted), token_hash, {"gen_layers": 2, "head_layers": [1, 2]}, 64)
    assert (found.config.gen_layers, found.config.hidden_size) == (2, 32)
    for path, tokens, overrides, seq_len, message in (
            (release, token_hash, {}, 32, "the authors' release folder; convert it first with `amos-ds convert"),
            (tmp_path, token_hash, {}, 32, "no complete checkpoint there"),
            (converted, "0123456789abcdef", {}, 32, "tokenizer .* --data is encoded with 0123456789abcdef"),
            (converted, token_hash, {}, 65, "seq_len 65 exceeds its max_positions 64"),
            (converted, token_hash, {"head_layers": [9]}, 32, "the model overrides do not fit its model")):
        with pytest.raises(ConfigError, match=message):
            locate_init(str(path), tokens, overrides, seq_len)


def test_masking_reads_the_release_ids(release):
    from amos_ds.data.masking import mask_tokens
    from amos_ds.vocab import IGNORE_INDEX

    special = load_tokenizer(release).special  # <s>=0 <pad>=1 </s>=2 <unk>=3, pieces 4..mask-1, <mask> last
    tokens = torch.randint(0, special.mask + 1, (8, 64), generator=torch.Generator().manual_seed(0)).numpy()
    tokens[:, 0], tokens[:, -1], tokens[7, 40:] = special.cls, special.sep, special.pad
    inputs, labels = mask_tokens(tokens, torch.arange(8).numpy(), 3, 0.3, (0.5, 0.5, 0.0), special)
    masked = labels != IGNORE_INDEX
    assert masked.any() and special.is_ordinary(tokens[masked]).all() and not masked[tokens < 4].any()
    assert not masked[tokens == special.mask].any()
    replaced = inputs[masked & (inputs != special.mask)]
    assert len(replaced) and replaced.min() >= 4 and replaced.max() < special.mask


def test_init_from_an_amos_ds_checkpoint_takes_every_weight(release, converted, tmp_path):
    import shutil

    from amos_ds.model import AMOSModel
    from amos_ds.train.init_from import init_record, load_init, locate_init

    run = tmp_path / "run"  # the conversion without its mark: a run that pretrained every weight
    shutil.copytree(converted, run)
    meta_path = run / "checkpoints" / "step_00000000" / "amos_meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["converted_from"]
    meta_path.write_text(json.dumps(meta))
    found = locate_init(str(run), load_tokenizer(release).hash, {}, 32)
    torch.manual_seed(99)
    model = AMOSModel(found.config)
    load_init(found, model)
    saved = weights(run / "checkpoints" / "step_00000000")
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[name], saved[name]) for name in saved)
    assert init_record(found)["loaded"] == "every weight" and init_record(found)["converted_from"] is None


def test_the_launch_plan_counts_the_model_of_the_init_checkpoint(converted, tmp_path):
    from amos_ds.model import AMOSModel
    from amos_ds.train import launch
    from amos_ds.train.hostfile import Host
    from amos_ds.train.train_config import TrainConfig

    config = TrainConfig(preset="base", init_from=str(converted), model={"gen_layers": 4, "head_layers": [2, 4]},
                         run_dir=str(tmp_path / "run"))
    plan = launch.make_plan("h", [Host("localhost", 2)], config, throughput_from=None)
    model_config = load_source(str(converted)).config.replace(gen_layers=4, head_layers=(2, 4))
    with torch.device("meta"):
        assert plan.parameters == sum(p.numel() for p in AMOSModel(model_config).parameters())
