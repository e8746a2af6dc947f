"""Preemption: SIGTERM or SIGUSR1 asks the run to save a checkpoint at the next step boundary and exit 0.

A handler only sets a flag; the loop asks `should_stop()` once per optimizer step, which all-reduces the flag so
that every rank stops at the same step even when the signal reached only some of them (a scheduler signalling
one node, an operator signalling one process). The handlers are installed first thing in a run, before the
start-up (rendezvous, data, model, DeepSpeed, a resume's checkpoint) that takes minutes at scale: a signal then
(a Slurm time limit, a preemption) stops the run at its first step boundary instead of killing the rank.
"""

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    def __init__(self) -> None:
        self.received: int | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a stop signal (a collective: call it on all ranks, with
        the device their process group communicates from)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
