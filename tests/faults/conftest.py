"""The fault battery's one tiny data set (built once per session), its clean reference outputs, and the figure.

Reference outputs (all under one session folder, never modified by a trial; trials work on copies):
  data/       synth --cases 4 --size 48 --min-slices 6 --max-slices 8
  shards/     preprocess --slice-size 32,32            (and shards_window/, shards_24/ on demand)
  run/        train 1 epoch (TRAIN_TINY)               (and run2/: 2 epochs, on demand, for kill/resume trials)
  pred/       predict --checkpoint run/checkpoints/last.pt --no-overlays --save-probabilities
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import time
from pathlib import Path

import pytest

from tests.faults import harness as H

SLICE = ("--slice-size", "32,32")
PREPROCESS_VARIANTS = {"shards": (), "shards_window": ("--intensity", "window"), "shards_24": ("--slice-size", "24,24")}
PREDICT_FLAGS = ("--no-overlays", "--save-probabilities")
_T0 = time.monotonic()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


class World:
    """Clean reference outputs, built lazily once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        H.require_ok(H.cli("synth", "--out", self.data, "--cases", 4, "--size", 48, "--min-slices", 6,
                           "--max-slices", 8, "--seed", 0), "synth")

    def shards_variant(self, name: str = "shards") -> Path:
        out = self.root / name
        if not (out / "manifest.json").exists():
            H.require_ok(H.cli("preprocess", "--data", self.data, "--out", out, *SLICE,
                               *PREPROCESS_VARIANTS[name]), f"preprocess {name}")
        return out

    @property
    def shards(self) -> Path:
        return self.shards_variant("shards")

    def run_epochs(self, epochs: int) -> Path:
        out = self.root / ("run" if epochs == 1 else f"run{epochs}")
        if not (out / "checkpoints" / "last.pt").exists():
            H.require_ok(H.cli("train", "--shards", self.shards, "--out", out, "--epochs", epochs,
                               *H.TRAIN_TINY), f"train {epochs} epoch(s)")
        return out

    @property
    def run(self) -> Path:
        return self.run_epochs(1)

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "last.pt"

    @property
    def pred(self) -> Path:
        out = self.root / "pred"
        if not (out / "summary.json").exists():
            H.require_ok(H.cli("predict", "--checkpoint", self.checkpoint, "--input", self.data, "--out", out,
                               *PREDICT_FLAGS), "predict")
        return out

    def copy(self, what: Path, dst: Path) -> Path:
        """A private copy of a reference folder for one trial."""
        shutil.copytree(what, dst)
        return dst


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("faults_world"))


# ----------------------------------------------------------------------------- the figure
def _figure() -> dict:
    t = H.TALLY
    bad, kills, full, corr = t["bad_input"], t["kill"], t["disk_full"], t["corruption"]
    verdicts = [_verdict(r) for r in bad]
    return {
        "bad_inputs": len(bad), "bad_inputs_clear": sum(r["clear"] for r in bad),
        **{f"bad_inputs_{v}": verdicts.count(v) for v in VERDICTS},
        "by_class": {str(c): {v: sum(1 for r, w in zip(bad, verdicts) if r.get("issue_class") == c and w == v)
                              for v in VERDICTS}
                     for c in sorted({r["issue_class"] for r in bad if "issue_class" in r})},
        "not_clear": {v: [r["kind"] for r, w in zip(bad, verdicts) if w == v] for v in VERDICTS[2:]},
        "kills": sum(r["killed"] for r in kills), "kill_trials": len(kills),
        "corrupt_but_valid": sum(r["corrupt_but_valid"] for r in kills),
        "lost": sum(r["lost"] for r in kills),
        "disk_full": len(full), "disk_full_clean": sum(r["clean"] for r in full),
        "corruptions": len(corr), "corruptions_named": sum(r["named"] for r in corr),
        "unclear": [r["kind"] for r in bad if not r["clear"]],
        "kill_problems": [r for r in kills if r["corrupt_but_valid"] or r["lost"]],
        "disk_full_problems": [r["kind"] for r in full if not r["clean"]],
        "corruptions_unnamed": [r["kind"] for r in corr if not r["named"]],
        "kill_seeds": [(r["trial"], r["seed"]) for r in kills],
    }


#: a bad input's verdict (tests/faults/test_classes.py): one clear error (or a valid input handled as such), or not
VERDICTS = ("clear", "valid", "confusing", "silent", "lost")


def _verdict(r: dict) -> str:
    """A record's verdict; the kinds of test_bad_inputs.py are clear, or silent (exit 0), or else confusing."""
    if "verdict" in r:
        return r["verdict"]
    return "clear" if r["clear"] else ("silent" if r.get("rc") == 0 else "confusing")


def figure_line(f: dict) -> str:
    verdicts = ", ".join(f"{f.get('bad_inputs_' + v, 0)} {v}" for v in VERDICTS)
    return (f"faults: {f['bad_inputs']} bad inputs, {verdicts}; {f['kills']} kills, "
            f"{f['corrupt_but_valid']} corrupt-but-valid, {f['lost']} lost; {f['disk_full']} disk-full, "
            f"{f['disk_full_clean']} clean; {f['corruptions']} corruptions, {f['corruptions_named']} named")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not any(H.TALLY.values()):
        return
    from hpc_dfs.fsutil import write_json
    f = _figure()
    line = figure_line(f)
    terminalreporter.write_sep("-", "fault battery")
    terminalreporter.write_line(line)
    for what in ("unclear", "disk_full_problems", "corruptions_unnamed"):
        if f[what]:
            terminalreporter.write_line(f"  {what}: {', '.join(f[what])}")
    for v, kinds in f["not_clear"].items():
        if kinds:
            terminalreporter.write_line(f"  {v}: {', '.join(kinds)}")
    for r in f["kill_problems"]:
        terminalreporter.write_line(f"  kill trial {r['trial']} (seed {r['seed']}): {r.get('why', '')}")
    kids, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    cpu = kids.ru_utime + kids.ru_stime + me.ru_utime + me.ru_stime
    terminalreporter.write_line(f"  {time.monotonic() - _T0:.0f} s wall, {cpu:.0f} s CPU (the battery and its jobs), "
                                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpu(s)")
    f.update(line=line, seconds=round(time.monotonic() - _T0, 1), cpu_seconds=round(cpu, 1),
             load_average=round(os.getloadavg()[0], 1), exitstatus=int(exitstatus),
             machine=f"{os.cpu_count()} cpu(s), {platform.machine()}, {platform.python_version()}",
             complete_battery=len(H.TALLY["bad_input"]) >= 20 and len(H.TALLY["kill"]) >= 20)
    # a test run writes the figure under pytest's temporary folder, so it leaves the checkout clean; `make bench`
    # (make bench-faults) sets HPC_DFS_FAULTS_JSON=bench/results/faults.json to record a complete battery there
    target = os.environ.get("HPC_DFS_FAULTS_JSON")
    if target and not f["complete_battery"]:
        terminalreporter.write_line(f"  partial battery (-k or one file): {target} not updated")
        return
    out = Path(target) if target else config._tmp_path_factory.getbasetemp() / "faults.json"
    write_json(out, f)
    terminalreporter.write_line(f"  figure written to {out}")
