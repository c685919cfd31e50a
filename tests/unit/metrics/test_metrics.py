"""``hpc_dfs.metrics``: KiTS metrics against MONAI, an independent surface-distance computation, and by hand."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from hpc_dfs import metrics as ev
from hpc_dfs.config.predict import KITS21_NSD_TOLERANCES_MM, EvaluateConfig


def _blob_masks(seed: int, shape=(12, 24, 20)):
    """Two overlapping random blobs (smoothed noise thresholded): realistic, irregular masks."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05
    b = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05
    b |= a & (rng.random(shape) < 0.7)
    return a, b


def _onehot(mask):
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.cat([1 - m, m], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_and_iou_match_monai(seed):
    from monai.metrics import DiceMetric, MeanIoU
    a, b = _blob_masks(seed)
    assert a.any() and b.any()
    dm = DiceMetric(include_background=False)
    dm(_onehot(a), _onehot(b))
    im = MeanIoU(include_background=False)
    im(_onehot(a), _onehot(b))
    assert ev.dice(a, b) == pytest.approx(float(dm.aggregate()), abs=1e-6)
    assert ev.iou(a, b) == pytest.approx(float(im.aggregate()), abs=1e-6)


def _surface(mask):
    return np.argwhere(mask & ~ndimage.binary_erosion(mask))


@pytest.mark.parametrize("seed", [0, 3])
def test_hd95_matches_independent_kdtree(seed):
    """MONAI's definition: max of the two directed 95th percentiles of surface-voxel distances (mm)."""
    a, b = _blob_masks(seed)
    spacing = (2.5, 0.8, 0.7)
    pa, pb = _surface(a) * spacing, _surface(b) * spacing
    d_ab, _ = cKDTree(pb).query(pa)
    d_ba, _ = cKDTree(pa).query(pb)
    expected = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert ev.hausdorff(a, b, spacing) == pytest.approx(expected, rel=1e-5)


def test_hd95_by_hand_single_voxels():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2, 3, 3] = b[5, 3, 7] = True
    # 3 slices at 2.5 mm and 4 columns at 0.5 mm apart
    assert ev.hausdorff(a, b, (2.5, 1.0, 0.5)) == pytest.approx(np.hypot(7.5, 2.0))


def test_surface_dice_by_hand():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    shifted = np.roll(gt, 1, axis=2)
    far = np.zeros_like(gt)
    far[0:2, 5:15, 5:15] = True  # a slab whose nearest surface is 4 mm from the cube's
    sp = (1.0, 1.0, 1.0)
    assert ev.surface_dice(gt, gt, sp, 1.0) == pytest.approx(1.0)
    # every surface point moves by 1 mm: all within a 1.5 mm tolerance; within 0.5 mm only the 4 faces parallel to
    # the shift, i.e. 4 of 6 equal faces (sub-voxel surfels at the cube's edges make it 0.666, not exactly 2/3)
    assert ev.surface_dice(shifted, gt, sp, 1.5) == pytest.approx(1.0)
    assert ev.surface_dice(shifted, gt, sp, 0.5) == pytest.approx(4 / 6, abs=2e-3)
    # 3 mm slices: a shift of one slice moves the two z faces (area 10x10 mm^2 each) by 3 mm, beyond the KiTS21
    # tumour tolerance, while the 4 side faces (10x30 mm^2 each) stay: 1200 / 1400 of the surface area
    z1 = np.roll(gt, 1, axis=0)
    assert ev.surface_dice(z1, gt, (3.0, 1.0, 1.0), KITS21_NSD_TOLERANCES_MM["tumor"]) == pytest.approx(6 / 7, abs=2e-3)
    assert ev.surface_dice(z1, gt, (3.0, 1.0, 1.0), 3.1) == pytest.approx(1.0)
    assert ev.surface_dice(far, gt, sp, 2.0) == pytest.approx(0.0)


def test_empty_conventions():
    e = np.zeros((6, 6, 6), bool)
    m = e.copy()
    m[2:4, 2:4, 2:4] = True
    assert (ev.dice(e, e), ev.iou(e, e), ev.surface_dice(e, e, (1, 1, 1), 1.0), ev.hausdorff(e, e, (1, 1, 1))) == \
        (1.0, 1.0, 1.0, 0.0)
    for p, g in ((m, e), (e, m)):
        assert ev.dice(p, g) == 0.0 and ev.iou(p, g) == 0.0
        assert ev.surface_dice(p, g, (1, 1, 1), 1.0) == 0.0
        assert ev.hausdorff(p, g, (1, 1, 1)) is None


