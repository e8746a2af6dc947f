"""What held-out evaluation and the probe cost: the same short pretraining run with them at the default intervals
(--eval-every, --eval-batches, --probe-train-examples defaults) and without them (--eval-batches 0).

    python bench/bench_eval_cost.py                  # CPU: the main job (tiny, 2 ranks, ds_configs/cpu.json), 400 steps
    python bench/bench_eval_cost.py --budget gpu     # one GPU: `small`, bf16, 128 x 128 per step, one process

Prints one table: each run's wall time, its summed step times, the time its evaluations and probes took (measured
inside the run: `eval_time_s`, `probe_time_s` in metrics.jsonl), and two ratios: evaluation + probe over training
step time in the same run, and the wall-time difference between the runs over the run without them (noisier on a
shared machine: it includes start-up jitter and the other ranks' wait for rank 0's probe).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Appended, not first: the root's kernels/ would shadow PyPI's `kernels`, which transformers imports.
sys.path.append(str(REPO))
SHARED_DATA = Path(os.environ.get("AMOS_SHARED_DATA", REPO.parent / "shared" / "data"))
if not SHARED_DATA.is_dir():
    SHARED_DATA = REPO / ".data"  # where bench/gpu_check.sh's machine carries it
GPU_DS_CONFIG = {"train_batch_size": 128, "train_micro_batch_size_per_gpu": 128,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                           "weight_decay": 0.01, "torch_adam": True}},
                 "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                                   "warmup_num_steps": 100, "warmup_type": "linear",
                                                                   "total_num_steps": 2000}},
                 "gradient_clipping": 2.0, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: cpu 400, gpu 600)")
    mr = SHARED_DATA / "eval" / "mr"
    parser.add_argument("--probe-task", default=str(mr) if mr.is_dir() else "none",
                        help="GLUE-format task for the probe (default: the shared MR task, where there is one); "
                             "'none' for no probe")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    return parser.parse_args()


def command(args: argparse.Namespace, work: Path, run_dir: Path) -> list[str]:
    steps = args.steps or (400 if args.budget == "cpu" else 600)
    flags = ["--run-dir", str(run_dir), "--max-steps", str(steps), "--resume", "none"]
    if args.budget == "cpu":  # the README's main job
        return ["deepspeed", "--hostfile", "hostfiles/localhost", "--no_ssh", "--node_rank", "0", "--master_addr",
                "127.0.0.1", "amos_ds/pretrain.py", *flags]
    (work / "ds.json").write_text(json.dumps(GPU_DS_CONFIG))
    return [sys.executable, "amos_ds/pretrain.py", "--deepspeed_config", str(work / "ds.json"), "--preset", "small",
            *flags]


def timed_run(flags: list[str], run_dir: Path) -> tuple[float, list[dict]]:
    from amos_ds.train.metrics import read_metrics

    started = time.perf_counter()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(flags, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{' '.join(flags)} failed ({result.returncode}):\n{result.stdout[-3000:]}")
    return seconds, read_metrics(run_dir)


def main() -> None:
    args = parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="amos_eval_cost."))
    work.mkdir(parents=True, exist_ok=True)
    probe = [] if args.probe_task == "none" else ["--probe-task", args.probe_task]
    runs = {"with evaluation + probe": [*command(args, work, work / "with"), *probe],
            "without (--eval-batches 0)": [*command(args, work, work / "without"), "--eval-batches", "0"]}
    rows = {}
    for name, flags in runs.items():
        print(f"running {name}: {' '.join(flags)}", flush=True)
        rows[name] = timed_run(flags, Path(flags[flags.index("--run-dir") + 1]))
    print(f"\nevaluation cost, {args.budget} budget, {len(rows['without (--eval-batches 0)'][1])} steps, probe "
          f"{args.probe_task}\n")
    print("| run | wall s | summed step time s | evaluations | eval s | probe s | (eval + probe) / step time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (wall, records) in rows.items():
        step_time = sum(record["step_time_s"] for record in records)
        evals = [record for record in records if "eval_time_s" in record]
        eval_s = sum(record["eval_time_s"] for record in evals)
        probe_s = sum(record.get("probe_time_s", 0.0) for record in evals)
        print(f"| {name} | {wall:.1f} | {step_time:.1f} | {len(evals)} | {eval_s:.1f} | {probe_s:.1f} | "
              f"{100 * (eval_s + probe_s) / step_time:.2f}% |")
    (with_wall, _), (without_wall, _) = rows.values()
    print(f"| wall time with / without | {with_wall / without_wall:.3f} ({100 * (with_wall / without_wall - 1):+.2f}%) "
          "| | | | | |")


if __name__ == "__main__":
    main()
