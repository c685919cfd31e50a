"""Synthetic KiTS generator: exact layout, determinism, resumability, signal in the records, from-labels mode."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from hpc_dfs.cli import main as cli_main
from hpc_dfs.config import ConfigError
from hpc_dfs.config.data import SynthConfig
from hpc_dfs.data.kits_io import list_cases, load_case
from hpc_dfs.data.synth import phantom_record
from hpc_dfs.stages.synth import run_synth

SMALL = SynthConfig(cases="2", seed=5, size=48, min_slices=6, max_slices=8)


def test_phantoms_have_the_kits_layout(tmp_path):
    assert run_synth(tmp_path, SMALL) == 0
    cases = list_cases(tmp_path)
    assert [c.name for c in cases] == ["case_00000", "case_00001"]
    for c in cases:
        assert sorted(p.name for p in c.iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
        img = nib.load(str(c / "imaging.nii.gz"))
        assert img.get_data_dtype() == np.int16 and img.shape[1:] == (48, 48) and 6 <= img.shape[0] <= 8
        assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
        zooms = img.header.get_zooms()
        assert zooms[0] != zooms[1] and zooms[1] == zooms[2]  # anisotropic: slice spacing differs
        case = load_case(c, require_label=True)
        assert set(np.unique(case.label)) == {0, 1, 2}
        hu = case.image.astype(float)
        assert hu.min() < -900 and hu[case.label == 1].mean() > hu[(case.label == 0) & (hu > -500)].mean()
    recs = json.loads((tmp_path / "kits.json").read_text())
    assert [r["case_id"] for r in recs] == ["case_00000", "case_00001"]
    assert {"age_at_nephrectomy", "radiographic_size", "malignant", "comorbidities", "voxel_spacing"} <= set(recs[0])


def test_deterministic_and_resumable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_synth(a, SMALL) == 0
    assert run_synth(b, SMALL) == 0
    for name in ("case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz"):
        assert np.array_equal(np.asanyarray(nib.load(str(a / name)).dataobj),
                              np.asanyarray(nib.load(str(b / name)).dataobj))
    assert (a / "kits.json").read_text() == (b / "kits.json").read_text()
    before = (a / "case_00000" / "imaging.nii.gz").stat().st_mtime_ns
    (a / "case_00001" / "imaging.nii.gz").unlink()  # as if killed before the image was renamed in
    assert run_synth(a, SynthConfig(cases="3", seed=5, size=48, min_slices=6, max_slices=8)) == 0
    assert (a / "case_00000" / "imaging.nii.gz").stat().st_mtime_ns == before  # kept
    assert np.array_equal(np.asanyarray(nib.load(str(a / "case_00001/imaging.nii.gz")).dataobj),
                          np.asanyarray(nib.load(str(b / "case_00001/imaging.nii.gz")).dataobj))
    assert len(json.loads((a / "kits.json").read_text())) == 3
    assert not list(a.rglob(".tmp-*"))


def test_records_carry_signal_about_malignancy():
    from sklearn.metrics import roc_auc_score
    recs = [phantom_record(f"case_{i:05d}", np.random.default_rng([0, i])) for i in range(600)]
    y = np.array([r["malignant"] for r in recs], dtype=float)
    assert 0.6 < y.mean() < 0.95  # mostly malignant, as in KiTS, but both classes present
    size = np.array([r["radiographic_size"] for r in recs])
    age = np.array([r["age_at_nephrectomy"] for r in recs])
    assert roc_auc_score(y, size) > 0.7
    assert roc_auc_score(y, age) > 0.52


@pytest.mark.slow
def test_from_real_labels(tmp_path, kits19_dir):
    cfg = SynthConfig(cases="case_00004", from_labels=str(kits19_dir / "labels"),
                      kits_json=str(kits19_dir / "kits.json"))
    assert run_synth(tmp_path, cfg) == 0
    src = kits19_dir / "labels" / "case_00004" / "segmentation.nii.gz"
    assert (tmp_path / "case_00004" / "segmentation.nii.gz").read_bytes() == src.read_bytes()  # the real file
    img = nib.load(str(tmp_path / "case_00004" / "imaging.nii.gz"))
    seg = nib.load(str(src))
    assert img.shape == seg.shape == (64, 512, 512)
    np.testing.assert_allclose(img.affine, seg.affine, atol=1e-5)
    ct = np.asanyarray(img.dataobj).astype(float)
    lab = np.asanyarray(seg.dataobj)
    assert ct[lab == 1].mean() > ct[lab == 0].mean() + 50  # enhanced kidney stands out
    recs = json.loads((tmp_path / "kits.json").read_text())
    real = {r["case_id"]: r for r in json.loads((kits19_dir / "kits.json").read_text())}
    assert recs == [real["case_00004"]]


def test_from_labels_unknown_case_is_an_error(tmp_path, kits19_dir, capsys):
    cfg = SynthConfig(cases="case_99999", from_labels=str(kits19_dir / "labels"))
    with pytest.raises(ConfigError, match="no label map for case_99999") as err:
        run_synth(tmp_path, cfg)
    assert err.value.code == 2
    # through the CLI: one error line naming the case, exit status 2
    assert cli_main(["synth", "--out", str(tmp_path), "--cases", "case_99999",
                     "--from-labels", str(kits19_dir / "labels")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[-1].startswith("hpc-dfs synth: error: --from-labels") and "case_99999" in err_lines[-1]
    assert not (tmp_path / "kits.json").exists()


@pytest.mark.parametrize("problem, phrase", [("no_folder", "no such folder"), ("no_labels", "no case_XXXXX/"),
                                             ("bad_json", "--kits-json")])
def test_from_labels_bad_arguments_are_config_errors(tmp_path, problem, phrase):
    labels = tmp_path / "labels"
    kits_json = None
    if problem != "no_folder":
        (labels / "case_00000").mkdir(parents=True)
    if problem == "bad_json":
        (labels / "case_00000" / "segmentation.nii.gz").write_bytes(b"")
        kits_json = tmp_path / "kits.json"
        kits_json.write_text("{not json")
    cfg = SynthConfig(cases="1", from_labels=str(labels), kits_json=None if kits_json is None else str(kits_json))
    with pytest.raises(ConfigError, match=phrase) as err:
        run_synth(tmp_path / "out", cfg)
    assert err.value.code == 2 and not (tmp_path / "out").exists()