def test_kits_regions_by_hand():
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[1:3, 2:8, 2:8] = 1          # 72 voxels of kidney+tumour
    gt[1:3, 2:4, 2:4] = 2          # 8 of them tumour
    pred = gt.copy()
    pred[1:3, 2:4, 2:4] = 1        # tumour called kidney: kidney (label>0) perfect, tumour missed
    pred[0, 0, 0] = 2              # plus a false tumour voxel (also counts as kidney)
    m = ev.evaluate_arrays(pred, gt, (1.0, 1.0, 1.0), EvaluateConfig(surface_metrics=False))
    assert m["kidney_dice"] == pytest.approx(2 * 72 / (73 + 72))
    assert m["tumor_dice"] == 0.0
    assert m["kits_score"] == pytest.approx((m["kidney_dice"] + 0.0) / 2)
    assert m["kidney_iou"] == pytest.approx(72 / 73)
    assert m["tumor_ml_gt"] == pytest.approx(0.008)
    with pytest.raises(ev.EvaluationError, match="shape"):
        ev.evaluate_arrays(pred[:3], gt, (1, 1, 1))


def _save(path, arr, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def test_cli_end_to_end(tmp_path):
    """Files matched by KiTS naming; JSON/CSV/markdown written; missing GT and shape mismatch are named errors."""
    from hpc_dfs.cli import main
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])[[2, 1, 0, 3]]
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for i in range(3):
        g = np.zeros((8, 20, 16), np.uint8)
        g[2:6, 4:14, 3:9] = 1
        g[3:5, 5:8, 4:7] = 2
        _save(gt_dir / f"case_{i:05d}" / "segmentation.nii.gz", g, aff)
        p = g.copy()
        p[rng.random(g.shape) < 0.02] = 1
        _save(pred_dir / f"prediction_{i:05d}.nii.gz", p, aff)
        raw = p.copy()
        raw[0, 0, 0] = 2
        _save(pred_dir / "raw" / f"prediction_{i:05d}.nii.gz", raw, aff)
    _save(gt_dir / "case_00009" / "segmentation.nii.gz", np.zeros((8, 20, 16), np.uint8), aff)  # no prediction
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [c["case_id"] for c in res["cases"]] == ["case_00000", "case_00001", "case_00002"]
    for c in res["cases"]:
        assert {"kidney_dice", "tumor_dice", "kits_score", "mean_iou", "kidney_hd95", "tumor_surface_dice"} <= set(c)
        assert c["tumor_dice"] == 1.0 and 0.8 < c["kidney_dice"] < 1.0
        assert c["tumor_dice_raw"] < 1.0  # the raw map has a false tumour voxel
    assert res["mean"]["kidney_dice"] == pytest.approx(np.mean([c["kidney_dice"] for c in res["cases"]]))
    assert res["postprocessing"]["delta"]["tumor_dice"] > 0
    assert res["missing_predictions"] == ["case_00009"]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert rows[-1]["case_id"] == "mean" and float(rows[0]["kidney_dice"]) == res["cases"][0]["kidney_dice"]
    md = out.with_suffix(".md").read_text()
    assert "| case_00001 |" in md and "Effect of post-processing" in md

    # a prediction without ground truth and one on the wrong grid: named, skipped, exit code 1
    _save(pred_dir / "prediction_00042.nii.gz", np.zeros((8, 20, 16), np.uint8), aff)
    _save(pred_dir / "prediction_00009.nii.gz", np.zeros((8, 20, 15), np.uint8), aff)
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
                 "--pred-raw", str(pred_dir / "raw"), "--no-surface-metrics"]) == 1
    res = json.loads(out.read_text())
    errs = {e["case_id"]: e["error"] for e in res["errors"]}
    assert "no ground truth" in errs["case_00042"] and "shape (8, 20, 15)" in errs["case_00009"]
    assert len(res["cases"]) == 3


def _two_kidneys():
    """Ground truth with a kidney on each side (array axis 2 = patient's left, KiTS) and a tumour in one."""
    gt = np.zeros((10, 20, 40), np.uint8)
    gt[2:8, 5:15, 3:13] = 1
    gt[2:8, 5:15, 27:37] = 1
    gt[3:6, 7:10, 5:8] = 2       # 27 voxels = 0.027 ml at 1 mm
    return gt


