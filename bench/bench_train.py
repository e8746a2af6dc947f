"""Training step time: the DeepSpeed engine against a plain PyTorch loop, same model, same AdamW, same batch.

    python bench/bench_train.py                                  # CPU: tiny and small, fp32
    python bench/bench_train.py --preset base --impl triton      # CUDA: bf16, tokens/s and MFU
    python bench/bench_train.py --preset base --impl torch       # CUDA, the unfused vocabulary path

One step = forward, backward, gradient clipping at 2.0 and an AdamW update over one micro-batch of masked random
tokens (15% masked). The plain loop uses torch.optim.AdamW (bf16: under torch.autocast); DeepSpeed runs the same
torch AdamW (`torch_adam`) with ZeRO-1 in one process (bf16: its bf16 weights with fp32 master weights). The two
alternate in rounds so that a noisy machine slows both alike; the table shows the median step time of each.
Target: DeepSpeed at most 1.15x the plain loop.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from amos_ds.config import get_preset  # noqa: E402
from amos_ds.model import AMOSModel  # noqa: E402
from amos_ds.pretrain import setup_distributed  # noqa: E402
from amos_ds.train.flops import device_peak_tflops, step_flops  # noqa: E402
from amos_ds.vocab import IGNORE_INDEX, MASK_ID, NUM_SPECIAL_TOKENS  # noqa: E402

ADAMW = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01}
MASK_PROB = 0.15


def masked_batch(vocab_size: int, batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(NUM_SPECIAL_TOKENS, vocab_size, (batch, seq_len), generator=generator)
    masked = torch.rand(batch, seq_len, generator=generator) < MASK_PROB
    labels = torch.where(masked, tokens, torch.full_like(tokens, IGNORE_INDEX))
    inputs = torch.where(masked, torch.full_like(tokens, MASK_ID), tokens)
    return {"input_ids": inputs.to(device), "attention_mask": torch.ones_like(tokens).to(device),
            "labels": labels.to(device)}


class PlainLoop:
    def __init__(self, config, device: torch.device, bf16: bool) -> None:
        torch.manual_seed(0)
        self.model = AMOSModel(config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **ADAMW)
        self.device, self.bf16 = device, bf16

    def step(self, batch: dict[str, torch.Tensor], seed: int) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**batch, seed=seed).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedLoop:
    def __init__(self, config, micro_batch: int, bf16: bool, zero_stage: int) -> None:
        import deepspeed

        torch.manual_seed(0)
        ds_config = {"train_batch_size": micro_batch, "train_micro_batch_size_per_gpu": micro_batch,
                     "gradient_accumulation_steps": 1, "gradient_clipping": 2.0,
                     "optimizer": {"type": "AdamW", "params": {**ADAMW, "betas": list(ADAMW["betas"]),
                                                                "torch_adam": True}},
                     "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
        self.engine, _, _, _ = deepspeed.initialize(model=AMOSModel(config), config=ds_config)

    def step(self, batch: dict[str, torch.Tensor], seed: int) -> None:
        loss = self.engine(**batch, seed=seed).loss
        self.engine.backward(loss)
        self.engine.step()


def timed(loop, batch: dict[str, torch.Tensor], steps: int, seed: int, device: torch.device) -> list[float]:
    times = []
    for i in range(steps):
        start = time.perf_counter()
        loop.step(batch, seed + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bench(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    bf16 = args.precision == "bf16"
    config = get_preset(preset, vocab_impl=args.impl)
    seq_len = args.seq_len or config.max_positions
    batch = masked_batch(config.vocab_size, args.micro_batch, seq_len, device)
    loops = {"plain": PlainLoop(config, device, bf16),
             "deepspeed": DeepSpeedLoop(config, args.micro_batch, bf16, args.zero_stage)}
    times = {name: [] for name in loops}
    for loop in loops.values():
        timed(loop, batch, args.warmup, seed=0, device=device)
    for round_ in range(args.rounds):
        for name, loop in loops.items():
            times[name] += timed(loop, batch, args.steps_per_round, seed=1000 * (round_ + 1), device=device)
    median = {name: statistics.median(values) for name, values in times.items()}
    flops = step_flops(config, seq_len, MASK_PROB, args.micro_batch)
    peak = device_peak_tflops(device, args.precision)
    ds_tflops = flops / median["deepspeed"] / 1e12
    return {"preset": preset, "impl": args.impl, "batch": f"{args.micro_batch} x {seq_len}",
            "plain_ms": 1000 * median["plain"], "ds_ms": 1000 * median["deepspeed"],
            "ratio": median["deepspeed"] / median["plain"],
            "tokens_per_s": args.micro_batch * seq_len / median["deepspeed"], "tflops": ds_tflops,
            "mfu": ds_tflops / peak if peak else None}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["base"] if cuda else ["tiny", "small"])
    parser.add_argument("--impl", choices=("auto", "torch", "chunked", "triton"), default="auto",
                        help="the vocabulary path (ModelConfig.vocab_impl)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    parser.add_argument("--micro-batch", type=int, default=32 if cuda else 8)
    parser.add_argument("--seq-len", type=int, help="default: the preset's max_positions")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5 if cuda else 12)
    parser.add_argument("--steps-per-round", type=int, default=1)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    setup_distributed()  # a one-process group, as `python amos_ds/pretrain.py` makes
    name = torch.cuda.get_device_name() if cuda else (f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} "
                                                       f"threads, load average {os.getloadavg()[0]:.1f}")
    print(f"device: {name}; torch {torch.__version__}; {args.precision}, ZeRO-{args.zero_stage}; "
          f"median of {args.rounds} x {args.steps_per_round} steps after {args.warmup} warm-up")
    header = ("preset", "impl", "batch x seq", "plain ms/step", "DeepSpeed ms/step", "DS / plain", "DS tokens/s",
              "DS TFLOP/s", "DS MFU")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset in args.preset:
        row = bench(preset, args, device)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(f"| {row['preset']} | {row['impl']} | {row['batch']} | {row['plain_ms']:.1f} | {row['ds_ms']:.1f} | "
              f"{row['ratio']:.2f}x | {row['tokens_per_s']:,.0f} | {row['tflops']:.3f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
    # Leave without interpreter teardown: the process group can abort there (../shared/ENVIRONMENT.md).
    sys.stdout.flush()
    os._exit(0)
