"""Who owns which file, the run lock, and places that cannot be written."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest


def test_a_verb_does_not_replace_another_verbs_file(tmp_path):
    from hpc_dfs import fsutil
    (tmp_path / "last.pt").write_bytes(b"weights")
    (tmp_path / "mine.html").write_text("old")
    with fsutil.writing_as("report"):
        with pytest.raises(fsutil.ForeignFileError, match="hpc-dfs train"):
            fsutil.write_text(tmp_path / "last.pt", "<html>")
        fsutil.write_text(tmp_path / "mine.html", "new")            # a name no contract fixes
    with fsutil.writing_as("train"):
        fsutil.write_bytes(tmp_path / "last.pt", b"new weights")    # its own file
    fsutil.write_text(tmp_path / "summary.json", "{}")              # a library call, outside a verb
    assert (tmp_path / "last.pt").read_bytes() == b"new weights" and (tmp_path / "mine.html").read_text() == "new"


def test_read_only_and_wrong_kind_places_are_one_error(tmp_path):
    from hpc_dfs import fsutil
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as e:   # cli.main prints it as one DiskWriteError line
        fsutil.write_text(tmp_path / "afile" / "x.json", "{}")
    assert fsutil.is_unwritable(e.value) and not fsutil.is_disk_error(e.value)
    err = fsutil.DiskWriteError(e.value.filename, e.value)
    assert err.code == 2 and "afile" in str(err) and "\n" not in str(err)
    import errno
    assert fsutil.DiskWriteError("x", OSError(errno.EROFS, "ro")).code == 4


def test_a_folder_is_held_by_one_live_run(tmp_path):
    from hpc_dfs import fsutil
    lock = fsutil.lock_folder(tmp_path / "run", "test")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert fsutil.lock_folder(tmp_path / "run", "test") == lock   # this process holds it already
    holder = subprocess.Popen(["sleep", "30"])
    try:   # another live process holds it
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "what": "hpc-dfs train"}))
        with pytest.raises(fsutil.LockedError, match="in use by hpc-dfs train"):
            fsutil.lock_folder(tmp_path / "run", "test")
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))   # its holder is gone: stale
    assert fsutil.lock_folder(tmp_path / "run", "test") == lock
    fsutil.unlock_folder(lock)
    assert not lock.exists()


def test_a_lock_held_by_a_zombie_is_stale(tmp_path):
    """A killed holder that nobody reaped (state Z) still answers kill(pid, 0); its lock is taken over."""
    from hpc_dfs import fsutil
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(500):   # the child ends; unreaped, it stays a zombie
            if fsutil._proc_state(pid) == "Z":
                break
            time.sleep(0.01)
        assert fsutil._proc_state(pid) == "Z"
        lock = tmp_path / "run" / fsutil.LOCK_NAME
        lock.parent.mkdir()
        lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": fsutil._start_time(pid),
                                    "what": "hpc-dfs predict"}))
        assert fsutil.lock_folder(tmp_path / "run", "test") == lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        fsutil.unlock_folder(lock)
    finally:
        os.waitpid(pid, 0)
