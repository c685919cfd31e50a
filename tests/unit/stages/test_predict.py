"""``hpc-dfs predict`` on cases made by ``hpc-dfs synth``, with checkpoints of real (randomly initialised) models.

The checkpoints are built here, not by ``hpc-dfs train`` (kept out of unit tests for time): a real
``build_model`` network, the real ``preprocessing`` block and clinical pipeline from a real
``hpc-dfs preprocess`` run, saved with ``torch.save`` and loaded by predict with ``weights_only=True``.
So the whole inference path runs for real; only the weights are untrained.
"""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hpc_dfs.cli import main as cli
from hpc_dfs.errors import HpcDfsError

N_CASES = 2


def _save_case_variant(src: Path, dst: Path, crop, axcodes) -> None:
    """An odd-sized, non-square copy of a case, reoriented (so its affine is not the KiTS one)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        img = nib.load(str(src / name))
        img = img.slicer[crop]
        cur = nib.orientations.io_orientation(img.affine)
        img = img.as_reoriented(nib.orientations.ornt_transform(cur, nib.orientations.axcodes2ornt(axcodes)))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), str(dst / name))


def make_checkpoint(shards: Path, path: Path, seed: int, name: str = "dfs_fusion", **model_kw) -> Path:
    manifest = json.loads((shards / "manifest.json").read_text())
    pipeline = json.loads((shards / "clinical_pipeline.json").read_text())
    torch.manual_seed(seed)
    from hpc_dfs.models import build_model
    mcfg = dict(name=name, n_classes=3, base_channels=4, depth=2, n_clinical=manifest["clinical"]["n_features"],
                **model_kw)
    model = build_model(**mcfg)
    # BatchNorm running statistics of a fresh network are mean 0 / var 1; give them case-like values
    # so that the untrained network does not predict one class everywhere
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.5)
    torch.save({"model": model.state_dict(), "model_config": mcfg, "preprocessing": manifest["preprocessing"],
                "clinical": {"pipeline": pipeline, "feature_names": manifest["clinical"]["feature_names"],
                             "n_features": manifest["clinical"]["n_features"]},
                "classes": manifest["preprocessing"]["classes"], "epoch": 1, "metrics": {}}, path)
    return path


def make_setup(root: Path) -> dict:
    """Synth cases (plus an odd-sized reoriented one), shards, and two fusion checkpoints under ``root``."""
    data, shards = root / "data", root / "shards"
    assert cli(["synth", "--out", str(data), "--cases", str(N_CASES), "--size", "40", "--min-slices", "6",
                "--max-slices", "8", "--seed", "3"]) == 0
    assert cli(["preprocess", "--data", str(data), "--out", str(shards), "--slice-size", "32,32",
                "--n-folds", "2"]) == 0
    # case_00007: 37 x 30 in-plane, odd slice count, stored R,A,S (not the KiTS I,P,L)
    _save_case_variant(data / "case_00000", data / "case_00007", (slice(0, 5), slice(1, 38), slice(5, 35)),
                       ("R", "A", "S"))
    ck = [make_checkpoint(shards, root / f"fold{i}.pt", seed=i) for i in range(2)]
    return {"data": data, "shards": shards, "ckpts": ck, "root": root}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("predict"))


def test_predict_native_geometry_and_outputs(setup, tmp_path, caplog):
    out = tmp_path / "pred"
    rc = cli(["predict", "--checkpoint", str(setup["ckpts"][0]), "--input", str(setup["data"]), "--out", str(out),
              "--batch-size", "3", "--save-probabilities", "--save-raw"])
    assert rc == 0
    ids = ["00000", "00001", "00007"]
    for sfx in ids:
        src = nib.load(str(setup["data"] / f"case_{sfx}" / "imaging.nii.gz"))
        pred = nib.load(str(out / f"prediction_{sfx}.nii.gz"))
        assert pred.shape == src.shape
        assert np.array_equal(pred.affine, src.affine)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(src.affine)
        lab = np.asanyarray(pred.dataobj)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2}
        probs = np.asanyarray(nib.load(str(out / f"probabilities_{sfx}.nii.gz")).dataobj)
        assert probs.shape == (*src.shape, 3) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        raw = np.asanyarray(nib.load(str(out / "raw" / f"prediction_{sfx}.nii.gz")).dataobj)
        np.testing.assert_array_equal(raw, np.argmax(probs, axis=-1))  # raw = argmax of the stored probabilities
        assert (out / f"overlay_{sfx}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert nib.load(str(out / f"prediction_{sfx}.nii.gz")).shape != (0,)
    assert nib.load(str(out / "prediction_00007.nii.gz")).shape == (30, 37, 5)  # R,A,S reorientation of the crop
    rows = list(csv.DictReader((out / "risk.csv").open()))
    assert [r["case_id"] for r in rows] == [f"case_{s}" for s in ids]
    assert all(0.0 < float(r["risk_prob"]) < 1.0 for r in rows)
    # case_00007 has no record in kits.json: image-only, and said so
    assert "case_00007: no clinical record" in caplog.text and "running image-only" in caplog.text
    assert {r["case_id"]: r["clinical_used"] for r in rows} == {"case_00000": "1", "case_00001": "1",
                                                                "case_00007": "0"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_ok"] == 3 and summary["n_failed"] == 0
    assert all(c["seconds"]["total"] > 0 and c["status"] == "ok" for c in summary["cases"])

    # the acceptance chain: evaluate writes the JSON described in the issue
    ev = tmp_path / "eval.json"
    assert cli(["evaluate", "--pred", str(out), "--gt", str(setup["data"]), "--out", str(ev)]) == 0
    res = json.loads(ev.read_text())
    assert [c["case_id"] for c in res["cases"]] == [f"case_{s}" for s in ids]
    assert {"kidney_dice", "tumor_dice", "kits_score", "mean_iou", "kidney_hd95", "kidney_surface_dice"} <= \
        set(res["cases"][0]) and "kidney_dice" in res["mean"] and "postprocessing" in res


def test_weighted_average_of_replicas(setup):
    """Two checkpoints with weights (w, 1-w) give exactly the weighted mean of each one's probabilities."""
    from hpc_dfs.data.geometry import prepare_image
    from hpc_dfs.inference.replicas import clinical_vector, load_replicas
    from hpc_dfs.inference.slices import infer_slices
    img = nib.load(str(setup["data"] / "case_00001" / "imaging.nii.gz"))
    paths = [str(p) for p in setup["ckpts"]]
    a, b = load_replicas(paths[:1], [], "cpu"), load_replicas(paths[1:], [], "cpu")
    both = load_replicas(paths, [3.0, 1.0], "cpu")
    assert [r.weight for r in both] == [0.75, 0.25]
    slices, _ = prepare_image(np.asanyarray(img.dataobj).astype(np.float32), img.affine, a[0].preprocessing)
    rec = json.loads((setup["data"] / "kits.json").read_text())[1]

    def run(reps, tta=False):
        return infer_slices(reps, slices, [clinical_vector(r, "case_00001", rec) for r in reps], 4, tta, "cpu")
    pa, ra = run(a)
    pb, rb = run(b)
    pab, rab = run(both)
    assert not np.allclose(pa, pb)
    np.testing.assert_allclose(pab, 0.75 * pa + 0.25 * pb, atol=1e-6)
    assert rab == pytest.approx(0.75 * ra + 0.25 * rb)
    # batch size does not change the result; TTA gives a valid distribution different from no TTA
    p1, _ = infer_slices(a, slices, [clinical_vector(a[0], "case_00001", rec)], 1, False, "cpu")
    np.testing.assert_allclose(p1, pa, atol=1e-6)
    pt, rt = run(a, tta=True)
    np.testing.assert_allclose(pt.sum(0), 1.0, atol=1e-5)
    assert not np.allclose(pt, pa) and 0 < rt < 1


