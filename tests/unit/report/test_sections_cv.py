"""``hpc-dfs report`` of a cross-validation run: every fold's best validation metrics with their mean and SD, a warning
for a missing fold, and the pooled out-of-fold evaluation per fold (the run of ``tests/unit/training/test_folds.py``:
folds 0 and 2 of 3, then fold 1 added)."""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from hpc_dfs.cli import main as cli
from hpc_dfs.contracts import run as run_contract
from hpc_dfs.report import build_report

from tests.unit.training.test_folds import TRAIN, run, shards  # noqa: F401  (the module's fixtures)


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_partial_cv_run_shows_its_folds_and_warns_of_the_missing_one(run):  # noqa: F811
    text = _text(build_report(run))
    assert "3-fold cross-validation" in text and "configuration, data and curves of fold_0" in text
    summary = run_contract.cv_summary(run)
    for f in summary["folds"]:
        best = f["stages"]["locate"]["best"]
        assert f"fold {f['fold']} {f['n_val_cases']} 1 1 {best['kidney_dice']:.3f} {best['tumor_dice']:.3f}" in text
    mean = summary["mean"]["locate"]["kidney_dice"]
    assert f"mean ± SD (2 folds) {mean:.3f} ± " in text
    assert "cross-validation: fold(s) 1 of 3 missing or unfinished (`hpc-dfs train --folds 1 --auto-resume`)" in text
    assert "no out-of-fold evaluation" in text


@pytest.fixture(scope="module")
def complete(run, shards, tmp_path_factory) -> Path:  # noqa: F811
    """The run with fold 1 trained too, its out-of-fold predictions in RUN/oof and their evaluation."""
    out = tmp_path_factory.mktemp("cv_report") / "run"
    shutil.copytree(run, out)
    assert cli(["train", "--shards", str(shards), "--out", str(out), "--folds", "1", *TRAIN]) == 0
    data = shards.parent / "data"
    assert cli(["predict", "--oof", str(out), "--input", str(data), "--out", str(out / "oof"), "--no-overlays"]) == 0
    oof = out / "oof"
    assert cli(["evaluate", "--pred", str(oof), "--gt", str(data), "--out", str(oof / "eval.json")]) == 0
    return out


def test_complete_cv_run_shows_the_pooled_out_of_fold_evaluation(complete):
    ev = json.loads((complete / "oof" / "eval.json").read_text())
    text = _text(build_report(complete))
    assert "fold(s)" not in text.split("Cross-validation")[0]          # no missing-fold warning
    assert "Pooled out-of-fold evaluation" in text and "mean ± SD (3 folds)" in text
    for k, m in ev["oof"]["per_fold"].items():
        assert f"fold {k} {m['n_cases']} {m['kidney_dice']:.3f} {m['tumor_dice']:.3f} {m['kits_score']:.3f}" in text
    m = ev["mean"]
    assert f"pooled {m['n_cases']} {m['kidney_dice']:.3f} {m['tumor_dice']:.3f} {m['kits_score']:.3f}" in text
