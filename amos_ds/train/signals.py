"""Preemption: SIGTERM or SIGUSR1 asks the run to save a checkpoint at the next step boundary and exit 0.

A handler only sets a flag; the loop asks `should_stop()` once per optimizer step, which all-reduces the flag so
that every rank stops at the same step even when the signal reached only some of them (a scheduler signalling
one node, an operator signalling one process).
"""

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    def __init__(self, device: torch.device) -> None:
        self.received: int | None = None
        self._flag = torch.zeros(1, device=device)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank once any rank has received a stop signal (a collective: call it on all ranks)."""
        self._flag.fill_(1.0 if self.received is not None else 0.0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag.item())
