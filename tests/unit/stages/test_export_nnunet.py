"""``hpc-dfs export-nnunet``: nnU-Net v2 raw datasets from KiTS19- and KiTS23-like data.

Data: KiTS19-like phantoms (``synth``), and KiTS23-like cases rendered by ``synth --from-labels`` around real
KiTS23 label maps with cysts (``../shared/data/kits23/labels``) cut to a few slices around their cysts. The
folds come from a real ``preprocess`` run. The slow test runs the real nnU-Net v2 (``nnunetv2==2.8.1`` in
``bench/.venv-nnunet``, made by ``bench/nnunet_venv.sh``): ``nnUNetv2_plan_and_preprocess
--verify_dataset_integrity`` must accept both exports and write its plans.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_dfs.cli import main as cli
from hpc_dfs.config.data import PreprocessConfig, SynthConfig
from hpc_dfs.data.nnunet import NnunetExportError, plan_export, write_export
from hpc_dfs.stages.export_nnunet import run as export
from hpc_dfs.stages.preprocess import run_preprocess
from hpc_dfs.stages.synth import run_synth
from tests.conftest import missing_shared

REPO = Path(__file__).resolve().parents[3]
KITS23_LABELS = REPO / ".." / "shared" / "data" / "kits23" / "labels"
PEER = REPO / "bench" / ".venv-nnunet" / "bin"


# ----------------------------------------------------------------------------- data
def kits19_like(root: Path, n: int = 4, seed: int = 2) -> Path:
    """Small phantoms (labels 0-2, KiTS19 schema)."""
    assert run_synth(root, SynthConfig(cases=str(n), seed=seed, size=48, min_slices=6, max_slices=8)) == 0
    return root


def kits23_like(root: Path, cases=("case_00402", "case_00403"), kits_json: Path | None = None) -> Path:
    """CT rendered around real KiTS23 labels with cysts, cut to the cysts' slices and the kidneys in-plane; with
    ``kits_json`` (the real kits23.json) the cases' records are attached and the layout is KiTS23's."""
    import nibabel as nib

    labels = root.parent / (root.name + "_labels")
    for cid in cases:
        src = KITS23_LABELS / cid / "segmentation.nii.gz"
        if not src.is_file():
            missing_shared(f"real KiTS23 labels not available ({src} is absent; see ../shared/data/kits23/SOURCE.md)")
        img = nib.load(str(src))
        lab = np.asarray(img.dataobj)
        zc = np.flatnonzero((lab == 3).any(axis=(1, 2)))
        z0, z1 = max(int(zc[0]) - 2, 0), min(int(zc[-1]) + 3, lab.shape[0])
        _, yy, xx = np.nonzero(lab[z0:z1] > 0)
        lo = [z0, max(int(yy.min()) - 8, 0), max(int(xx.min()) - 8, 0)]
        hi = [z1, int(yy.max()) + 9, int(xx.max()) + 9]
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ np.array(lo) + img.affine[:3, 3]
        out = labels / cid / "segmentation.nii.gz"
        out.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), affine), str(out))
    cfg = SynthConfig(cases=",".join(cases), seed=1, from_labels=str(labels),
                      kits_json=str(kits_json) if kits_json else None)
    assert run_synth(root, cfg) == 0
    return root


# ----------------------------------------------------------------------------- fast checks
def test_kits19_export_with_our_folds(tmp_path):
    data = kits19_like(tmp_path / "kits19")
    shards = tmp_path / "shards"
    assert run_preprocess(data, shards, PreprocessConfig(slice_size=[32, 32], n_folds=2, fg_samples_per_case=200)) == 0
    out = tmp_path / "raw" / "Dataset064_KiTS19like"
    assert cli(["export-nnunet", "--data", str(data), "--out", str(out), "--shards", str(shards)]) == 0
    ids = [f"case_{i:05d}" for i in range(4)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in ids]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in ids]
    for c in ids:  # byte for byte
        assert (out / "imagesTr" / f"{c}_0000.nii.gz").read_bytes() == (data / c / "imaging.nii.gz").read_bytes()
        assert (out / "labelsTr" / f"{c}.nii.gz").read_bytes() == (data / c / "segmentation.nii.gz").read_bytes()
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "kidney": 1, "tumor": 2} and "regions_class_order" not in ds
    assert ds["channel_names"] == {"0": "CT"} and ds["numTraining"] == 4 and ds["file_ending"] == ".nii.gz"
    manifest = json.loads((shards / "manifest.json").read_text())
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == manifest["n_folds"] == 2
    for f, s in enumerate(splits):
        assert s["val"] == sorted(c["case_id"] for c in manifest["cases"] if c["fold"] == f)
        assert sorted(s["train"] + s["val"]) == ids
    assert not list(out.rglob(".tmp-*"))
    # a rerun keeps everything; another dataset in the same folder is refused before anything is written
    assert export(data, out, shards)["kept"] == 8
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for other, why in ((kits19_like(tmp_path / "other", seed=9), "differs from"),  # same ids, other images
                       (kits19_like(tmp_path / "fewer", n=2), "is not part of this export")):  # a subset
        with pytest.raises(NnunetExportError, match=why) as e:
            plan_export(other, out)
        assert e.value.code == 2 and "holds another dataset" in str(e.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_kits23_export_has_the_regions(tmp_path):
    data = kits23_like(tmp_path / "kits23")
    out = tmp_path / "raw" / "Dataset220_KiTS23like"
    plan = plan_export(data, out)
    assert plan.kits23
    write_export(plan)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert ds["regions_class_order"] == [1, 3, 2] and ds["numTraining"] == 2
    assert ds["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    with pytest.raises(NnunetExportError, match=r"\[case_00402\] holds label 3"):
        plan_export(data, tmp_path / "raw" / "Dataset221_Forced", labels="kits19")


def _tiny(root: Path, cid: str, lab: np.ndarray, with_label: bool = True) -> None:
    from hpc_dfs.data.kits_io import kits_affine, save_nifti_atomic
    save_nifti_atomic(np.zeros(lab.shape, np.int16), kits_affine((3.0, 1.0, 1.0)), root / cid / "imaging.nii.gz")
    if with_label:
        save_nifti_atomic(lab, kits_affine((3.0, 1.0, 1.0)), root / cid / "segmentation.nii.gz")


@pytest.mark.parametrize("what, message, code", [
    ("name", "must be named DatasetNNN_NAME", 2),
    ("label5", r"\[case_00001\] .*segmentation.nii.gz: label value 5 outside 0-3", 3),
    ("nolabel", r"\[case_00001\] no ground truth in", 3),
])
def test_errors_are_one_line_naming_the_case(tmp_path, capsys, what, message, code):
    lab = np.zeros((4, 8, 8), np.uint8)
    lab[1:3, 2:6, 2:6] = 1
    _tiny(tmp_path / "data", "case_00000", lab)
    bad = lab.copy()
    bad[2, 3, 3] = 5
    _tiny(tmp_path / "data", "case_00001", bad if what == "label5" else lab, with_label=what != "nolabel")
    out = tmp_path / ("raw/not_a_dataset" if what == "name" else "raw/Dataset001_T")
    assert cli(["export-nnunet", "--data", str(tmp_path / "data"), "--out", str(out)]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-dfs export-nnunet: error: "), lines
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- the real nnU-Net accepts them
def _peer_or_skip() -> Path:
    res = subprocess.run(["bash", str(REPO / "bench" / "nnunet_venv.sh")], capture_output=True, text=True,
                         timeout=1800)
    if res.returncode != 0 or not (PEER / "nnUNetv2_plan_and_preprocess").exists():
        msg = f"peer venv bench/.venv-nnunet could not be created: {(res.stdout + res.stderr)[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must be able to install it from the package registry)")
        pytest.skip(msg)
    return PEER


@pytest.mark.slow
def test_nnunet_plan_and_preprocess_accepts_the_exports(tmp_path):
    peer = _peer_or_skip()
    raw, pre, res = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results"
    export(kits23_like(tmp_path / "kits23"), raw / "Dataset220_KiTS23like")
    export(kits19_like(tmp_path / "kits19"), raw / "Dataset064_KiTS19like")
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "OMP_NUM_THREADS": "1"}
    for did, name in (("220", "Dataset220_KiTS23like"), ("064", "Dataset064_KiTS19like")):
        t0 = time.perf_counter()
        run = subprocess.run([str(peer / "nnUNetv2_plan_and_preprocess"), "-d", did, "-c", "2d", "-np", "1",
                              "-npfp", "1", "--verify_dataset_integrity"], env=env, capture_output=True, text=True,
                             timeout=900)
        wall = time.perf_counter() - t0
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        plans = json.loads((pre / name / "nnUNetPlans.json").read_text())
        assert "2d" in plans["configurations"]
        assert sorted(p.name for p in (pre / name / "gt_segmentations").iterdir()) == \
            sorted(p.name for p in (raw / name / "labelsTr").iterdir())
        print(f"nnUNetv2_plan_and_preprocess -d {did} -c 2d --verify_dataset_integrity: ok in {wall:.1f} s")
    probe = ("import json, sys\n"
             "from nnunetv2.utilities.label_handling.label_handling import LabelManager\n"
             "d = json.load(open(sys.argv[1]))\n"
             "lm = LabelManager(d['labels'], d.get('regions_class_order'))\n"
             "regions = [sorted(int(i) for i in (r if isinstance(r, (tuple, list)) else [r])) for r in "
             "lm.foreground_regions]\n"
             "print(json.dumps([lm.has_regions, regions]))\n")
    check = subprocess.run([str(peer / "python"), "-c", probe, str(pre / "Dataset220_KiTS23like" / "dataset.json")],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    has_regions, regions = json.loads(check.stdout.strip().splitlines()[-1])
    assert has_regions and regions == [[1, 2, 3], [2, 3], [2]]
