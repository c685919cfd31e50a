"""``hpc_dfs.data.refine``: stage-2 windows round-trip, in any file orientation, for training and predict."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from hpc_dfs.data import refine
from hpc_dfs.data.kits_io import kits_affine

PLAN = dict(spacing=1.0, slice_size=(48, 48), margin_mm=6.0, min_box_mm=(10.0, 10.0, 10.0))
SPATIAL = {"spacing": {"median": [3.0, 2.0, 2.0], "min": [3.0, 2.0, 2.0]}}


def _case(orient: bool):
    n, h, w = 20, 96, 96
    zz, yy, xx = np.mgrid[:n, :h, :w]
    lab = np.zeros((n, h, w), np.uint8)
    for cx in (25, 70):
        lab[((zz - 10) / 6) ** 2 + ((yy - 50) / 12) ** 2 + ((xx - cx) / 9) ** 2 < 1] = 1
    lab[((zz - 10) / 3) ** 2 + ((yy - 50) / 5) ** 2 + ((xx - 76) / 5) ** 2 < 1] = 2
    img = lab.astype(np.float32) * 100 - 50
    aff = kits_affine((3.0, 2.0, 2.0))
    if not orient:
        return img, lab, aff
    t = np.array([[0, 1], [2, 1], [1, -1]])  # another file orientation: (z, x, y) with y flipped
    t = nib.orientations.ornt_transform(nib.orientations.io_orientation(aff), t)
    return (nib.orientations.apply_orientation(img, t), nib.orientations.apply_orientation(lab, t),
            aff @ nib.orientations.inv_ornt_aff(t, img.shape))


def _pp():
    return {"orientation": ["I", "P", "L"], "intensity": {"clip": [-100, 200], "mean": 0.0, "std": 100.0},
            "refine": refine.refine_plan(SPATIAL, **PLAN)}


def _threshold_model(sl: np.ndarray) -> np.ndarray:
    c = np.clip(np.round(sl + 0.5), 0, 2).astype(int)  # the image encodes the class (normalised label - 0.5)
    return np.stack([c == k for k in range(3)]).astype(np.float32)


@pytest.mark.parametrize("orient", [False, True])
def test_training_windows_hold_both_kidneys_and_the_tumour(orient):
    img, lab, aff = _case(orient)
    out = refine.refine_case(img, lab, aff, _pp())
    assert out["image"].shape[1:] == (48, 48) and out["image"].dtype == np.float32
    assert out["label"].shape == out["image"].shape and len(out["stack"]) == len(out["image"])
    assert len(out["boxes"]) == 2 and sorted(set(out["stack"].tolist())) == [0, 1]
    classes = [set(np.unique(out["label"][out["stack"] == i]).tolist()) for i in (0, 1)]
    assert classes == [{0, 1}, {0, 1, 2}]  # boxes ordered by column: the tumour kidney is the second


@pytest.mark.parametrize("orient", [False, True])
def test_predict_windows_paste_back_exactly_in_the_native_frame(orient):
    img, lab, aff = _case(orient)
    stage1 = np.stack([lab == c for c in range(3)]).astype(np.float32)
    stage1[2] = 0.0  # stage 1 saw no tumour: kidney only, as a coarse model would
    stage1[1] = (lab > 0)
    probs, boxes = refine.refine_in_boxes(img, aff, stage1, _pp(), _threshold_model)
    assert probs.shape == stage1.shape and len(boxes) == 2
    pred = probs.argmax(0)
    for c in (1, 2):
        inter = np.count_nonzero((pred == c) & (lab == c))
        assert 2 * inter / (np.count_nonzero(pred == c) + np.count_nonzero(lab == c)) > 0.97
    assert all(b["slice_size"][0] % 16 == 0 and b["slice_size"][1] % 16 == 0 for b in boxes)


@pytest.mark.parametrize("orient", [False, True])
def test_blend_mixes_stage_one_into_the_windows_only(orient):
    img, lab, aff = _case(orient)
    stage1 = np.stack([lab == c for c in range(3)]).astype(np.float32)
    stage1[2] = 0.0
    stage1[1] = (lab > 0)
    alone, boxes = refine.refine_in_boxes(img, aff, stage1, _pp(), _threshold_model)
    mixed, boxes_mixed = refine.refine_in_boxes(img, aff, stage1, _pp(), _threshold_model, blend=0.25)
    assert boxes_mixed == boxes
    inside = np.any(alone != stage1, axis=0)       # where stage 2 changed something, the window is there
    np.testing.assert_allclose(mixed, 0.75 * alone + 0.25 * stage1, atol=1e-6)
    assert inside.any() and np.allclose(mixed.sum(0), 1.0, atol=1e-5)   # still a distribution
    same, _ = refine.refine_in_boxes(img, aff, stage1, _pp(), _threshold_model, blend=1.0)
    np.testing.assert_allclose(same, stage1, atol=1e-6)   # all stage 1


def test_no_kidney_keeps_stage_one_and_says_so():
    img, lab, aff = _case(False)
    empty = np.zeros((3, *lab.shape), np.float32)
    empty[0] = 1.0
    probs, boxes = refine.refine_in_boxes(img, aff, empty, _pp(), _threshold_model)
    assert boxes == [] and probs is empty
    out = refine.refine_case(img, np.zeros_like(lab), aff, _pp())
    assert out["image"].shape == (0, 48, 48) and out["boxes"] == []


def test_plan_checks_its_settings():
    assert refine.refine_plan(SPATIAL)["target_spacing"] == [None, 2.0, 2.0]  # auto: the median in-plane spacing
    with pytest.raises(ValueError, match="multiples of 16"):
        refine.refine_plan(SPATIAL, slice_size=(50, 48))
    with pytest.raises(ValueError):
        refine.refine_plan(SPATIAL, margin_mm=-1)


def test_canonical_affine_has_the_asked_orientation():
    aff = refine.canonical_affine((3.0, 0.8, 0.7), ("I", "P", "L"))
    assert nib.aff2axcodes(aff) == ("I", "P", "L")
    assert np.allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), [3.0, 0.8, 0.7])


def _region_model(sl: np.ndarray) -> np.ndarray:
    c = np.clip(np.round(sl + 0.5), 0, 2).astype(int)   # as _threshold_model; regions kidney+masses, masses, tumour
    return np.stack([c >= 1, c >= 2, c == 2]).astype(np.float32)


@pytest.mark.parametrize("orient", [False, True])
def test_region_probabilities_give_the_boxes_and_paste_back(orient):
    """KiTS23 regions (sigmoid, no background channel): the boxes come from the first region (kidney and masses)
    and stage 2's regions come back in the native frame, so their labels (order kidney, cyst, tumour) match."""
    from hpc_dfs.data.regions import region_labels
    img, lab, aff = _case(orient)
    stage1 = np.stack([lab > 0, np.zeros_like(lab), np.zeros_like(lab)]).astype(np.float32)   # kidney only
    probs, boxes = refine.refine_in_boxes(img, aff, stage1, _pp(), _region_model, regions=True)
    assert probs.shape == stage1.shape and len(boxes) == 2
    pred = region_labels(probs, [1, 3, 2])
    for c in (1, 2):
        inter = np.count_nonzero((pred == c) & (lab == c))
        assert 2 * inter / (np.count_nonzero(pred == c) + np.count_nonzero(lab == c)) > 0.97


