"""Preemption: SIGTERM or SIGUSR1 asks the run to save a checkpoint at the next step boundary and exit 0.

A handler only sets a flag; the loop asks `should_stop()` once per optimizer step, which all-reduces the flag so
that every rank stops at the same step even when the signal reached only some of them (a scheduler signalling
one node, an operator signalling one process). The handlers are installed first thing in a run, before the
start-up (rendezvous, data, model, DeepSpeed, a resume's checkpoint) that takes minutes at scale: a signal then
(a Slurm time limit, a preemption) stops the run at its first step boundary instead of killing the rank.

Processes forked during the run inherit the handlers. A forked child that gets one of the signals dies of it as
it would without them: `multiprocessing.Pool.terminate()` (preprocessing the built-in corpus) stops its workers
with SIGTERM and waits for them. (The data loader's workers ignore both signals: amos_ds/data/loader.py.) The
handlers are removed when the run ends, so a process that calls the trainer in-process (tests, benchmarks) gets
its own back.
"""

import os
import signal
from types import TracebackType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """`with StopSignal() as stop:` for the length of a run."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def __enter__(self) -> "StopSignal":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a forked child: die of the signal, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a stop signal (a collective: call it on all ranks, with
        the device their process group communicates from)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
