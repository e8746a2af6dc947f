"""The long fault-injection series: kill, hang or corrupt a two-rank CPU run at random moments, resume it, and check
that it ends with the weights of an uninterrupted run (fp32, same world size: bit for bit).

    python bench/faults.py                         # 20 trials, the four kinds in turn (about 30 min on 2 cores)
    python bench/faults.py --trials 40 --kinds save rank

Kinds of fault, one per trial, at a moment drawn as a step (uniformly from 1 to the last but one), then a delay
within the reference run's mean step time (saves included) after that step is recorded:
    job      SIGKILL to every process of the job (a node lost, a preemption without notice)
    rank     SIGKILL to one rank; the deepspeed launcher then stops the others
    save     SIGKILL to the job while a checkpoint is being written (the step folder exists, amos_meta.json not yet)
    hang     SIGSTOP to one rank; the collective timeout ends the job (TrainConfig.collective_timeout_s)
    corrupt  the job is killed once it has two checkpoints, then one byte of the newest complete checkpoint's
             largest file is flipped (the resume must warn and take the one before)

After the fault the same command runs again at once on the same MASTER_PORT (what a preemption script does) with
`--resume auto`, until the run is complete. Each trial reports the step reached, the checkpoint resumed from, the
steps lost (trained but not in a checkpoint), the seconds from the fault to the job's exit, whether the recovery
path ran (`recovered`: the job was restarted and resumed from a checkpoint before the end; for `corrupt`, the resume
warned about the damaged checkpoint and took an older one) and whether the final weights equal the reference run's.
A fault that lands after the run has saved its last checkpoint (only the exit was left) is not a trial: the moment
is drawn again (up to REDRAWS times; the number of redraws is reported). The table goes to stdout, the records to
OUT/faults.json.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Appended, not first: the root's kernels/ would shadow PyPI's `kernels`, which transformers imports.
sys.path.append(str(REPO))

from amos_ds.data.builtin import prepare_builtin_corpus  # noqa: E402
from amos_ds.pretrain import free_port, shared_memory_buffer  # noqa: E402

PRETRAIN = REPO / "amos_ds" / "pretrain.py"
KINDS = ("job", "rank", "save", "hang", "corrupt")
VOCAB, SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 1024, 32, 8, 4
TIMEOUT_S = 10  # collective timeout of the runs
REDRAWS = 5  # fresh draws of a fault moment that fell after the run's end, before the trial is given up


def write_configs(directory: Path, corpus: Path) -> list[str]:
    ds_config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                          "warmup_num_steps": 2, "warmup_type": "linear",
                                                          "total_num_steps": 100}},
        "gradient_clipping": 2.0, "zero_optimization": {"stage": 1},
    }
    train_config = {"builtin_cache": str(corpus), "builtin_vocab_size": VOCAB, "seq_len": SEQ_LEN, "num_workers": 2,
                    "plot": False, "collective_timeout_s": TIMEOUT_S, "keep_last": 2}
    (directory / "ds.json").write_text(json.dumps(ds_config))
    (directory / "train.json").write_text(json.dumps(train_config))
    return ["--deepspeed_config", str(directory / "ds.json"), "--config", str(directory / "train.json"),
            "--preset", "tiny", "--fp32"]


class Job:
    """One `deepspeed --num_gpus R` run of pretrain.py in its own process group, output to a log file."""

    def __init__(self, ranks: int, port: int, flags: list[str], log: Path) -> None:
        self.port = port
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   str(PRETRAIN), *flags]
        self.log = log.open("a")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def rank_pid(self, rank: int) -> int | None:
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "-g", str(self.process.pid)], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if "pretrain.py" in line and f"--local_rank={rank}" in line:
                return int(line.split()[0])
        return None

    def wait(self, timeout: float) -> int | None:
        """The job's exit code, or None when it still ran after `timeout` seconds (it is killed either way)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()
        for buffer in glob.glob(str(shared_memory_buffer("*", "*", self.port, "*"))):
            os.remove(buffer)


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step_")) for p in run_dir.glob("checkpoints/step_*/amos_meta.json"))


def trained_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]  # DeepSpeed's file: see RELIABILITY.md


