"""Validation metrics of 4-class and region-trained runs: the labels a region model predicts, and the masses
region (tumour or cyst, KiTS23's second region) beside kidney and tumour."""
from __future__ import annotations

import math

import pytest
import torch

from hpc_dfs.data.regions import resolve_regions
from hpc_dfs.training.metrics import CaseAccumulator, predicted_labels, score, summarise

CLASSES = ["background", "kidney", "tumor", "cyst"]


def _logits_for(label: torch.Tensor, regions: dict | None) -> torch.Tensor:
    """Logits whose prediction is exactly ``label`` [B, H, W]: one-hot softmax logits, or region logits +-5."""
    if regions is None:
        return torch.nn.functional.one_hot(label.long(), 4).permute(0, 3, 1, 2).float() * 10
    return torch.stack([torch.isin(label, torch.tensor(r)) for r in regions["classes"]], 1).float() * 10 - 5


@pytest.mark.parametrize("regions", [None, resolve_regions("kits23", CLASSES)])
def test_perfect_prediction_scores_one_on_every_region(regions):
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[0, 2:6, 2:6] = 1
    label[0, 3:5, 3:4] = 2
    label[0, 3:5, 4:5] = 3
    label[1, 1:4, 1:4] = 1          # the second case: kidney only
    logits = _logits_for(label, regions)
    assert torch.equal(predicted_labels(logits, regions), label)
    acc = CaseAccumulator(CLASSES, regions)
    acc.update(logits, label, None, torch.tensor([1.0, -1.0]), ["case_00000", "case_00001"])
    m = summarise(acc.records())
    assert m["kidney_dice"] == 1.0 and m["tumor_dice"] == 1.0 and m["masses_dice"] == 1.0
    assert math.isnan(m["per_case"]["case_00001"]["masses_dice"])   # no mass in truth or prediction: left out
    assert score(m) == 1.0


def test_cyst_predicted_as_tumour_is_a_masses_hit_and_a_tumour_miss():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, 2:6, 2:6] = 1
    label[0, 3:5, 3:5] = 3                      # a cyst
    pred = label.clone()
    pred[pred == 3] = 2                         # predicted as tumour
    acc = CaseAccumulator(CLASSES)
    acc.update(_logits_for(pred, None), label, None, torch.tensor([-1.0]), ["case_00000"])
    m = summarise(acc.records())
    assert m["kidney_dice"] == 1.0 and m["masses_dice"] == 1.0 and m["tumor_dice"] == 0.0
    assert score(m) == pytest.approx(2 / 3)


def test_three_classes_have_no_masses_region():
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, 1:3, 1:3] = 2
    acc = CaseAccumulator(CLASSES[:3])
    acc.update(_logits_for(label, None)[:, :3], label, None, torch.tensor([-1.0]), ["case_00000"])
    assert "masses_dice" not in summarise(acc.records())
