"""amos_ds.errors: each error's exit code, and the one handler's single line per node."""

import pytest

from amos_ds.errors import CheckpointError, ConfigError, DataError, NonFiniteLoss, exit_code_of


def fails_with(error: Exception):
    def run() -> int:
        raise error
    return run


@pytest.mark.parametrize("error,code", [(ConfigError("--config x.json: file not found"), 2),
                                        (DataError("a.txt: looks binary"), 2),
                                        (CheckpointError("saving checkpoint c failed: disk full"), 1),
                                        (NonFiniteLoss("steps 1-3: non-finite losses"), 3)])
def test_each_error_ends_with_its_exit_code_and_one_line(error, code, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert exit_code_of(fails_with(error)) == code
    assert capsys.readouterr().err == f"amos-ds: error: {error}\n"
    assert exit_code_of(fails_with(error), prefix="") == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_only_local_rank_0_prints(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert exit_code_of(fails_with(DataError("a.txt: looks binary"))) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert exit_code_of(fails_with(DataError("a.txt: looks binary"))) == 2
    assert capsys.readouterr().err == "amos-ds: error: a.txt: looks binary\n"


def test_success_and_other_exceptions_pass_through(capsys):
    assert exit_code_of(lambda: 0) == 0
    with pytest.raises(KeyError):
        exit_code_of(fails_with(KeyError("a bug")))
    assert capsys.readouterr().err == ""
