"""Does AMOS pretraining give a better encoder? AMOS, the ELECTRA-style single-generator ablation, an independent
Hugging Face ELECTRA and random initialisation, after pretraining on the same data for the same token budget: held-out
RTD AUC, a linear probe on frozen features, and accuracy fine-tuned on MR with the same seeds.

    python bench/quality.py --budget cpu [--work DIR]     # this 2-core CPU: about 51 minutes in all
    python bench/quality.py --budget gpu [--work DIR]     # one H100/H200 (bench/gpu_check.sh runs it): up to 7 minutes

Both pretraining runs use the real trainer (amos_ds/pretrain.py, one process) on a tokenizer and corpus built from
DATA/pretrain, with the same steps, batch and sequence length; the ELECTRA-style arm is `single_gen_<d>` (one generator
of the middle head's depth, no mixture, as the paper's single-generator baselines). On the CPU the two runs go side by
side, one core each (`--threads` per run); on the GPU one after the other. The independent peer is
bench/bench_train.py's Hugging Face ELECTRA (ElectraForMaskedLM + ElectraForPreTraining, shared embeddings, RTD weight
50), trained in this process afterwards on the batches the trainer's loader gives the AMOS arms (the same held-out
split, sample order and masking) for the same steps, with AdamW at the same peak learning rate, warm-up and linear
decay; its discriminator is then probed and fine-tuned as the other arms are (the same classification head, seeds, grid
and epochs; `HFElectraSource`). Every flag below overrides the budget's value; `--pretrain-steps 20 --epochs 1 --seeds
1` is a smoke test. Prints one table: held-out RTD AUC at the last step (0.5 = chance), the probe's MR dev accuracy
(mean-pooled frozen last layer, amos_ds/finetune/probe.py; majority class beside it), MR test accuracy at each seed's
best dev epoch, median and spread (min-max) over seeds, and each arm against random init; writes results.json and copies
each run's plots (Figure 3a: mixture_weights.png, Figure 3b: disc_accuracy.png, held_out.png) into WORK/plots/ARM/.
"""

import argparse
import collections
import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Appended, not first: the root's kernels/ would shadow PyPI's `kernels`, which transformers imports.
sys.path.append(str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from amos_ds.config import ModelConfig  # noqa: E402
from amos_ds.finetune.pretrained import EncoderSource  # noqa: E402

BUDGETS = {
    # CPU: the main job's recipe (tiny, 32 x 128 tokens per step, peak lr 2e-3, fp32; ds_configs/cpu.json) on the
    # shared text, for 1,800 steps (the main job's 1,200 and more: this text's unigram plateau lasts longer than the
    # built-in corpus's): two pretraining runs side by side, one core each (about 20 minutes; 40 is only a safety
    # net), the HF ELECTRA arm (about 23 minutes) and 12 fine-tunings (about 7 minutes); 51 minutes in all.
    "cpu": dict(preset="tiny", vocab_size=8192, seq_len=128, batch_size=32, pretrain_lr=2e-3, pretrain_steps=1800,
                pretrain_minutes=40.0, epochs=3, lr=3e-4, max_len=64, device="cpu", threads=1, fp32=True,
                side_by_side=True),
    # GPU: `small` in bf16, 128 x 128 tokens per step; about 80 s per pretraining run on an H100.
    "gpu": dict(preset="small", vocab_size=8192, seq_len=128, batch_size=128, pretrain_lr=1e-3, pretrain_steps=2000,
                pretrain_minutes=1.5, epochs=3, lr=1e-4, max_len=64, device="cuda", threads=8, fp32=False,
                side_by_side=False),
}
PRINT_EVERY = 100  # of the trainer's step lines, print every this many


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--data", default=os.environ.get("AMOS_SHARED_DATA", str(REPO.parent / "shared" / "data")),
                        help="folder with pretrain/ (raw text) and eval/mr/")
    parser.add_argument("--work", help="folder for the tokenizer, corpus, runs and results (default: a temporary one)")
    parser.add_argument("--preset")
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch-size", type=int, help="pretraining batch (sequences)")
    parser.add_argument("--pretrain-lr", type=float)
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--pretrain-minutes", type=float, help="deadline of each pretraining run (a safety net)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="fine-tuning LR, every arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-len", type=int)
    parser.add_argument("--threads", type=int, help="intra-op threads (CPU: 1, a second waits on a busy core)")
    args = parser.parse_args()
    for name, value in BUDGETS[args.budget].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def prepare_corpus(data: Path, work: Path, vocab_size: int) -> Path:
    """A tokenizer trained on every file of DATA/pretrain, and those files preprocessed with it."""
    from amos_ds.data.preprocess import preprocess
    from amos_ds.data.tokenizer import train_tokenizer

    sources = sorted(str(p) for p in (data / "pretrain").iterdir() if p.is_file())
    workers = min(8, os.cpu_count() or 1)
    train_tokenizer(sources, vocab_size, str(work / "tokenizer"), max_sentences=300_000, threads=workers)
    preprocess(sources, str(work / "tokenizer"), str(work / "corpus"), workers=workers, progress=False)
    return work / "corpus"