def _text(caplog) -> str:
    """Log text so far (then cleared): predict's one-line errors."""
    text = caplog.text
    caplog.clear()
    return text


def test_checkpoint_problems_stop_the_run(setup, tmp_path, caplog):
    ck = torch.load(setup["ckpts"][0], weights_only=True)
    no_pre = tmp_path / "no_pre.pt"
    torch.save({k: v for k, v in ck.items() if k != "preprocessing"}, no_pre)
    args = ["predict", "--input", str(setup["data"]), "--out", str(tmp_path / "o")]
    assert cli([*args, "--checkpoint", str(no_pre)]) == 2
    assert "no_pre.pt has no preprocessing parameters" in _text(caplog)
    other = tmp_path / "other.pt"
    ck2 = dict(ck)
    ck2["preprocessing"] = {**ck["preprocessing"], "slice_size": [48, 48]}
    torch.save(ck2, other)
    assert cli([*args, "--checkpoint", str(setup["ckpts"][0]), "--checkpoint", str(other)]) == 2
    assert "different preprocessing (differing keys: slice_size)" in _text(caplog)
    assert cli([*args, "--checkpoint", str(setup["ckpts"][0]), "--weights", "1,2"]) == 2
    assert "2 --weights for 1 --checkpoint" in _text(caplog)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_bad_inputs_are_skipped_with_one_error_each(setup, tmp_path, caplog):
    data = tmp_path / "data"
    for cid in ("case_00000", "case_00001"):
        shutil.copytree(setup["data"] / cid, data / cid)
    # truncated gzip
    (data / "case_00002").mkdir()
    blob = (setup["data"] / "case_00000" / "imaging.nii.gz").read_bytes()
    (data / "case_00002" / "imaging.nii.gz").write_bytes(blob[: len(blob) // 2])
    # a 4-D image
    (data / "case_00003").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 8, 8, 2), np.int16), np.eye(4)), str(data / "case_00003" / "imaging.nii.gz"))
    # a case folder without its image
    (data / "case_00004").mkdir()
    # a malformed clinical record for case_00001 (age 400)
    records = json.loads((setup["data"] / "kits.json").read_text())
    bad = [dict(r, age_at_nephrectomy=400) if r["case_id"] == "case_00001" else r for r in records]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = tmp_path / "pred"
    rc = cli(["predict", "--checkpoint", str(setup["ckpts"][0]), "--input", str(data), "--out", str(out),
              "--clinical", str(tmp_path / "bad.json"), "--no-overlays"])
    err = caplog.text
    assert rc == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {c["case_id"]: c for c in summary["cases"]}
    assert status["case_00002"]["status"] == "failed"
    assert "imaging.nii.gz: truncated gzip" in status["case_00002"]["error"]
    assert "(4, 8, 8, 2), expected 3" in status["case_00003"]["error"]
    assert "missing" in status["case_00004"]["error"]
    assert "malformed clinical record" in status["case_00001"]["error"] and "age_at_nephrectomy" in err
    for cid in ("case_00001", "case_00002", "case_00003", "case_00004"):
        assert f"{cid}: " in err
    # the good case went on
    assert status["case_00000"]["status"] == "ok" and (out / "prediction_00000.nii.gz").exists()
    assert "4 of 5 cases failed" in err


