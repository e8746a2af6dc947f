"""amos_ds.atomic: a file or folder is whole under its final name or absent, and what was written is fsynced."""

import os

import pytest

from amos_ds import atomic


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths fsynced, in order."""
    paths = []
    real_fsync = atomic.fsync

    def recording(path):
        paths.append(str(path))
        real_fsync(path)

    monkeypatch.setattr(atomic, "fsync", recording)
    return paths


def test_a_file_is_replaced_whole_after_its_data_and_then_its_folder_are_fsynced(tmp_path, fsynced):
    target = tmp_path / "latest"
    target.write_text("step_00000001")
    atomic.write_atomically(target, "step_00000002")
    assert target.read_text() == "step_00000002"
    assert fsynced == [str(tmp_path / f".latest.{os.getpid()}.tmp"), str(tmp_path)]
    assert os.listdir(tmp_path) == ["latest"]


def test_a_folder_is_published_with_every_file_and_subfolder_fsynced(tmp_path, fsynced):
    target = tmp_path / "export"
    with atomic.staged(target) as folder:
        (folder / "generator").mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "generator" / "model.safetensors").write_bytes(b"\0" * 8)
        assert not target.exists()
    assert (target / "config.json").read_text() == "{}" and (target / "generator" / "model.safetensors").is_file()
    temporary = tmp_path / f".export.{os.getpid()}.tmp"
    assert sorted(fsynced) == sorted([str(temporary / "config.json"), str(temporary),
                                      str(temporary / "generator" / "model.safetensors"), str(temporary / "generator"),
                                      str(tmp_path)])
    assert fsynced[-1] == str(tmp_path)  # the rename, after everything it publishes
    assert os.listdir(tmp_path) == ["export"]


def test_an_error_leaves_the_old_file_and_nothing_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic.staged(target) as temporary:
            temporary.write_text("half of the new")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]


def test_a_leftover_of_a_killed_process_is_cleared_first(tmp_path):
    leftover = tmp_path / f".summary.json.{os.getpid()}.tmp"
    leftover.mkdir()
    (leftover / "stale").write_text("x")
    atomic.write_atomically(tmp_path / "summary.json", b"{}\n")
    assert (tmp_path / "summary.json").read_bytes() == b"{}\n" and os.listdir(tmp_path) == ["summary.json"]
