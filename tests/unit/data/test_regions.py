"""KiTS23 regions: resolved against the shards' classes, the label order of nnU-Net's regions_class_order, and the
same regions as the official evaluation (hpc_dfs.metrics.kits23)."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_dfs.config import ConfigError
from hpc_dfs.data.regions import region_labels, region_mask, resolve_regions

CLASSES = ["background", "kidney", "tumor", "cyst"]


def test_kits23_regions_in_class_indices():
    spec = resolve_regions("kits23", CLASSES)
    assert spec == {"name": "kits23", "names": ["kidney_and_masses", "masses", "tumor"],
                    "classes": [[1, 2, 3], [2, 3], [2]], "labels": [1, 3, 2]}
    assert resolve_regions("none", CLASSES) is None


def test_regions_are_the_official_evaluation_regions():
    """Each region's classes are the label values the KiTS23 evaluation scores as that region."""
    from hpc_dfs.metrics import kits23
    spec = resolve_regions("kits23", CLASSES)
    assert spec["classes"] == [sorted(r.labels) for r in kits23.REGIONS]


def test_labels_follow_the_regions_class_order():
    """A voxel in all three regions is tumour, in the first two cyst, in the first only kidney, in none
    background; the round trip from a label map through its region masks gives the map back."""
    truth = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    spec = resolve_regions("kits23", CLASSES)
    probs = np.stack([region_mask(truth, r).astype(np.float32) for r in spec["classes"]])
    assert np.array_equal(region_labels(probs, spec["labels"]), truth)
    probs = np.array([[0.9, 0.9, 0.9, 0.4], [0.2, 0.6, 0.6, 0.9], [0.1, 0.3, 0.7, 0.9]])
    # nnU-Net writes each region's label over the earlier ones whatever they hold: the last voxel is tumour
    # although its outer region is below 0.5
    assert region_labels(probs, spec["labels"]).tolist() == [1, 3, 2, 2]


def test_missing_class_or_unknown_set_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"loss.regions=kits23 needs the classes cyst, kidney, tumor.*no cyst"):
        resolve_regions("kits23", ["background", "kidney", "tumor"])
    with pytest.raises(ConfigError, match=r"loss.regions must be one of none, kits23, got 'brats'"):
        resolve_regions("brats", CLASSES)
    with pytest.raises(ValueError, match="2 region channels for 3 region labels"):
        region_labels(np.zeros((2, 4)), [1, 3, 2])
