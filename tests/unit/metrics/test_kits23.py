"""The KiTS23 evaluation (:mod:`hpc_dfs.metrics.kits23`) against an independent implementation written here.

The reference below follows the published definition (Nikolov et al. 2021, DeepMind's ``surface-distance``
package, as the KiTS23 code calls it) by another code path than the library:

- surfels: the 2x2x2 cubes of voxel corners are enumerated by explicit shifts of a padded mask (the library:
  ``scipy.ndimage.correlate`` with the encoding kernel); a cube's code weights the voxel at offset (a, b, c)
  by ``2 ** (7 - 4a - 2b - c)``;
- distances: nearest-neighbour queries of a k-d tree on the surfel positions in mm (the library: scipy's
  Euclidean distance transform on the corner grid);
- areas: MONAI's public float32 table (the library: the float64 norms of the triangle normals). The table
  itself is checked from first principles on the codes whose surface is plain geometry (one corner cut off:
  a triangle; a half cube: a plane; an edge: a strip), and for symmetry under every permutation of the axes
  (what lets nibabel's axis order give SimpleITK's figures).

Predictions are real KiTS23 label maps (``../shared/data/kits23/labels``) perturbed: eroded and shifted, a
cyst predicted where the truth has none, cysts predicted as tumour, tumours predicted as cyst, an empty
prediction, cases with and without cysts, the real (anisotropic) spacing and an invented one. Each case is
cropped to a box around its masses so that the whole file runs in seconds.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from hpc_dfs.metrics import kits23
from tests.conftest import missing_shared

LABELS_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "kits23" / "labels"
#: two cases with cysts (5 mm slices) and one without (2 mm slices)
CASES = ("case_00402", "case_00403", "case_00405")


# ----------------------------------------------------------------------------- the independent reference
def _ref_surfels(mask: np.ndarray, spacing, area32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (mm) and areas of the surfels of ``mask``, every cube enumerated by explicit shifts."""
    m = np.zeros(tuple(n + 2 for n in mask.shape), dtype=np.int64)
    m[1:-1, 1:-1, 1:-1] = mask
    n0, n1, n2 = (n + 1 for n in mask.shape)
    code = np.zeros((n0, n1, n2), dtype=np.int64)
    for a, b, c in itertools.product((0, 1), repeat=3):
        code += (2 ** (7 - 4 * a - 2 * b - c)) * m[a:a + n0, b:b + n1, c:c + n2]
    surf = (code > 0) & (code < 255)
    return np.argwhere(surf) * np.asarray(spacing, dtype=np.float64), area32[code[surf]].astype(np.float64)


def ref_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing, tol: float) -> float:
    """Surface Dice from the definition: surfel areas within ``tol`` of the other surface, both ways."""
    from monai.metrics.utils import get_code_to_measure_table
    from scipy.spatial import cKDTree

    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    area32 = get_code_to_measure_table([float(s) for s in spacing])[0].numpy()
    xp, ap = _ref_surfels(pred, spacing, area32)
    xg, ag = _ref_surfels(truth, spacing, area32)
    dg = cKDTree(xp).query(xg)[0]
    dp = cKDTree(xg).query(xp)[0]
    return float((ag[dg <= tol].sum() + ap[dp <= tol].sum()) / (ag.sum() + ap.sum()))


def ref_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    n = pred.sum() + truth.sum()
    return 1.0 if n == 0 else 2.0 * (pred & truth).sum() / n


HEC = {"kidney": ((1, 2, 3), 1.0331), "masses": ((2, 3), 1.1329), "tumor": ((2,), 1.1498)}  # published, rounded


def ref_case(truth: np.ndarray, pred: np.ndarray, spacing) -> dict[str, float]:
    out = {}
    for name, (labels, tol) in HEC.items():
        g, p = np.isin(truth, labels), np.isin(pred, labels)
        out[f"Dice_{name}"] = ref_dice(p, g)
        out[f"SD_{name}"] = ref_surface_dice(p, g, spacing, tol)
    return out


