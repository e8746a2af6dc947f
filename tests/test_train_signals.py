"""Preemption in this process: a stop signal only sets a flag, which should_stop() reports at the step boundary."""

import os
import signal

import pytest
import torch

from amos_ds.train.signals import StopSignal


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_reported_at_the_next_check_not_acted_on(signum, one_process_group):
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopSignal()
        cpu = torch.device("cpu")
        assert not stop.should_stop(cpu) and stop.received is None
        os.kill(os.getpid(), signum)  # the process lives on: the handler only records it
        assert stop.received == signum
        assert stop.should_stop(cpu) and stop.should_stop(cpu)  # and it stays asked
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
