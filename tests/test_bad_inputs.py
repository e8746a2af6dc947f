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
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_pretrain, write_configs

from amos_ds import cli
from amos_ds.data import open_corpora
from amos_ds.train import checkpoint
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


@case
def eval_every_zero(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--eval-every", "0"], "eval_every must be at least 1"


@case
def eval_data_too_small(tmp, cache):
    data = shard_folder(tmp, cache)
    return "pretrain", [*train_flags(tmp, cache), "--eval-data", str(data), "--eval-batches", "100000"], \
        f"--eval-data {data}: "


@case
def probe_task_missing(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--probe-task", str(tmp / "absent")], \
        f"--probe-task {tmp / 'absent'}: not a folder"



@case
def probe_checkpoint_missing(tmp, cache):
    return "cli", ["probe", str(tmp / "absent"), "--task", str(tmp)], f"--pretrained {tmp / 'absent'}: no such file"

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


# Training flags and config fields: types and ranges.
@case
def seed_negative(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--seed", "-1"], "--seed must be in [0, 2**32), got -1"


@case
def seed_beyond_64_bits(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--seed", str(2**64)], "--seed must be in [0, 2**32)"


@case
def save_every_zero(tmp, cache):
    return "pretrain", [*train_flags(tmp, cache), "--save-every", "0"], "TrainConfig.save_every must be at least 1"


@case
def keep_last_zero(tmp, cache):
    return "pretrain", train_flags(tmp, cache, keep_last=0), "TrainConfig.keep_last must be at least 1"


@case
def log_every_zero(tmp, cache):
    return "pretrain", train_flags(tmp, cache, log_every=0), "TrainConfig.log_every must be at least 1"


@case
def num_workers_negative(tmp, cache):
    return "pretrain", train_flags(tmp, cache, num_workers=-1), "TrainConfig.num_workers must be at least 0"


@case
def seq_len_zero(tmp, cache):
    return "pretrain", train_flags(tmp, cache, seq_len=0), "TrainConfig.seq_len must be at least 1"


@case
def seq_len_too_short_to_mask(tmp, cache):
    return "pretrain", train_flags(tmp, cache, seq_len=4), "seq_len 4 is too short: use at least 8"


@case
def mask_prob_one(tmp, cache):
    return "pretrain", train_flags(tmp, cache, mask_prob=1.0), "TrainConfig.mask_prob must be in (0, 1), got 1.0"


@case
def mask_split_not_summing_to_one(tmp, cache):
    return "pretrain", train_flags(tmp, cache, mask_split=[0.5, 0.2, 0.2]), \
        "TrainConfig.mask_split must be three fractions in [0, 1] summing to 1 ([MASK], random, unchanged), got (0.5, "


@case
def mask_split_negative(tmp, cache):
    return "pretrain", train_flags(tmp, cache, mask_split=[1.2, -0.1, -0.1]), \
        "TrainConfig.mask_split must be three fractions in [0, 1] summing to 1"


@case
def mask_split_of_two(tmp, cache):
    return "pretrain", train_flags(tmp, cache, mask_split=[0.9, 0.1]), "mask_split must be tuple[float, float, float]"


@case
def collective_timeout_not_finite(tmp, cache):
    (tmp / "nan.json").write_text('{"collective_timeout_s": NaN}')
    return "pretrain", [*train_flags(tmp, cache), "--config", str(tmp / "nan.json")], \
        f"--config {tmp / 'nan.json'}: collective_timeout_s must be a finite number, got nan"


@case
def compile_unknown_in_config(tmp, cache):
    return "pretrain", train_flags(tmp, cache, compile="maybe"), "--compile must be one of ('auto', 'on', 'off')"


@case
def fp32_not_a_boolean(tmp, cache):
    return "pretrain", train_flags(tmp, cache, fp32="yes"), "fp32 must be bool, got 'yes'"


@case
def unknown_ablation(tmp, cache):
    return "pretrain", train_flags(tmp, cache, ablation="no_such"), "unknown ablation 'no_such'"


@case
def model_override_unknown_field(tmp, cache):
    return "pretrain", train_flags(tmp, cache, model={"hidden": 64}), "model settings (--preset tiny"


@case
def builtin_vocab_size_too_small(tmp, cache):
    return "pretrain", train_flags(tmp, cache, builtin_vocab_size=5), "TrainConfig.builtin_vocab_size must be at least"


@case
def run_dir_is_a_file(tmp, cache):
    flags = train_flags(tmp, cache)
    (tmp / "file").write_text("not a folder")
    return "pretrain", [*flags, "--run-dir", str(tmp / "file")], f"--run-dir {tmp / 'file'}: cannot write its lock"


@case
def run_dir_held_by_another_job(tmp, cache):
    flags = train_flags(tmp, cache)
    (tmp / "run").mkdir()
    (tmp / "run" / "run.lock").write_text(json.dumps({"host": "node-9", "pid": 17, "started": "2026-12-01",
                                                       "job_id": "42", "token": "theirs"}))
    return "pretrain", flags, f"--run-dir {tmp / 'run'}: in use by another job (PID 17 on node-9, job 42"


@case
def data_weight_zero(tmp, cache):
    data = shard_folder(tmp, cache)
    return "pretrain", [*train_flags(tmp, cache), "--data", f"{data}:0"], f"{data}:0: the weight must be a positive"


# DeepSpeed config fields the trainer relies on.
def ds_flags(tmp: Path, cache: Path, **changes) -> list[str]:
    flags = train_flags(tmp, cache)
    ds = json.loads((tmp / "ds.json").read_text())
    (tmp / "ds.json").write_text(json.dumps({**ds, **changes}))
    return flags


@case
def ds_learning_rate_negative(tmp, cache):
    flags = ds_flags(tmp, cache, optimizer={"type": "AdamW", "params": {"lr": -1e-3}})
    return "pretrain", flags, \
        f"--deepspeed_config {tmp / 'ds.json'}: optimizer.params.lr must be a number >= 0, got -0.001"


@case
def ds_zero_stage_unknown(tmp, cache):
    flags = ds_flags(tmp, cache, zero_optimization={"stage": 5})
    return "pretrain", flags, f"--deepspeed_config {tmp / 'ds.json'}: zero_optimization.stage must be 0, 1, 2 or 3"


@case
def ds_bf16_and_fp16_together(tmp, cache):
    flags = ds_flags(tmp, cache, bf16={"enabled": True}, fp16={"enabled": True})
    return "pretrain", flags, f"--deepspeed_config {tmp / 'ds.json'}: bf16 and fp16 are both enabled"


@case
def ds_gradient_clipping_negative(tmp, cache):
    flags = ds_flags(tmp, cache, gradient_clipping=-1.0)
    return "pretrain", flags, f"--deepspeed_config {tmp / 'ds.json'}: gradient_clipping must be a number >= 0"


@case
def ds_total_steps_zero(tmp, cache):
    flags = ds_flags(tmp, cache, scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 0}})
    return "pretrain", [*flags[:-2]], \
        f"--deepspeed_config {tmp / 'ds.json'}: scheduler.params.total_num_steps must be a positive integer"


@case
def ds_config_not_an_object(tmp, cache):
    flags = train_flags(tmp, cache)
    (tmp / "ds.json").write_text("[8, 8]")
    return "pretrain", flags, f"--deepspeed_config {tmp / 'ds.json'}: expected a JSON object"


# Resuming: settings that alter the run, and --max-steps below the checkpoint.
def recorded_checkpoint(tmp: Path, cache: Path) -> tuple[Path, list[str]]:
    """checkpoint_folder with the settings a run records: those train_flags gives."""
    flags = train_flags(tmp, cache)
    train = TrainConfig(**json.loads((tmp / "train.json").read_text()), preset="tiny", fp32=False).to_dict()
    point = checkpoint_folder(tmp, cache, train=train, deepspeed=json.loads((tmp / "ds.json").read_text()))
    return point, [*flags, "--resume", str(point), "--max-steps", "4"]


@case
def resume_with_another_learning_rate(tmp, cache):
    point, flags = recorded_checkpoint(tmp, cache)
    ds = json.loads((tmp / "ds.json").read_text())
    ds["optimizer"]["params"]["lr"] = 5e-3
    (tmp / "ds.json").write_text(json.dumps(ds))
    return "pretrain", flags, f"--resume {point}: 1 setting(s) differ from the checkpoint's " \
        "(deepspeed.optimizer.params.lr: 0.001 -> 0.005); restore them, pass --allow-config-change"


@case
def resume_with_another_seq_len_and_mask_prob(tmp, cache):
    point, flags = recorded_checkpoint(tmp, cache)
    train = json.loads((tmp / "train.json").read_text())
    (tmp / "train.json").write_text(json.dumps({**train, "seq_len": 16, "mask_prob": 0.3}))
    return "pretrain", flags, f"--resume {point}: 2 setting(s) differ from the checkpoint's (train.mask_prob: " \
        "0.15 -> 0.3, train.seq_len: 32 -> 16)"


@case
def resume_with_another_global_batch(tmp, cache):
    point, flags = recorded_checkpoint(tmp, cache)
    ds = json.loads((tmp / "ds.json").read_text())
    (tmp / "ds.json").write_text(json.dumps({**ds, "train_batch_size": 16}))
    return "pretrain", flags, "(deepspeed.train_batch_size: 8 -> 16)"


@case
def max_steps_below_the_checkpoint(tmp, cache):
    point, flags = recorded_checkpoint(tmp, cache)
    return "pretrain", [*flags, "--max-steps", "1"], \
        f"--max-steps 1: {point} is already at step 2; give a larger --max-steps to train further"


# The data command line.
def builtin_tokenizer(cache: Path) -> str:
    return glob.glob(f"{cache}/builtin-*/tokenizer")[0]


def preprocess(tmp: Path, cache: Path, *flags: str) -> list[str]:
    (tmp / "text.txt").write_text("Some text to tokenize.\n" * 50)
    return ["preprocess", "--input", str(tmp / "text.txt"), "--tokenizer", builtin_tokenizer(cache), "--output",
            str(tmp / "shards"), "--quiet", *flags]


@case
def preprocess_shard_mb_tiny(tmp, cache):
    return "cli", preprocess(tmp, cache, "--shard-mb", "0.0001"), "--shard-mb must be in [0.01, 65536], got 0.0001"


@case
def preprocess_shard_mb_not_finite(tmp, cache):
    return "cli", preprocess(tmp, cache, "--shard-mb", "nan"), "--shard-mb must be in [0.01, 65536], got nan"


@case
def preprocess_workers_zero(tmp, cache):
    return "cli", preprocess(tmp, cache, "--workers", "0"), "--workers must be at least 1, got 0"


@case
def preprocess_tokenizer_missing(tmp, cache):
    argv = preprocess(tmp, cache)
    argv[argv.index("--tokenizer") + 1] = str(tmp / "absent")
    return "cli", argv, f"{tmp / 'absent'}: not a tokenizer folder"


@case
def preprocess_output_is_a_file(tmp, cache):
    (tmp / "shards").write_text("a file")
    return "cli", preprocess(tmp, cache), f"{tmp / 'shards'}: exists and is not an amos-ds shard folder"


@case
def inspect_seq_len_zero(tmp, cache):
    data = shard_folder(tmp, cache)
    return "cli", ["inspect", str(data), "--seq-len", "0"], "--seq-len must be at least 8, got 0"


@case
def tokenizer_vocab_size_too_small(tmp, cache):
    (tmp / "text.txt").write_text("Some text.\n" * 50)
    return "cli", ["tokenizer", "train", "--input", str(tmp / "text.txt"), "--vocab-size", "10", "--output",
                   str(tmp / "tok")], "--vocab-size 10 is too small"


@case
def tokenizer_max_sentences_zero(tmp, cache):
    (tmp / "text.txt").write_text("Some text.\n" * 50)
    return "cli", ["tokenizer", "train", "--input", str(tmp / "text.txt"), "--vocab-size", "1024",
                   "--max-sentences", "0", "--output", str(tmp / "tok")], "--max-sentences must be at least 1, got 0"


# Readers of checkpoints and runs.
def finetune(tmp: Path, pretrained: str, *flags: str) -> list[str]:
    (tmp / "task").mkdir()
    for split in ("train", "dev", "test"):
        (tmp / "task" / f"{split}.tsv").write_text("label\tsentence\n1\tgood\n0\tbad\n")
    return ["finetune", "--pretrained", pretrained, "--task-dir", str(tmp / "task"), "--output", str(tmp / "ft"),
            *flags]


@case
def finetune_from_a_flipped_byte(tmp, cache):
    point = checkpoint_folder(tmp, cache)
    (point / "mp_rank_00_model_states.pt").write_bytes(b"weighty")
    return "cli", finetune(tmp, str(point)), \
        f"--pretrained {point}: {point / 'mp_rank_00_model_states.pt'} does not match the SHA-256"


@case
def finetune_weight_decay_negative(tmp, cache):
    return "cli", finetune(tmp, "none", "--tokenizer", builtin_tokenizer(cache), "--weight-decay", "-0.1"), \
        "--weight-decay must be at least 0, got -0.1"


@case
def plot_of_a_damaged_metrics_line(tmp, cache):
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    return "cli", ["plot", str(tmp / "run")], f"{tmp / 'run' / 'metrics.jsonl'} line 2: not a JSON record"


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


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60


# `amos-ds` subcommands with no case yet: a subcommand added to the command line fails the test below until it has a
# case here or is named in this set.
WITHOUT_CASES = {"export"}  # its checks follow the import of transformers; tests/test_export.py has them


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
    code = cli.main(argv) if program == "cli" else run_pretrain(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith(("error: ", "amos-ds: error: "))
    assert snapshot(tmp_path, corpus) == before, "the disk changed"


def test_a_start_on_a_full_disk_fails_in_one_line_before_deepspeed(tmp_path, corpus, capsys, monkeypatch,
                                                                   one_process_group):
    flags = train_flags(tmp_path, corpus)
    before = snapshot(tmp_path, corpus)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    capsys.readouterr()
    assert run_pretrain(flags) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --run-dir {tmp_path / 'run'}: 1.0 MiB free on its filesystem, a checkpoint needs about 64.0 MiB; "
        "free space, then start again"]
    assert snapshot(tmp_path, corpus) == before


def test_max_steps_at_the_checkpoint_is_nothing_to_do(tmp_path, corpus, capsys, one_process_group):
    point, flags = recorded_checkpoint(tmp_path, corpus)
    before = snapshot(tmp_path, corpus)
    capsys.readouterr()
    assert run_pretrain([*flags, "--max-steps", "2"]) == 0
    assert f"nothing to do: {point} is at step 2 = --max-steps; give a larger --max-steps to train further" in \
        capsys.readouterr().out
    assert snapshot(tmp_path, corpus) == before