# ----------------------------------------------------------------------------- real labels, perturbed
def _load_cropped(case_id: str) -> tuple[np.ndarray, tuple]:
    import nibabel as nib

    path = LABELS_DIR / case_id / "segmentation.nii.gz"
    if not path.is_file():
        missing_shared(f"real KiTS23 labels not available ({path} is absent; see ../shared/data/kits23/SOURCE.md)")
    img = nib.load(str(path))
    lab = np.asarray(img.dataobj).astype(np.int16)
    zz, yy, xx = np.nonzero(lab >= 2)  # a box around the masses, with some kidney around them
    lo = np.maximum([zz.min() - 2, yy.min() - 12, xx.min() - 12], 0)
    hi = np.minimum([zz.max() + 3, yy.max() + 13, xx.max() + 13], lab.shape)
    return lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), tuple(float(z) for z in img.header.get_zooms()[:3])


def _perturbations(truth: np.ndarray) -> dict[str, np.ndarray]:
    from scipy import ndimage

    out = {}
    p = truth.copy()
    p[(truth > 0) & ~ndimage.binary_erosion(truth > 0, structure=np.ones((1, 3, 3)))] = 0  # kidney rim lost in-plane
    p[p == 2] = 1
    p[np.roll(truth == 2, 2, axis=2) & (truth > 0)] = 2  # the tumour shifted by two columns
    out["eroded_shifted"] = p
    p = truth.copy()
    has_cyst = bool((truth == 3).any())
    p[truth == 3] = 2  # cysts predicted as tumour
    kid = np.argwhere(truth == 1)
    c = kid[len(kid) // 2]
    ball = np.zeros(truth.shape, bool)
    ball[c[0], max(c[1] - 3, 0):c[1] + 3, max(c[2] - 3, 0):c[2] + 3] = True
    p[ball & (truth == 1)] = 3  # a predicted cyst in kidney tissue (where the truth has none)
    out["cyst_swaps" if has_cyst else "false_cyst"] = p
    p = truth.copy()
    p[truth == 2] = 3  # tumours predicted as cyst: masses right, tumour region empty in the prediction
    out["tumour_as_cyst"] = p
    out["empty"] = np.zeros_like(truth)
    out["perfect"] = truth.copy()
    return out


@pytest.fixture(scope="module")
def real_cases():
    return {cid: _load_cropped(cid) for cid in CASES}


def test_agrees_with_the_independent_implementation_on_real_labels(real_cases):
    worst, n = 0.0, 0
    seen_no_cyst = seen_cyst = False
    for cid, (truth, spacing) in real_cases.items():
        seen_cyst |= bool((truth == 3).any())
        seen_no_cyst |= not (truth == 3).any()
        for name, pred in _perturbations(truth).items():
            invented = name in ("eroded_shifted", "cyst_swaps", "false_cyst")
            for sp in (spacing, (3.0, 0.7, 1.1)) if invented else (spacing,):  # real (5 or 2 mm slices), invented
                got = kits23.score_case(truth, pred, sp)
                want = ref_case(truth, pred, sp)
                assert list(got) == list(kits23.CSV_COLUMNS[1:])
                for k in want:
                    assert abs(got[k] - want[k]) <= 1e-6, (cid, name, sp, k, got[k], want[k])
                    worst, n = max(worst, abs(got[k] - want[k])), n + 1
                if name == "empty":
                    assert all(got[f"{m}_{r}"] == 0.0 for m in ("Dice", "SD") for r in ("kidney", "masses", "tumor"))
                if name == "perfect":
                    assert all(v == 1.0 for v in got.values())
                if name == "tumour_as_cyst":
                    assert got["Dice_masses"] == 1.0 and got["Dice_tumor"] == 0.0 and got["SD_tumor"] == 0.0
    assert seen_cyst and seen_no_cyst
    print(f"kits23 cross-check: {n} figures, max |difference| {worst:.2e}")


def test_surface_dice_differs_from_a_plain_face_count(real_cases):
    """The figure is not trivially 1 or 0: an eroded kidney's surface Dice lies strictly between."""
    truth, spacing = real_cases["case_00402"]
    row = kits23.score_case(truth, _perturbations(truth)["eroded_shifted"], spacing)
    assert 0.05 < row["SD_kidney"] < 0.99 and 0.05 < row["Dice_kidney"] < 0.99


# ----------------------------------------------------------------------------- the table, from first principles
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (5.0, 0.81, 0.77), (0.5, 2.0, 3.3)])
def test_area_table_matches_plain_geometry(spacing):
    s = np.asarray(spacing)
    table = kits23.area_table(spacing)
    w = {(a, b, c): 2 ** (7 - 4 * a - 2 * b - c) for a, b, c in itertools.product((0, 1), repeat=3)}
    corner = 0.125 * math.sqrt((s[1] * s[2]) ** 2 + (s[0] * s[2]) ** 2 + (s[0] * s[1]) ** 2)
    for k, bit in w.items():  # one corner in (or out): a triangle through the three half-edges
        assert table[bit] == pytest.approx(corner, rel=1e-12)
        assert table[255 - bit] == pytest.approx(corner, rel=1e-12)
    for axis in range(3):  # half the cube in: a plane across it, area = the other two spacings' product
        half = sum(bit for k, bit in w.items() if k[axis] == 0)
        other = [s[i] for i in range(3) if i != axis]
        assert table[half] == pytest.approx(other[0] * other[1], rel=1e-12)
        assert table[255 - half] == pytest.approx(other[0] * other[1], rel=1e-12)
    for axis in range(3):  # two corners along one edge: a strip cutting the other two axes at their half
        for k in w:
            if k[axis] == 0:
                k2 = tuple(1 if i == axis else k[i] for i in range(3))
                o = [s[i] for i in range(3) if i != axis]
                assert table[w[k] + w[k2]] == pytest.approx(s[axis] * 0.5 * math.hypot(*o), rel=1e-12)


