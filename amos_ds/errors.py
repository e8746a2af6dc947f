"""The errors that end an amos-ds command, each with its exit code, and the one handler every entry point uses.

Every layer (data, train, finetune, export) raises these; `amos-ds` (cli.py) and amos_ds/pretrain.py turn them into
one line on stderr per node and the class's exit code with `exit_code_of`. Anything else is a bug: a traceback.
"""

import os
import sys
from collections.abc import Callable


class AmosError(Exception):
    """An error whose one-line message says what is wrong and what to do; `exit_code` is the process's exit code."""

    exit_code = 1


class ConfigError(AmosError, ValueError):
    """Bad input to a run (a flag, a config file, a hostfile); the message names the flag or file and what to do."""

    exit_code = 2


class DataError(AmosError):
    """Bad input data (missing, unreadable, binary, empty, mismatched or corrupt); the message names the file."""

    exit_code = 2


class CheckpointError(AmosError, RuntimeError):
    """A checkpoint could not be written, converted or loaded (not bad input: the disk or DeepSpeed failed); the
    message names the file and what is still intact."""

    exit_code = 1


class NonFiniteLoss(AmosError, RuntimeError):
    """Training stopped after too many non-finite losses in a row; the message says what to do."""

    exit_code = 3


def exit_code_of(run: Callable[[], int], prefix: str = "amos-ds: ") -> int:
    """run()'s exit code; an AmosError instead prints `{prefix}error: {message}` on stderr, once per node (the
    process with LOCAL_RANK 0; without a launcher, the one process), and returns the error's exit code."""
    try:
        return run()
    except AmosError as err:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