def inject(kind: str, job: Job, run_dir: Path, at_step: int, delay_s: float,
           rng: random.Random) -> tuple[float | None, str]:
    """Wait until step `at_step` is recorded, then `delay_s` more (or for a save, for `save`), inject the fault;
    return (time, detail)."""
    while (trained_steps(run_dir) < at_step or (kind == "corrupt" and len(complete_steps(run_dir)) < 2)) and \
            job.process.poll() is None:
        time.sleep(0.01)  # corrupt: also a checkpoint to damage and an older one to fall back to
    started = time.monotonic()
    if kind == "save":
        target = max(complete_steps(run_dir), default=0) + 1
        while job.process.poll() is None:
            writing = [p for p in run_dir.glob("checkpoints/step_*")
                       if not (p / "amos_meta.json").exists() and int(p.name.removeprefix("step_")) >= target]
            if writing and any(writing[0].iterdir()):
                os.killpg(job.process.pid, signal.SIGKILL)
                return time.monotonic(), f"killed while writing {writing[0].name}"
            time.sleep(0.001)
        return None, "the run ended before a save was caught"
    while time.monotonic() - started < delay_s and job.process.poll() is None:
        time.sleep(0.01)
    if job.process.poll() is not None:
        return None, "the run ended before the fault"
    if kind in ("job", "corrupt"):
        os.killpg(job.process.pid, signal.SIGKILL)
        return time.monotonic(), f"SIGKILL to the job at step {trained_steps(run_dir)}"
    rank = rng.randrange(2)
    pid = job.rank_pid(rank)
    if pid is None:
        return None, "rank not found"
    os.kill(pid, signal.SIGKILL if kind == "rank" else signal.SIGSTOP)
    return time.monotonic(), f"{'SIGKILL' if kind == 'rank' else 'SIGSTOP'} to rank {rank} at step " \
                             f"{trained_steps(run_dir)}"


