"""Disk full: a small tmpfs mounted by the test, nearly filled by a filler file, for preprocess, train and predict.

Each run must stop with ONE clear error naming the file being written (rc > 0, no segfault, no traceback), leave
nothing corrupt that reads as valid, and finish after the filler is deleted (a rerun / ``--resume``) with the
outputs of a clean run. Needs root for ``mount``; skipped with a message otherwise, except under CI where it fails.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults import harness as H
from tests.faults.conftest import PREDICT_FLAGS, SLICE


@contextlib.contextmanager
def tmpfs(where: Path, size_kb: int):
    """A tmpfs of ``size_kb`` KiB mounted on ``where`` for the block."""
    if os.geteuid() != 0:
        msg = "disk-full trials mount a tmpfs and need root"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run them)")
        pytest.skip(msg)
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        msg = f"cannot mount a tmpfs on {where}: {res.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(mount: Path, leave_kb: int = 0) -> Path:
    """Write a filler file until only ``leave_kb`` KiB are free on ``mount`` (0: until ENOSPC)."""
    filler = mount / "filler.bin"
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize - leave_kb * 1024
    block = b"\0" * 65536
    with open(filler, "ab") as f:
        try:
            while free > 0:
                f.write(block[: min(len(block), free)])
                free -= len(block)
            if leave_kb == 0:
                while True:
                    f.write(block)
                    f.flush()
        except OSError:
            pass
    return filler


def _record_and_check(kind: str, problems: list[str]) -> None:
    H.record("disk_full", kind=kind, clean=not problems)
    assert not problems, f"{kind}: " + "\n".join(problems)


def _kb(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) // 1024 + 1


def test_hole5_disk_full_preprocess_is_clean(world, tmp_path):
    H.ref_arrays(world, "shards")
    # room for the clean run (shards of format 2 are ~1 MiB each here), so that the rerun can finish
    with tmpfs(tmp_path / "disk", 2 * _kb(world.shards) + 256) as disk:
        filler = fill(disk, leave_kb=64)
        out = disk / "shards"
        res = H.cli("preprocess", "--data", world.data, "--out", out, *SLICE)
        problems = H.clear_error(res, "preprocess", "shard-case_", "manifest.json", "clinical_pipeline.json", ".h5")
        problems += H.shards_corrupt_but_valid(world, out, ["shards"])
        problems += _valid_shards_are_clean(world, out)
        filler.unlink()
        res = H.cli("preprocess", "--data", world.data, "--out", out, *SLICE)
        if res.returncode != 0:
            problems.append(f"the rerun after freeing space failed: {res.stderr[-800:]}")
        else:
            problems += H.same_shards(H.shard_arrays(out), H.ref_arrays(world, "shards"))
    _record_and_check("preprocess", problems)


def _valid_shards_are_clean(world, out: Path) -> list[str]:
    """Any shard file that verifies on its own must hold the clean run's arrays."""
    import h5py

    from hpc_dfs.data.shards import validate_shard
    ref, bad = H.ref_arrays(world, "shards"), []
    for p in sorted(out.glob("shard-*.h5")):
        cid = p.stem[len("shard-"):]
        if validate_shard(p, cid, deep=True)[0]:
            with h5py.File(p, "r") as f:
                if f[cid]["image"][()].tobytes() != ref[cid]["image"].tobytes():
                    bad.append(f"{p.name} verifies but is not the clean run's")
    return bad


def test_hole5_disk_full_train_keeps_epoch1_and_resumes(world, tmp_path):
    """The disk fills up after epoch 1's metrics row: a clean error, epoch 1 kept, --resume finishes epoch 2."""
    ref_run = world.run_epochs(2)
    with tmpfs(tmp_path / "disk", 24 * 1024) as disk:
        out = disk / "run"
        args = ("train", "--shards", world.shards, "--out", out, "--epochs", 2, *H.TRAIN_TINY)
        res, filler = _run_until_row_then_fill(args, out)
        problems = H.clear_error(res, "train", ".pt", "metrics.jsonl", "curves.png", "config.toml", str(out))
        problems += H.checkpoints_corrupt_but_valid(out, ref_run)
        if [r["epoch"] for r in H.metrics_rows(out)] != [1]:
            problems.append(f"metrics.jsonl after the stop: {H.metrics_rows(out)} (expected the epoch-1 row)")
        filler.unlink()
        res = H.cli(*args, "--resume")
        if res.returncode != 0:
            problems.append(f"--resume after freeing space failed: {res.stderr[-800:]}")
        else:
            a, b = H.load_checkpoint(out / "checkpoints" / "last.pt"), H.load_checkpoint(ref_run / "checkpoints" /
                                                                                         "last.pt")
            if (d := H.max_rel_diff(a["model"], b["model"])) > H.WEIGHT_TOL:
                problems.append(f"resumed weights differ from the clean run by {d:.2e}")
            if (epochs := [r["epoch"] for r in H.metrics_rows(out)]) != [1, 2]:
                problems.append(f"metrics.jsonl epochs after --resume: {epochs} (expected [1, 2]): epoch-1 row lost")
    _record_and_check("train", problems)


def _run_until_row_then_fill(args, out: Path) -> tuple[H.Run, Path]:
    """Run train; when metrics.jsonl holds a row and epoch 1's checkpoint is written, stop it (SIGSTOP), fill the
    disk, let it go on. (Train writes the epoch's row BEFORE its checkpoint, so that a kill between the two cannot
    lose the row: waiting for the row alone could fill the disk before epoch 1 is kept.)"""
    cmd = [str(c) for c in H.hpc_dfs_cmd(*args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=H.job_env(),
                            cwd=H.REPO, start_new_session=True)
    so, se = H._Reader(proc.stdout).start(), H._Reader(proc.stderr).start()
    t_end = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < t_end:
        if ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()
                and (out / "checkpoints" / "epoch_0001.pt").exists()):
            break
        time.sleep(0.001)
    stopped = proc.poll() is None
    if stopped:
        proc.send_signal(signal.SIGSTOP)
    filler = fill(out.parent, leave_kb=0)
    if stopped:
        proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        H.kill_tree(proc.pid)
        proc.wait()
    time.sleep(0.05)
    return H.Run(proc.returncode, so.text, se.text), filler


def test_hole5_disk_full_predict_is_clean(world, tmp_path):
    ref = world.pred
    with tmpfs(tmp_path / "disk", 1024) as disk:
        filler = fill(disk, leave_kb=48)
        out = disk / "pred"
        args = ("predict", "--checkpoint", world.checkpoint, "--input", world.data, "--out", out, *PREDICT_FLAGS)
        res = H.cli(*args)
        problems = H.clear_error(res, "predict", "prediction_", "probabilities_", "summary.json", "risk.csv",
                                 str(out))
        problems += [f"{n} reads as valid but differs" for n in H.readable_but_wrong_predictions(out, ref)]
        filler.unlink()
        res = H.cli(*args)
        if res.returncode != 0:
            problems.append(f"the rerun after freeing space failed: {res.stderr[-800:]}")
        else:
            problems += H.same_predictions(out, ref)
    _record_and_check("predict", problems)
