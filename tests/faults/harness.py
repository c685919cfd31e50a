"""The fault-injection harness: run the real CLI, kill it at a seeded random moment, and check every output
as its reader would.

    res = cli("preprocess", "--data", d, "--out", s)            # one plain process, stderr kept apart
    problems = clear_error(res, "preprocess", "case_00001")     # [] when the failure is one clear line
    k = kill_at(hpc_dfs_cmd(...), Trigger.tmp_file(out), seed=3, max_delay=0.3)

Every record of a trial goes to ``TALLY``; ``conftest.py`` prints the figure at the end of the session and
writes it under pytest's temporary folder (``make bench-faults`` records it in ``bench/results/faults.json``).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tests.launch import REPO, hpc_dfs_cmd, job_env, launcher_prefix

TMP_PREFIX = ".tmp-"
#: "bad_input" / "kill" / "disk_full" / "corruption" -> list of records (dicts)
TALLY: dict[str, list[dict]] = {"bad_input": [], "kill": [], "disk_full": [], "corruption": []}
TRAIN_TINY = ("--steps-per-epoch", 2, "--batch-size", 4, "--num-workers", 0, "--set", "model.base_channels=8",
              "--set", "model.norm=instance", "--seed", 0)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    killed: bool = False          # SIGKILLed by the harness while still running
    kill_after_s: float = 0.0     # seconds from the trigger to the kill
    attempts: int = 1             # runs started: a run that ended before its kill is reset and started again

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args, timeout: float = 180, np: int = 1, env: Optional[dict] = None) -> Run:
    """Run ``hpc-dfs ARGS`` (``np`` > 1: under mpirun) to completion with stdout and stderr kept apart."""
    cmd = _command(args, np)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env(env),
                            cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Run(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Run(-9, out or "", (err or "") + f"\n[faults] TIMEOUT after {timeout}s: {' '.join(cmd)}", True)


def _command(args, np: int) -> list[str]:
    prefix = launcher_prefix("mpirun", np) if np > 1 else []
    return [str(c) for c in prefix + hpc_dfs_cmd(*args)]


def require_ok(res: Run, what: str) -> Run:
    assert res.returncode == 0, f"{what} failed (rc {res.returncode}):\n{res.output[-4000:]}"
    return res


# ----------------------------------------------------------------------------- clear errors
ERROR_LINE = re.compile(r"^hpc-dfs [a-z]+: error:|\b(ERROR|CRITICAL)\b")


def cli_error_lines(res: Run, verb: str) -> list[str]:
    """The ``hpc-dfs VERB: error: ...`` lines of ``cli.main`` (an HpcDfsError raised by the stage) on stderr."""
    return [ln for ln in res.stderr.splitlines() if ln.startswith(f"hpc-dfs {verb}: error:")]


def clear_error(res: Run, verb: str, *names: str, one_line: bool = False, cli_line: bool = False) -> list[str]:
    """Problems with a failed run's report; [] when it is a clear error.

    Clear means: a non-zero exit that is not a signal (rc 1..127, not 134/139 nor negative), no Python traceback
    nor 'Exception ignored' nor segfault, and an error line on stderr (the CLI's ``hpc-dfs VERB: error: ...``,
    argparse's, or a logged ERROR) that alone names one of ``names`` (the case or the file).

    ``one_line`` (a run refused before any work starts): exactly one error line in all. ``cli_line`` (with it):
    that line is ``cli.main``'s ``hpc-dfs VERB: error: ...`` (the stage raised an HpcDfsError) naming one of
    ``names``.
    """
    if res.timed_out:
        return ["timed out"]
    problems = []
    if not 0 < res.returncode < 128:
        problems.append(f"rc {res.returncode} (expected a non-zero exit, not a signal)")
    for bad in ("Traceback (most recent call last)", "Exception ignored", "Segmentation fault", "core dumped"):
        if bad in res.output:
            problems.append(f"output holds {bad!r}")
    lines = [ln for ln in res.stderr.splitlines() if ERROR_LINE.search(ln)]
    if not lines:
        problems.append("no error line on stderr")
    elif names and not any(n.lower() in ln.lower() for ln in lines for n in names):
        problems.append(f"no error line names any of {names}: {lines[:3]}")
    if len(lines) > 6:
        problems.append(f"{len(lines)} error lines: a flood, not one clear line")
    if one_line and len(lines) != 1:
        problems.append(f"{len(lines)} error lines for a run refused before it started: expected exactly one")
    elif one_line and cli_line:
        cli_lines = cli_error_lines(res, verb)
        if len(cli_lines) != 1:
            problems.append(f"the one error line is not 'hpc-dfs {verb}: error: ...': {lines[:1]}")
        elif names and not any(n.lower() in cli_lines[0].lower() for n in names):
            problems.append(f"the 'hpc-dfs {verb}: error:' line names none of {names}: {cli_lines[0]}")
    if problems:
        problems.append(f"{verb} stderr tail: " + res.stderr[-1500:])
    return problems


def record(category: str, **fields) -> dict:
    TALLY[category].append(fields)
    return fields


# ----------------------------------------------------------------------------- kill -9 at a random moment
@dataclass
class Trigger:
    """When the random delay starts: a file matching ``pattern`` appears in ``folder``, or a line holds ``text``."""
    folder: Optional[Path] = None
    pattern: str = ""
    text: str = ""
    check: Optional[Callable[[], bool]] = None

    @classmethod
    def tmp_file(cls, folder: Path, name_part: str = "") -> "Trigger":
        return cls(folder=Path(folder), pattern=TMP_PREFIX + name_part)

    @classmethod
    def line(cls, text: str) -> "Trigger":
        return cls(text=text)

    @classmethod
    def when(cls, check: Callable[[], bool]) -> "Trigger":
        return cls(check=check)

    def fired(self, output: str) -> bool:
        if self.text:
            return self.text in output
        if self.check is not None:
            return self.check()
        try:
            return any(e.name.startswith(self.pattern) for e in os.scandir(self.folder))
        except FileNotFoundError:
            return False


@dataclass
class _Reader:
    stream: object
    chunks: list = field(default_factory=list)

    def start(self) -> "_Reader":
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        for line in iter(self.stream.readline, ""):
            self.chunks.append(line)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def kill_at(args, trigger: Trigger, seed: int, max_delay: float, np: int = 1, timeout: float = 180,
            reset: Optional[Callable[[], None]] = None, attempts: int = 4) -> Run:
    """Start ``hpc-dfs ARGS``, wait for ``trigger``, sleep U(0, max_delay) seconds (seeded), SIGKILL the whole job.

    On a fast, quiet machine a run can end before its kill; then nothing was tested. With ``reset`` (which
    puts the outputs back as they were before the run, see :func:`restorer`) such a run is reset and started
    again with a quarter of the delay, up to ``attempts`` runs; ``Run.attempts`` says how many it took.
    """
    delay = random.Random(seed).uniform(0.0, max_delay)
    for i in range(attempts if reset is not None else 1):
        run = _kill_once(args, trigger, delay, np, timeout)
        run.attempts = i + 1
        if run.killed or reset is None:
            break
        reset()
        delay /= 4
    return run


def restorer(path: Path) -> Callable[[], None]:
    """A ``reset`` for :func:`kill_at`: puts ``path`` back as it is now (removed when it does not exist yet)."""
    import shutil

    path = Path(path)
    snap = path.with_name(f".snap-{path.name}")
    shutil.rmtree(snap, ignore_errors=True)
    if path.exists():
        shutil.copytree(path, snap)

    def reset() -> None:
        shutil.rmtree(path, ignore_errors=True)
        if snap.exists():
            shutil.copytree(snap, path)
    return reset


def _kill_once(args, trigger: Trigger, delay: float, np: int, timeout: float) -> Run:
    proc = subprocess.Popen(_command(args, np), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=job_env(), cwd=REPO, start_new_session=True)
    out, err = _Reader(proc.stdout).start(), _Reader(proc.stderr).start()
    t_end = time.monotonic() + timeout
    while proc.poll() is None and not trigger.fired(out.text + err.text) and time.monotonic() < t_end:
        time.sleep(0.0005)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        kill_tree(proc.pid)
    proc.wait()
    time.sleep(0.05)  # the readers drain
    return Run(proc.returncode, out.text, err.text, killed=killed, kill_after_s=delay)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for e in os.scandir("/proc"):
        if e.name.isdigit():
            try:
                ppid = int(Path(e.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(e.name))
    return kids


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (mpirun's ranks may sit in other groups)."""
    kids, todo, tree = _children(), [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # a rank that mpirun started just after the snapshot above is orphaned by the kill, not killed by it: the job was
    # started in a session of its own (start_new_session), so every process left in that session is part of it
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end:
        rest = [p for p in _session(pid) if _alive(p)] + [p for p in tree[1:] if Path(f"/proc/{p}").exists()
                                                           and _alive(p)]
        if not rest:
            break
        for p in rest:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` (field 6 of /proc/PID/stat)."""
    out = []
    for e in os.scandir("/proc"):
        if e.name.isdigit():
            try:
                if int(Path(e.path, "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    out.append(int(e.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ----------------------------------------------------------------------------- readers' view of outputs
def shards_read_as_valid(shards: Path) -> bool:
    """True when the shards folder passes what training relies on: the manifest, a deep check, the dataset."""
    from hpc_dfs.data.reader import SliceDataset, ShardSet
    try:
        ShardSet(shards).validate(deep=True)
        ds = SliceDataset(shards)
        ds.close()
        return True
    except Exception:  # noqa: BLE001 - any refusal is a refusal
        return False


def shard_arrays(shards: Path) -> dict:
    """{case_id: {dataset: array}} of every case listed in the manifest, plus the manifest's key facts."""
    import h5py
    man = json.loads((shards / "manifest.json").read_text())
    out = {"_preprocessing": man["preprocessing"],
           "_cases": [(c["case_id"], c["n_slices"], c["fold"], c["shard"]) for c in man["cases"]]}
    for c in man["cases"]:
        with h5py.File(shards / c["shard"], "r") as f:
            g = f[c["case_id"]]
            out[c["case_id"]] = {k: g[k][()] for k in ("image", "label", "clinical", "classes_present")}
    return out


def same_shards(a: dict, b: dict) -> list[str]:
    """Differences between two ``shard_arrays`` results (byte-exact arrays)."""
    diffs = []
    if a["_cases"] != b["_cases"]:
        diffs.append(f"manifest cases differ: {a['_cases']} vs {b['_cases']}")
    if a["_preprocessing"] != b["_preprocessing"]:
        diffs.append("manifest preprocessing differs")
    for cid in sorted(k for k in a if not k.startswith("_")):
        for k, arr in a[cid].items():
            other = b.get(cid, {}).get(k)
            if other is None or arr.dtype != other.dtype or arr.shape != other.shape or arr.tobytes() != \
                    other.tobytes():
                diffs.append(f"{cid}/{k} differs")
    return diffs


def nifti_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a NIfTI, every byte decoded (a truncated gzip raises)."""
    import nibabel as nib
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def prediction_files(pred: Path) -> list[Path]:
    return sorted(p for p in pred.glob("*.nii.gz") if not p.name.startswith(TMP_PREFIX))


def same_predictions(pred: Path, ref: Path, require_all: bool = True) -> list[str]:
    """Differences between the prediction NIfTIs in ``pred`` and ``ref`` (decoded bytes and affine)."""
    diffs = []
    mine = {p.name: p for p in prediction_files(pred)}
    theirs = {p.name: p for p in prediction_files(ref)}
    if require_all and set(mine) != set(theirs):
        diffs.append(f"files differ: {sorted(set(mine) ^ set(theirs))}")
    for name in sorted(set(mine) & set(theirs)):
        try:
            a, aff_a = nifti_array(mine[name])
        except Exception as e:  # noqa: BLE001
            diffs.append(f"{name} does not read: {e}")
            continue
        b, aff_b = nifti_array(theirs[name])
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes() or not np.array_equal(aff_a, aff_b):
            diffs.append(f"{name} differs from the clean run")
    return diffs


def readable_but_wrong_predictions(pred: Path, ref: Path) -> list[str]:
    """Predictions that read fully as valid NIfTI but differ from the clean run (corrupt-but-valid)."""
    bad = []
    for p in prediction_files(pred):
        try:
            a, aff = nifti_array(p)
        except Exception:  # noqa: BLE001 - refused by its reader: not valid
            continue
        b, aff_b = nifti_array(ref / p.name)
        if a.tobytes() != b.tobytes() or not np.array_equal(aff, aff_b):
            bad.append(p.name)
    return bad


def load_checkpoint(path: Path) -> Optional[dict]:
    """The checkpoint as predict / --resume read it, or None when that reader refuses it."""
    from hpc_dfs.contracts import checkpoint
    try:
        return checkpoint.load(path)
    except Exception:  # noqa: BLE001
        return None


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor relative difference of two state dicts (inf when the keys differ)."""
    import torch
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, float(torch.linalg.vector_norm(x - y) / (torch.linalg.vector_norm(y) + 1e-12)))
    return worst


def metrics_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def leftover_tmp(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(TMP_PREFIX + "*"))


# ----------------------------------------------------------------------------- corrupt-but-valid checkers
WEIGHT_TOL = 1e-6
_REF_ARRAYS: dict = {}


def ref_arrays(world, variant: str) -> dict:
    """``shard_arrays`` of the clean reference shards of ``variant`` (built once)."""
    if variant not in _REF_ARRAYS:
        _REF_ARRAYS[variant] = shard_arrays(world.shards_variant(variant))
    return _REF_ARRAYS[variant]


def shards_corrupt_but_valid(world, out: Path, variants) -> list[str]:
    """What a reader would accept in ``out`` although it is not the clean run of the manifest's settings."""
    if not (out / "manifest.json").exists() or not shards_read_as_valid(out):
        return []
    got = shard_arrays(out)
    for v in variants:
        ref = ref_arrays(world, v)
        if got["_preprocessing"] == ref["_preprocessing"]:
            diffs = same_shards(got, ref)
            return [f"shards read as valid but differ from the clean '{v}' run: {diffs[:3]}"] if diffs else []
    return ["shards read as valid with a manifest of unknown settings"]


def checkpoints_corrupt_but_valid(out: Path, ref_run: Path) -> list[str]:
    """Checkpoints that load as valid but hold other weights than the clean run's at their epoch, and metric rows
    that parse but differ from the clean run's."""
    bad = []
    for p in sorted((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else []:
        if p.name.startswith(TMP_PREFIX):
            continue
        st = load_checkpoint(p)
        if st is None:
            continue
        ref = load_checkpoint(ref_run / "checkpoints" / f"epoch_{int(st['epoch']):04d}.pt")
        if ref is None or max_rel_diff(st["model"], ref["model"]) > WEIGHT_TOL:
            bad.append(f"{p.name} (epoch {st['epoch']}) loads but is not the clean run's")
    ref_rows = {r["epoch"]: r for r in metrics_rows(ref_run)}
    try:
        rows = metrics_rows(out)
    except ValueError:
        rows = []  # a reader refuses it: not valid, and the resume must repair it
    for r in rows:
        want = ref_rows.get(r.get("epoch"))
        if want is None or abs(r["train_loss"] - want["train_loss"]) > 1e-5 * max(1.0, abs(want["train_loss"])):
            bad.append(f"metrics.jsonl row {r} is not the clean run's")
    return bad
