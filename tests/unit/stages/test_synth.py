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




# ----------------------------------------------------------------------------- styles (domain randomisation)
def test_default_style_renders_as_before_styles_existed():
    """Voxels of one small phantom recorded before render_ct was split into a painter and looks (+-1 HU)."""
    from hpc_dfs.data.synth import phantom_case

    ct, _, _, _ = phantom_case(1, SynthConfig(seed=5, size=48, min_slices=6, max_slices=8), 5)
    assert ct.shape == (7, 48, 48)
    idx = [13718, 10272, 8243, 4351, 4964, 660, 1213, 266, 2826, 13116, 10473, 14720, 8122, 9783, 15656, 11765,
           10197, 8767, 9030, 15080, 4473, 13158, 10819, 44]
    before = [-933, -921, 116, -940, -869, -33, 99, -926, -925, -71, 18, 94, 75, -914, -899, -950, 131, -944, -882, 9,
              -916, -915, -14, -954]
    assert np.abs(ct.reshape(-1)[idx].astype(int) - before).max() <= 1
    assert abs(int(ct.astype(np.int64).sum()) - (-8882927)) <= 200


def _styled(style: str, k: int, size: int = 64):
    from hpc_dfs.data.synth import phantom_case

    return phantom_case(k, SynthConfig(seed=3, size=size, min_slices=8, max_slices=10, style=style), 3)


@pytest.mark.parametrize("style", ["random", "streak"])
def test_styles_are_deterministic_and_change_only_the_look(style):
    ct, lab, aff, rec = _styled(style, 2)
    ct2, lab2, _, _ = _styled(style, 2)
    assert np.array_equal(ct, ct2) and np.array_equal(lab, lab2)
    ct_d, lab_d, aff_d, rec_d = _styled("default", 2)
    assert np.array_equal(lab, lab_d) and np.array_equal(aff, aff_d) and rec == rec_d  # same case, other look
    assert ct.dtype == np.int16 and ct.shape == ct_d.shape and not np.array_equal(ct, ct_d)
    assert np.abs(ct.astype(float) - ct_d).mean() > 10


def test_random_style_draws_each_structure_per_case():
    """Kidney intensity is not one fixed value across cases, yet tumour and kidney stay apart within a case."""
    kidney, gap = [], []
    for k in range(8):
        ct, lab, _, _ = _styled("random", k, size=48)
        hu = ct.astype(float)
        kidney.append(hu[lab == 1].mean())
        gap.append(abs(hu[lab == 2].mean() - hu[lab == 1].mean()))
    default = [_styled("default", k, size=48) for k in range(8)]
    spread_default = np.std([c.astype(float)[lab == 1].mean() for c, lab, _, _ in default])
    assert np.std(kidney) > 100 and np.std(kidney) > 2 * spread_default
    assert np.median(gap) > 30


def test_random_look_keeps_its_contrast_constraints():
    from hpc_dfs.data.synth_looks import MIN_CONTRAST, RandomLook

    for k in range(40):
        look = RandomLook(np.random.default_rng([1, k]), 10)
        m = look.mean
        assert abs(m["tumour"] - m["cortex"]) >= MIN_CONTRAST and abs(m["tumour"] - m["medulla"]) >= MIN_CONTRAST
        around = ["perirenal"] if look.has_rim else ["mesentery", "psoas", "liver", "spleen", "muscle"]
        assert all(abs(m["cortex"] - m[t]) >= MIN_CONTRAST for t in around)


def test_streak_style_has_no_fat_rim():
    """The held-out look paints no perirenal fat: fat is not commoner next to the kidney than a little further out."""
    from scipy import ndimage

    excess = {}
    for style in ("default", "streak"):
        diffs = []
        for k in range(5):
            ct, lab, _, _ = _styled(style, k, size=96)
            d = ndimage.distance_transform_edt(lab == 0, sampling=(1e3, 1, 1))  # in-plane pixels to the kidney
            fat = (ct > -160) & (ct < -40)
            diffs.append(fat[(d > 0) & (d <= 2)].mean() - fat[(d > 5) & (d <= 8)].mean())
        excess[style] = float(np.mean(diffs))
    assert excess["default"] > 0.15 and excess["streak"] < 0.05, excess


def test_style_is_a_synth_setting(tmp_path):
    from hpc_dfs.config import ConfigError, load

    with pytest.raises(ConfigError, match="style"):
        load(SynthConfig, overrides=["style=photoreal"])
    cfg = load(SynthConfig, overrides=["style=random", "cases=1", "size=48", "min_slices=6", "max_slices=6"])
    assert run_synth(tmp_path / "r", cfg) == 0
    assert run_synth(tmp_path / "d", SynthConfig(cases="1", size=48, min_slices=6, max_slices=6)) == 0
    name = "case_00000/segmentation.nii.gz"
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "r" / name)).dataobj),
                          np.asanyarray(nib.load(str(tmp_path / "d" / name)).dataobj))
    img = [np.asanyarray(nib.load(str(tmp_path / d / "case_00000/imaging.nii.gz")).dataobj) for d in ("r", "d")]
    assert not np.array_equal(*img)


def test_synth_help_states_the_tumour_contrast_that_the_generator_draws():
    """The table in ``hpc-dfs synth --help`` is the default look's own arithmetic (it cannot drift from the code)."""
    import re

    from hpc_dfs.data.synth_looks import PHASES, TUMOUR_HU, tumour_contrast_hu
    from hpc_dfs.stages import synth as stage
    doc = stage.__doc__
    names = {"non-contrast": "noncontrast", "corticomedullary": "corticomedullary", "nephrographic": "nephrographic",
             "excretory": "excretory"}
    for shown, phase in names.items():
        row = re.search(rf"^\s+{shown}\s+((?:[+-]\d+\s*)+)$", doc, re.M)
        assert row, shown
        values = [int(v) for v in row.group(1).split()]
        assert values == [round(tumour_contrast_hu(phase, s)) for s in TUMOUR_HU], (shown, values)
    assert set(names.values()) == set(PHASES)
