"""The bad-input catalogue: every case ends with one error line naming the file or flag, exit code 2, and the disk
exactly as it was (no run directory, no half-written file, the inputs untouched).

Training cases call amos_ds/pretrain.py's main() in this process (one rank, a process group made once), the others
the `amos-ds` command line; each case's inputs are built in its own folder.
"""

import argparse
import glob
import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_configs

from amos_ds import cli, pretrain
from amos_ds.data import open_corpora
from amos_ds.train.checkpoint import FILES, META, tag_for
from amos_ds.train.train_config import TrainConfig

Case = Callable[[Path, Path], tuple[str, list[str], str]]  # (tmp, corpus) -> (program, argv, expected in the line)
CASES: dict[str, Case] = {}


def case(function: Case) -> Case:
    CASES[function.__name__] = function
    return function


def train_flags(tmp: Path, cache: Path, **train_config) -> list[str]:
    flags = write_configs(tmp, cache, zero_stage=1)
    config = json.loads((tmp / "train.json").read_text())
    (tmp / "train.json").write_text(json.dumps({**config, **train_config}))
    return [*flags, "--run-dir", str(tmp / "run"), "--max-steps", "2"]


def shard_folder(tmp: Path, cache: Path) -> Path:
    """A copy of the built-in corpus's shard folder, to damage."""
    data = tmp / "data"
    shutil.copytree(glob.glob(f"{cache}/builtin-*")[0], data)
    return data


