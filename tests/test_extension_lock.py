"""A torch extension build lock left by a killed job is removed (it would hang every later start); one held by a
build on this host is left alone."""

import os
import time

from amos_ds.train import extension_lock


def lock_file(root, age_s: float):
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_lock_no_process_holds_is_removed_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = lock_file(tmp_path, age_s=3600)
    assert extension_lock.extension_locks() == [lock]
    assert not extension_lock.held_on_this_host(lock)
    extension_lock.clear_stale_extension_locks()
    assert not lock.exists()
    assert capsys.readouterr().err == (f"warning: removed {lock}, left by a build of a torch extension that was killed "
                                       "(no process holds it)\n")


def test_a_lock_held_by_a_build_on_this_host_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = lock_file(tmp_path, age_s=3600)
    fd = os.open(lock, os.O_RDONLY)  # as torch's FileBaton holds it while it builds
    try:
        assert extension_lock.held_on_this_host(lock)
        extension_lock.clear_stale_extension_locks()
        assert lock.exists() and capsys.readouterr().err == ""
    finally:
        os.close(fd)


def test_a_young_lock_is_given_time_for_a_build_on_another_node(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(extension_lock, "STALE_AFTER_S", 1.5)
    lock = lock_file(tmp_path, age_s=0)
    started = time.monotonic()
    extension_lock.clear_stale_extension_locks()
    assert 1.0 <= time.monotonic() - started < 10 and not lock.exists()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {lock}: a build lock no process on this host holds; waiting up to ")
    assert err[1].startswith(f"warning: removed {lock}")
