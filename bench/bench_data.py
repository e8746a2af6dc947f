"""Data pipeline benchmark: preprocessing throughput vs bare sentencepiece, peak memory at 1x/4x text, loader speed.

    python bench/bench_data.py [--data ../shared/data/pretrain] [--vocab-size 32768]

Prints one table; every ratio is against a baseline measured in the same run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Appended, not first: the root's kernels/ would shadow PyPI's `kernels`, which transformers imports.
sys.path.append(str(REPO))

from amos_ds.data import DataConfig, ResumableSampler, build_loader, open_corpora  # noqa: E402
from amos_ds.data.sources import SourceStats, expand_inputs, iter_sources  # noqa: E402
from amos_ds.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

PREPROCESS = """
import resource, sys, time
sys.path.append({repo!r})
from amos_ds.data.preprocess import preprocess
start = time.perf_counter()
preprocess({inputs!r}, {tokenizer!r}, {output!r}, workers={workers}, progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the benchmark process across fork + exec.
main_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(time.perf_counter() - start, main_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def bare_encode(tokenizer: Tokenizer, inputs: list[str]) -> tuple[float, int]:
    """Seconds sentencepiece alone takes to encode the same lines in one process, and the text size."""
    lines = [line for doc in iter_sources(expand_inputs(inputs), SourceStats()) for line in doc.split("\n")]
    start = time.perf_counter()
    for i in range(0, len(lines), 10_000):
        tokenizer.sp.encode(lines[i:i + 10_000])
    return time.perf_counter() - start, sum(len(line) + 1 for line in lines)


def run_preprocess(inputs: list[str], tokenizer: str, output: Path, workers: int) -> tuple[float, float, float]:
    """Seconds, and peak RSS (MB) of the main process and of the largest worker, for a fresh preprocess run."""
    code = PREPROCESS.format(repo=str(REPO), inputs=inputs, tokenizer=tokenizer, output=str(output), workers=workers)
    seconds, main, worker = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.split()
    return float(seconds), int(main) / 1024, int(worker) / 1024


def loader_speed(data: str, seconds: float = 10.0, batch: int = 32) -> float:
    """Sequences of 512 per second from build_loader in the calling process (num_workers=0: one core)."""
    import torch

    torch.set_num_threads(1)
    dataset = open_corpora([data], 512, seed=1)
    sampler = ResumableSampler(len(dataset), batch, 0, 1, seed=1)
    it = iter(build_loader(dataset, sampler, DataConfig(seq_len=512, num_workers=0)))
    next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += next(it)["input_ids"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    default_data = os.environ.get("AMOS_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(default_data) / "pretrain"))
    parser.add_argument("--vocab-size", type=int, default=32768)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data."))
    try:
        inputs = [str(p) for p in expand_inputs([args.data])]
        start = time.perf_counter()
        tok = train_tokenizer(inputs, args.vocab_size, str(work / "tok"), max_sentences=300_000)
        train_s = time.perf_counter() - start
        bare_s, text_bytes = bare_encode(tok, inputs)
        mb = text_bytes / 1e6
        one, *_ = run_preprocess(inputs, str(tok.directory), work / "w1", 1)
        two, *rss1 = run_preprocess(inputs, str(tok.directory), work / "w2", 2)
        copies = []
        for k in range(4):
            (work / f"copy{k}").mkdir()
            for path in inputs:
                os.symlink(path, work / f"copy{k}" / Path(path).name)
            copies.append(str(work / f"copy{k}"))
        _, *rss4 = run_preprocess(copies, str(tok.directory), work / "w2x4", 2)
        loader = loader_speed(str(work / "w2"))
        rows = [
            (f"tokenizer train (BPE {args.vocab_size}, 300k sampled lines)", f"{train_s:.1f} s", ""),
            ("bare sentencepiece encode, 1 process", f"{mb / bare_s:.2f} MB/s", "1.00 (baseline)"),
            ("preprocess --workers 1 (end to end)", f"{mb / one:.2f} MB/s", f"{bare_s / one:.2f} of bare"),
            ("preprocess --workers 2 (end to end)", f"{mb / two:.2f} MB/s", f"{one / two:.2f} x workers 1"),
            ("peak RSS 1x text (main / largest worker)", f"{rss1[0]:.0f} / {rss1[1]:.0f} MB", "1.00 (baseline)"),
            ("peak RSS 4x text (main / largest worker)", f"{rss4[0]:.0f} / {rss4[1]:.0f} MB",
             f"{rss4[0] / rss1[0]:.2f} / {rss4[1] / rss1[1]:.2f} of 1x"),
            ("loader: read+pack+mask+collate, 1 core", f"{loader:,.0f} seq/s", f"{loader / 5000:.2f} of 5,000 goal"),
        ]
        print(f"text: {mb:.1f} MB in {len(inputs)} files from {args.data}")
        width = max(len(r[0]) for r in rows)
        print(f"| {'measure'.ljust(width)} | {'value':>22} | {'ratio':<26} |")
        print(f"|{'-' * (width + 2)}|{'-' * 24}|{'-' * 28}|")
        for name, value, ratio in rows:
            print(f"| {name.ljust(width)} | {value:>22} | {ratio:<26} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
