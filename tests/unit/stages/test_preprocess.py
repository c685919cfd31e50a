"""Preprocessing: the slice transform and its exact inverse, shards + manifest contract, resume, bad inputs."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from hpc_dfs.cli import main as cli_main
from hpc_dfs.config.data import PreprocessConfig
from hpc_dfs.data.kits_clinical import ClinicalPipeline
from hpc_dfs.data.geometry import prepare_image, prepare_label, resample_image, restore_labels, restore_volume
from hpc_dfs.data.kits_io import kits_affine
from hpc_dfs.data.shards import validate_shard
from hpc_dfs.stages.preprocess import PreprocessError, run_preprocess
from tests.launch import REPO, job_env
from tests.unit.data.test_kits_io import write_records, write_tiny_case

PARAMS = {"slice_size": [32, 32], "target_spacing": [None, None, None], "orientation": ["I", "P", "L"],
          "intensity": {"scheme": "ct", "clip": [-100.0, 300.0], "mean": 50.0, "std": 100.0}}


def _blob_label(shape, rng):
    lab = np.zeros(shape, np.uint8)
    n, h, w = shape
    zz, yy, xx = np.ogrid[:n, :h, :w]
    lab[((zz - n / 2) / (n / 3)) ** 2 + ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 < 1] = 1
    lab[((zz - n / 2) / (n / 5)) ** 2 + ((yy - h / 2) / (h / 8)) ** 2 + ((xx - w / 3) / (w / 8)) ** 2 < 1] = 2
    return lab


@pytest.mark.parametrize("affine, shape, target", [
    (kits_affine((3.0, 0.8, 0.8)), (12, 70, 90), [None, 2.0, 2.0]),      # KiTS orientation, shrink + pad
    (np.diag([0.7, 0.9, 2.5, 1.0]), (50, 40, 9), [None, None, None]),     # RAS array, 'fit', flips + permutation
    (kits_affine((2.0, 0.8, 0.8)), (10, 100, 30), [3.0, 1.0, 1.0]),       # z resampling, crop in y, pad in x
])
def test_restore_volume_inverts_geometry(affine, shape, target):
    rng = np.random.default_rng(0)
    params = dict(PARAMS, target_spacing=target)
    image = rng.normal(50, 80, shape).astype(np.float32)
    label = _blob_label(shape, rng)
    slices, geom = prepare_image(image, affine, params)
    labels = prepare_label(label, geom)
    assert slices.dtype == np.float32 and slices.shape[1:] == (32, 32) and labels.shape == slices.shape
    onehot = np.stack([(labels == c) for c in range(3)]).astype(np.float32)
    probs = restore_volume(onehot, geom)
    assert probs.shape == (3, *shape) and probs.dtype == np.float32  # exactly the input's shape
    back = probs.argmax(0)
    assert (back == label).mean() > 0.97
    assert np.array_equal(restore_labels(labels, geom).shape, shape)
    assert (restore_labels(labels, geom) == label).mean() > 0.97


def test_identity_geometry_is_exact():
    rng = np.random.default_rng(1)
    shape = (7, 32, 32)
    params = dict(PARAMS, target_spacing=[None, 0.8, 0.8])
    image = rng.normal(50, 80, shape)
    label = _blob_label(shape, rng)
    slices, geom = prepare_image(image, kits_affine((3.0, 0.8, 0.8)), params)
    # intensity: clip then z-score
    np.testing.assert_allclose(slices, (np.clip(image, -100, 300) - 50) / 100, atol=1e-5)
    labels = prepare_label(label, geom)
    assert np.array_equal(labels, label)
    onehot = np.stack([(labels == c) for c in range(3)]).astype(np.float32)
    assert np.array_equal(restore_volume(onehot, geom).argmax(0), label)
    assert np.array_equal(restore_labels(labels, geom), label)


def test_padding_reads_clip_floor():
    image = np.full((3, 10, 10), 200.0)
    slices, geom = prepare_image(image, kits_affine((3.0, 1.0, 1.0)), dict(PARAMS, target_spacing=[None, 1.0, 1.0]))
    assert slices[0, 0, 0] == pytest.approx((-100 - 50) / 100)  # padded border
    assert slices[0, 16, 16] == pytest.approx((200 - 50) / 100)
    probs = restore_volume(np.zeros((2, 3, 32, 32), np.float32), geom)
    assert probs.shape == (2, 3, 10, 10)


# ----------------------------------------------------------------------------- the stage
def make_dataset(root: Path, n: int = 4) -> Path:
    shapes = [(6, 24, 20), (8, 28, 28), (5, 20, 26), (7, 30, 24), (6, 22, 22), (9, 26, 20)]
    for i in range(n):
        write_tiny_case(root, f"case_{i:05d}", shape=shapes[i % len(shapes)],
                        spacing=(3.0, 1.2 + 0.1 * i, 1.2 + 0.1 * i), seed=i)
    write_records(root, [f"case_{i:05d}" for i in range(n)])
    return root


CFG = PreprocessConfig(slice_size=[32, 32], n_folds=2, fg_samples_per_case=200)


def _arrays(shards: Path) -> dict:
    out = {}
    for p in sorted(shards.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            def visit(name, obj, shard=p.name):  # every dataset, the stage-2 windows' refine/ group included
                if isinstance(obj, h5py.Dataset):
                    out[f"{shard}/{name}"] = obj[()]
            f.visititems(visit)
    return out


def test_manifest_and_shards_follow_the_contract(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    assert run_preprocess(data, out, CFG) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["n_folds"] == 2
    assert [c["case_id"] for c in m["cases"]] == [f"case_{i:05d}" for i in range(4)]
    assert m["shards"] == [f"shard-case_{i:05d}.h5" for i in range(4)]
    for c in m["cases"]:
        assert set(c) >= {"case_id", "shard", "n_slices", "fold", "risk_label", "n_voxels_in", "slices_with"}
        assert c["fold"] in (0, 1) and c["risk_label"] in (0, 1)
    pre = m["preprocessing"]
    assert pre["slice_size"] == [32, 32] and pre["classes"] == ["background", "kidney", "tumor"]
    assert pre["intensity"]["scheme"] == "ct" and len(pre["intensity"]["clip"]) == 2
    assert m["fingerprint"]["n_cases"] == 4 and "percentile_lo" in m["fingerprint"]["foreground"]
    pipe = ClinicalPipeline.from_json(out / m["clinical"]["pipeline_file"])
    assert m["clinical"]["n_features"] == pipe.n_features > 0
    with h5py.File(out / "shard-case_00001.h5", "r") as f:
        g = f["case_00001"]
        assert g["image"].shape == (8, 32, 32) and g["image"].dtype == np.float32
        assert g["label"].dtype == np.uint8 and g["classes_present"].shape == (8, 3)
        datasets = []
        g.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        assert {"refine/image", "refine/label", "refine/stack"} <= {name for name, _ in datasets}
        for name, ds in datasets:
            assert ds.fletcher32, name
        assert g["image"].chunks == (1, 32, 32) and g["image"].compression is None  # default: memory-mapped
        assert g["slice_checksums"].shape == (8, 2) and g.attrs["schema_version"] == 2
        assert g.attrs["case_id"] == "case_00001" and list(g.attrs["original_shape"]) == [8, 28, 28]
        assert len(json.loads(g.attrs["affine"])) == 4 and g.attrs["orientation"] == "IPL"
        assert len(g.attrs["source_sha256"]) == 64 and json.loads(g.attrs["preprocessing"]) == pre
        # the shard's clinical vector is what the stored pipeline gives for that record
        from hpc_dfs.data.kits_clinical import load_kits_records, preop_frame
        frame = preop_frame(load_kits_records(data / "kits.json"))
        np.testing.assert_array_equal(g["clinical"][()], pipe.transform(frame.loc[["case_00001"]])[0])
        assert int(g["classes_present"][()][:, 2].sum()) == m["cases"][1]["slices_with"]["tumor"]
    # labels in the shard equal the native label through the same geometry
    geom = json.loads(h5py.File(out / "shard-case_00000.h5", "r")["case_00000"].attrs["geometry"])
    native = np.asanyarray(nib.load(str(data / "case_00000" / "segmentation.nii.gz")).dataobj)
    assert np.array_equal(prepare_label(native, geom), _arrays(out)["shard-case_00000.h5/case_00000/label"])


def test_rerun_skips_valid_and_redoes_corrupt(tmp_path, caplog):
    data = make_dataset(tmp_path / "data", 3)
    out = tmp_path / "shards"
    assert run_preprocess(data, out, CFG) == 0
    first = _arrays(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    # flip bytes inside the image data of one shard: fletcher32 must catch it
    p = out / "shard-case_00001.h5"
    with h5py.File(p, "r") as f:
        offset = f["case_00001"]["image"].id.get_chunk_info(2).byte_offset
    raw = bytearray(p.read_bytes())
    raw[offset + 10:offset + 14] = bytes(b ^ 0xFF for b in raw[offset + 10:offset + 14])
    p.write_bytes(bytes(raw))
    ok, why = validate_shard(p)
    assert not ok and "case_00001" in why or "checksum" in why.lower() or "data" in why.lower()
    assert run_preprocess(data, out, CFG) == 0
    assert validate_shard(p)[0]
    again = _arrays(out)
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    new_mtimes = {q.name: q.stat().st_mtime_ns for q in out.glob("shard-*.h5")}
    assert new_mtimes["shard-case_00000.h5"] == mtimes["shard-case_00000.h5"]  # skipped, not rewritten
    assert new_mtimes["shard-case_00001.h5"] != mtimes["shard-case_00001.h5"]


def _break(case_dir: Path, problem: str) -> None:
    img_p, lab_p = case_dir / "imaging.nii.gz", case_dir / "segmentation.nii.gz"
    if problem == "missing_imaging":
        img_p.unlink()
    elif problem == "truncated":
        img_p.write_bytes(img_p.read_bytes()[:300])
    elif problem == "shape":
        lab = nib.load(str(lab_p))
        nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), lab.affine), str(lab_p))
    elif problem == "affine":
        lab = nib.load(str(lab_p))
        nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), kits_affine((3.0, 2.0, 2.0))), str(lab_p))
    elif problem == "labels":
        lab = nib.load(str(lab_p))
        a = np.asanyarray(lab.dataobj).copy()
        a[0, 0, 0] = 9
        nib.save(nib.Nifti1Image(a, lab.affine), str(lab_p))
    elif problem == "nan":
        img = nib.load(str(img_p))
        a = np.asanyarray(img.dataobj).astype(np.float32)
        a[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(a, img.affine), str(img_p))


def test_bad_cases_are_reported_and_the_others_written(tmp_path, caplog):
    problems = ["missing_imaging", "truncated", "shape", "affine", "labels", "nan"]
    data = make_dataset(tmp_path / "data", 2 + len(problems) + 2)
    ids = [f"case_{i:05d}" for i in range(2 + len(problems) + 2)]
    for cid, prob in zip(ids[2:], problems):
        _break(data / cid, prob)
    recs = json.loads((data / "kits.json").read_text())
    recs = [r for r in recs if r["case_id"] != ids[-2]]          # clinical record missing
    for r in recs:
        if r["case_id"] == ids[-1]:
            r["age_at_nephrectomy"] = "sixty"                     # malformed clinical value
    (data / "kits.json").write_text(json.dumps(recs))
    out = tmp_path / "shards"
    assert run_preprocess(data, out, CFG) == 1
    m = json.loads((out / "manifest.json").read_text())
    assert [c["case_id"] for c in m["cases"]] == ids[:2]
    failed = {f["case_id"]: f["error"] for f in m["failed"]}
    expect = {ids[2]: "missing imaging.nii.gz", ids[3]: "truncated gzip", ids[4]: "shape mismatch",
              ids[5]: "affine mismatch", ids[6]: "label value 9 outside the label set", ids[7]: "non-finite voxels",
              ids[8]: "clinical record missing", ids[9]: "malformed clinical value age_at_nephrectomy='sixty'"}
    assert set(failed) == set(expect)
    for cid, phrase in expect.items():
        assert failed[cid].startswith(f"[{cid}]") and phrase in failed[cid], failed[cid]
        assert not (out / f"shard-{cid}.h5").exists()  # nothing written for a bad case
    assert "8 case(s) failed" in caplog.text


def test_fail_fast_stops_at_first(tmp_path):
    data = make_dataset(tmp_path / "data", 3)
    _break(data / "case_00000", "truncated")
    out = tmp_path / "shards"
    assert run_preprocess(data, out, CFG, fail_fast=True) == 1
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("shard-*.h5"))


def test_empty_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match="no case folders") as err:
        run_preprocess(tmp_path / "empty", tmp_path / "out", CFG)
    assert err.value.code == 2
    # the verb: one error line, exit status 2, nothing written
    assert cli_main(["preprocess", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "hpc-dfs preprocess: error: no case folders" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, make, phrase", [
    ("--data", None, "--data {}: no such folder"),
    ("--data", "file", "--data {}: not a folder"),
    ("--out", "file", "--out {}: not a folder"),
])
def test_bad_path_arguments_exit_2(tmp_path, capsys, flag, make, phrase):
    data = make_dataset(tmp_path / "data", 1)
    bad = tmp_path / "bad"
    if make == "file":
        bad.write_text("x")
    args = {"--data": str(data), "--out": str(tmp_path / "out"), flag: str(bad)}
    assert cli_main(["preprocess", *[v for kv in args.items() for v in kv], "--slice-size", "32,32"]) == 2
    assert f"hpc-dfs preprocess: error: {phrase.format(bad)}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_no_clinical_records_is_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    (data / "kits.json").unlink()
    with pytest.raises(PreprocessError, match="no clinical records in .*--clinical none") as err:
        run_preprocess(data, tmp_path / "out", CFG)
    assert err.value.code == 2
    assert run_preprocess(data, tmp_path / "out", dataclasses.replace(CFG, clinical="none")) == 0


def test_decoding_twice_equals_the_cached_pass(tmp_path, monkeypatch):
    """cache_mb=0: every case is loaded and resampled again for writing; the shards are the same, byte for byte
    in every array and attribute."""
    import hpc_dfs.data.preprocess_passes as stage

    loads = []
    real = stage.load_item

    def counting(case_dir, *args, **kwargs):
        loads.append(case_dir.name)
        return real(case_dir, *args, **kwargs)

    monkeypatch.setattr(stage, "load_item", counting)
    data = make_dataset(tmp_path / "data", 3)
    assert run_preprocess(data, tmp_path / "cached", CFG) == 0
    assert sorted(loads) == ["case_00000", "case_00001", "case_00002"]  # decoded once each
    assert run_preprocess(data, tmp_path / "twice", dataclasses.replace(CFG, cache_mb=0)) == 0
    assert sorted(loads[3:]) == sorted(["case_00000", "case_00001", "case_00002"] * 2)  # twice each
    a, b = _arrays(tmp_path / "cached"), _arrays(tmp_path / "twice")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for cid in ("case_00000", "case_00002"):
        assert _attrs(tmp_path / "cached", cid) == _attrs(tmp_path / "twice", cid)


def _attrs(shards: Path, cid: str) -> dict:
    with h5py.File(shards / f"shard-{cid}.h5", "r") as f:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f[cid].attrs.items()}


def test_load_item_is_the_transform_of_the_native_case(tmp_path):
    from hpc_dfs.data.fingerprint import case_part
    from hpc_dfs.data.kits_io import LABEL_MAPS, load_case
    from hpc_dfs.data.plan import load_item

    data = make_dataset(tmp_path / "data", 2)
    spatial = {"slice_size": [32, 32], "target_spacing": [None, 1.0, 1.0], "orientation": ["I", "P", "L"]}
    item, part = load_item(data / "case_00001", LABEL_MAPS["kits19"], spatial,
                           sample=lambda case: case_part(case.case_id, case.image, case.label, (8, 28, 28),
                                                         (3.0, 1.3, 1.3), 50, 0))
    case = load_case(data / "case_00001", require_label=True)
    hu, geom = resample_image(case.image, case.affine, spatial)
    assert item.case_id == "case_00001" and item.geometry == geom and np.array_equal(item.hu, hu)
    assert np.array_equal(item.labels, prepare_label(case.label, geom)) and item.labels.shape == hu.shape
    assert item.original_shape == (8, 28, 28) and item.source_files == ["imaging.nii.gz", "segmentation.nii.gz"]
    assert item.nbytes == hu.nbytes + item.labels.nbytes
    assert part.case_id == "case_00001" and part.fg_samples.size == 50
    assert load_item(data / "case_00001", LABEL_MAPS["kits19"], spatial)[1] is None


def test_cli_help_shows_defaults():
    res = subprocess.run([sys.executable, "-m", "hpc_dfs", "preprocess", "--help"], capture_output=True, text=True,
                         cwd=REPO, env=job_env())
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "--slice-size" in text and "(default: 256,256)" in text and "--fail-fast" in text


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_nothing_invalid(tmp_path):
    """Kill preprocess with SIGKILL mid-run (several moments); what is left never reads as valid but isn't,
    and a rerun finishes with shards equal to an uninterrupted run."""
    data = make_dataset(tmp_path / "data", 6)
    clean = tmp_path / "clean"
    assert run_preprocess(data, clean, CFG) == 0
    reference = _arrays(clean)
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "hpc_dfs", "preprocess", "--data", str(data), "--out", str(out),
           "--slice-size", "32,32", "--n-folds", "2", "--fg-samples-per-case", "200"]
    killed = 0
    for delay in (0.5, 1.5, 2.5):
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob("shard-*.h5"))) >= 1 or list(out.glob(".tmp-*")):
                break
            time.sleep(0.02)
        time.sleep(delay * 0.1)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        for p in out.glob("shard-*.h5"):  # every shard under its final name is complete and verifies
            ok, why = validate_shard(p)
            assert ok, why
        if (out / "manifest.json").exists():
            for c in json.loads((out / "manifest.json").read_text())["cases"]:
                assert validate_shard(out / c["shard"], c["case_id"])[0]
    assert killed >= 1  # at least one run really was killed mid-way
    assert run_preprocess(data, out, CFG) == 0
    assert not list(out.glob(".tmp-*"))
    again = _arrays(out)
    assert again.keys() == reference.keys()
    assert all(np.array_equal(again[k], reference[k]) for k in reference)
