"""Cross-validation end to end, at a tiny size: ``train --folds all`` on 2 ranks, out-of-fold predict, the pooled
evaluation with its per-fold figures, and the ensemble of the folds.

6 phantom cases of 32x32 slices in 3 folds (the real ``hpc-dfs synth`` + ``preprocess --n-folds 3``), the cascade
(``--stage both``: every fold trains locate, then refine), base width 4, 1 epoch of 3 steps per stage; about a minute
on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from hpc_dfs.contracts import checkpoint, run as run_contract, shards as shards_contract
from hpc_dfs.fsutil import sha256_file

from tests.launch import hpc_dfs_cmd, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.horovod]

TINY = ["--epochs", "1", "--steps-per-epoch", "3", "--num-workers", "0", "--set", "model.base_channels=4",
        "--set", "model.norm=instance", "--global-batch-size", "4", "--batch-size", "4", "--val-batch-size", "8",
        "--seed", "0"]
FOLDS = 3


@pytest.fixture(scope="module")
def cv(tmp_path_factory) -> dict:
    """The data, its shards (3 folds) and a cross-validation run of every fold, trained under mpirun -np 2."""
    root = tmp_path_factory.mktemp("cv")
    res = launch(hpc_dfs_cmd("synth", "--out", root / "data", "--cases", 6, "--seed", 0, "--size", 32,
                             "--min-slices", 6, "--max-slices", 8), launcher="none", timeout=180)
    assert res.returncode == 0, res.output
    res = launch(hpc_dfs_cmd("preprocess", "--data", root / "data", "--out", root / "shards", "--slice-size", "32,32",
                             "--n-folds", FOLDS, "--set", "refine.slice_size=32,32", "--set", "refine.spacing=3.0"),
                 launcher="none", timeout=180)
    assert res.returncode == 0, res.output
    res = launch(hpc_dfs_cmd("train", "--shards", root / "shards", "--out", root / "run", "--folds", "all",
                             "--stage", "both", *TINY), np=2, launcher="mpirun", timeout=300)
    assert res.returncode == 0, res.output[-4000:]
    manifest = shards_contract.read_manifest(root / "shards")
    return {"root": root, "data": root / "data", "shards": root / "shards", "run": root / "run",
            "fold_of": {c["case_id"]: c["fold"] for c in manifest["cases"]}, "train_output": res.output}


def _best(run: Path, fold: int, stage: str) -> Path:
    return checkpoint.best_path(run_contract.fold_dir(run, fold) / stage)


def test_every_fold_trained_on_two_ranks_with_its_own_validation_fold(cv):
    run, fold_of = cv["run"], cv["fold_of"]
    assert sorted(set(fold_of.values())) == list(range(FOLDS))
    summary = run_contract.read_cv_summary(run)
    assert summary["n_folds"] == FOLDS and summary["missing_folds"] == [] and summary["stage"] == "both"
    assert [f["fold"] for f in summary["folds"]] == list(range(FOLDS))
    for f in summary["folds"]:
        k = f["fold"]
        assert f["finished"] and f["run"] == f"fold_{k}"
        info = run_contract.read_fold_info(run / f["run"])
        assert info["val_cases"] == sorted(c for c, fk in fold_of.items() if fk == k)
        assert info["n_train_cases"] == len(fold_of) - len(info["val_cases"])
        for stage in ("locate", "refine"):
            rec = f["stages"][stage]
            assert rec["run"] == f"fold_{k}/{stage}" and rec["epochs"] == 1 and rec["best_epoch"] == 1
            meta = checkpoint.read_meta(_best(run, k, stage))
            assert meta["config"]["schedule"]["val_fold"] == k and meta["config"]["stage"] == stage
            assert meta["world_size"] == 2
            assert rec["best"]["kidney_dice"] == pytest.approx(meta["metrics"]["kidney_dice"])
    for stage in ("locate", "refine"):
        mean = sum(f["stages"][stage]["best"]["kidney_dice"] for f in summary["folds"]) / FOLDS
        assert summary["mean"][stage]["kidney_dice"] == pytest.approx(mean)


def test_auto_resume_skips_the_finished_folds(cv):
    run = cv["run"]
    before = {p: sha256_file(p) for p in sorted(run.rglob("*.pt"))}
    res = launch(hpc_dfs_cmd("train", "--shards", cv["shards"], "--out", run, "--folds", "all", "--stage", "both",
                             "--auto-resume", *TINY), np=2, launcher="mpirun", timeout=180)
    assert res.returncode == 0, res.output[-3000:]
    for k in range(FOLDS):
        assert f"fold {k}: {run_contract.fold_dir(run, k)} already finished its 1 epochs; skipped" in res.output
    assert {p: sha256_file(p) for p in sorted(run.rglob("*.pt"))} == before


def test_out_of_fold_prediction_and_pooled_evaluation(cv):
    run, fold_of, pred = cv["run"], cv["fold_of"], cv["root"] / "oof"
    res = launch(hpc_dfs_cmd("predict", "--oof", run, "--input", cv["data"], "--out", pred, "--set",
                             "overlays=false"), np=2, launcher="mpirun", timeout=240)
    assert res.returncode == 0, res.output[-3000:]
    summary = json.loads((pred / "summary.json").read_text())
    ids = [c["case_id"] for c in summary["cases"]]
    assert sorted(ids) == sorted(fold_of) and len(ids) == len(set(ids))      # every case exactly once
    assert {c["rank"] for c in summary["cases"]} == {0, 1}
    for c in summary["cases"]:
        k = fold_of[c["case_id"]]
        assert c["status"] == "ok" and c["fold"] == k
        shas = [sha256_file(_best(run, k, "locate")), sha256_file(_best(run, k, "refine"))]
        # the model of its own fold, and that fold's alone (stage 1 and stage 2 of the cascade)
        assert c["provenance"]["checkpoints_sha256"] == hashlib.sha256(" ".join(shas).encode()).hexdigest()
        assert c["cascade"]["stage"] in ("refine", "locate (no kidney found by stage 1)")
    assert set(summary["oof"]["folds"]) == {str(k) for k in range(FOLDS)}

    out = cv["root"] / "oof_eval.json"
    res = launch(hpc_dfs_cmd("evaluate", "--pred", pred, "--gt", cv["data"], "--out", out), launcher="none",
                 timeout=180)
    assert res.returncode == 0, res.output[-3000:]
    ev = json.loads(out.read_text())
    assert ev["mean"]["n_cases"] == len(fold_of) and not ev["missing_predictions"]
    assert {c["case_id"]: c["fold"] for c in ev["cases"]} == fold_of
    per_fold = ev["oof"]["per_fold"]
    assert sorted(per_fold) == [str(k) for k in range(FOLDS)]
    for k, m in per_fold.items():
        mine = [c["kidney_dice"] for c in ev["cases"] if c["fold"] == int(k)]
        assert m["n_cases"] == len(mine) and m["kidney_dice"] == pytest.approx(sum(mine) / len(mine))
    pooled = [c["kidney_dice"] for c in ev["cases"]]
    assert ev["mean"]["kidney_dice"] == pytest.approx(sum(pooled) / len(pooled))
    md = out.with_suffix(".md").read_text()
    assert "## Cross-validation: per fold and pooled" in md and "| **pooled** | **6** |" in md


def test_ensemble_of_the_folds_and_a_missing_fold(cv):
    run, pred = cv["run"], cv["root"] / "ensemble"
    res = launch(hpc_dfs_cmd("predict", "--checkpoint", run, "--input", cv["data"], "--out", pred, "--set",
                             "overlays=false"), launcher="none", timeout=240)
    assert res.returncode == 0, res.output[-3000:]
    assert f"cross-validation run {run}: the ensemble of its {FOLDS} folds" in res.output
    summary = json.loads((pred / "summary.json").read_text())
    assert [c["path"] for c in summary["checkpoints"]] == [str(_best(run, k, "locate")) for k in range(FOLDS)]
    assert [c["path"] for c in summary["refine_checkpoints"]] == [str(_best(run, k, "refine")) for k in range(FOLDS)]
    assert all(c["weight"] == pytest.approx(1 / FOLDS) for c in summary["checkpoints"])
    assert summary["n_ok"] == len(cv["fold_of"]) and "oof" not in summary

    partial = cv["root"] / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(run_contract.fold_dir(partial, 2))
    res = launch(hpc_dfs_cmd("predict", "--checkpoint", partial, "--input", cv["data"], "--out",
                             cv["root"] / "never"), launcher="none", timeout=120)
    assert res.returncode == 2, res.output[-2000:]
    errors = [line for line in res.output.splitlines() if "error" in line]
    assert errors == [f"hpc-dfs predict: error: cross-validation run {partial}: fold(s) 2 missing (train them: "
                      "`hpc-dfs train --folds 2`)"], res.output[-2000:]
