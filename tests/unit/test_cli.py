"""``python -m hpc_dfs`` exits without the interpreter's teardown once the verb is done (cli.run)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from hpc_dfs import cli


class _Exited(Exception):
    def __init__(self, code):
        self.code = code


def _fake_exit(code):
    raise _Exited(code)


def test_run_finishes_atexit_and_exits_at_once_with_main_code(monkeypatch):
    calls = []
    monkeypatch.delitem(sys.modules, "hpc_dfs.parallel", raising=False)  # no backend started in this process
    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: calls.append("atexit"))
    monkeypatch.setattr(cli.os, "_exit", _fake_exit)
    with pytest.raises(_Exited) as e:
        cli.run([])
    assert e.value.code == 3 and calls == ["atexit"]


def test_run_exits_the_ordinary_way_while_a_thread_still_works(monkeypatch):
    monkeypatch.setattr(cli, "main", lambda argv=None: 1)
    monkeypatch.setattr(cli.os, "_exit", _fake_exit)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(SystemExit) as e:
            cli.run([])
        assert e.value.code == 1
    finally:
        stop.set()
        t.join()


def test_module_entry_point_keeps_exit_codes_and_output():
    ok = subprocess.run([sys.executable, "-m", "hpc_dfs", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("hpc-dfs ")
    bad = subprocess.run([sys.executable, "-m", "hpc_dfs", "preprocess", "--data", "/nonexistent-folder", "--out",
                          "/tmp/unused-out"], capture_output=True, text=True)
    assert bad.returncode == 2 and "hpc-dfs preprocess: error:" in bad.stderr
