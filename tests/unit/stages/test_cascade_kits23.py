"""KiTS23 through the cascade: 4 classes (softmax) and KiTS23 regions (``loss.regions=kits23``), each trained with
``train --stage both`` and predicted with ``--refine-checkpoint``; predict writes KiTS labels 0-3 (argmax, or the
regions in nnU-Net's order [1, 3, 2]) and ``evaluate --regions kits23`` scores them.

Data: CT rendered around 2 real KiTS23 label maps with cysts, cut small, with their kits23.json records
(``tests/unit/stages/test_export_nnunet.py``); 32x32 slices, windows of 32x32 at 3 mm, base width 4, 2 steps per
stage: the plumbing, not a result. What 2 ranks add is in tests/distributed/test_train_kits23_distributed.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hpc_dfs import parallel
from hpc_dfs.cli import main as cli
from hpc_dfs.data.regions import region_labels
from tests.conftest import missing_shared
from tests.unit.stages.test_export_nnunet import KITS23_LABELS, kits23_like

pytestmark = pytest.mark.slow

TRAIN = ["--num-workers", "0", "--set", "model.base_channels=4", "--global-batch-size", "4", "--batch-size", "4",
         "--deterministic", "--seed", "3", "--val-batch-size", "8", "--epochs", "1", "--steps-per-epoch", "2",
         "--lr", "0.01"]
MODES = {"classes": [], "regions": ["--set", "loss.regions=kits23"]}


@pytest.fixture(scope="module")
def data_and_shards(tmp_path_factory) -> tuple[Path, Path]:
    kits23_json = KITS23_LABELS.parent / "kits23.json"
    if not kits23_json.is_file():
        missing_shared(f"{kits23_json} is absent (see ../shared/data/kits23/SOURCE.md)")
    root = tmp_path_factory.mktemp("kits23_cascade")
    data = kits23_like(root / "data", kits_json=kits23_json)
    parallel.init()
    assert cli(["preprocess", "--data", str(data), "--out", str(root / "shards"), "--slice-size", "32,32",
                "--n-folds", "2", "--set", "refine.slice_size=32,32", "--set", "refine.spacing=3.0"]) == 0
    return data, root / "shards"


@pytest.mark.parametrize("mode", list(MODES))
def test_cascade_predicts_kits_labels_and_evaluates_as_kits23(data_and_shards, tmp_path, mode):
    data, shards = data_and_shards
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert cli(["train", "--shards", str(shards), "--out", str(run), "--stage", "both", *TRAIN, *MODES[mode]]) == 0
    assert cli(["predict", "--input", str(data), "--out", str(pred), "--checkpoint",
                str(run / "locate" / "checkpoints" / "last.pt"), "--refine-checkpoint",
                str(run / "refine" / "checkpoints" / "last.pt"), "--save-raw", "--save-probabilities",
                "--no-overlays", "--threads", "1"]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["classes"] == ["background", "kidney", "tumor", "cyst"] and summary["n_ok"] == 2
    state = torch.load(run / "refine" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for case in summary["cases"]:
        assert set(case["volumes_ml"]) == {"kidney", "tumor", "cyst"} and "cascade" in case
        raw = np.asarray(nib.load(str(pred / case["files"]["raw"])).dataobj)
        probs = np.moveaxis(np.asarray(nib.load(str(pred / case["files"]["probabilities"])).dataobj), -1, 0)
        assert set(np.unique(raw).tolist()) <= {0, 1, 2, 3}
        if mode == "regions":   # three sigmoid channels, turned into labels in the regions' order
            assert probs.shape[0] == 3 and state["regions"]["labels"] == [1, 3, 2]
            assert np.array_equal(raw, region_labels(probs, [1, 3, 2]))
        else:                   # four softmax channels, their argmax
            assert probs.shape[0] == 4 and state["regions"] is None
            assert np.allclose(probs.sum(0), 1.0, atol=1e-4) and np.array_equal(raw, probs.argmax(0))
    out = tmp_path / "eval23.json"
    assert cli(["evaluate", "--pred", str(pred), "--gt", str(data), "--regions", "kits23", "--out", str(out)]) == 0
    rows = (tmp_path / "eval23.csv").read_text().splitlines()
    assert rows[0] == "caseID,Dice_kidney,Dice_masses,Dice_tumor,SD_kidney,SD_masses,SD_tumor" and len(rows) == 4
    html_path = tmp_path / "report.html"
    assert cli(["report", str(run), "--pred", str(pred), "--eval", str(out), "--shards", str(shards), "--out",
                str(html_path)]) == 0
    html = html_path.read_text()
    assert "0 background, 1 kidney, 2 tumor, 3 cyst" in html and "Test: KiTS23 mean Dice" in html
    assert "val masses Dice" in html and "masses Dice (tumour or cyst; 2D slices)" in html
    if mode == "regions":
        assert ("kits23 regions, one sigmoid each: kidney_and_masses = {kidney, tumor, cyst}; masses = {tumor, cyst}; "
                "tumor = {tumor} (BCE + soft Dice); labels written in the order kidney, cyst, tumor") in html
    else:
        assert "softmax over the 4 classes (CE + soft Dice)" in html