def test_area_table_is_symmetric_under_axis_permutations():
    """SimpleITK's arrays reverse nibabel's axes; the areas must not depend on the order (all 256 codes)."""
    s = (5.0, 0.81, 0.77)
    base = kits23.area_table(s)
    bits = {(a, b, c): 2 ** (7 - 4 * a - 2 * b - c) for a, b, c in itertools.product((0, 1), repeat=3)}
    for perm in itertools.permutations(range(3)):
        t = kits23.area_table([s[i] for i in perm])
        for code in range(256):
            moved = sum(bit for k, bit in bits.items() if code & bits[tuple(k[perm.index(i)] for i in range(3))])
            assert t[moved] == pytest.approx(base[code], rel=1e-12), (perm, code)


# ----------------------------------------------------------------------------- rules, files and the CSV
def test_empty_rules_and_label_checks(tmp_path):
    t = np.zeros((4, 6, 6), np.int16)
    t[1:3, 2:4, 2:4] = 1
    row = kits23.score_case(t, t, (1, 1, 1))
    assert row["Dice_tumor"] == row["SD_tumor"] == row["Dice_masses"] == 1.0  # empty in both
    p = t.copy()
    p[2, 2, 2] = 2
    row = kits23.score_case(t, p, (1, 1, 1))
    assert row["Dice_tumor"] == row["SD_tumor"] == 0.0  # empty in the truth only
    with pytest.raises(kits23.Kits23Error, match="shape"):
        kits23.score_case(t, t[:3], (1, 1, 1))
    import nibabel as nib
    bad = t.copy()
    bad[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(bad.astype(np.uint8), np.eye(4)), str(tmp_path / "case_00001.nii.gz"))
    nib.save(nib.Nifti1Image(t.astype(np.uint8), np.eye(4)), str(tmp_path / "gt.nii.gz"))
    with pytest.raises(kits23.Kits23Error, match=r"case_00001\.nii\.gz: label value\(s\) 4 outside"):
        kits23.score_files(tmp_path / "case_00001.nii.gz", tmp_path / "gt.nii.gz")
    nib.save(nib.Nifti1Image(t.astype(np.uint8), np.diag([1.0, 1.0, 1.5, 1.0])), str(tmp_path / "case_00002.nii.gz"))
    with pytest.raises(kits23.Kits23Error, match=r"case_00002\.nii\.gz has voxel spacing \(1\.0, 1\.0, 1\.5\)"):
        kits23.score_files(tmp_path / "case_00002.nii.gz", tmp_path / "gt.nii.gz")


