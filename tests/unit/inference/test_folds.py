"""The folds of a cross-validation run at inference: ``predict --checkpoint RUN`` (their ensemble) and ``predict --oof
RUN`` (each fold's validation cases by its own model), then ``evaluate`` of the pooled set per fold.

The run is laid out as ``train --folds`` writes it (``RUN/fold_K/checkpoints/best.pt`` and ``fold.json`` through the
run contract), with real, untrained checkpoints of the shards (as in ``tests/unit/stages/test_predict.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_dfs.cli import main as cli
from hpc_dfs.contracts import checkpoint as ckpt, run as run_contract, shards as shards_contract
from hpc_dfs.fsutil import sha256_file

from tests.unit.stages.test_predict import make_checkpoint, make_setup


@pytest.fixture(scope="module")
def cv(tmp_path_factory) -> dict:
    """The predict tests' data (2 folds, plus case_00007 that no fold holds) and a 2-fold cross-validation run."""
    s = make_setup(tmp_path_factory.mktemp("cv_predict"))
    manifest = shards_contract.read_manifest(s["shards"])
    run = s["root"] / "run"
    for k in (0, 1):
        fold_run = run_contract.fold_dir(run, k)
        ckpt.checkpoint_dir(fold_run).mkdir(parents=True)
        make_checkpoint(s["shards"], ckpt.best_path(fold_run), seed=10 + k)
        val = sorted(c["case_id"] for c in manifest["cases"] if c["fold"] == k)
        run_contract.write_fold_info(fold_run, {"fold": k, "n_folds": 2, "stage": "locate", "val_cases": val,
                                                "n_train_cases": len(manifest["cases"]) - len(val),
                                                "manifest_sha256": "", "shards": str(s["shards"]), "epochs": 1,
                                                "finished": True})
    return {**s, "run": run, "fold_of": {c["case_id"]: c["fold"] for c in manifest["cases"]}}


def _summary(pred: Path) -> dict:
    return json.loads((pred / "summary.json").read_text())


def test_checkpoint_run_is_the_ensemble_of_its_folds(cv, tmp_path, caplog):
    pred = tmp_path / "pred"
    assert cli(["predict", "--checkpoint", str(cv["run"]), "--input", str(cv["data"]), "--out", str(pred),
                "--no-overlays"]) == 0
    bests = [str(ckpt.best_path(run_contract.fold_dir(cv["run"], k))) for k in (0, 1)]
    assert [c["path"] for c in _summary(pred)["checkpoints"]] == bests
    assert f"cross-validation run {cv['run']}: the ensemble of its 2 folds, fold 0: {bests[0]}; fold 1: " \
           f"{bests[1]}" in caplog.text


def test_oof_predicts_each_case_with_its_own_fold(cv, tmp_path, caplog):
    pred = tmp_path / "oof"
    assert cli(["predict", "--oof", str(cv["run"]), "--input", str(cv["data"]), "--out", str(pred),
                "--no-overlays"]) == 0
    rows = _summary(pred)["cases"]
    assert sorted(r["case_id"] for r in rows) == sorted(cv["fold_of"])          # case_00007 is in no fold
    assert "1 input case(s) are in no fold of" in caplog.text and "case_00007" in caplog.text
    for r in rows:
        k = cv["fold_of"][r["case_id"]]
        assert r["fold"] == k
        assert r["provenance"]["checkpoints_sha256"] == sha256_file(ckpt.best_path(run_contract.fold_dir(cv["run"], k)))
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--pred", str(pred), "--gt", str(cv["data"]), "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert {c["case_id"]: c["fold"] for c in ev["cases"]} == cv["fold_of"]
    for k, m in ev["oof"]["per_fold"].items():
        mine = [c["tumor_dice"] for c in ev["cases"] if c["fold"] == int(k)]
        assert m["n_cases"] == len(mine) and m["tumor_dice"] == pytest.approx(sum(mine) / len(mine))
    folds = [m["kidney_dice"] for m in ev["oof"]["per_fold"].values()]
    assert ev["oof"]["fold_mean"]["kidney_dice"] == pytest.approx(sum(folds) / len(folds))
    assert ev["missing_predictions"] == ["case_00007"]                       # its truth is there, no fold has it
    md = out.with_suffix(".md").read_text()
    assert "## Cross-validation: per fold and pooled" in md
    assert f"| **pooled** | **{len(cv['fold_of'])}** |" in md and md.count("\n| 0 | ") == 1


def test_usage_errors(cv, tmp_path, capsys):
    run, data = str(cv["run"]), str(cv["data"])
    cases = [(["--oof", run, "--checkpoint", str(cv["ckpts"][0])], "--oof takes every fold's model from its run"),
             (["--checkpoint", run, "--weights", "1"], "got 1 weights for 2 --checkpoint (cross-validation runs count "
                                                       "one per fold)"),
             (["--checkpoint", str(tmp_path)], "--checkpoint"),
             (["--oof", str(tmp_path)], f"{tmp_path} holds no fold_K/ folders: not a cross-validation run")]
    for args, msg in cases:
        assert cli(["predict", *args, "--input", data, "--out", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
