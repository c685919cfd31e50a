"""KiTS23 cysts (label 3) in ``synth --from-labels``: water density, no enhancement, a sharp wall.

CT is rendered around a real KiTS23 label map with cysts (``../shared/data/kits23/labels/case_00402``),
cropped in-plane around its kidneys so that a render takes about a second.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpc_dfs.data.synth import render_from_labels
from hpc_dfs.data.synth_looks import MIN_CONTRAST, RandomLook
from tests.conftest import missing_shared

LABEL = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "kits23" / "labels" / "case_00402" / \
    "segmentation.nii.gz"


@pytest.fixture(scope="module")
def cropped_label(tmp_path_factory) -> Path:
    """The real label map cut to its kidneys plus 40 voxels in-plane (affine moved to match), as a case folder."""
    import nibabel as nib

    if not LABEL.is_file():
        missing_shared(f"real KiTS23 labels not available ({LABEL} is absent; see ../shared/data/kits23/SOURCE.md)")
    img = nib.load(str(LABEL))
    lab = np.asarray(img.dataobj)
    assert (lab == 3).sum() > 1000  # the case has cysts
    _, yy, xx = np.nonzero(lab > 0)
    y0, x0 = max(int(yy.min()) - 40, 0), max(int(xx.min()) - 40, 0)
    y1, x1 = min(int(yy.max()) + 41, lab.shape[1]), min(int(xx.max()) + 41, lab.shape[2])
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, y0, x0]) + img.affine[:3, 3]
    out = tmp_path_factory.mktemp("kits23") / "case_00402" / "segmentation.nii.gz"
    out.parent.mkdir()
    nib.save(nib.Nifti1Image(lab[:, y0:y1, x0:x1].copy(), affine, img.header), str(out))
    return out


def _profile(ct: np.ndarray, lab: np.ndarray) -> dict:
    """Mean HU of the cyst's interior (in-plane depth >= 3 voxels), of its voxels at depth 2, and of the kidney."""
    from scipy import ndimage

    cyst = lab == 3
    depth = np.stack([ndimage.distance_transform_edt(s) for s in cyst])
    ct = ct.astype(np.float64)
    return {"interior": ct[cyst & (depth >= 3)].mean(), "depth2": ct[cyst & (np.rint(depth) == 2)].mean(),
            "kidney": ct[lab == 1].mean(), "n_interior": int((cyst & (depth >= 3)).sum())}


def test_cysts_are_water_without_enhancement_and_sharp(cropped_label):
    profiles = []
    for seed in (0, 1, 2):  # three cases of the default look: non-contrast and enhanced phases among them
        ct, raw, _ = render_from_labels(cropped_label, None, seed)
        profiles.append(_profile(ct, np.asarray(raw)))
    for p in profiles:
        assert p["n_interior"] > 200
        assert -20.0 <= p["interior"] <= 40.0, p  # water (10 HU) after the case's gain, offset and noise
        assert abs(p["depth2"] - p["interior"]) <= 10.0, p  # homogeneous up to its wall: no ramp, no rim
    cysts = [p["interior"] for p in profiles]
    kidneys = [p["kidney"] for p in profiles]
    assert max(kidneys) - min(kidneys) > 50.0  # the kidney enhances with the phase ...
    assert max(cysts) - min(cysts) < 25.0  # ... the cyst does not


def test_cysts_in_the_other_looks(cropped_label):
    ct, raw, _ = render_from_labels(cropped_label, None, 0, style="streak")
    p = _profile(ct, np.asarray(raw))
    assert -30.0 <= p["interior"] <= 40.0 and p["kidney"] - p["interior"] > 60.0
    for seed in range(200):  # domain randomisation: any intensity, but apart from kidney and tumour
        look = RandomLook(np.random.default_rng(seed), 8)
        v = float(look.cyst([np.zeros((1, 2, 2))] * 5, np.ones((1, 2, 2), bool))[0])
        assert all(abs(v - look.mean[t]) >= MIN_CONTRAST for t in ("cortex", "medulla", "tumour"))


def test_kits23_layout_is_recognised_by_preprocess(cropped_label, tmp_path):
    """With KiTS23 records, synth writes kits23.json (the KiTS23 layout): preprocess then reads label 3."""
    import json

    from hpc_dfs.config.data import PreprocessConfig, SynthConfig
    from hpc_dfs.data.kits_io import detect_dataset
    from hpc_dfs.stages.preprocess import run_preprocess
    from hpc_dfs.stages.synth import run_synth

    kits23_json = LABEL.parents[2] / "kits23.json"
    if not kits23_json.is_file():
        missing_shared(f"{kits23_json} is absent")
    data = tmp_path / "data"
    cfg = SynthConfig(cases="case_00402", seed=0, from_labels=str(cropped_label.parents[1]), kits_json=str(kits23_json))
    assert run_synth(data, cfg) == 0
    assert not (data / "kits.json").exists() and detect_dataset(data) == "kits23"
    assert [r["case_id"] for r in json.loads((data / "kits23.json").read_text())] == ["case_00402"]
    base = PreprocessConfig(slice_size=[32, 32], n_folds=1, fg_samples_per_case=200)
    assert run_preprocess(data, tmp_path / "kept", base) == 0  # default: the cyst is a 4th class
    m = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert m["preprocessing"]["classes"] == ["background", "kidney", "tumor", "cyst"]
    assert m["preprocessing"]["label_map"] == {"0": 0, "1": 1, "2": 2, "3": 3}
    assert m["cases"][0]["slices_with"]["cyst"] > 0
    import dataclasses
    assert run_preprocess(data, tmp_path / "folded", dataclasses.replace(base, label_map="0:0,1:1,2:2,3:1")) == 0
    folded = json.loads((tmp_path / "folded" / "manifest.json").read_text())
    assert folded["preprocessing"]["classes"] == ["background", "kidney", "tumor"]  # cyst counted as kidney