def pretrain(args: argparse.Namespace, corpus: Path, run_dir: Path, ablation: str | None) -> None:
    """Run amos_ds/pretrain.py in one process until --pretrain-steps or the deadline; its progress lines are printed
    with the run's name in front."""
    lr, steps = args.pretrain_lr, args.pretrain_steps
    ds_config = {"train_batch_size": args.batch_size, "train_micro_batch_size_per_gpu": args.batch_size,
                 "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                           "weight_decay": 0.01, "torch_adam": True}},
                 "scheduler": {"type": "WarmupDecayLR", "params": {
                     "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(1, steps // 12),
                     "warmup_type": "linear", "total_num_steps": steps}},
                 "gradient_clipping": 2.0, "bf16": {"enabled": not args.fp32}, "zero_optimization": {"stage": 1}}
    train_config = {"seq_len": args.seq_len, "num_workers": 0, "log_every": 1, "save_every": steps,
                    "ablation": ablation}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.ds.json").write_text(json.dumps(ds_config))
    (run_dir.parent / f"{run_dir.name}.train.json").write_text(json.dumps(train_config))
    command = [sys.executable, str(REPO / "amos_ds" / "pretrain.py"),
               "--deepspeed_config", str(run_dir.parent / f"{run_dir.name}.ds.json"),
               "--config", str(run_dir.parent / f"{run_dir.name}.train.json"), "--preset", args.preset,
               "--data", str(corpus), "--max-steps", str(steps), "--run-dir", str(run_dir)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}  # one process: the trainer sets its rank and a free port
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + args.pretrain_minutes * 60
    tail = collections.deque(maxlen=30)  # shown if the trainer fails
    # The trainer logs every step (its summary averages the last 10), so the deadline is checked often enough.
    for line in process.stdout:
        tail.append(line)
        step = re.match(r"step (\d+)/", line)
        if (step and int(step[1]) % PRINT_EVERY == 0) or line.startswith(
                ("training", "stop signal", "error", "Traceback", "summary")):
            print(f"  {run_dir.name}: {line.rstrip()[:160]}", flush=True)
        if time.monotonic() > deadline and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits 0
            deadline = float("inf")
    if process.wait():
        raise RuntimeError(f"pretraining {run_dir.name} failed with exit code {process.returncode}; its last lines:\n"
                           f"{''.join(tail)}")


class HFElectraEncoder(nn.Module):
    """The HF peer's discriminator body (an ElectraModel) behind fine-tuning's encoder interface: ids [B, T] -> the
    last layer's hidden states [B, T, H]; `config` gives the classification head its width and init std."""

    def __init__(self, body: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.body, self.config = body, config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids, attention_mask=attention_mask).last_hidden_state


@dataclasses.dataclass
class HFElectraSource(EncoderSource):
    """What each fine-tuning seed of the HF arm starts from: the peer's trained discriminator body (`state`, with its
    `hf_config`), rebuilt with fine-tuning's dropout. `config` is the AMOS arms' (same width and positions)."""

    hf_config: object = None  # transformers.ElectraConfig

    def build(self, dropout: float) -> HFElectraEncoder:
        from transformers import ElectraModel

        hf_config = copy.deepcopy(self.hf_config)
        hf_config.hidden_dropout_prob = hf_config.attention_probs_dropout_prob = dropout
        body = ElectraModel(hf_config)
        body.load_state_dict(self.state)
        return HFElectraEncoder(body, self.config)