def corrupt_newest(run_dir: Path) -> str:
    steps = complete_steps(run_dir)
    if not steps:
        return "no checkpoint to corrupt"
    tag = run_dir / "checkpoints" / f"step_{steps[-1]:08d}"
    victim = max((p for p in tag.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return f"flipped a byte of {victim.relative_to(run_dir)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each run")
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="draws the fault moments and the ranks")
    parser.add_argument("--out", type=Path, default=Path("runs/faults"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus"
    prepare_builtin_corpus(str(corpus), VOCAB)
    flags = [*write_configs(args.out, corpus), "--max-steps", str(args.steps), "--save-every", str(args.save_every)]

    reference = args.out / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    started = time.monotonic()
    job = Job(2, free_port(), [*flags, "--run-dir", str(reference)], args.out / "reference.log")
    while trained_steps(reference) == 0 and job.process.poll() is None:
        time.sleep(0.02)
    first_step = time.monotonic()
    code = job.wait(900)
    duration, training_s = time.monotonic() - started, time.monotonic() - first_step
    step_s = training_s / args.steps
    if code != 0 or complete_steps(reference)[-1:] != [args.steps]:
        print(f"reference run failed (exit {code}); see {args.out / 'reference.log'}")
        return 1
    expected = final_weights(reference, args.steps)
    print(f"reference: {args.steps} steps in {duration:.0f} s ({training_s:.0f} s from the first step)", flush=True)

    records = []
    header = (f"{'trial':>5}  {'kind':<8} {'fault':<44} {'exit_s':>6} {'resumed':>7} {'lost':>4} {'runs':>4} "
              f"{'recovered':<9} equal")
    print(header, flush=True)
    for trial in range(args.trials):
        kind = args.kinds[trial % len(args.kinds)]
        run_dir = args.out / f"trial_{trial:03d}"
        port = free_port()  # one fixed port for the whole trial: every restart reuses it at once
        log = args.out / f"trial_{trial:03d}.log"
        redraws = -1
        injected = None
        while injected is None and redraws < REDRAWS:
            redraws += 1
            shutil.rmtree(run_dir, ignore_errors=True)
            log.unlink(missing_ok=True)
            job = Job(2, port, [*flags, "--run-dir", str(run_dir)], log)
            # A step drawn uniformly, then a moment within that step's time (its saves included): the runs' speed
            # varies with the machine's load, so a moment in seconds would often fall after the end.
            injected, detail = inject(kind, job, run_dir, rng.randrange(1, args.steps), rng.uniform(0, step_s), rng)
            if job.wait(TIMEOUT_S + 120) is None and injected:  # a hang no collective timeout reached
                detail += f"; the job had not exited {TIMEOUT_S + 120} s later and was killed"
            if injected and complete_steps(run_dir)[-1:] == [args.steps]:  # only the exit was left to interrupt
                injected, detail = None, "the run had saved its last checkpoint before the fault"
        if not injected:
            print(f"{trial:>5}  {kind:<8} no fault landed before the run's end in {REDRAWS + 1} draws: not counted",
                  flush=True)
            records.append({"trial": trial, "kind": kind, "fault": detail, "redraws": redraws, "counted": False})
            continue
        exit_s = time.monotonic() - injected
        at_fault = trained_steps(run_dir)
        corrupted_step = complete_steps(run_dir)[-1] if kind == "corrupt" and complete_steps(run_dir) else None
        if kind == "corrupt":
            detail += "; " + corrupt_newest(run_dir)
        runs, resumed_from, outputs = 1, None, ""
        while complete_steps(run_dir)[-1:] != [args.steps] and runs < 4:
            before = log.stat().st_size
            Job(2, port, [*flags, "--run-dir", str(run_dir)], log).wait(900)
            runs += 1
            outputs = log.read_text()[before:]
            if resumed_from is None:
                resumed_from = next((int(line.split(" at step ")[1].split()[0]) for line in outputs.splitlines()
                                     if line.startswith("resumed from")), 0)
        complete = complete_steps(run_dir)[-1:] == [args.steps]
        weights = final_weights(run_dir, args.steps) if complete else {}
        equal = complete and weights.keys() == expected.keys() and all(
            torch.equal(weights[name], expected[name]) for name in expected)
        warned = "falling back to the previous complete checkpoint" in outputs
        recovered = complete and runs > 1 and resumed_from is not None and resumed_from < args.steps and (
            kind != "corrupt" or (warned and corrupted_step is not None and resumed_from < corrupted_step))
        record = {"trial": trial, "kind": kind, "fault": detail, "redraws": redraws, "counted": True,
                  "exit_s": exit_s, "step_at_fault": at_fault, "resumed_from": resumed_from,
                  "steps_lost": at_fault - resumed_from if resumed_from is not None else 0, "runs": runs,
                  "complete": complete, "weights_equal": equal, "corrupted_step": corrupted_step,
                  "corruption_warned": warned, "recovered": recovered}
        records.append(record)
        (args.out / "faults.json").write_text(json.dumps(records, indent=1))
        print(f"{trial:>5}  {kind:<8} {detail[:44]:<44} {exit_s:>6.1f} "
              f"{resumed_from if resumed_from is not None else '-':>7} {record['steps_lost']:>4} {runs:>4} "
              f"{str(recovered):<9} {equal}", flush=True)
        if equal:
            shutil.rmtree(run_dir)

    counted = [r for r in records if r["counted"]]
    print(f"\n{len(counted)} faults injected ({len(records) - len(counted)} trials without one, "
          f"{sum(r['redraws'] for r in records)} moments redrawn); {sum(r['weights_equal'] for r in counted)} ended "
          f"with the reference weights; {sum(r['recovered'] for r in counted)} went through their recovery path; "
          f"most steps lost {max((r['steps_lost'] for r in counted), default=0)} "
          f"(checkpoint interval {args.save_every})")
    print("\nkind      trials  recovered  weights equal  fault to job exit median / max (s)  most steps lost")
    for kind in args.kinds:
        mine = [r for r in counted if r["kind"] == kind]
        if mine:
            times = sorted(r["exit_s"] for r in mine)
            print(f"{kind:<8}  {len(mine):>6}  {sum(r['recovered'] for r in mine):>9}  "
                  f"{sum(r['weights_equal'] for r in mine):>13}  {times[len(times) // 2]:>17.1f} / {times[-1]:<14.1f}  "
                  f"{max(r['steps_lost'] for r in mine):>15}")
    return 0 if counted and all(r["weights_equal"] and r["recovered"] for r in counted) else 1


if __name__ == "__main__":
    sys.exit(main())
