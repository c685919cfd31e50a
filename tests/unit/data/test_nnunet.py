"""nnU-Net v2 raw datasets read as they are: preprocess of an exported dataset gives the shards of its KiTS-layout
source, slice for slice; dataset.json's labels (plain or KiTS23's regions) map to ours; a second channel or an
unknown label is one error naming the file; predict finds imagesTs.

Data: CT rendered around real KiTS23 labels with cysts, cut small (``tests/unit/stages/test_export_nnunet.py``).
"""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from hpc_dfs.cli import main as cli
from hpc_dfs.config.data import PreprocessConfig
from hpc_dfs.data.nnunet import NnunetDatasetError, read_raw_dataset
from hpc_dfs.inference.cases import discover_inputs
from hpc_dfs.stages.preprocess import run_preprocess
from tests.unit.stages.test_export_nnunet import kits23_like

CFG = PreprocessConfig(slice_size=[32, 32], n_folds=2, fg_samples_per_case=200, clinical="none")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(KiTS-layout data, the nnU-Net dataset export-nnunet made of it)."""
    root = tmp_path_factory.mktemp("nnunet")
    data = kits23_like(root / "data")
    out = root / "raw" / "Dataset220_KiTS23tiny"
    assert cli(["export-nnunet", "--data", str(data), "--out", str(out)]) == 0
    return data, out


def _slices(shards, group=""):
    m = json.loads((shards / "manifest.json").read_text())
    out = {}
    for c in m["cases"]:
        with h5py.File(shards / c["shard"], "r") as f:
            g = f[c["case_id"]][group] if group else f[c["case_id"]]
            out[c["case_id"]] = (g["image"][:], g["label"][:])
    return m, out


def test_preprocess_of_the_nnunet_export_equals_that_of_the_kits_layout(exported, tmp_path):
    data, raw = exported
    import dataclasses
    # synth without KiTS23 records writes kits.json, which reads as KiTS19: the layout is named here
    assert run_preprocess(data, tmp_path / "kits", dataclasses.replace(CFG, dataset="kits23")) == 0
    assert run_preprocess(raw, tmp_path / "nnunet", CFG) == 0
    m_kits, kits = _slices(tmp_path / "kits")
    m_nn, nn = _slices(tmp_path / "nnunet")
    assert m_nn["preprocessing"] == m_kits["preprocessing"]
    assert m_nn["preprocessing"]["classes"] == ["background", "kidney", "tumor", "cyst"]
    assert sorted(nn) == sorted(kits) == ["case_00402", "case_00403"]
    for cid in kits:
        assert np.array_equal(nn[cid][0], kits[cid][0]) and np.array_equal(nn[cid][1], kits[cid][1])
        assert (kits[cid][1] == 3).any()   # the cyst is in the shards, as class 3
    _, kits_r = _slices(tmp_path / "kits", "refine")
    _, nn_r = _slices(tmp_path / "nnunet", "refine")
    assert all(np.array_equal(nn_r[c][1], kits_r[c][1]) for c in kits_r)


def _with_dataset_json(src, dst, **changes):
    shutil.copytree(src, dst)
    doc = json.loads((dst / "dataset.json").read_text())
    doc.update(changes)
    (dst / "dataset.json").write_text(json.dumps(doc))
    return dst


def test_plain_labels_map_by_name(exported, tmp_path):
    _, raw = exported
    plain = _with_dataset_json(raw, tmp_path / "Dataset221_plain", labels={
        "background": 0, "kidney": 1, "tumour": 2, "cyst": 3})
    doc = json.loads((plain / "dataset.json").read_text())
    doc.pop("regions_class_order", None)   # plain labels need no order
    (plain / "dataset.json").write_text(json.dumps(doc))
    ds = read_raw_dataset(plain)
    assert ds.label_map == {0: 0, 1: 1, 2: 2, 3: 3} and ds.dataset == "kits23"
    assert [p.name for p in ds.cases] == ["case_00402_0000.nii.gz", "case_00403_0000.nii.gz"]
    assert read_raw_dataset(raw).label_map == {0: 0, 1: 1, 2: 2, 3: 3}   # KiTS23's regions


@pytest.mark.parametrize("changes, pattern", [
    ({"channel_names": {"0": "CT", "1": "PET"}}, r"dataset\.json: channel_names .* one channel \(CT\), this "
                                                 r"dataset has 2 channels"),
    ({"labels": {"background": 0, "kidney": 1, "liver": 2}}, r"dataset\.json: label 'liver': 2 is not one of ours"),
    ({"labels": {"background": 0, "kidney": [1, 2], "tumor": 2}}, r"dataset\.json: region labels .* are not "
                                                                  r"KiTS23's"),
])
def test_bad_dataset_json_is_one_error_naming_the_file(exported, tmp_path, changes, pattern):
    _, raw = exported
    bad = _with_dataset_json(raw, tmp_path / "Dataset222_bad", **changes)
    with pytest.raises(NnunetDatasetError, match=pattern):
        read_raw_dataset(bad)
    assert cli(["preprocess", "--data", str(bad), "--out", str(tmp_path / "s"), "--slice-size", "32,32",
                "--clinical", "none"]) == 3


def test_a_second_channel_file_is_an_error_naming_it(exported, tmp_path):
    _, raw = exported
    two = _with_dataset_json(raw, tmp_path / "Dataset223_two")
    shutil.copy(two / "imagesTr" / "case_00402_0000.nii.gz", two / "imagesTr" / "case_00402_0001.nii.gz")
    with pytest.raises(NnunetDatasetError, match=r"case_00402_0001\.nii\.gz: case case_00402 has channel files"):
        read_raw_dataset(two)


def test_predict_reads_imagests_else_imagestr(exported, tmp_path):
    _, raw = exported
    ds = _with_dataset_json(raw, tmp_path / "Dataset224_ts")
    cases, root = discover_inputs(ds)
    assert [c.case_id for c in cases] == ["case_00402", "case_00403"] and root == ds
    (ds / "imagesTs").mkdir()
    shutil.copy(ds / "imagesTr" / "case_00403_0000.nii.gz", ds / "imagesTs" / "case_00403_0000.nii.gz")
    cases, _ = discover_inputs(ds)
    assert [(c.case_id, c.image_path.parent.name) for c in cases] == [("case_00403", "imagesTs")]
