"""SIGKILL at seeded random moments (preprocess first run / resume / rerun with changed settings, train in the loop
and during the checkpoint write, predict mid-write; a couple under ``mpirun -np 2``).

After each kill a checker opens every output as its reader would and counts what reads as valid but is not
what a clean run writes (``corrupt-but-valid``); then a rerun / ``--auto-resume`` must finish with outputs equal to
a clean run (shards' arrays and predictions byte for byte, weights within 1e-6), else the trial counts as ``lost``.
The seeds are printed in the trial ids; ``FAULTS_SEED=N`` shifts all of them to explore other moments.
A run that ends before its kill (a fast, quiet machine) is put back as it was and started again with a
quarter of the delay (``harness.kill_at(reset=...)``, up to 4 runs), so the kills land whatever the load.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.faults import harness as H
from tests.faults.conftest import PREDICT_FLAGS, PREPROCESS_VARIANTS, SLICE

BASE_SEED = int(os.environ.get("FAULTS_SEED", "0"))
WEIGHT_TOL = H.WEIGHT_TOL


def _seed(i: int) -> int:
    return BASE_SEED * 1000 + i


def _trial(name: str, seed: int, kills: int, corrupt: list[str], lost: list[str]) -> None:
    why = "; ".join(corrupt + lost)
    H.record("kill", trial=name, seed=seed, killed=kills, corrupt_but_valid=int(bool(corrupt)), lost=int(bool(lost)),
             why=why)
    assert not corrupt, f"{name} seed {seed}: read as valid but wrong: {why}"
    assert not lost, f"{name} seed {seed}: not recovered: {why}"


# ----------------------------------------------------------------------------- preprocess
def _preprocess(world, out: Path, variant: str):
    return ("preprocess", "--data", world.data, "--out", out, *SLICE, *PREPROCESS_VARIANTS[variant])


def _finish_preprocess(world, out: Path, variant: str) -> list[str]:
    res = H.cli(*_preprocess(world, out, variant))
    if res.returncode != 0:
        return [f"rerun failed (rc {res.returncode}): {res.stderr[-800:]}"]
    return [f"after the rerun: {d}" for d in H.same_shards(H.shard_arrays(out), H.ref_arrays(world, variant))]


PRE_FIRST = [_seed(i) for i in range(5)]


@pytest.mark.parametrize("seed", PRE_FIRST, ids=[f"seed{s}" for s in PRE_FIRST])
def test_kill_preprocess_first_run(world, tmp_path, seed):
    out = tmp_path / "shards"
    H.ref_arrays(world, "shards")
    k = H.kill_at(_preprocess(world, out, "shards"), H.Trigger.tmp_file(out), seed, max_delay=0.4,
                  reset=H.restorer(out))
    corrupt = H.shards_corrupt_but_valid(world, out, ["shards"])
    _trial("preprocess first run", seed, int(k.killed), corrupt, _finish_preprocess(world, out, "shards"))


PRE_RESUME = [_seed(10 + i) for i in range(2)]


@pytest.mark.parametrize("seed", PRE_RESUME, ids=[f"seed{s}" for s in PRE_RESUME])
def test_kill_preprocess_resume(world, tmp_path, seed):
    """Killed twice: the first run, then the resumed run; the third run finishes."""
    out = tmp_path / "shards"
    H.ref_arrays(world, "shards")
    kills, corrupt = 0, []
    for i in range(2):
        k = H.kill_at(_preprocess(world, out, "shards"), H.Trigger.tmp_file(out), seed + i, max_delay=0.4,
                      reset=H.restorer(out))
        kills += int(k.killed)
        corrupt += H.shards_corrupt_but_valid(world, out, ["shards"])
    _trial("preprocess resume", seed, kills, corrupt, _finish_preprocess(world, out, "shards"))


PRE_CHANGED = [("shards_window", _seed(20)), ("shards_window", _seed(21)), ("shards_24", _seed(22)),
               ("shards_24", _seed(23))]


@pytest.mark.parametrize("variant, seed", PRE_CHANGED, ids=[f"{v}-seed{s}" for v, s in PRE_CHANGED])
def test_kill_preprocess_rerun_with_changed_settings(world, tmp_path, variant, seed):
    out = world.copy(world.shards, tmp_path / "shards")
    H.ref_arrays(world, "shards"), H.ref_arrays(world, variant)
    k = H.kill_at(_preprocess(world, out, variant), H.Trigger.tmp_file(out), seed, max_delay=0.4,
                  reset=H.restorer(out))
    corrupt = H.shards_corrupt_but_valid(world, out, ["shards", variant])
    _trial(f"preprocess rerun as {variant}", seed, int(k.killed), corrupt, _finish_preprocess(world, out, variant))


@pytest.mark.distributed
def test_kill_preprocess_mpirun_np2(world, tmp_path):
    seed = _seed(30)
    out = tmp_path / "shards"
    H.ref_arrays(world, "shards")
    k = H.kill_at(_preprocess(world, out, "shards"), H.Trigger.tmp_file(out), seed, max_delay=0.4, np=2,
                  reset=H.restorer(out))
    corrupt = H.shards_corrupt_but_valid(world, out, ["shards"])
    _trial("preprocess mpirun -np 2", seed, int(k.killed), corrupt, _finish_preprocess(world, out, "shards"))


# ----------------------------------------------------------------------------- train
def _train(world, out: Path, *extra):
    return ("train", "--shards", world.shards, "--out", out, "--epochs", 2, *H.TRAIN_TINY, *extra)


def _finish_train(world, out: Path, ref_run: Path) -> list[str]:
    res = H.cli(*_train(world, out, "--auto-resume"))
    if res.returncode != 0:
        return [f"--auto-resume failed (rc {res.returncode}): {res.stderr[-800:]}"]
    a, b = H.load_checkpoint(out / "checkpoints" / "last.pt"), H.load_checkpoint(ref_run / "checkpoints" / "last.pt")
    lost = []
    if a is None or a["epoch"] != 2 or a["step"] != b["step"]:
        lost.append("last.pt after the resume is not at epoch 2 / the clean run's step")
    elif (d := H.max_rel_diff(a["model"], b["model"])) > WEIGHT_TOL:
        lost.append(f"resumed weights differ from the clean run by {d:.2e}")
    epochs = [r["epoch"] for r in H.metrics_rows(out)]
    if epochs != [1, 2]:
        lost.append(f"metrics.jsonl epochs after the resume: {epochs} (expected [1, 2])")
    return lost


TRAIN_LOOP = [_seed(40 + i) for i in range(3)]


@pytest.mark.parametrize("seed", TRAIN_LOOP, ids=[f"seed{s}" for s in TRAIN_LOOP])
def test_kill_train_in_the_loop(world, tmp_path, seed):
    """Killed at a random moment after the model is built: mid-epoch, in validation or between epochs."""
    ref_run, out = world.run_epochs(2), tmp_path / "run"
    k = H.kill_at(_train(world, out), H.Trigger.line("steps/epoch"), seed, max_delay=1.0, reset=H.restorer(out))
    corrupt = H.checkpoints_corrupt_but_valid(out, ref_run)
    _trial("train in the loop", seed, int(k.killed), corrupt, _finish_train(world, out, ref_run))


TRAIN_CKPT = [_seed(50 + i) for i in range(3)]


@pytest.mark.parametrize("seed", TRAIN_CKPT, ids=[f"seed{s}" for s in TRAIN_CKPT])
def test_kill_train_during_checkpoint_write(world, tmp_path, seed):
    """Killed while a checkpoint is being written (odd seeds: the epoch-2 one, after epoch_0001.pt exists)."""
    ref_run, out = world.run_epochs(2), tmp_path / "run"
    ckdir = out / "checkpoints"
    second = seed % 2 == 1

    def writing() -> bool:
        try:
            tmp = any(e.name.startswith(H.TMP_PREFIX) for e in os.scandir(ckdir))
        except FileNotFoundError:
            return False
        return tmp and (not second or (ckdir / "epoch_0001.pt").exists())

    k = H.kill_at(_train(world, out), H.Trigger.when(writing), seed, max_delay=0.02, reset=H.restorer(out))
    corrupt = H.checkpoints_corrupt_but_valid(out, ref_run)
    _trial("train checkpoint write", seed, int(k.killed), corrupt, _finish_train(world, out, ref_run))


# ----------------------------------------------------------------------------- predict
def _predict(world, out: Path):
    return ("predict", "--checkpoint", world.checkpoint, "--input", world.data, "--out", out, *PREDICT_FLAGS)


def _finish_predict(world, out: Path) -> list[str]:
    res = H.cli(*_predict(world, out))
    if res.returncode != 0:
        return [f"rerun failed (rc {res.returncode}): {res.stderr[-800:]}"]
    return [f"after the rerun: {d}" for d in H.same_predictions(out, world.pred)]


PREDICT = [_seed(60 + i) for i in range(3)]


@pytest.mark.parametrize("seed", PREDICT, ids=[f"seed{s}" for s in PREDICT])
def test_kill_predict_mid_write(world, tmp_path, seed):
    ref, out = world.pred, tmp_path / "pred"
    k = H.kill_at(_predict(world, out), H.Trigger.tmp_file(out), seed, max_delay=0.3, reset=H.restorer(out))
    corrupt = [f"{n} reads as valid but differs" for n in H.readable_but_wrong_predictions(out, ref)]
    _trial("predict mid-write", seed, int(k.killed), corrupt, _finish_predict(world, out))


@pytest.mark.distributed
def test_kill_predict_mpirun_np2(world, tmp_path):
    seed = _seed(70)
    ref, out = world.pred, tmp_path / "pred"
    k = H.kill_at(_predict(world, out), H.Trigger.tmp_file(out), seed, max_delay=0.3, np=2,
                  reset=H.restorer(out))
    corrupt = [f"{n} reads as valid but differs" for n in H.readable_but_wrong_predictions(out, ref)]
    _trial("predict mpirun -np 2", seed, int(k.killed), corrupt, _finish_predict(world, out))


# ----------------------------------------------------------------------------- hole 1 and hole 6 (kill side)
def test_hole1_killed_rerun_with_changed_settings_is_refused(world, tmp_path):
    """Rerun with --intensity window, SIGKILL just after the first shard is replaced: the folder must not read as
    valid-but-mixed, and train must refuse it with one line naming the shard (or the manifest)."""
    out = world.copy(world.shards, tmp_path / "shards")
    old = {p.name: p.stat().st_ino for p in out.glob("shard-*.h5")}

    def replaced() -> bool:
        return any(p.exists() and p.stat().st_ino != old[p.name] for p in (out / n for n in old))

    # not killed: preprocess refused to mix, or rebuilt elsewhere and finished; either way the checks below hold
    H.kill_at(_preprocess(world, out, "shards_window"), H.Trigger.when(replaced), seed=0, max_delay=0.0)
    corrupt = H.shards_corrupt_but_valid(world, out, ["shards", "shards_window"])
    res = H.cli("train", "--shards", out, "--out", tmp_path / "run", "--epochs", 1, *H.TRAIN_TINY)
    assert not corrupt, "; ".join(corrupt) + f" (and train exited {res.returncode})"
    if res.returncode != 0:
        problems = H.clear_error(res, "train", "shard", "manifest")
        assert not problems, "\n".join(problems)


def test_hole6_killed_predict_leaves_no_tmp_probabilities_after_rerun(world, tmp_path):
    """A predict killed while writing probabilities leaves .tmp-probabilities_*; the rerun must clean them."""
    out = tmp_path / "pred"
    k = H.kill_at(_predict(world, out), H.Trigger.tmp_file(out, "probabilities_"), seed=0, max_delay=0.0)
    assert k.killed, "predict finished before the kill"
    if not H.leftover_tmp(out):  # the kill landed after the rename: plant what a kill leaves
        shutil.copyfile(world.pred / "probabilities_00000.nii.gz", out / ".tmp-probabilities_00000.nii.gz.x1.nii.gz")
    res = H.require_ok(H.cli(*_predict(world, out)), "predict rerun")
    assert not H.leftover_tmp(out), f"leftover temporary files after the rerun: {H.leftover_tmp(out)}"
    assert not H.same_predictions(out, world.pred), res.output[-500:]
