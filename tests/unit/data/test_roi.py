"""Kidney ROI boxes for the cascade: components, margin/min size/clipping, crop-paste, training jitter, 2.5D context."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpc_dfs.data.roi import (Box, RoiError, context_indices, crop, jitter_box, kidney_boxes, kidney_mask, paste,
                              refine_patch_size, refine_spacing, sample_training_box, slice_context)

SPACING = (3.0, 1.5, 1.5)  # z, y, x mm


def _two_kidneys(n=20, h=80, w=100):
    """Right kidney (low columns) larger than the left, a tumour on the left one, and a 2-voxel speck."""
    lab = np.zeros((n, h, w), np.uint8)
    lab[4:14, 30:50, 10:30] = 1          # 10 x 20 x 20 voxels
    lab[6:12, 32:48, 65:80] = 1          # 6 x 16 x 15
    lab[7:10, 35:40, 70:74] = 2          # tumour inside the left kidney
    lab[0, 0, 0:2] = 1                   # a speck: far below 10 % of the largest component
    return lab


def test_boxes_of_a_two_kidney_label_without_margin():
    boxes = kidney_boxes(_two_kidneys(), SPACING, margin_mm=0, min_size_mm=0)
    assert [b.start for b in boxes] == [(4, 30, 10), (6, 32, 65)]      # ordered by column; speck dropped
    assert [b.stop for b in boxes] == [(14, 50, 30), (12, 48, 80)]
    assert boxes[0].voxels == 10 * 20 * 20 and boxes[1].voxels == 6 * 16 * 15


def test_margin_min_size_and_clipping():
    lab = _two_kidneys()
    (right, left) = kidney_boxes(lab, SPACING, margin_mm=(6.0, 4.5, 4.5), min_size_mm=0)
    assert right.start == (2, 27, 7) and right.stop == (16, 53, 33)    # 6 mm = 2 slices, 4.5 mm = 3 px
    (right, left) = kidney_boxes(lab, SPACING, margin_mm=0, min_size_mm=(0, 45.0, 45.0))
    assert right.shape[1:] == (30, 30) and left.shape[1:] == (30, 30)  # grown about the centre to 30 px
    assert right.centre[1:] == (40.0, 20.0)
    # a margin reaching past the volume: moved inside, not shrunk, as long as the volume is large enough
    (right, left) = kidney_boxes(lab, SPACING, margin_mm=(30.0, 0, 30.0), min_size_mm=0)
    assert right.start[2] == 0 and right.shape[2] == 20 + 2 * 20 and right.inside(lab.shape)
    assert right.start[0] == 0 and right.stop[0] == 20                 # z: 10 + 2 * 10 slices > 20: the whole volume
    assert all(b.inside(lab.shape) for b in (right, left))


def test_single_merged_component_and_no_kidney():
    lab = np.zeros((10, 40, 60), np.uint8)
    lab[3:7, 15:25, 10:50] = 1                                         # horseshoe: one component across the midline
    (box,) = kidney_boxes(lab, SPACING, margin_mm=0, min_size_mm=0)
    assert box.start == (3, 15, 10) and box.stop == (7, 25, 50)
    assert kidney_boxes(np.zeros((10, 40, 60), np.uint8), SPACING) == []
    assert kidney_boxes(np.full((10, 40, 60), 0.2, np.float32), SPACING) == []   # probabilities under threshold


def test_probability_inputs_give_the_label_boxes():
    lab = _two_kidneys()
    onehot = np.stack([(lab == c).astype(np.float32) for c in range(3)])
    fg = (lab > 0).astype(np.float32) * 0.9
    expect = kidney_boxes(lab, SPACING)
    assert kidney_boxes(onehot, SPACING) == expect and kidney_boxes(fg, SPACING) == expect
    assert np.array_equal(kidney_mask(onehot), lab > 0)


def test_box_json_round_trip_and_bad_json():
    box = kidney_boxes(_two_kidneys(), SPACING)[1]
    assert Box.from_json(json.loads(json.dumps(box.to_json()))) == box
    with pytest.raises(RoiError, match="not a kidney box"):
        Box.from_json({"start": [0, 0, 0], "stop": [0, 5, 5]})
    with pytest.raises(RoiError, match="not a kidney box"):
        Box.from_json({"stop": [1, 5, 5]})


def test_box_in_mm_maps_between_grids():
    box = Box((2, 10, 20), (6, 30, 40))
    start, stop = box.to_mm((3.0, 1.5, 1.5))
    assert start == (6.0, 15.0, 30.0) and stop == (18.0, 45.0, 60.0)
    fine = Box.from_mm(start, stop, (3.0, 0.75, 0.75), (20, 200, 200))
    assert fine.start == (2, 20, 40) and fine.stop == (6, 60, 80)      # the same region, twice the pixels
    assert Box.from_mm((-5.0, 0, 0), (1e4, 10, 10), (1.0, 1.0, 1.0), (8, 8, 8)) == Box((0, 0, 0), (8, 8, 8))


def test_crop_paste_round_trip_is_exact():
    rng = np.random.default_rng(0)
    lab = _two_kidneys()
    probs = rng.dirichlet(np.ones(3), size=lab.shape).astype(np.float32).transpose(3, 0, 1, 2)
    boxes = kidney_boxes(lab, SPACING)
    assert len(boxes) == 2 and not _overlap(*boxes)
    full = paste([crop(probs, b) for b in boxes], boxes, lab.shape, n_classes=3)
    for b in boxes:
        assert np.array_equal(crop(full, b), crop(probs, b))                # bit for bit
    outside = np.ones(lab.shape, bool)
    for b in boxes:
        outside[b.slices] = False
    assert (full[0][outside] == 1).all() and (full[1:][:, outside] == 0).all()
    # overlapping boxes: the average of the crops where they overlap
    a, b = Box((0, 0, 0), (4, 10, 10)), Box((2, 5, 5), (6, 15, 15))
    ones, threes = np.ones((3, 4, 10, 10), np.float32), np.full((3, 4, 10, 10), 3, np.float32)
    full = paste([ones, threes], [a, b], (8, 20, 20), 3)
    assert full[1, 3, 7, 7] == 2 and full[1, 1, 1, 1] == 1 and full[1, 5, 12, 12] == 3
    with pytest.raises(ValueError, match="does not fit"):
        paste([ones], [b], (5, 20, 20), 3)


def _overlap(a: Box, b: Box) -> bool:
    return all(max(x0, y0) < min(x1, y1) for x0, x1, y0, y1 in zip(a.start, a.stop, b.start, b.stop))


def test_jitter_is_deterministic_per_seed_and_within_bounds():
    lab = _two_kidneys()
    box = kidney_boxes(lab, SPACING, margin_mm=0, min_size_mm=0)[0]
    shift, scale = (6.0, 9.0, 9.0), (0.8, 1.25)
    a = [jitter_box(box, lab.shape, SPACING, np.random.default_rng([3, i]), shift, scale) for i in range(200)]
    b = [jitter_box(box, lab.shape, SPACING, np.random.default_rng([3, i]), shift, scale) for i in range(200)]
    assert a == b
    assert len(set(a)) > 100                                            # it does move
    for j in a:
        assert j.inside(lab.shape)
        for ax in range(3):
            size, move = j.shape[ax], abs(j.centre[ax] - box.centre[ax]) * SPACING[ax]
            assert int(box.shape[ax] * scale[0]) - 1 <= size <= int(np.ceil(box.shape[ax] * scale[1])) + 1
            if box.start[ax] - 10 > 0 and box.stop[ax] + 10 < lab.shape[ax]:   # not moved by the volume's edge
                assert move <= shift[ax] + SPACING[ax]
    assert jitter_box(box, lab.shape, SPACING, np.random.default_rng(0), 0.0, (1.0, 1.0)) == box


def test_sample_training_box_draws_both_kidneys():
    lab = _two_kidneys()
    picks = {sample_training_box(lab, SPACING, np.random.default_rng(i), shift_mm=0.0, scale=(1.0, 1.0))
             for i in range(30)}
    assert picks == set(kidney_boxes(lab, SPACING))
    assert sample_training_box(np.zeros_like(lab), SPACING, np.random.default_rng(0)) is None


def test_refine_spacing_and_patch_size():
    fp = {"spacing": {"median": [3.0, 0.78, 0.8], "min": [1.0, 0.5, 0.5], "max": [5.0, 1.0, 1.0]}}
    assert refine_spacing(fp) == 0.78
    assert refine_spacing(fp, "finest") == 0.5
    assert refine_spacing(fp, "1.2") == 1.2 and refine_spacing(fp, 1.5) == 1.5
    assert refine_spacing(fp, finest_mm=1.0) == 1.0                     # a CPU budget: no finer than 1 mm
    with pytest.raises(ValueError, match="auto"):
        refine_spacing(fp, "fine")
    assert refine_patch_size([(80.0, 70.0), (100.0, 90.0)], 1.0, percentile=100) == [112, 96]


def test_slice_context_clamps_at_the_ends():
    vol = np.arange(5)[:, None, None] * np.ones((5, 2, 3))
    ctx = slice_context(vol, 3)
    assert ctx.shape == (5, 3, 2, 3)
    assert ctx[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert context_indices(3, 5).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]
    assert slice_context(vol, 1).shape == (5, 1, 2, 3)
    t = slice_context(torch.from_numpy(vol), 3)
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), ctx)
    with pytest.raises(ValueError, match="odd"):
        slice_context(vol, 2)
