"""What a run reports each optimizer step: a console line (rank 0), `metrics.jsonl`, and TensorBoard.

metrics.jsonl holds one JSON object per optimizer step with `step`, every model metric (averaged over the step's
micro-batches and all ranks), `lr`, `grad_norm`, `tokens_per_s`, `tflops` (model TFLOP/s per device), `mfu`,
`data_wait_s`, `step_time_s`, `mem_gib`, `world_size`, `skipped_steps` (DeepSpeed's count of steps not applied,
amos_ds/train/nonfinite.py) and, with TrainConfig.log_samples, `samples` (the step's samples' numbers in the whole
dataset, every rank's in rank order; at an evaluation also `eval_samples`, the held-out ones'). A step that
evaluated on held-out data adds its `eval_*`, `health_*` and `probe_*` keys (amos_ds/train/evaluate.py) and a
second console line. TensorBoard events go through DeepSpeed's monitor (the `tensorboard` section of the DeepSpeed
config, pointed at RUN_DIR/tensorboard), under `Train/<name>`, and the held-out keys under `Eval/<name>`.
"""

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from amos_ds.atomic import write_atomically
from amos_ds.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
HELD_OUT_PREFIXES = ("eval_", "health_", "probe_")  # keys of a held-out evaluation


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Every record of RUN_DIR/metrics.jsonl, in order ([] when there is none yet); see _read_lines."""
    return [record for _, record in _read_lines(Path(run_dir) / METRICS_FILE)]


def _read_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every record of a metrics.jsonl. A partial last line, cut short by a full disk or a power
    cut while it was appended, is dropped with a warning; a damaged line before it is an error naming it."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_bytes().decode(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except ValueError:
            if number < len(lines):
                raise ConfigError(f"{path} line {number}: not a JSON record; restore the file or delete that "
                                  "line") from None
            print(f"warning: {path}: dropped its last line, a record cut short while it was written ({line[:40]!r})",
                  file=sys.stderr, flush=True)
    return records


def average_over_ranks(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-rank sums over `count` micro-batches -> the mean over all micro-batches of all ranks (one all-reduce)."""
    names = sorted(sums)
    stacked = torch.stack([sums[name].float() for name in names])
    dist.all_reduce(stacked)
    stacked /= count * dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory since the last call (CUDA), or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """Rank 0's writer of metrics.jsonl, TensorBoard events and the console line; other ranks hold a no-op one."""

    def __init__(self, run_dir: Path, monitor: Any, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.monitor = monitor
        self.config_change: dict[str, list] | None = None
        if not enabled:
            return
        path = Path(run_dir) / METRICS_FILE
        # After a crash the file may hold steps past the checkpoint we resume from: those steps run again.
        kept = [line for line, record in _read_lines(path) if record["step"] <= resume_step]
        write_atomically(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def log(self, record: dict[str, Any], max_steps: int) -> None:
        if not self.enabled:
            return
        if self.config_change:
            record, self.config_change = {**record, "config_change": self.config_change}, None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.monitor.enabled:
            self.monitor.write_events([
                (f"{'Eval' if name.startswith(HELD_OUT_PREFIXES) else 'Train'}/{name}", value, step)
                for name, value in record.items() if isinstance(value, (int, float)) and name != "step"])
        print(console_line(record, max_steps), flush=True)
        if "eval_mlm_loss" in record:
            print(eval_line(record), flush=True)

    def note_config_change(self, changes: dict[str, list]) -> None:
        """Settings changed on resume (--allow-config-change): warned now, recorded in the next record."""
        if self.enabled:
            self.config_change = changes
            print(f"warning: resuming with changed settings, recorded in {METRICS_FILE}: {json.dumps(changes)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def console_line(record: dict[str, Any], max_steps: int) -> str:
    """One compact line: progress, losses, what the paper plots, optimizer state, speed, memory."""
    heads = [name.removeprefix("mix_weight_L") for name in record if name.startswith("mix_weight_L")]
    mix = "/".join(f"{record[f'mix_weight_L{layer}']:.2f}" for layer in heads)
    mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
    grad_norm = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "n/a"
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} (mlm {record['mlm_loss']:.3f}, "
            f"rtd {record['rtd_loss']:.4f}) | acc rep {record['disc_acc_replaced']:.3f} "
            f"orig {record['disc_acc_original']:.3f} | mix L{'/'.join(heads)} {mix} | lr {record['lr']:.2e} | "
            f"gnorm {grad_norm} | {record['tokens_per_s']:,.0f} tok/s | "
            f"{record['tflops']:.3f} TFLOP/s | MFU {mfu} | data {1000 * record['data_wait_s']:.0f} ms | "
            f"mem {record['mem_gib']:.2f} GiB")


def eval_line(record: dict[str, Any]) -> str:
    """The held-out evaluation of a step: MLM per head, RTD against the constant guess, AUC, probe, health."""
    heads = [name.removeprefix("eval_mlm_loss_L") for name in record if name.startswith("eval_mlm_loss_L")]
    mlm = " ".join(f"L{layer} {record[f'eval_mlm_loss_L{layer}']:.3f}/{record[f'eval_mlm_acc_L{layer}']:.3f}"
                   for layer in heads)
    auc = f"{record['eval_rtd_auc']:.3f}" if record["eval_rtd_auc"] is not None else "n/a"
    probe = (f" | probe {record['probe_accuracy']:.3f} (majority {record['probe_majority']:.3f}, "
             f"{record['probe_time_s']:.1f} s)" if "probe_accuracy" in record else "")
    health = (f" | health cos {record['health_mean_cosine']:.3f} rank {record['health_effective_rank']:.1f} "
              f"std {record['health_unit_std']:.3f}" if "health_mean_cosine" in record else "")
    return (f"eval step {record['step']} | mlm loss/acc {mlm} | rtd {record['eval_rtd_loss']:.4f} "
            f"(constant {record['eval_rtd_loss_constant']:.4f}) AUC {auc} | acc rep "
            f"{record['eval_disc_acc_replaced']:.3f} orig {record['eval_disc_acc_original']:.3f}{probe}{health} | "
            f"{record['eval_time_s']:.1f} s")
