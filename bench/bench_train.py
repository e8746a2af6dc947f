"""Training throughput of an optimizer step as pretrain.py takes it, against Hugging Face ELECTRA on the same batches.

    python bench/bench_train.py                                              # CPU: small, fp32, 8 x 128, accumulation 8
    python bench/bench_train.py --preset base --attention sdpa flex --profile  # CUDA: bf16, ZeRO-1, 32 x 512
    python bench/bench_train.py --amos-root /work/main                       # another checkout (before a change)

AMOS: the DeepSpeed engine as pretrain.py builds it from a shipped config (ds_configs/base.json on CUDA: torch's fused
AdamW, bf16, ZeRO-1, overlap_comm; cpu.json on the CPU) with the batch set to micro-batch x accumulation, encoder
layers compiled as TrainConfig.compile says, and the loader's batches (MaskedBatches over random token rows: exactly
round(0.15 n) masked per row, the flat masked positions, no padding). One optimizer step = `--accumulation`
micro-batches of forward, backward and engine.step, the metrics summed on the device and read once at the end.
Peer: Hugging Face transformers' ELECTRA as a user sets it up: an ElectraForMaskedLM generator with the AMOS
generator's depth at full width, an ElectraForPreTraining discriminator, tied embeddings, SDPA attention, torch AdamW
(fused on CUDA), bf16 autocast on CUDA, clipping at 2.0, the same accumulation and the same batches; replaced tokens
sampled from the generator, RTD weight 50. The two alternate step by step so that a noisy machine slows both alike;
the table shows median step times. `--profile` adds, for AMOS, one profiled step's time by category.
"""

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--amos-root", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the amos-ds checkout to measure (default: this one)")
if __name__ == "__main__":
    # Appended, not first: the root's kernels/ would shadow PyPI's `kernels`, which transformers imports.
    sys.path.append(str(parser.parse_known_args()[0].amos_root))

from amos_ds.config import get_preset  # noqa: E402
from amos_ds.data.loader import DataConfig, MaskedBatches  # noqa: E402
from amos_ds.model import AMOSModel  # noqa: E402
from amos_ds.pretrain import setup_distributed  # noqa: E402
from amos_ds.train.flops import device_peak_tflops, step_flops  # noqa: E402
from amos_ds.train.metrics import average_over_ranks  # noqa: E402
from amos_ds.vocab import AMOS_DS_CLS, AMOS_DS_SEP, AMOS_DS_SPECIAL_TOKENS, IGNORE_INDEX  # noqa: E402

