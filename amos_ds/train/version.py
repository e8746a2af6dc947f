"""The code version a run records in its checkpoints, and that `amos-ds launch` compares across nodes.

Light on purpose: `amos-ds launch` runs it on every node over ssh (`python -m amos_ds.train.version`) before a job
starts, so it imports nothing heavy.
"""

import subprocess
from pathlib import Path

import amos_ds


def code_version() -> str:
    """amos-ds's version, plus the git commit (and '-dirty') when running from a checkout."""
    root = Path(amos_ds.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{amos_ds.__version__}+{commit}" if commit else amos_ds.__version__


if __name__ == "__main__":
    print(code_version())