def train_hf_electra(args: argparse.Namespace, corpus: Path, like: EncoderSource) -> dict:
    """Hugging Face ELECTRA on the AMOS arms' batches: its held-out RTD AUC after the steps, and its discriminator as
    a fine-tuning source with `like`'s tokenizer and model config."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_train import RTD_WEIGHT, ElectraPeer

    from amos_ds.config import get_preset
    from amos_ds.data import DataConfig, ResumableSampler, build_loader, open_corpora
    from amos_ds.data.held_out import held_out_batches
    from amos_ds.finetune.run import warmup_linear_decay
    from amos_ds.train.evaluate import held_out_split, roc_auc
    from amos_ds.train.train_config import TrainConfig

    started = time.perf_counter()
    seed = TrainConfig.seed  # the trainer's default: its sample order and masking
    dataset = open_corpora([str(corpus)], args.seq_len, seed)
    training, held_out = held_out_split(dataset, [], TrainConfig.eval_batches, args.batch_size, seed)
    data_config = DataConfig(seq_len=args.seq_len, seed=seed, num_workers=0)
    batches = iter(build_loader(training, ResumableSampler(len(training), args.batch_size, 0, 1, seed), data_config))
    device = torch.device(args.device)
    peer = ElectraPeer(get_preset(args.preset).replace(vocab_size=dataset.vocab_size),
                       argparse.Namespace(precision="fp32" if args.fp32 else "bf16"), device)
    for group in peer.optimizer.param_groups:
        group["lr"] = args.pretrain_lr
    schedule = torch.optim.lr_scheduler.LambdaLR(
        peer.optimizer, warmup_linear_decay(max(1, args.pretrain_steps // 12), args.pretrain_steps))
    deadline = time.monotonic() + args.pretrain_minutes * 60  # the AMOS arms' safety net, here too
    for step in range(1, args.pretrain_steps + 1):
        loss = peer.step([next(batches)], seed=step)["loss"]
        schedule.step()
        if time.monotonic() > deadline:
            print(f"  HF ELECTRA: --pretrain-minutes {args.pretrain_minutes:g} reached at step {step}", flush=True)
            break
        if step % PRINT_EVERY == 0 or step == args.pretrain_steps:
            print(f"  HF ELECTRA: step {step}/{args.pretrain_steps} | loss {loss:.4f} (RTD weight {RTD_WEIGHT:g})",
                  flush=True)
    peer.generator.eval()
    peer.discriminator.eval()
    scores, labels = [], []
    torch.manual_seed(seed)  # the Gumbel noise of its held-out sampling
    with torch.no_grad():
        for _, batch in held_out_batches(held_out, args.batch_size, 0, 1, data_config):
            _, judged, replaced = peer.forward(batch)
            real = batch["attention_mask"].to(device).bool()
            scores.append(judged.logits.float()[real].cpu())
            labels.append(replaced[real].cpu())
    body = peer.discriminator.electra
    state = {name: tensor.detach().cpu() for name, tensor in body.state_dict().items()}
    source = HFElectraSource(like.config, like.tokenizer, state, "HF ELECTRA (bench/bench_train.py's ElectraPeer)",
                             hf_config=body.config)
    return {"auc": roc_auc(torch.cat(scores).numpy(), torch.cat(labels).numpy()), "source": source,
            "steps": step, "minutes": (time.perf_counter() - started) / 60}


def probe_last_layer(encoder: nn.Module, task) -> float:
    """The probe's dev accuracy on an encoder's (on the CPU, as `build` leaves it) mean-pooled last layer."""
    from amos_ds.finetune.probe import probe_layers

    accuracy, = probe_layers(lambda ids, mask: [encoder(ids, mask)], task, torch.device("cpu"))
    return accuracy


def spread(values: list[float]) -> str:
    return f"{min(values):.4f}-{max(values):.4f}"


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the trainer's process; this one sets torch's below
    import statistics

    from amos_ds.config import get_preset
    from amos_ds.finetune.pretrained import load_source
    from amos_ds.finetune.probe import load_probe_task
    from amos_ds.finetune.run import FinetuneConfig, finetune
    from amos_ds.finetune.tasks import load_task
    from amos_ds.train.summary import read_summary

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "pretrain").is_dir() or not (data / "eval" / "mr").is_dir():
        sys.exit(f"--data {data}: needs pretrain/ and eval/mr/ (see ../shared/data/README.md)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="amos_quality."))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpu_started = time.process_time()

    corpus = prepare_corpus(data, work, args.vocab_size)
    print(f"corpus ready in {time.perf_counter() - started:.0f} s", flush=True)
    heads = get_preset(args.preset).head_layers
    single = f"single_gen_{heads[len(heads) // 2]}"
    pretrained = {}

    def pretrain_arm(arm: str, ablation: str | None) -> None:
        print(f"pretraining {arm}: {args.preset}, {args.pretrain_steps} steps x {args.batch_size} x {args.seq_len}",
              flush=True)
        arm_started = time.perf_counter()
        run_dir = work / ("amos" if ablation is None else single)
        pretrain(args, corpus, run_dir, ablation)
        source = load_source(str(run_dir))
        step = json.loads((Path(source.description) / "amos_meta.json").read_text())["step"]
        pretrained[arm] = (source, step, (time.perf_counter() - arm_started) / 60, read_summary(run_dir))
        shutil.copytree(run_dir / "plots", work / "plots" / run_dir.name, dirs_exist_ok=True)

    with ThreadPoolExecutor(max_workers=2 if args.side_by_side else 1) as pool:
        runs = [pool.submit(pretrain_arm, "AMOS", None), pool.submit(pretrain_arm, f"ELECTRA-style ({single})", single)]
        try:
            for run in runs:
                run.result()
        except RuntimeError as err:
            sys.exit(str(err))
    pretrained = {arm: pretrained[arm] for arm in ("AMOS", f"ELECTRA-style ({single})")}  # the table's order

    task = load_task(data / "eval" / "mr")
    probe_task = load_probe_task(data / "eval" / "mr", pretrained["AMOS"][0].tokenizer, args.max_len)
    print(f"pretraining HF ELECTRA: {args.preset} shapes, {args.pretrain_steps} steps x {args.batch_size} x "
          f"{args.seq_len}", flush=True)
    amos_source = pretrained["AMOS"][0]
    hf_electra = train_hf_electra(args, corpus, amos_source)
    config = FinetuneConfig(epochs=args.epochs, lr=[args.lr], batch_size=[32], warmup=0.1, max_len=args.max_len,
                            seeds=args.seeds, device=args.device)
    arms = {arm: source for arm, (source, *_) in pretrained.items()}
    arms["HF ELECTRA"] = hf_electra["source"]
    arms["random init"] = dataclasses.replace(amos_source, state=None, description="random init")
    held_out_auc = {arm: summary["held_out"]["eval_rtd_auc"] for arm, (*_, summary) in pretrained.items()}
    held_out_auc["HF ELECTRA"] = hf_electra["auc"]
    results = {}
    for arm, source in arms.items():
        print(f"fine-tuning {arm}", flush=True)
        results[arm] = finetune(source, task, config, log=lambda line: print("  " + line, flush=True))
        results[arm]["probe"] = probe_last_layer(source.build(0.0).eval(), probe_task)
        results[arm]["held_out_auc"] = held_out_auc.get(arm)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    model = amos_source.config
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\nAMOS quality on MR ({len(task.train)}/{len(task.dev)}/{len(task.test)} train/dev/test), {device}, "
          f"total {(time.perf_counter() - started) / 60:.1f} min wall, {(time.process_time() - cpu_started) / 60:.1f} "
          f"min CPU in this process (the trainer's is in its own)")
    print(f"pretraining: preset {args.preset} (H {model.hidden_size}, {model.disc_layers}-layer discriminator, "
          f"vocab {model.vocab_size}), {args.batch_size} x {args.seq_len} tokens per step, lr {args.pretrain_lr:g}, "
          f"{'fp32' if args.fp32 else 'bf16'}")
    for arm, (_, step, minutes, summary) in pretrained.items():
        print(f"  {arm}: {step} steps = {step * args.batch_size * args.seq_len / 1e6:.2f}M tokens in {minutes:.1f} "
              f"min; logged steps {summary['first_step']}-{summary['last_step']}: deepest head's MLM "
              f"loss {summary['mlm_loss']:.3f} (unigram entropy {summary['unigram_entropy']:.3f}), discriminator "
              f"RTD loss {summary['rtd_loss']:.3f} (best constant guess {summary['rtd_loss_constant']:.3f}), "
              f"accuracy on replaced tokens {summary['disc_acc_replaced']:.3f}")
    print(f"  HF ELECTRA: {hf_electra['steps']} steps in {hf_electra['minutes']:.1f} min (this process)")
    print(f"fine-tuning: {config.epochs} epochs, lr {args.lr:g}, batch {config.batch_size[0]}, warm-up "
          f"{config.warmup:g}, dropout {config.dropout:g}, max_len {config.max_len}, seeds {config.seeds}; probe: "
          f"{len(probe_task.train)}/{len(probe_task.dev)} train/dev, majority class {probe_task.majority:.4f}\n")
    print("| encoder | held-out RTD AUC | probe dev acc | test acc (median) | spread (min-max) | dev acc (median) | "
          "test acc per seed | vs random init |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base = results["random init"]["median"]["test"]["accuracy"]
    for arm, result in results.items():
        auc = "-" if result["held_out_auc"] is None else f"{result['held_out_auc']:.4f}"
        tests = [run["test"]["accuracy"] for run in result["runs"]]
        median = statistics.median(tests)
        print(f"| {arm} | {auc} | {result['probe']:.4f} | {median:.4f} | {spread(tests)} | "
              f"{result['median']['dev']['accuracy']:.4f} | {' '.join(f'{t:.4f}' for t in tests)} | "
              f"{100 * (median - base):+.2f} pts |")
    print(f"\nresults: {work / 'results.json'}; plots (Figure 3a mixture_weights.png, 3b disc_accuracy.png): "
          f"{work / 'plots'}")


if __name__ == "__main__":
    main()
