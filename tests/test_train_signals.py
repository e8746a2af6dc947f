"""Preemption in this process: a stop signal only sets a flag, which should_stop() reports at the step boundary;
a forked child still dies of it, and the handlers leave with the run."""

import multiprocessing
import os
import signal
import time

import pytest
import torch

from amos_ds.train.signals import STOP_SIGNALS, StopSignal


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_stop_signal_is_reported_at_the_next_check_not_acted_on(signum, one_process_group):
    cpu = torch.device("cpu")
    with StopSignal() as stop:
        assert not stop.should_stop(cpu) and stop.received is None
        os.kill(os.getpid(), signum)  # the process lives on: the handler only records it
        assert stop.received == signum
        assert stop.should_stop(cpu) and stop.should_stop(cpu)  # and it stays asked


def test_the_handlers_are_those_of_before_once_the_run_ends():
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with StopSignal() as stop:
        assert all(signal.getsignal(signum) == stop._handle for signum in STOP_SIGNALS)
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_forked_child_dies_of_a_stop_signal_as_without_the_handler(signum):
    """multiprocessing.Pool.terminate() stops its forked workers with SIGTERM and waits for them: a worker that only
    recorded the signal would hang the run (it did, preprocessing the built-in corpus during start-up)."""
    with StopSignal() as stop:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        try:
            time.sleep(0.5)  # the child is in its sleep, its handlers those it inherited
            os.kill(child.pid, signum)
            child.join(10)
            assert child.exitcode == -signum
        finally:
            child.kill()
        assert stop.received is None  # the parent was not signalled
