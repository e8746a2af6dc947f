"""The settings of one pretraining run: a plain dataclass, filled from its defaults, then `--config FILE`, then flags.

Only what scripts rely on has a flag (`--deepspeed_config`, `--preset`, `--data`, `--run-dir`, `--max-steps`,
`--save-every`, `--resume`, `--allow-config-change`, `--seed`, `--compile`, `--eval-data`, `--eval-every`,
`--eval-batches`, `--probe-task`, `--fp32`); everything else lives in the JSON file, whose keys are the field names
below. Optimizer, schedule, batch size, precision and ZeRO stage belong to the DeepSpeed config.
"""

import argparse
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from amos_ds.config import ModelConfig, get_preset, with_ablation
from amos_ds.data.tokenizer import MIN_VOCAB_SIZE
from amos_ds.errors import ConfigError

# Shipped DeepSpeed configs, looked up here when a relative --deepspeed_config is not found from the working directory.
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


COMPILE_CHOICES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    # The model: a preset, then an ablation from the paper, then single-field overrides of ModelConfig.
    preset: str = "tiny"
    ablation: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    # The data: corpora written by `amos-ds preprocess` as DIR[:WEIGHT]; none means the built-in corpus.
    data: list[str] = field(default_factory=list)
    builtin_cache: str = "~/.cache/amos-ds"
    builtin_vocab_size: int = 8192
    seq_len: int | None = None  # None: the model's max_positions (128 for tiny/small, 512 for base)
    mask_prob: float = 0.15
    mask_split: tuple[float, float, float] = (1.0, 0.0, 0.0)
    num_workers: int = 2
    # torch.compile of the encoder layers: "auto" compiles on CUDA (ZeRO stages 0-2), "on" everywhere, "off" never.
    compile: str = "auto"
    # Optimizer, schedule, batch, precision and ZeRO: the DeepSpeed config; --fp32 turns bf16/fp16 off.
    deepspeed_config: str = "ds_configs/cpu.json"
    fp32: bool = False
    max_steps: int | None = None  # None: the schedule's total_num_steps from the DeepSpeed config
    seed: int = 1234
    # Outputs.
    run_dir: str = "runs/amos"
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir; none: start fresh; or a checkpoint path
    allow_config_change: bool = False  # resume although settings that alter the run differ (recorded in the run)
    # A new run from another run's (or `amos-ds convert`'s) checkpoint: its model and weights (train/init_from.py).
    init_from: str | None = None
    log_every: int = 1
    log_samples: bool = False  # record every step's sample indices in metrics.jsonl (for data-order checks)
    plot: bool = True  # draw the PNGs into run_dir/plots at the end
    # Held-out evaluation (amos_ds/train/evaluate.py): every eval_every steps and at the end, on eval_batches global
    # batches (train_batch_size samples each) of eval_data, or else of a fixed slice of `data` (at most a tenth of
    # it) that training then never reads; eval_batches 0 turns evaluation off.
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 200
    eval_batches: int = 8
    # A GLUE-format task folder whose frozen discriminator features a linear probe scores at each evaluation.
    probe_task: str | None = None
    probe_train_examples: int = 1000  # the probe fits on at most this many of train.tsv's examples
    # Faults. A step with a NaN/inf loss is skipped; this many in a row save the last good state and stop the run.
    max_nonfinite_steps: int = 10
    # A collective that waits longer than this (a rank hung or gone) fails, so the job ends and can resume.
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self.mask_split = tuple(self.mask_split)
        max_positions = self.model_config().max_positions
        self.seq_len = max_positions if self.seq_len is None else self.seq_len
        if self.seq_len > max_positions:
            raise ConfigError(f"TrainConfig.seq_len {self.seq_len} exceeds the model's max_positions {max_positions}")
        for name in ("seq_len", "num_workers", "save_every", "keep_last", "log_every", "builtin_vocab_size",
                     "max_nonfinite_steps", "collective_timeout_s", "eval_every", "eval_batches",
                     "probe_train_examples"):
            minimum = 0 if name in ("num_workers", "eval_batches") else 1
            if getattr(self, name) < minimum:
                raise ConfigError(f"TrainConfig.{name} must be at least {minimum}, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.builtin_vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(f"TrainConfig.builtin_vocab_size must be at least {MIN_VOCAB_SIZE}, got "
                              f"{self.builtin_vocab_size}")
        if not 0 <= self.seed < 2**32:  # NumPy's and torch's seeds
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"TrainConfig.mask_prob must be in (0, 1), got {self.mask_prob}")
        if len(self.mask_split) != 3 or not all(0.0 <= share <= 1.0 for share in self.mask_split) or \
                abs(sum(self.mask_split) - 1.0) > 1e-6:
            raise ConfigError(f"TrainConfig.mask_split must be three fractions in [0, 1] summing to 1 ([MASK], "
                              f"random, unchanged), got {self.mask_split}")
        if self.compile not in COMPILE_CHOICES:
            raise ConfigError(f"--compile must be one of {COMPILE_CHOICES}, got {self.compile!r}")

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The preset with the ablation and overrides applied; a training run passes the data's vocabulary size."""
        if vocab_size and self.model.get("vocab_size", vocab_size) != vocab_size:
            raise ConfigError(f"TrainConfig.model.vocab_size {self.model['vocab_size']} differs from the data's "
                              f"tokenizer ({vocab_size} pieces); remove it: the tokenizer sets the vocabulary size")
        try:
            config = get_preset(self.preset)
            if self.ablation:
                config = with_ablation(config, self.ablation)
            config = config.replace(**self.model)
            return config.replace(vocab_size=vocab_size) if vocab_size else config
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model settings (--preset {self.preset}, ablation, model overrides): {err}") from err

    def deepspeed_config_path(self) -> Path:
        """--deepspeed_config as given, or else the shipped ds_configs/ file of that name."""
        path = Path(self.deepspeed_config)
        if path.is_file() or path.is_absolute():
            return path
        shipped = DS_CONFIG_DIR / path.name
        return shipped if shipped.is_file() else path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The flags of `amos_ds/pretrain.py`; unset flags are None so that the config file's values stand."""
    parser = argparse.ArgumentParser(prog="amos_ds/pretrain.py", description="Pretrain AMOS with DeepSpeed.")
    parser.add_argument("--config", metavar="FILE", help="JSON file of TrainConfig fields (see docs/TRAINING.md)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", metavar="FILE",
                        help="DeepSpeed config JSON (default ds_configs/cpu.json)")
    parser.add_argument("--preset", help="model preset: tiny, small, base, base_plus_plus")
    parser.add_argument("--data", nargs="+", metavar="DIR[:WEIGHT]",
                        help="prepared corpora, optionally weighted; absent: the built-in corpus")
    parser.add_argument("--run-dir", dest="run_dir", help="checkpoints, metrics.jsonl, TensorBoard events, plots")
    parser.add_argument("--max-steps", dest="max_steps", type=int,
                        help="optimizer steps in the whole run (default: the schedule's total_num_steps)")
    parser.add_argument("--save-every", dest="save_every", type=int,
                        help="checkpoint every N optimizer steps, and at the end (default 1000)")
    parser.add_argument("--resume", help="auto (newest complete checkpoint), none, or a checkpoint path")
    parser.add_argument("--allow-config-change", dest="allow_config_change", action="store_true", default=None,
                        help="resume although the learning rate, batch, masking, data... differ from the "
                             "checkpoint's; the change is recorded in metrics.jsonl and the checkpoints")
    parser.add_argument("--init-from", dest="init_from", metavar="CHECKPOINT",
                        help="start a new run from this checkpoint or run directory (e.g. `amos-ds convert`'s): its "
                             "model and weights, the run's own data, optimizer and schedule")
    parser.add_argument("--seed", type=int, help="data order, masking, weights, dropout, noise (default 1234)")
    parser.add_argument("--compile", choices=COMPILE_CHOICES,
                        help="torch.compile the encoder layers: auto (on CUDA, ZeRO 0-2; the default), on, off")
    parser.add_argument("--eval-data", dest="eval_data", nargs="+", metavar="DIR[:WEIGHT]",
                        help="held-out corpora (default: a fixed slice of --data that training does not read)")
    parser.add_argument("--eval-every", dest="eval_every", type=int,
                        help="evaluate on the held-out data every N optimizer steps, and at the end (default 200)")
    parser.add_argument("--eval-batches", dest="eval_batches", type=int,
                        help="held-out global batches (train_batch_size samples each) per evaluation (default 8; "
                             "0: no evaluation)")
    parser.add_argument("--probe-task", dest="probe_task", metavar="DIR",
                        help="GLUE-format task folder: a linear probe on frozen discriminator features at each "
                             "evaluation")
    parser.add_argument("--fp32", action="store_true", default=None, help="no bf16/fp16 (for exactness tests)")
    # Passed by the deepspeed launcher; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig defaults, overridden by the --config file, overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if args.config:
        values = read_config_file(Path(args.config), TrainConfig, "--config")
    flags = {f.name for f in fields(TrainConfig)} & set(vars(args))
    values.update({name: getattr(args, name) for name in flags if getattr(args, name) is not None})
    return TrainConfig(**values)


def read_config_file(path: Path, config_class: type, flag: str) -> dict[str, Any]:
    """The fields of a JSON config file for `config_class` (a dataclass), each checked against its annotation."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: file not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{flag} {path}: not readable JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object of {config_class.__name__} fields")
    known = [f.name for f in fields(config_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{flag} {path}: unknown field(s) {unknown}; known: {known}")
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        if not _has_type(value, hints[name]):
            raise ConfigError(f"{flag} {path}: {name} must be {_type_name(hints[name])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # Python's JSON reader accepts NaN and Infinity
            raise ConfigError(f"{flag} {path}: {name} must be a finite number, got {value}")
    return values


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (values are data: nothing in them is ever evaluated)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):  # JSON has lists only
        item = args[0] if args else Any
        return isinstance(value, list) and all(_has_type(v, item) for v in value) and \
            (origin is list or ... in args or len(value) == len(args))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else hint.__name__
