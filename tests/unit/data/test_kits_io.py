"""KiTS-layout I/O: loading, validation errors that name the case, label maps, atomic NIfTI writing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hpc_dfs.data.kits_io import (LABEL_MAPS, CaseError, detect_dataset, kits_affine, list_cases, load_case,
                                  read_header, save_nifti_atomic)


def write_tiny_case(root: Path, case_id: str, shape=(6, 24, 20), spacing=(3.0, 1.5, 1.5), seed: int = 0,
                    label_dtype=np.uint8, image_dtype=np.int16, label_name: str = "segmentation.nii.gz") -> Path:
    """A small labelled case: body ellipse, a kidney box (1) with a tumour cube (2), KiTS affine."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    lab = np.zeros(shape, dtype=label_dtype)
    lab[1:n - 1, h // 4:h // 2 + 2, w // 4:w // 2 + 2] = 1
    lab[2:n - 2, h // 3:h // 2, w // 3:w // 2] = 2
    img = rng.normal(-60, 20, shape)
    img[lab == 1] += 200
    img[lab == 2] += 120
    aff = kits_affine(spacing)
    d = root / case_id
    save_nifti_atomic(img, aff, d / "imaging.nii.gz", dtype=image_dtype)
    save_nifti_atomic(lab, aff, d / label_name, dtype=label_dtype)
    return d


def write_records(root: Path, case_ids, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    recs = [{"case_id": c, "age_at_nephrectomy": int(rng.integers(30, 80)),
             "gender": str(rng.choice(["male", "female"])),
             "body_mass_index": float(rng.uniform(20, 35)), "radiographic_size": float(rng.uniform(1, 8)),
             "smoking_history": "never_smoked", "pack_years": 0, "age_when_quit_smoking": "not_applicable",
             "last_preop_egfr": {"value": ">=90"}, "comorbidities": {"copd": bool(rng.random() < 0.3)},
             "malignant": bool(rng.random() < 0.7)} for c in case_ids]
    (root / "kits.json").write_text(json.dumps(recs))
    return root / "kits.json"


def test_load_case_roundtrip(tmp_path):
    d = write_tiny_case(tmp_path, "case_00001")
    case = load_case(d)
    assert case.case_id == "case_00001"
    assert case.image.shape == (6, 24, 20) and case.image.dtype == np.int16
    assert case.label.dtype == np.uint8 and set(np.unique(case.label)) == {0, 1, 2}
    assert case.spacing == pytest.approx((3.0, 1.5, 1.5))
    assert nib.aff2axcodes(case.affine) == ("I", "P", "L")
    assert list_cases(tmp_path) == [d]
    shape, zooms, _ = read_header(d / "imaging.nii.gz", "case_00001")
    assert shape == (6, 24, 20) and zooms[:3] == pytest.approx((3.0, 1.5, 1.5))


def test_uint16_labels_and_kits21_label_map(tmp_path):
    d = write_tiny_case(tmp_path, "case_00002", label_dtype=np.uint16)
    assert load_case(d).label.dtype == np.uint8  # the KiTS19 uint16 quirk is read as classes
    d21 = write_tiny_case(tmp_path / "k21", "case_00003", label_name="aggregated_MAJ_seg.nii.gz")
    seg = nib.load(str(d21 / "aggregated_MAJ_seg.nii.gz"))
    lab = np.asanyarray(seg.dataobj).copy()
    lab[0, 0, 0] = 3  # a cyst voxel
    save_nifti_atomic(lab, seg.affine, d21 / "aggregated_MAJ_seg.nii.gz", dtype=np.uint8)
    assert detect_dataset(tmp_path / "k21") == "kits21"
    case = load_case(d21, label_map=LABEL_MAPS["kits21"])
    assert case.label[0, 0, 0] == 3  # the cyst is its own class by default
    assert load_case(d21, label_map={0: 0, 1: 1, 2: 2, 3: 1}).label[0, 0, 0] == 1  # folded on request
    with pytest.raises(CaseError, match=r"\[case_00003\].*label value 3 outside the label set \[0, 1, 2\] "
                                        r"\(a KiTS21/23 cyst in data read as KiTS19: pass --dataset kits23"):
        load_case(d21, label_map=LABEL_MAPS["kits19"])


def _rewrite(path: Path, arr=None, affine=None, dtype=None):
    img = nib.load(str(path))
    a = np.asanyarray(img.dataobj) if arr is None else arr
    save_nifti_atomic(a, img.affine if affine is None else affine, path, dtype=dtype or img.get_data_dtype())


@pytest.mark.parametrize("problem, pattern", [
    ("missing_imaging", r"\[case_00007\] missing imaging.nii.gz"),
    ("truncated_gzip", r"\[case_00007\] imaging.nii.gz: truncated gzip"),
    ("garbage_gzip", r"\[case_00007\] imaging.nii.gz: unreadable"),
    ("shape_mismatch", r"\[case_00007\] image/label shape mismatch: imaging.nii.gz \(6, 24, 20\) vs segmentation"),
    ("affine_mismatch", r"\[case_00007\] affine mismatch between imaging.nii.gz and segmentation.nii.gz"),
    ("label_outside", r"\[case_00007\] segmentation.nii.gz holds label value 5 outside the label set"),
    ("non_finite", r"\[case_00007\] imaging.nii.gz holds 2 non-finite voxels"),
    ("missing_label", r"\[case_00007\] missing ground truth"),
])
def test_bad_inputs_raise_one_clear_error(tmp_path, problem, pattern):
    d = write_tiny_case(tmp_path, "case_00007", image_dtype=np.float32 if problem == "non_finite" else np.int16)
    img_p, lab_p = d / "imaging.nii.gz", d / "segmentation.nii.gz"
    if problem == "missing_imaging":
        img_p.unlink()
    elif problem == "truncated_gzip":
        data = img_p.read_bytes()
        img_p.write_bytes(data[: len(data) // 2])
    elif problem == "garbage_gzip":
        data = bytearray(img_p.read_bytes())
        data[400:600] = os.urandom(200)
        img_p.write_bytes(bytes(data))
    elif problem == "shape_mismatch":
        _rewrite(lab_p, arr=np.zeros((6, 24, 21), np.uint8))
    elif problem == "affine_mismatch":
        _rewrite(lab_p, affine=kits_affine((3.0, 1.5, 1.6)))
    elif problem == "label_outside":
        lab = np.asanyarray(nib.load(str(lab_p)).dataobj).copy()
        lab[3, 3, 3] = 5
        _rewrite(lab_p, arr=lab)
    elif problem == "non_finite":
        img = np.asanyarray(nib.load(str(img_p)).dataobj).astype(np.float32)
        img[0, 0, 0], img[1, 1, 1] = np.nan, np.inf
        _rewrite(img_p, arr=img, dtype=np.float32)
    elif problem == "missing_label":
        lab_p.unlink()
    with pytest.raises(CaseError, match=pattern) as info:
        load_case(d, require_label=True)
    assert info.value.case_id == "case_00007"


def test_empty_and_missing_directories(tmp_path):
    with pytest.raises(ValueError, match="no case folders"):
        list_cases(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_cases(tmp_path / "nope")


def test_one_layout_for_every_stage(tmp_path):
    """The KiTS names live in hpc_dfs.contracts.kits; kits_io, inference and the prediction contract use them."""
    from hpc_dfs.contracts import kits as layout
    from hpc_dfs.data import kits_io
    from hpc_dfs.contracts import prediction
    from hpc_dfs.inference import cases as predict

    assert kits_io.CASE_RE is layout.CASE_RE is predict.CASE_RE
    assert kits_io.IMAGE_NAME is layout.IMAGE_NAME is predict.IMAGE_NAME == "imaging.nii.gz"
    assert kits_io.LABEL_FILES[0] == layout.LABEL_NAME == "segmentation.nii.gz"
    assert prediction.PRED_RE is layout.PRED_RE
    assert layout.CASE_RE.match("case_00012").group(1) == "00012"
    for bad in ("case_12", "case_000123", "case_0001a", "xcase_00012"):
        assert not layout.CASE_RE.match(bad), bad
    assert layout.prediction_name("case_00012") == "prediction_00012.nii.gz"
    assert layout.prediction_name("scan7") == "prediction_scan7.nii.gz"
    assert prediction.case_id_of(layout.prediction_name("case_00012")) == "case_00012"
    assert prediction.case_id_of("prediction_12.nii.gz") is None
    assert predict.CaseInput("case_00012", tmp_path).suffix == "00012"
    for name in ("case_00003", "case_3", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "imaging.nii.gz").write_bytes(b"")
    assert [c.name for c in list_cases(tmp_path)] == ["case_00003"]
    assert [c.case_id for c in predict.discover_inputs(tmp_path)[0]] == ["case_00003"]


def test_data_errors_share_the_one_base():
    from hpc_dfs.data.kits_clinical import ClinicalRecordError
    from hpc_dfs.data.uci_ckd import UCICKDError
    from hpc_dfs.errors import EXIT_DATA, HpcDfsError

    err = CaseError("case_00007", "truncated gzip")
    assert isinstance(err, HpcDfsError) and err.code == EXIT_DATA and str(err) == "[case_00007] truncated gzip"
    clin = ClinicalRecordError("case_00007", "malformed clinical value age=-1")
    assert isinstance(clin, HpcDfsError) and isinstance(clin, ValueError) and clin.code == EXIT_DATA
    assert str(clin) == "[case_00007] malformed clinical value age=-1"
    uci = UCICKDError("x.arff: no @data section")
    assert isinstance(uci, HpcDfsError) and isinstance(uci, ValueError) and uci.code == EXIT_DATA


def test_save_nifti_atomic_leaves_no_temp_files(tmp_path):
    p = save_nifti_atomic(np.ones((2, 3, 4), np.float32), kits_affine((1, 1, 1)), tmp_path / "x.nii.gz")
    assert p.exists() and nib.load(str(p)).shape == (2, 3, 4)
    assert [f.name for f in tmp_path.iterdir()] == ["x.nii.gz"]


def test_real_kits19_label_header(kits19_dir):
    shape, zooms, affine = read_header(kits19_dir / "labels" / "case_00004" / "segmentation.nii.gz", "case_00004")
    assert shape == (64, 512, 512)
    assert nib.aff2axcodes(affine) == ("I", "P", "L")
    assert zooms[0] == pytest.approx(4.0)