def test_image_only_models_and_single_file_input(setup, tmp_path):
    ck = make_checkpoint(setup["shards"], tmp_path / "unet.pt", seed=0, name="unet")
    out = tmp_path / "pred"
    img_path = setup["data"] / "case_00000" / "imaging.nii.gz"
    assert cli(["predict", "--checkpoint", str(ck), "--input", str(img_path), "--out", str(out),
                "--no-postprocess", "--tta"]) == 0
    assert nib.load(str(out / "prediction_00000.nii.gz")).shape == nib.load(str(img_path)).shape
    rows = list(csv.DictReader((out / "risk.csv").open()))
    assert rows == [{"case_id": "case_00000", "risk_prob": "", "clinical_used": "0"}]  # U-Net has no risk head


def test_nifti_bytes_are_deterministic(setup):
    from hpc_dfs.inference.nifti import nifti_gz_bytes
    img = nib.load(str(setup["data"] / "case_00001" / "imaging.nii.gz"))
    lab = (np.asanyarray(img.dataobj) > 100).astype(np.uint8)
    b1, b2 = nifti_gz_bytes(lab, img), nifti_gz_bytes(lab, img)
    assert b1 == b2 and b1[4:8] == b"\x00\x00\x00\x00"  # gzip MTIME field is zero
    back = nib.Nifti1Image.from_bytes(gzip.decompress(b1))
    assert np.array_equal(back.affine, img.affine) and np.array_equal(np.asanyarray(back.dataobj), lab)