def test_detection_hit_missed_wrong_kidney_and_false_positives():
    gt = _two_kidneys()
    cfg = EvaluateConfig(surface_metrics=False)
    hit = ev.evaluate_arrays(gt.copy(), gt, (1, 1, 1), cfg)
    assert (hit["detection"], hit["n_tumors_gt"], hit["n_tumors_hit"], hit["n_fp_components"]) == ("hit", 1, 1, 0)
    assert hit["tumor_ml_gt"] == pytest.approx(0.027) and hit["tumors"][0]["ml"] == pytest.approx(0.027)
    assert hit["tumors"][0]["side"] != ev.tumour_detection(np.flip(gt, 2), np.flip(gt, 2), ev.kits_affine((1, 1, 1)),
                                                          0.001)["tumors"][0]["side"]  # mirrored: the other side

    none = np.where(gt == 2, 1, gt).astype(np.uint8)
    missed = ev.evaluate_arrays(none, gt, (1, 1, 1), cfg)
    assert (missed["detection"], missed["n_tumors_missed"], missed["n_fp_components"]) == ("missed", 1, 0)

    other = none.copy()
    other[3:6, 7:10, 30:33] = 2  # a tumour predicted in the other kidney only
    wrong = ev.evaluate_arrays(other, gt, (1, 1, 1), cfg)
    assert (wrong["detection"], wrong["n_tumors_wrong_kidney"], wrong["n_fp_components"]) == ("wrong kidney", 1, 1)
    assert wrong["fp_ml"] == pytest.approx(0.027) and wrong["tumor_dice"] == 0.0

    same = none.copy()
    same[3:6, 11:14, 9:12] = 2  # a false positive in the same kidney, not touching the tumour: still missed
    near = ev.evaluate_arrays(same, gt, (1, 1, 1), cfg)
    assert (near["detection"], near["n_tumors_missed"], near["n_fp_components"]) == ("missed", 1, 1)

    both = gt.copy()
    both[3:6, 7:10, 30:33] = 2  # hit plus a false positive elsewhere
    b = ev.evaluate_arrays(both, gt, (1, 1, 1), cfg)
    assert (b["detection"], b["n_tumors_hit"], b["n_fp_components"]) == ("hit", 1, 1)
    empty = ev.evaluate_arrays(np.zeros_like(gt), np.where(gt == 2, 1, gt).astype(np.uint8), (1, 1, 1), cfg)
    assert (empty["detection"], empty["n_tumors_gt"]) == ("no tumour", 0)


def test_missing_prediction_counts_as_zero_and_strict_fails(tmp_path):
    """KiTS: a missing prediction scores Dice 0 (mean_all, n visible); --strict makes it an error (exit 3)."""
    from hpc_dfs.cli import main
    aff = ev.kits_affine((2.5, 0.8, 0.8))
    gt = _two_kidneys()
    for i in range(2):
        _save(tmp_path / "gt" / f"case_{i:05d}" / "segmentation.nii.gz", gt, aff)
    _save(tmp_path / "pred" / "prediction_00000.nii.gz", gt, aff)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
                 "--no-surface-metrics"]) == 0
    res = json.loads(out.read_text())
    assert res["mean"]["n_cases"] == 1 and res["mean"]["tumor_dice"] == 1.0
    ma = res["mean_all"]
    assert (ma["n_cases"], ma["n_missing"], ma["tumor_dice"], ma["kidney_dice"]) == (2, 1, 0.5, 0.5)
    assert ma["n_tumors_missed"] == 1 and res["missing_cases"][0]["detection"] == "missed"
    md = out.with_suffix(".md").read_text()
    assert "mean (n=1)" in md and "mean, missing = 0 (n=2)" in md and "case_00001 (no prediction)" in md
    assert "## Tumour detection" in md
    rows = {r["case_id"]: r for r in csv.DictReader(out.with_suffix(".csv").open())}
    assert rows["case_00001"]["status"] == "missing prediction" and rows["case_00000"]["n_tumors_hit"] == "1"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
                 "--strict"]) == 3


def test_label_outside_0_1_2_is_an_error_naming_the_case(tmp_path, capsys):
    from hpc_dfs.cli import main
    aff = ev.kits_affine((1, 1, 1))
    gt = _two_kidneys()
    _save(tmp_path / "gt" / "case_00003" / "segmentation.nii.gz", gt, aff)
    bad = gt.copy()
    bad[0, 0, 0] = 9
    _save(tmp_path / "pred" / "prediction_00003.nii.gz", bad, aff)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
                 "--no-surface-metrics"]) == 1
    err = json.loads(out.read_text())["errors"]
    assert err[0]["case_id"] == "case_00003" and "label value(s) 9 outside {0, 1, 2}" in err[0]["error"]
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt"), "--out", str(out)]) == 2
    assert "--pred" in capsys.readouterr().err