def checkpoint_folder(tmp: Path, cache: Path, **meta) -> Path:
    """A complete checkpoint of a tiny run on the built-in corpus (the fields that are checked before loading)."""
    dataset = open_corpora([glob.glob(f"{cache}/builtin-*")[0]], 32, 1234)
    path = tmp / "old" / "checkpoints" / tag_for(2)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    files = {"mp_rank_00_model_states.pt": {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}
    model = TrainConfig(preset="tiny", seq_len=32).model_config(dataset.vocab_size).to_dict()
    (path / META).write_text(json.dumps({"step": 2, "world_size": 1, "zero_stage": 1, "model": model,
                                         "tokenizer_hash": dataset.tokenizer_hash, FILES: files, **meta}))
    return path


# Hostfiles, through `amos-ds launch --dry-run`.
def launch(tmp: Path, hostfile: str, *extra: str) -> list[str]:
    (tmp / "hosts").write_text(hostfile)
    return ["launch", "--hostfile", str(tmp / "hosts"), "--dry-run", *extra, "--", "--preset", "tiny"]


@case
def hostfile_missing(tmp, cache):
    return "cli", ["launch", "--hostfile", str(tmp / "absent"), "--dry-run"], f"hostfile {tmp / 'absent'}: cannot read"


@case
def hostfile_without_slots(tmp, cache):
    return "cli", launch(tmp, "node1 slots=8\nnode2 8\n"), f"hostfile {tmp / 'hosts'} line 2"


@case
def hostfile_duplicate_host(tmp, cache):
    return "cli", launch(tmp, "node1 slots=8\nnode1 slots=8\n"), "host 'node1' is already on line 1"


@case
def hostfile_zero_slots(tmp, cache):
    return "cli", launch(tmp, "node1 slots=0\n"), "slots=0 gives the host nothing to run"


@case
def hostfile_shell_in_hostname(tmp, cache):
    return "cli", launch(tmp, "node1;touch${IFS}pwned slots=8\n"), "a hostname may hold only letters"


@case
def launch_env_not_key_value(tmp, cache):
    return "cli", launch(tmp, "node1 slots=2\n", "--env", "NOT A KEY=1"), "--env 'NOT A KEY=1'"


# Training configs.
@case
def config_unknown_key(tmp, cache):
    return "pretrain", train_flags(tmp, cache, learning_rate=1.0), "unknown field(s) ['learning_rate']"


@case
def config_value_is_code(tmp, cache):
    """Config values are data: a string of Python where a number belongs is refused, never evaluated."""
    return "pretrain", train_flags(tmp, cache, seq_len=f"__import__('pathlib').Path('{tmp}/pwned').touch()"), \
        "seq_len must be int | None, got \"__import__("


@case
def config_not_json(tmp, cache):
    (tmp / "bad.json").write_text("{'preset': 'tiny'}")
    return "pretrain", ["--config", str(tmp / "bad.json")], f"--config {tmp / 'bad.json'}: not readable JSON"


@case
def config_missing(tmp, cache):
    return "pretrain", ["--config", str(tmp / "absent.json")], f"--config {tmp / 'absent.json'}: file not found"


@case
def batch_does_not_divide(tmp, cache):
    flags = train_flags(tmp, cache)
    ds = json.loads((tmp / "ds.json").read_text())
    (tmp / "ds.json").write_text(json.dumps({**ds, "train_micro_batch_size_per_gpu": 3}))
    return "pretrain", flags, f"--deepspeed_config {tmp / 'ds.json'}: train_batch_size 8 is not divisible"


@case
def head_layer_beyond_the_generator(tmp, cache):
    return "pretrain", train_flags(tmp, cache, model={"head_layers": [1, 2, 9]}), "within the generator's layers"


@case
def tokenizer_vocabulary_unlike_the_model(tmp, cache):
    return "pretrain", train_flags(tmp, cache, model={"vocab_size": 30522}), \
        "TrainConfig.model.vocab_size 30522 differs from the data's tokenizer (1024 pieces)"


@case
def deepspeed_config_missing(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--deepspeed_config", str(tmp / "absent.json")], \
        f"--deepspeed_config {tmp / 'absent.json'}: file not found"


@case
def deepspeed_config_not_json(tmp, cache):
    flags = train_flags(tmp, cache)
    (tmp / "ds.json").write_text('{"train_batch_size": 8,')
    return "pretrain", flags, f"--deepspeed_config {tmp / 'ds.json'}: not readable JSON"


@case
def max_steps_zero(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--max-steps", "0"], "--max-steps must be at least 1"


@case
def seq_len_beyond_the_model(tmp, cache):
    return "pretrain", train_flags(tmp, cache, seq_len=4096), "seq_len 4096 exceeds the model's max_positions"


@case
def unknown_preset(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--preset", "huge"], "--preset huge"


@case
def nonfinite_limit_zero(tmp, cache):
    return "pretrain", train_flags(tmp, cache, max_nonfinite_steps=0), "max_nonfinite_steps must be at least 1"


# Data.
@case
def data_folder_missing(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--data", str(tmp / "absent")], f"{tmp / 'absent'}: no manifest"


@case
def data_folder_empty(tmp, cache):
    (tmp / "empty").mkdir()
    return "pretrain", [*train_flags(tmp, cache), "--data", str(tmp / "empty")], f"{tmp / 'empty'}: no manifest"


@case
def data_is_raw_non_utf8_text(tmp, cache):
    (tmp / "latin1").mkdir()
    (tmp / "latin1" / "text.txt").write_bytes("Caf\xe9 na\xefve\n".encode("latin-1"))
    return "pretrain", [*train_flags(tmp, cache), "--data", str(tmp / "latin1")], f"{tmp / 'latin1'}: no manifest"


@case
def data_weight_not_a_number(tmp, cache):
    data = shard_folder(tmp, cache)
    return "pretrain", [*train_flags(tmp, cache), "--data", f"{data}:lots"], f"{data}:lots"


@case
def data_tokens_and_index_lengths_differ(tmp, cache):
    data = shard_folder(tmp, cache)
    with open(data / "shard-00000.bin", "ab") as f:
        f.write(b"\x05\x00")
    return "pretrain", [*train_flags(tmp, cache), "--data", str(data)], \
        f"{data / 'shard-00000.bin'}: holds"


@case
def data_index_checksum_differs_from_manifest(tmp, cache):
    data = shard_folder(tmp, cache)
    raw = bytearray((data / "shard-00000.idx").read_bytes())
    raw[48:80] = bytes(32)  # the index's token checksum, forged
    (data / "shard-00000.idx").write_bytes(bytes(raw))
    return "pretrain", [*train_flags(tmp, cache), "--data", str(data)], \
        f"{data / 'shard-00000.idx'}: does not match manifest.json"


@case
def data_index_is_binary_garbage(tmp, cache):
    data = shard_folder(tmp, cache)
    (data / "shard-00000.idx").write_bytes(bytes(range(256)) * 4)
    return "pretrain", [*train_flags(tmp, cache), "--data", str(data)], \
        f"{data / 'shard-00000.idx'}: is not an amos-ds index"


@case
def shard_tokens_changed_after_writing(tmp, cache):
    data = shard_folder(tmp, cache)
    raw = bytearray((data / "shard-00000.bin").read_bytes())
    raw[100] ^= 1
    (data / "shard-00000.bin").write_bytes(bytes(raw))
    return "cli", ["inspect", str(data), "--seq-len", "32"], f"{data / 'shard-00000.bin'}: checksum mismatch"


@case
def tokenizer_from_binary_input(tmp, cache):
    (tmp / "blob.txt").write_bytes(b"text\x00\x01\x02" * 100)
    return "cli", ["tokenizer", "train", "--input", str(tmp / "blob.txt"), "--vocab-size", "1024", "--output",
                   str(tmp / "tok")], f"{tmp / 'blob.txt'}: looks binary"


@case
def tokenizer_from_empty_input(tmp, cache):
    (tmp / "empty.txt").write_text("")
    return "cli", ["tokenizer", "train", "--input", str(tmp / "empty.txt"), "--vocab-size", "1024", "--output",
                   str(tmp / "tok")], f"{tmp / 'empty.txt'}: no text found"


# Checkpoints.
@case
def resume_from_another_preset(tmp, cache):
    point = checkpoint_folder(tmp, cache)
    return "pretrain", [*train_flags(tmp, cache), "--preset", "small", "--resume", str(point)], \
        f"--resume {point}: model differs from the checkpoint's"


@case
def resume_from_another_tokenizer(tmp, cache):
    point = checkpoint_folder(tmp, cache, tokenizer_hash="0123456789abcdef")
    return "pretrain", [*train_flags(tmp, cache), "--resume", str(point)], \
        f"--resume {point}: trained on tokenizer 0123456789abcdef"


@case
def resume_without_a_complete_checkpoint(tmp, cache):
    point = checkpoint_folder(tmp, cache)
    (point / META).unlink()  # killed while saving
    return "pretrain", [*train_flags(tmp, cache), "--resume", str(tmp / "old")], \
        f"--resume {tmp / 'old'}: no complete checkpoint there"


@case
def resume_from_a_folder_that_is_not_a_checkpoint(tmp, cache):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    return "pretrain", [*train_flags(tmp, cache), "--resume", str(tmp / "photos")], \
        f"--resume {tmp / 'photos'}: no complete checkpoint there"


@case
def resume_from_a_corrupted_checkpoint(tmp, cache):
    point = checkpoint_folder(tmp, cache)
    (point / "mp_rank_00_model_states.pt").write_bytes(b"weighty")
    return "pretrain", [*train_flags(tmp, cache), "--resume", str(point)], \
        f"--resume {point}: {point / 'mp_rank_00_model_states.pt'} does not match the SHA-256"


@case
def resume_none_over_a_runs_checkpoints(tmp, cache):
    flags = train_flags(tmp, cache)
    checkpoint_folder(tmp, cache)
    return "pretrain", [*flags, "--run-dir", str(tmp / "old"), "--resume", "none"], \
        f"--resume none: --run-dir {tmp / 'old'} already holds checkpoints up to step 2"



# Fine-tuning's hyperparameter grid (checked before any task or checkpoint is read).
def finetune_flags(tmp: Path, *grid: str) -> list[str]:
    return ["finetune", "--pretrained", "none", "--task-dir", str(tmp / "task"), *grid, "--output", str(tmp / "out")]


@case
def finetune_negative_learning_rate(tmp, cache):
    return "cli", finetune_flags(tmp, "--lr", "2e-5", "-0.00003"), "--lr -3e-05: a learning rate must be positive"


@case
def finetune_zero_batch_size(tmp, cache):
    return "cli", finetune_flags(tmp, "--batch-size", "16", "0"), "--batch-size 0: a batch size must be at least 1"


@case
def finetune_learning_rate_given_twice(tmp, cache):
    return "cli", finetune_flags(tmp, "--lr", "2e-5", "3e-5", "2e-5"), "--lr 2e-05 3e-05 2e-05: 2e-05 is given twice"


@case
def convert_not_a_release_folder(tmp, cache):
    return "cli", ["convert", str(tmp), str(tmp / "out")], "not a release folder; it needs pytorch_model.bin"


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()} | \
        {str(p): b"<dir>" for root in roots for p in root.rglob("*") if p.is_dir()}


# `amos-ds` subcommands with no case yet: a subcommand added to the command line fails the test below until it has a
# case here or is named in this set.
WITHOUT_CASES = {"plot", "preprocess", "export"}


def test_the_catalogue_reaches_every_entry_point(tmp_path, corpus):
    """pretrain.py and every `amos-ds` subcommand (as the command line registers them) have a case."""
    reached = set()
    for name, make_case in CASES.items():
        (tmp_path / name).mkdir()
        program, argv, _ = make_case(tmp_path / name, corpus)
        reached.add("pretrain.py" if program == "pretrain" else argv[0])
    subparsers = argparse.ArgumentParser().add_subparsers()
    for module in cli.COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    subcommands = set(subparsers.choices)
    assert reached >= {"pretrain.py"} | (subcommands - WITHOUT_CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path, corpus, capsys, one_process_group):
    program, argv, expected = CASES[name](tmp_path, corpus)
    before = snapshot(tmp_path, corpus)
    capsys.readouterr()
    environment = dict(os.environ)
    try:
        code = cli.main(argv) if program == "cli" else pretrain.main(argv)
    finally:  # pretrain.main sets RANK, MASTER_PORT and the like for its one-process group
        os.environ.clear()
        os.environ.update(environment)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith(("error: ", "amos-ds: error: "))
    assert snapshot(tmp_path, corpus) == before, "the disk changed"