def test_a_setup_error_on_one_rank_stops_every_rank(setup, tmp_path, monkeypatch):
    """The ranks agree on setup: a rank whose own setup went well still raises when a peer's failed (no hang)."""
    from hpc_dfs import parallel
    from hpc_dfs.config.predict import PredictConfig
    from hpc_dfs.inference import errors, setup as predict_setup
    paths = predict_setup.PredictPaths([setup["ckpts"][0]], setup["data"], tmp_path / "o")
    peer = ("--input /node2/data: no such folder", 2)
    monkeypatch.setattr(parallel, "allgather_object", lambda obj, *a, **k: [obj, peer])
    with pytest.raises(errors.PredictError, match="rank 1: --input /node2/data: no such folder") as err:
        predict_setup.setup_on_every_rank(PredictConfig(), paths)
    assert err.value.code == 2
    # this rank's own error wins over a peer's, with its own code
    bad = predict_setup.PredictPaths([tmp_path / "missing.pt"], setup["data"], tmp_path / "o")
    with pytest.raises(HpcDfsError, match="missing.pt: no such file"):
        predict_setup.setup_on_every_rank(PredictConfig(), bad)


def test_errors_are_one_line_on_stderr(setup, tmp_path, capsys):
    args = ["predict", "--checkpoint", str(setup["ckpts"][0]), "--out", str(tmp_path / "o")]
    assert cli([*args, "--input", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"hpc-dfs predict: error: --input {tmp_path / 'nowhere'}: does not exist"]
    assert cli(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["hpc-dfs predict: error: --input and --out are required"]


def test_provenance_stale_tmp_and_a_failed_case_moved_aside(setup, tmp_path, capsys):
    """The header and summary carry the checkpoint and input sha256; a rerun cleans the
    .tmp-* a killed run left; a case that fails on a rerun has its earlier prediction moved to stale/, and
    evaluate refuses a prediction that is not from the run of summary.json."""
    from hpc_dfs.fsutil import sha256_file
    data, out = tmp_path / "data", tmp_path / "pred"
    for cid in ("case_00000", "case_00001"):
        shutil.copytree(setup["data"] / cid, data / cid)
    out.mkdir()
    (out / ".tmp-probabilities_00000.nii.gz.x1.nii.gz").write_bytes(b"partial")
    args = ["--input", str(data), "--out", str(out), "--no-overlays"]
    assert cli(["predict", "--checkpoint", str(setup["ckpts"][1]), *args]) == 0
    assert not list(out.glob(".tmp-*"))
    row = {c["case_id"]: c for c in json.loads((out / "summary.json").read_text())["cases"]}["case_00000"]
    ck_sha, in_sha = sha256_file(setup["ckpts"][1]), sha256_file(data / "case_00000" / "imaging.nii.gz")
    assert row["provenance"] == {"checkpoints_sha256": ck_sha, "input_sha256": in_sha,
                                 "descrip": f"hpc-dfs {ck_sha[:12]} {in_sha[:12]}"}
    header = nib.load(str(out / "prediction_00000.nii.gz")).header["descrip"].item().decode()
    assert header == row["provenance"]["descrip"]
    blob = (data / "case_00001" / "imaging.nii.gz").read_bytes()
    (data / "case_00001" / "imaging.nii.gz").write_bytes(blob[: len(blob) // 2])
    assert cli(["predict", "--checkpoint", str(setup["ckpts"][0]), *args]) == 1
    assert not (out / "prediction_00001.nii.gz").exists() and (out / "stale" / "prediction_00001.nii.gz").exists()
    ev_args = ["evaluate", "--pred", str(out), "--gt", str(setup["data"]), "--out", str(tmp_path / "ev.json"),
               "--no-surface-metrics"]
    capsys.readouterr()
    assert cli(ev_args) == 0  # case_00001 counts as missing (mean_all)
    shutil.copyfile(out / "stale" / "prediction_00001.nii.gz", out / "prediction_00001.nii.gz")
    assert cli(ev_args) == 3
    assert "prediction_00001.nii.gz (case_00001 failed in it)" in capsys.readouterr().err