def _write(path: Path, lab: np.ndarray, zooms=(2.0, 0.8, 0.8)) -> None:
    import nibabel as nib
    img = nib.Nifti1Image(lab.astype(np.uint8), np.diag([*zooms, 1.0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def test_folder_both_namings_csv_and_summary(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    t = np.zeros((6, 10, 10), np.uint8)
    t[1:5, 2:8, 2:8] = 1
    t[2:4, 3:5, 3:5] = 2
    t[2:4, 6:8, 6:8] = 3
    for i in (1, 2, 3):
        _write(gt / f"case_0000{i}" / "segmentation.nii.gz", t)
    _write(pred / "case_00001.nii.gz", t)  # challenge naming
    p = t.copy()
    p[t == 3] = 1
    _write(pred / "prediction_00002.nii.gz", p)  # hpc-dfs naming
    assert kits23.find_prediction(pred, "case_00001").name == "case_00001.nii.gz"
    assert kits23.find_prediction(pred, "case_00002").name == "prediction_00002.nii.gz"
    assert kits23.find_prediction(pred, "case_00003") is None
    rows = kits23.score_folder(pred, gt)
    assert list(rows) == ["case_00001", "case_00002"]
    assert rows["case_00002"]["Dice_tumor"] == 1.0 and rows["case_00002"]["Dice_masses"] < 1.0
    with pytest.raises(kits23.Kits23Error, match="case_00003: no prediction"):
        kits23.score_folder(pred, gt, case_ids=["case_00001", "case_00003"])
    rows3 = kits23.score_folder(pred, gt, case_ids=["case_00001", "case_00003"], missing="empty")
    assert rows3["case_00003"]["Dice_kidney"] == 0.0
    out = kits23.write_csv(pred / "evaluation.csv", rows)
    lines = out.read_text().splitlines()
    assert lines[0] == "caseID,Dice_kidney,Dice_masses,Dice_tumor,SD_kidney,SD_masses,SD_tumor"
    assert lines[1].startswith("case_00001,1.00000000,") and lines[-1].startswith("average,")
    assert len(lines) == 4
    s = kits23.summarise(rows)
    assert s["n_cases"] == 2
    assert s["mean_dice"] == pytest.approx((s["Dice_kidney"] + s["Dice_masses"] + s["Dice_tumor"]) / 3)
    avg = [float(v) for v in lines[-1].split(",")[1:]]
    assert avg == pytest.approx([s[c] for c in kits23.CSV_COLUMNS[1:]], abs=1e-8)
    _write(pred / "prediction_00001.nii.gz", p)  # two different predictions of one case: refused
    with pytest.raises(kits23.Kits23Error, match="both predictions of case_00001"):
        kits23.find_prediction(pred, "case_00001")


def test_evaluate_regions_kits23_through_the_cli(real_cases, tmp_path):
    """`hpc-dfs evaluate --regions kits23` on real labels: the official CSV, and every value equal to the
    independent implementation above to 1e-6 (a predicted cyst where the truth has none, an empty prediction,
    cases with and without cysts; both namings)."""
    import csv
    import json
    import subprocess
    import sys

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    want = {}
    for i, (cid, (truth, spacing)) in enumerate(sorted(real_cases.items())):
        perturbed = _perturbations(truth)
        choice = ("false_cyst" if "false_cyst" in perturbed else "cyst_swaps", "empty", "eroded_shifted")[i % 3]
        _write(gt / cid / "segmentation.nii.gz", truth, spacing)
        name = f"case_{cid[5:]}.nii.gz" if i % 2 == 0 else f"prediction_{cid[5:]}.nii.gz"
        _write(pred / name, perturbed[choice], spacing)
        want[cid] = ref_case(truth, perturbed[choice], spacing)
    out = tmp_path / "eval" / "eval.json"
    res = subprocess.run([sys.executable, "-m", "hpc_dfs", "evaluate", "--pred", str(pred), "--gt", str(gt),
                          "--out", str(out), "--regions", "kits23"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.reader(out.with_suffix(".csv").read_text().splitlines()))
    assert rows[0] == ["caseID", "Dice_kidney", "Dice_masses", "Dice_tumor", "SD_kidney", "SD_masses", "SD_tumor"]
    assert [r[0] for r in rows[1:]] == [*sorted(want), "average"]
    for r in rows[1:-1]:
        for col, v in zip(rows[0][1:], r[1:]):
            assert float(v) == pytest.approx(want[r[0]][col], abs=1e-6), (r[0], col)
    result = json.loads(out.read_text())
    assert result["regions"] == "kits23" and result["mean"]["n_cases"] == len(want)
    means = [sum(w[c] for w in want.values()) / len(want) for c in rows[0][1:]]
    assert [float(v) for v in rows[-1][1:]] == pytest.approx(means, abs=1e-6)
    assert result["mean"]["mean_dice"] == pytest.approx(sum(means[:3]) / 3, abs=1e-6)
    assert "Mean over the three regions" in out.with_suffix(".md").read_text()
    from hpc_dfs.report.sections_results import section_evaluation
    html = section_evaluation(result, out)
    assert "official KiTS23 evaluation" in html and "Dice_masses" in html and sorted(want)[0] in html
