"""DeepSpeed hostfiles (`HOST slots=N` per line, `#` comments), checked before a multi-node job is started.

DeepSpeed's own parser accepts some mistakes silently (or fails late, on a remote node); this one rejects, with
the file and line, anything that would waste a job: bad syntax, a host listed twice, zero slots, or a hostname
that is not safe to hand to ssh/pdsh/mpirun through a shell.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from amos_ds.errors import ConfigError

# Letters, digits, dots, hyphens, underscores: DNS names, IPv4 addresses, cluster node names; no shell syntax.
SAFE_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\S+)")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(path: Path | str) -> list[Host]:
    """The hosts of a hostfile, in file order, or a ConfigError naming the file, the line and the fix."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"hostfile {path}: cannot read it ({err.strerror})") from None
    hosts: list[Host] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {path} line {number}: {line!r}"
        match = LINE.fullmatch(line)
        if not match:
            raise ConfigError(f"{where}: expected 'HOSTNAME slots=N'")
        name, slots = match["host"], match["slots"]
        if not SAFE_HOSTNAME.fullmatch(name):
            raise ConfigError(f"{where}: a hostname may hold only letters, digits, '.', '-' and '_' "
                              "(it is passed to a shell)")
        if not slots.isdigit():
            raise ConfigError(f"{where}: slots must be a whole number of GPUs, got {slots!r}")
        if int(slots) == 0:
            raise ConfigError(f"{where}: slots=0 gives the host nothing to run: remove the line or give its GPU count")
        if name in first_line:
            raise ConfigError(f"{where}: host {name!r} is already on line {first_line[name]}: list each host once")
        first_line[name] = number
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise ConfigError(f"hostfile {path}: lists no hosts; add lines of the form 'HOSTNAME slots=N'")
    return hosts
