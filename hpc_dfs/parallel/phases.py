"""Per-rank phase times of a whole command, from the process's own start: where a run's seconds go.

    clock = PhaseClock()          # first thing in a stage: the time until here is interpreter start-up + imports
    clock.mark("imports")
    ...; clock.mark("plan")
    log.debug("phases %s", clock.json())   # HPC_DFS_LOG_LEVEL=DEBUG shows it on every rank

Each mark records the wall seconds since the process started (``/proc/self/stat``; elsewhere since this
module was imported) and the CPU seconds of the process (``time.process_time``: user + system, since it
started). A phase's figures are the differences to the mark before it, so a rank that waits in a
collective shows wall time without CPU time. ``bench/bench_preprocess.py`` and ``bench/bench_predict.py``
read these lines into their JSON.
"""
from __future__ import annotations

import json
import os
import time

__all__ = ["PhaseClock", "process_start"]

_IMPORTED = time.time()


def process_start() -> float:
    """The wall-clock time (``time.time()`` scale) at which this process started.

    From ``/proc/self/stat`` on Linux; elsewhere (or when it cannot be read) the time this module was imported.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # pragma: no cover - not Linux
        return _IMPORTED


class PhaseClock:
    """Named marks of wall and CPU time since the process started (see the module docstring)."""

    def __init__(self) -> None:
        self.t0 = process_start()
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, name: str) -> None:
        """End the phase ``name`` now."""
        self.marks.append((name, time.time() - self.t0, time.process_time()))

    def phases(self) -> list[dict]:
        """One dict per phase: ``name``, ``wall_s`` and ``cpu_s`` spent in it, and ``end_wall_s`` since the start."""
        out, prev_w, prev_c = [], 0.0, 0.0
        for name, w, c in self.marks:
            out.append({"name": name, "wall_s": round(w - prev_w, 3), "cpu_s": round(c - prev_c, 3),
                        "end_wall_s": round(w, 3)})
            prev_w, prev_c = w, c
        return out

    def json(self) -> str:
        """:meth:`phases` as one line of JSON (what the stages log at DEBUG)."""
        return json.dumps(self.phases(), separators=(",", ":"))