def test_predictions_not_from_the_run_of_summary_json_are_refused(tmp_path, capsys):
    """A prediction whose case failed in summary.json, or whose header names another checkpoint or
    input, is refused (exit 3) naming the file; without provenance in the summary nothing is checked."""
    from hpc_dfs.cli import main
    aff = ev.kits_affine((1, 1, 1))
    gt = _two_kidneys()
    rows = []
    for i, descrip in enumerate(("hpc-dfs aaaaaaaaaaaa bbbbbbbbbbbb", "hpc-dfs cccccccccccc dddddddddddd")):
        cid = f"case_{i:05d}"
        _save(tmp_path / "gt" / cid / "segmentation.nii.gz", gt, aff)
        img = nib.Nifti1Image(gt, aff)
        img.header["descrip"] = descrip.encode()
        (tmp_path / "pred").mkdir(exist_ok=True)
        nib.save(img, str(tmp_path / "pred" / f"prediction_{i:05d}.nii.gz"))
        rows.append({"case_id": cid, "status": "ok", "provenance": {"descrip": descrip}})
    summary = tmp_path / "pred" / "summary.json"
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
            "--out", str(tmp_path / "eval.json"), "--no-surface-metrics"]
    summary.write_text(json.dumps({"cases": rows}))
    assert main(args) == 0
    rows[1]["provenance"]["descrip"] = "hpc-dfs eeeeeeeeeeee dddddddddddd"      # another checkpoint
    summary.write_text(json.dumps({"cases": rows}))
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "prediction_00001.nii.gz" in err and "provenance" in err and "prediction_00000" not in err
    rows[1] = {"case_id": "case_00001", "status": "failed", "error": "truncated"}  # a stale file of an older run
    summary.write_text(json.dumps({"cases": rows}))
    assert main(args) == 3
    assert "prediction_00001.nii.gz (case_00001 failed in it)" in capsys.readouterr().err
    summary.write_text(json.dumps({"cases": [{"case_id": "case_00000", "status": "ok"}]}))   # an older predict
    assert main(args) == 0


def test_submission_naming_scores_as_prediction_naming_and_both_at_once_is_refused(tmp_path, capsys):
    """``case_XXXXX.nii.gz`` (the KiTS submission and nnU-Net naming) is scored exactly as ``prediction_XXXXX``."""
    from hpc_dfs.cli import main
    aff = np.diag([-0.8, -0.8, 2.5, 1.0])[[2, 1, 0, 3]]
    rng = np.random.default_rng(1)
    for i in range(2):
        g = np.zeros((8, 20, 16), np.uint8)
        g[2:6, 4:14, 3:9] = 1
        g[3:5, 5:8, 4:7] = 2
        _save(tmp_path / "gt" / f"case_{i:05d}" / "segmentation.nii.gz", g, aff)
        p = g.copy()
        p[rng.random(g.shape) < 0.05] = 1
        _save(tmp_path / "ours" / f"prediction_{i:05d}.nii.gz", p, aff)
        _save(tmp_path / "nnunet" / f"case_{i:05d}.nii.gz", p, aff)
    res = {}
    for name in ("ours", "nnunet"):
        out = tmp_path / f"eval_{name}.json"
        assert main(["evaluate", "--pred", str(tmp_path / name), "--gt", str(tmp_path / "gt"), "--out", str(out),
                     "--no-surface-metrics"]) == 0
        res[name] = json.loads(out.read_text())
    assert [c["case_id"] for c in res["nnunet"]["cases"]] == ["case_00000", "case_00001"]
    for a, b in zip(res["ours"]["cases"], res["nnunet"]["cases"]):
        assert a["kidney_dice"] == b["kidney_dice"] < 1.0 and a["tumor_dice"] == b["tumor_dice"]

    _save(tmp_path / "nnunet" / "prediction_00001.nii.gz", np.zeros((8, 20, 16), np.uint8), aff)
    assert main(["evaluate", "--pred", str(tmp_path / "nnunet"), "--gt", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "eval_both.json")]) == 3
    err = capsys.readouterr().err
    assert "case_00001 twice" in err and "case_00001.nii.gz" in err and "prediction_00001.nii.gz" in err