MASK_PROB = 0.15
RTD_WEIGHT = 50.0
ADAMW = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01}
# Profile categories, first match wins: substrings of CUDA kernel names, or of CPU operator names on the CPU.
CATEGORIES = (
    ("communication", ("nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "gloo")),
    ("optimizer", ("multi_tensor_apply", "adam", "_foreach_")),  # CUDA kernels; torch AdamW's ops on the CPU
    ("vocabulary path", ("_forward_kernel", "_backward_kernel")),  # the fused Triton kernels (amos_kernels)
    ("attention", ("fmha", "attention", "flash", "flex", "cudnn_sdpa")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
)


class RandomRows:
    """A PackedDataset stand-in of random ordinary tokens: [CLS] + seq_len - 2 tokens + [SEP] per sample."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def __getitem__(self, index: int) -> np.ndarray:
        row = np.random.default_rng(index).integers(len(AMOS_DS_SPECIAL_TOKENS), self.vocab_size, self.seq_len)
        row[0], row[-1] = AMOS_DS_CLS, AMOS_DS_SEP
        return row


def loader_batches(vocab_size: int, seq_len: int, micro_batch: int, count: int, pin: bool) -> list[dict]:
    """`count` micro-batches as the training loader yields them (pinned for asynchronous copies on CUDA)."""
    batches = MaskedBatches(RandomRows(vocab_size, seq_len), DataConfig(seq_len=seq_len))
    out = []
    for i in range(count):
        batch = batches[list(range(i * micro_batch, (i + 1) * micro_batch))]
        out.append({k: v.pin_memory() if pin and isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


class AMOSLoop:
    """The DeepSpeed engine and the micro-batch loop of pretrain.py."""

    def __init__(self, config, args: argparse.Namespace, device: torch.device) -> None:
        import deepspeed

        from amos_ds.train.ds_config import load_ds_config

        ds_config = load_ds_config(args.amos_root / "ds_configs" / args.deepspeed_config)
        ds_config.update(train_batch_size=args.micro_batch * args.accumulation,
                         train_micro_batch_size_per_gpu=args.micro_batch,
                         gradient_accumulation_steps=args.accumulation, steps_per_print=10**9)
        ds_config["zero_optimization"]["stage"] = args.zero_stage
        if args.precision == "fp32":
            ds_config.pop("bf16", None)
        torch.manual_seed(0)
        model = AMOSModel(config)
        # As pretrain.should_compile (spelled out: a checkout given by --amos-root may predate it).
        self.compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda"
                                                 and args.zero_stage < 3)
        if self.compiled:
            model.compile_layers()
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=ds_config)
        self.static = "masked_positions" in inspect.signature(AMOSModel.forward).parameters
        self.device = device

    def inputs(self, batch: dict) -> dict:
        if self.static:  # this checkout's loader and model: no wait for the device in the forward
            from amos_ds.pretrain import model_inputs

            return model_inputs(batch, self.device)
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask", "labels")}

    def step(self, batches: list[dict], seed: int) -> dict[str, float]:
        sums = {}
        for micro_step, batch in enumerate(batches):
            out = self.engine(**self.inputs(batch), seed=seed + micro_step)
            self.engine.backward(out.loss)
            self.engine.step()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        return average_over_ranks(sums, len(batches))  # the one read of the step, as in pretrain.py


class ElectraPeer:
    """Hugging Face ELECTRA generator + discriminator, trained the way its users write the loop."""

    def __init__(self, config, args: argparse.Namespace, device: torch.device) -> None:
        from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

        shapes = dict(vocab_size=config.vocab_size, embedding_size=config.hidden_size, hidden_size=config.hidden_size,
                      num_attention_heads=config.num_heads, intermediate_size=config.ffn_size,
                      max_position_embeddings=config.max_positions, layer_norm_eps=config.layer_norm_eps)
        generator_config = ElectraConfig(num_hidden_layers=config.gen_layers, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **shapes)
        discriminator_config = ElectraConfig(num_hidden_layers=config.disc_layers, hidden_dropout_prob=config.dropout,
                                             attention_probs_dropout_prob=config.attention_dropout, **shapes)
        for hf_config in (generator_config, discriminator_config):
            hf_config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.generator = ElectraForMaskedLM(generator_config).to(device)
        self.discriminator = ElectraForPreTraining(discriminator_config).to(device)
        # ELECTRA ties the embeddings of the two networks (same width here) and the generator's output layer.
        self.generator.electra.embeddings = self.discriminator.electra.embeddings
        self.generator.generator_lm_head.weight = self.discriminator.electra.embeddings.word_embeddings.weight
        self.params = list({id(p): p for m in (self.generator, self.discriminator) for p in m.parameters()}.values())
        self.optimizer = torch.optim.AdamW(self.params, **ADAMW, fused=device.type == "cuda")
        self.device, self.bf16 = device, args.precision == "bf16"

    def forward(self, batch: dict) -> tuple:
        """(generator output, discriminator output, replaced [B, T]) of one batch: replaced tokens sampled from the
        generator's distribution (Gumbel-max), the discriminator judging the corrupted sequence."""
        input_ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            generated = self.generator(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            masked = labels != IGNORE_INDEX
            with torch.no_grad():
                logits = generated.logits[masked].float()
                noise = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
                sampled = (logits + noise).argmax(dim=-1)
            original = torch.where(masked, labels, input_ids)
            corrupted = original.clone()
            corrupted[masked] = sampled
            replaced = corrupted != original
            judged = self.discriminator(input_ids=corrupted, attention_mask=attention_mask, labels=replaced.long())
        return generated, judged, replaced

    def step(self, batches: list[dict], seed: int) -> dict[str, float]:
        total = 0.0
        for batch in batches:
            generated, judged, _ = self.forward(batch)
            loss = generated.loss + RTD_WEIGHT * judged.loss
            (loss / len(batches)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(total) / len(batches)}


def timed_step(loop, batches: list[dict], seed: int, device: torch.device) -> float:
    start = time.perf_counter()
    loop.step(batches, seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in CATEGORIES if any(key in lowered for key in keys)), "elementwise and other")


def profile_breakdown(loop, batches: list[dict], device: torch.device) -> dict[str, float]:
    """Milliseconds by category over one profiled optimizer step: device kernels on CUDA (idle = the step's wall
    time with no kernel running), operators' self time on the CPU (idle = time in no operator: Python, waits)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed_step(loop, batches, 7, device)
    totals = {label: 0.0 for label, _ in CATEGORIES} | {"elementwise and other": 0.0}
    intervals = []
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                totals[category(event.name)] += event.time_range.elapsed_us() / 1000
                intervals.append((event.time_range.start, event.time_range.end))
        busy, end = 0.0, float("-inf")
        for start, stop in sorted(intervals):  # the union of kernel intervals (streams may overlap)
            busy += max(0.0, stop - max(start, end))
            end = max(end, stop)
        busy /= 1000
    else:
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                totals[category(event.key)] += event.self_cpu_time_total / 1000
        busy = sum(totals.values())
    totals["idle"] = max(0.0, 1000 * seconds - busy)
    totals["step"] = 1000 * seconds
    return totals


def bench(preset: str, attention: str, args: argparse.Namespace, device: torch.device, peer) -> dict:
    dropout = {} if attention == "sdpa" else {"attention_dropout": 0.0}
    overrides = {"attention_impl": attention, **dropout} if attention != "default" else {}
    config = get_preset(preset, **overrides)
    seq_len = args.seq_len or config.max_positions
    batches = loader_batches(config.vocab_size, seq_len, args.micro_batch, args.accumulation, device.type == "cuda")
    loops = {"amos": AMOSLoop(config, args, device)}
    if peer is not None:
        loops["peer"] = peer
    times = {name: [] for name in loops}
    for name, loop in loops.items():
        for warmup in range(args.warmup):
            started = time.perf_counter()
            timed_step(loop, batches, 100 + warmup, device)
            if name == "amos" and warmup == 0:
                first_step = time.perf_counter() - started
    for step in range(args.steps):
        for name, loop in loops.items():
            times[name].append(timed_step(loop, batches, 1000 * (step + 1), device))
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = args.micro_batch * args.accumulation * seq_len
    tflops = step_flops(config, seq_len, MASK_PROB, args.micro_batch * args.accumulation) / median["amos"] / 1e12
    peak = device_peak_tflops(device, args.precision)
    row = {"preset": preset, "attention": attention, "compiled": loops["amos"].compiled,
           "batch": f"{args.micro_batch} x {seq_len} x {args.accumulation}", "amos_ms": 1000 * median["amos"],
           "tokens_per_s": tokens / median["amos"], "tflops": tflops, "mfu": tflops / peak if peak else None,
           "first_step_s": first_step if args.warmup else None}
    if peer is not None:
        row.update(peer_ms=1000 * median["peer"], peer_tokens_per_s=tokens / median["peer"],
                   speedup=median["peer"] / median["amos"])
    if args.profile:
        row["profile"] = profile_breakdown(loops["amos"], batches, device)
    return row


def main() -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", nargs="+", default=["base"] if cuda else ["small"])
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=("sdpa", "flex", "default"),
                        help="ModelConfig.attention_impl to measure (flex turns attention dropout off); "
                             "default: the checkout's own (for --amos-root checkouts that predate the field)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    parser.add_argument("--deepspeed-config", default="base.json" if cuda else "cpu.json",
                        help="a file in the checkout's ds_configs/: optimizer and ZeRO settings")
    parser.add_argument("--micro-batch", type=int, default=32 if cuda else 8)
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, help="default: the preset's max_positions")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the encoder layers (auto: on CUDA below ZeRO-3), as TrainConfig.compile")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before timing (the first compiles)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps of each")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip Hugging Face ELECTRA")
    parser.add_argument("--profile", action="store_true", help="one more AMOS step under torch.profiler")
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    setup_distributed()  # a one-process group, as `python amos_ds/pretrain.py` makes
    name = torch.cuda.get_device_name() if cuda else (f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} "
                                                       f"threads, load average {os.getloadavg()[0]:.1f}")
    print(f"device: {name}; torch {torch.__version__}; amos-ds at {args.amos_root}; {args.precision}, "
          f"ZeRO-{args.zero_stage}, {args.deepspeed_config}; median of {args.steps} optimizer steps after "
          f"{args.warmup} warm-up", flush=True)
    header = ("preset", "attention", "compiled", "micro x seq x accum", "AMOS ms/step", "AMOS tokens/s", "TFLOP/s",
              "MFU", "first step s", "HF ELECTRA ms/step", "HF tokens/s", "AMOS speed / HF")
    rows = []
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for preset in args.preset:
        config = get_preset(preset)
        peer = ElectraPeer(config, args, device) if args.peer else None
        for attention in args.attention:
            if attention == "flex" and not cuda:
                print(f"| {preset} | flex | skipped: PyTorch runs no FlexAttention backward on the CPU |", flush=True)
                continue
            row = bench(preset, attention, args, device, peer)
            rows.append(row)
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            first = f"{row['first_step_s']:.1f}" if row["first_step_s"] is not None else "n/a"
            peer_cells = (f"{row['peer_ms']:.1f} | {row['peer_tokens_per_s']:,.0f} | {row['speedup']:.2f}x"
                          if peer is not None else "n/a | n/a | n/a")
            print(f"| {preset} | {attention} | {row['compiled']} | {row['batch']} | {row['amos_ms']:.1f} | "
                  f"{row['tokens_per_s']:,.0f} | {row['tflops']:.3f} | {mfu} | {first} | {peer_cells} |", flush=True)
            if args.profile:  # also now, so that a run cut short by a time limit still shows it
                print("profile " + ", ".join(f"{label} {ms:.1f} ms" for label, ms in row["profile"].items()),
                      file=sys.stderr, flush=True)
        del peer
    if args.profile:
        labels = [label for label, _ in CATEGORIES] + ["elementwise and other", "idle"]
        print("\nWhere one AMOS optimizer step's time goes (ms; share of the step)"
              + (" on the GPU" if cuda else ": CPU operators' self time, idle = outside any operator"))
        print("| preset | attention | " + " | ".join(labels) + " | step |")
        print("|" + "---|" * (len(labels) + 3))
        for row in rows:
            cells = [f"{row['profile'][label]:.1f} ({100 * row['profile'][label] / row['profile']['step']:.0f}%)"
                     for label in labels]
            print(f"| {row['preset']} | {row['attention']} | " + " | ".join(cells)
                  + f" | {row['profile']['step']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
    # Leave without interpreter teardown: the process group can abort there (../shared/ENVIRONMENT.md).
    sys.stdout.flush()
    os._exit(0)