def test_outside_the_slices_field_of_view_is_background_for_classes_and_nothing_for_regions():
    """A case wider than the slices: restored probabilities outside the window are the replica's fill, which
    for a region model is 0 in every region (a background one-hot there would read as kidney everywhere)."""
    from hpc_dfs.data.geometry import prepare_image, restore_volume
    from hpc_dfs.data.regions import region_labels
    from hpc_dfs.inference.replicas import Replica
    img = np.zeros((4, 120, 120), np.float32)
    params = {"slice_size": [32, 32], "target_spacing": [None, 1.0, 1.0], "orientation": ["I", "P", "L"],
              "intensity": {"scheme": "ct", "clip": [-100.0, 100.0], "mean": 0.0, "std": 100.0}}
    slices, geom = prepare_image(img, kits_affine((3.0, 1.0, 1.0)), params)
    assert slices.shape == (4, 32, 32)   # 120 mm at 1 mm cut to 32 pixels: most of the case lies outside
    classes = ["background", "kidney", "tumor", "cyst"]
    softmax = Replica("a.pt", 1.0, None, params, classes, False, False)
    sigmoid = Replica("b.pt", 1.0, None, params, classes, False, False,
                      regions={"classes": [[1, 2, 3], [2, 3], [2]], "labels": [1, 3, 2]})
    assert softmax.fill == [1.0, 0.0, 0.0, 0.0] and sigmoid.fill == [0.0, 0.0, 0.0]
    inside = np.full((3, 4, 32, 32), 0.9, np.float32)   # every region inside the window
    native = restore_volume(inside, geom, fill=sigmoid.fill)
    labels = region_labels(native, sigmoid.regions["labels"])
    assert native.shape == (3, 4, 120, 120) and 0 < np.count_nonzero(labels) < labels.size // 4
    assert set(np.unique(labels).tolist()) == {0, 2}
