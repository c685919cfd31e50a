"""``hpc_dfs.metrics.kits23`` against the official KiTS23 scoring path, run in the peer environment (slow).

The official code (neheller/kits23, ``kits23/evaluation/metrics.py``) reads both files with SimpleITK,
reverses the spacing to match SimpleITK's array axes, builds each hierarchical evaluation class, applies
the empty-region rules and calls DeepMind's ``surface-distance`` package (``compute_surface_distances`` and
``compute_surface_dice_at_tolerance``). That path is restated below and run by ``bench/.venv-nnunet``'s
interpreter, where ``bench/nnunet_venv.sh`` installs SimpleITK (with nnunetv2) and ``surface-distance==0.1``
(DeepMind's package as published on PyPI). The KiTS23 repository itself is not a PyPI package.

Cases: the first ten real KiTS23 label maps (``../shared/data/kits23/labels``, with and without cysts;
``KITS23_OFFICIAL_CASES=100`` takes all of them), each cut to a box around its kidneys, with the perturbed
predictions of ``test_kits23_metrics`` (a cyst where the truth has none, cysts as tumour, tumours as cyst,
an empty prediction, ...) written as ``case_XXXXX.nii.gz`` (the challenge's naming); one case is also
written with an invented spacing.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_dfs.metrics import kits23
from tests.unit.metrics.test_kits23 import LABELS_DIR, _perturbations
from tests.conftest import missing_shared

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
PEER_PY = REPO / "bench" / ".venv-nnunet" / "bin" / "python"
#: how many of the real label maps (sorted) to score; KITS23_OFFICIAL_CASES=100 scores all of them (about 15 min)
N_CASES = int(os.environ.get("KITS23_OFFICIAL_CASES", "10"))

OFFICIAL = r'''
import json, sys
import numpy as np
import SimpleITK as sitk
from surface_distance import compute_surface_distances, compute_surface_dice_at_tolerance

HECS = {"kidney": ((1, 2, 3), 1.0330772532390826), "masses": ((2, 3), 1.1328796488598762),
        "tumor": ((2,), 1.1498198361434828)}
out = {}
for pred_file, gt_file, key in json.load(open(sys.argv[1])):
    pred_img, gt_img = sitk.ReadImage(pred_file), sitk.ReadImage(gt_file)
    spacing = tuple(list(pred_img.GetSpacing())[::-1])  # as the official code: the prediction's, reversed
    pred, gt = sitk.GetArrayFromImage(pred_img), sitk.GetArrayFromImage(gt_img)
    row = {}
    for name, (labels, tol) in HECS.items():
        mp, mg = np.isin(pred, labels), np.isin(gt, labels)
        if not mp.any() and not mg.any():
            dc = sd = 1.0
        elif not mp.any() or not mg.any():
            dc = sd = 0.0
        else:
            dc = 2 * np.count_nonzero(mp & mg) / (np.count_nonzero(mp) + np.count_nonzero(mg))
            sd = compute_surface_dice_at_tolerance(compute_surface_distances(mg, mp, spacing), tol)
        row["Dice_" + name], row["SD_" + name] = float(dc), float(sd)
    out[key] = row
json.dump(out, open(sys.argv[2], "w"))
'''


def _peer() -> Path:
    """The peer interpreter, created on demand (skips, naming the reason, when it cannot be made)."""
    res = subprocess.run(["bash", str(REPO / "bench" / "nnunet_venv.sh")], capture_output=True, text=True,
                         timeout=1800)
    if res.returncode != 0 or not PEER_PY.exists():
        pytest.skip(f"peer venv bench/.venv-nnunet could not be created: {(res.stdout + res.stderr)[-300:]}")
    return PEER_PY


def _write_cases(root: Path) -> list[tuple[Path, Path, str]]:
    """Ground truth and predictions (KiTS and challenge naming) of the first cases, cut to their kidneys."""
    import nibabel as nib

    cases = sorted(LABELS_DIR.glob("case_*/segmentation.nii.gz"))[:N_CASES]
    if len(cases) < N_CASES:
        missing_shared(f"real KiTS23 labels not available in {LABELS_DIR} (see ../shared/data/kits23/SOURCE.md)")
    work = []
    for i, path in enumerate(cases):
        img = nib.load(str(path))
        lab = np.asarray(img.dataobj)
        nz = np.nonzero(lab > 0)
        lo = [max(int(a.min()) - 3, 0) for a in nz]
        hi = [min(int(a.max()) + 4, n) for a, n in zip(nz, lab.shape)]
        crop = lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ np.array(lo) + img.affine[:3, 3]
        if i == 0:  # an invented anisotropic spacing as well
            affine[:3, :3] = np.sign(img.affine[:3, :3]) @ np.diag([3.0, 0.7, 1.1])  # voxel axes (columns)
        cid = path.parent.name
        gt = root / "gt" / cid / "segmentation.nii.gz"
        gt.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(crop, affine), str(gt))
        for name, pred in _perturbations(crop).items():
            p = root / f"pred_{name}" / f"{cid}.nii.gz"
            p.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(pred.astype(np.uint8), affine), str(p))
            work.append((p, gt, f"{name}/{cid}"))
    return work


def test_equals_the_official_scoring_path(tmp_path):
    peer = _peer()
    work = _write_cases(tmp_path)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([[str(p), str(g), k] for p, g, k in work]))
    (tmp_path / "official.py").write_text(OFFICIAL)
    t0 = time.perf_counter()
    res = subprocess.run([str(peer), str(tmp_path / "official.py"), str(jobs), str(tmp_path / "official.json")],
                         capture_output=True, text=True, timeout=1800)
    t_official = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    official = json.loads((tmp_path / "official.json").read_text())
    t0 = time.perf_counter()
    ours = {}
    for folder in sorted({p.parent for p, _, _ in work}):  # each folder as it is, challenge naming
        for cid, row in kits23.score_folder(folder, tmp_path / "gt").items():
            ours[f"{folder.name[5:]}/{cid}"] = row
    t_ours = time.perf_counter() - t0
    assert sorted(ours) == sorted(official)
    worst, n = 0.0, 0
    for key, row in official.items():
        for col, v in row.items():
            assert abs(ours[key][col] - v) <= 1e-6, (key, col, ours[key][col], v)
            worst, n = max(worst, abs(ours[key][col] - v)), n + 1
    assert any(k.startswith("false_cyst/") for k in official) and any(k.startswith("cyst_swaps/") for k in official)
    print(f"official KiTS23 path: {len(official)} predictions of {N_CASES} cases, {n} figures, max |difference| "
          f"{worst:.2e}; official {t_official:.1f} s, hpc_dfs.metrics.kits23 {t_ours:.1f} s")
