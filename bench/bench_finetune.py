"""The fine-tuning proof that pretraining worked: pretrain on real text for a bounded time with the real trainer,
then fine-tune that checkpoint's encoder and the same architecture from random init on MR, same seeds and budget.

    python bench/bench_finetune.py [--data ../shared/data] [--preset tiny] [--pretrain-steps 1000]
                                   [--pretrain-minutes 13] [--epochs 3] [--lr 3e-4] [--seeds 1 2 3]

Prints one table: dev and test accuracy (median over seeds, test at each seed's best dev epoch) of both arms and the
difference. Pretraining stops at --pretrain-steps or, through the trainer's SIGTERM checkpoint, at the deadline.
Runs with one intra-op thread (--threads): on a shared 2-core machine a second OpenMP thread waits on a busy core,
which measured 7-30x slower per step than one thread.
"""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("AMOS_SHARED_DATA", str(REPO.parent / "shared" / "data")),
                        help="folder with pretrain/ (raw text) and eval/mr/")
    parser.add_argument("--work", help="folder for the tokenizer, corpus, run and results (default: a temporary one)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="pretraining batch (sequences)")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--pretrain-minutes", type=float, default=13.0, help="deadline for pretraining")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning LR, both arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def prepare_corpus(data: Path, work: Path, vocab_size: int) -> Path:
    """A tokenizer trained on every file of DATA/pretrain, and those files preprocessed with it."""
    from amos_ds.data.preprocess import preprocess
    from amos_ds.data.tokenizer import train_tokenizer

    sources = sorted(str(p) for p in (data / "pretrain").iterdir() if p.is_file())
    train_tokenizer(sources, vocab_size, str(work / "tokenizer"), max_sentences=300_000, threads=2)
    preprocess(sources, str(work / "tokenizer"), str(work / "corpus"), workers=2, progress=False)
    return work / "corpus"


def pretrain(args: argparse.Namespace, corpus: Path, work: Path) -> tuple[Path, str]:
    """Run amos_ds/pretrain.py in one process until --pretrain-steps or the deadline; the run dir and its last line."""
    lr, steps = args.pretrain_lr, args.pretrain_steps
    ds_config = {"train_batch_size": args.batch_size, "train_micro_batch_size_per_gpu": args.batch_size,
                 "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                           "weight_decay": 0.01, "torch_adam": True}},
                 "scheduler": {"type": "WarmupDecayLR", "params": {
                     "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(1, steps // 16),
                     "warmup_type": "linear", "total_num_steps": steps}},
                 "gradient_clipping": 2.0, "zero_optimization": {"stage": 1}}
    train_config = {"seq_len": args.seq_len, "num_workers": 0, "plot": False, "log_every": 50, "save_every": steps}
    (work / "ds.json").write_text(json.dumps(ds_config))
    (work / "train.json").write_text(json.dumps(train_config))
    run_dir = work / "run"
    command = [sys.executable, str(REPO / "amos_ds" / "pretrain.py"), "--deepspeed_config", str(work / "ds.json"),
               "--config", str(work / "train.json"), "--preset", args.preset, "--data", str(corpus),
               "--max-steps", str(steps), "--run-dir", str(run_dir), "--fp32"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}  # one process: the trainer sets its rank and a free port
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + args.pretrain_minutes * 60
    last = ""
    for line in process.stdout:  # the trainer logs every 50 steps, so the deadline is checked often enough
        if line.startswith(("step", "training", "stop signal", "error", "Traceback")):
            print("  " + line.rstrip()[:160], flush=True)
            last = line.strip()
        if time.monotonic() > deadline and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits 0
            deadline = float("inf")
    if process.wait():
        sys.exit(f"pretraining failed with exit code {process.returncode}: {last}")
    return run_dir, last


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the trainer's process; this one sets torch's below
    import torch

    from amos_ds.finetune.pretrained import load_source
    from amos_ds.finetune.run import FinetuneConfig, finetune
    from amos_ds.finetune.tasks import load_task

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "pretrain").is_dir() or not (data / "eval" / "mr").is_dir():
        sys.exit(f"--data {data}: needs pretrain/ and eval/mr/ (see ../shared/data/README.md)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_finetune."))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    corpus = prepare_corpus(data, work, args.vocab_size)
    print(f"corpus ready in {time.perf_counter() - started:.0f} s; pretraining {args.preset}", flush=True)
    pretrain_started = time.perf_counter()
    run_dir, last_line = pretrain(args, corpus, work)
    pretrain_minutes = (time.perf_counter() - pretrain_started) / 60

    task = load_task(data / "eval" / "mr")
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=32, warmup=0.1, max_len=args.max_len,
                            seeds=args.seeds)
    pretrained = load_source(str(run_dir))
    step = json.loads((Path(pretrained.description) / "amos_meta.json").read_text())["step"]
    random_init = dataclasses.replace(pretrained, state=None, description="random init")
    arms = {}
    for name, source in ((f"pretrained ({step} steps)", pretrained), ("random init", random_init)):
        print(f"fine-tuning {name}", flush=True)
        arms[name] = finetune(source, task, config, log=lambda line: print("  " + line, flush=True))
    (work / "results.json").write_text(json.dumps(arms, indent=2) + "\n")

    model = pretrained.config
    print(f"\nAMOS fine-tuning proof on MR ({len(task.train)}/{len(task.dev)}/{len(task.test)} train/dev/test), "
          f"CPU, {args.threads} thread(s), total {(time.perf_counter() - started) / 60:.1f} min")
    print(f"pretraining: preset {args.preset} (H {model.hidden_size}, {model.disc_layers}-layer discriminator, "
          f"vocab {model.vocab_size}), {step} steps x {args.batch_size} x {args.seq_len} tokens = "
          f"{step * args.batch_size * args.seq_len / 1e6:.2f}M tokens in {pretrain_minutes:.1f} min; last log: "
          f"{last_line[:90]}")
    print(f"fine-tuning: {config.epochs} epochs, lr {config.lr:g}, batch {config.batch_size}, warm-up "
          f"{config.warmup:g}, dropout {config.dropout:g}, max_len {config.max_len}, seeds {config.seeds}\n")
    print("| encoder | dev acc (median) | test acc (median) | test acc per seed |")
    print("| --- | --- | --- | --- |")
    for name, result in arms.items():
        per_seed = " ".join(f"{run['test_acc']:.4f}" for run in result["runs"])
        print(f"| {name} | {result['median_dev_acc']:.4f} | {result['median_test_acc']:.4f} | {per_seed} |")
    pre, rand = arms.values()
    print(f"| difference | {100 * (pre['median_dev_acc'] - rand['median_dev_acc']):+.2f} pts | "
          f"{100 * (pre['median_test_acc'] - rand['median_test_acc']):+.2f} pts | |")
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
