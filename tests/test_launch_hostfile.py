"""Hostfile checks: every mistake is one line naming the file, the line and the fix."""

import pytest

from amos_ds.cli import main
from amos_ds.errors import ConfigError
from amos_ds.train.hostfile import Host, parse_hostfile


def test_shipped_hostfiles_parse():
    assert parse_hostfile("hostfiles/a100") == [Host(f"node-0{i}", 8) for i in range(1, 9)]
    assert parse_hostfile("hostfiles/localhost") == [Host("localhost", 2)]


def test_comments_blank_lines_and_addresses(tmp_path):
    (tmp_path / "h").write_text("# cluster\n\nworker-1 slots=8  # first\n10.0.0.2 slots=4\ngpu_node.local slots=1\n")
    assert parse_hostfile(tmp_path / "h") == [Host("worker-1", 8), Host("10.0.0.2", 4), Host("gpu_node.local", 1)]


@pytest.mark.parametrize("text, message", [
    ("node1 slots=8\nnode2 8\n", "line 2: 'node2 8': expected 'HOSTNAME slots=N'"),
    ("node1 slots=8\nnode1 slots=8\n", "line 2: 'node1 slots=8': host 'node1' is already on line 1"),
    ("node1 slots=0\n", "line 1: 'node1 slots=0': slots=0 gives the host nothing to run"),
    ("node1 slots=eight\n", "slots must be a whole number of GPUs, got 'eight'"),
    ("node1;reboot slots=8\n", "a hostname may hold only letters, digits"),
    ("$(id) slots=8\n", "a hostname may hold only letters, digits"),
    ("# nothing\n", "lists no hosts"),
])
def test_mistakes_are_named(tmp_path, text, message):
    (tmp_path / "h").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse_hostfile(tmp_path / "h")


def test_launch_reports_a_bad_hostfile_in_one_line(tmp_path, capsys):
    (tmp_path / "h").write_text("node1 slots=8\nnode1 slots=8\n")
    assert main(["launch", "--hostfile", str(tmp_path / "h"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"amos-ds: error: hostfile {tmp_path / 'h'} line 2: 'node1 slots=8': host 'node1' is "
                            "already on line 1: list each host once\n")
    assert main(["launch", "--hostfile", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
