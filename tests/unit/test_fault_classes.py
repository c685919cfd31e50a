"""The shared mechanisms behind issue 21's six classes (the CLI trials are in tests/faults/test_classes.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest

from hpc_dfs.config import ConfigError, load
from hpc_dfs.config.data import PreprocessConfig
from hpc_dfs.config.train import TrainConfig
from hpc_dfs.data.checks import GeometryProblem, IntensityProblem, check_intensities, checked_spacing


def _affine(sz=2.5, sy=0.8, sx=0.8):
    aff = np.zeros((4, 4))
    aff[0, 2], aff[1, 1], aff[2, 0], aff[3, 3] = -sx, -sy, -sz, 1.0
    return aff


# ----------------------------------------------------------------------------- 1. values and settings
@pytest.mark.parametrize("key, value", [("loss.dice_weight", "nan"), ("optim.lr", "inf"), ("optim.lr", "1e12"),
                                        ("augmentation.rotate_deg", "-inf")])
def test_train_float_settings_refuse_nan_inf_and_absurd_rates(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load(TrainConfig, overrides=[f"{key}={value}"])


@pytest.mark.parametrize("override", ["z_spacing=nan", "in_plane_spacing='inf'", "in_plane_spacing='nan'",
                                      "window=[-200, inf]", "slice_size=[16, 16]", "refine.spacing='inf'"])
def test_preprocess_settings_refuse_what_cannot_work(override):
    with pytest.raises(ConfigError):
        load(PreprocessConfig, overrides=[override])


def test_valid_settings_still_load():
    assert load(PreprocessConfig, overrides=["slice_size=[24, 24]", "in_plane_spacing='0.8'"]).slice_size == [24, 24]
    assert load(TrainConfig, overrides=["optim.lr=10"]).optim.lr == 10


@pytest.mark.parametrize("image, phrase", [
    (np.ones((2, 3, 3), np.complex64), "complex"),
    (np.full((2, 3, 3), 1e40, np.float64), "non-finite"),
    (np.full((2, 3, 3), np.nan, np.float32), "non-finite"),
    (np.full((2, 3, 3), 2e5, np.float32), "implausible"),
    (np.full((2, 3, 3), 10**9, np.int32), "implausible")])
def test_intensities_that_cannot_be_ct(image, phrase):
    with pytest.raises(IntensityProblem, match=phrase):
        check_intensities(image)


def test_ct_intensities_pass():
    check_intensities(np.array([[[-1024, 0, 3071]]], np.int16))
    check_intensities(np.array([[[-1024.5, 0.25, 30000.0]]], np.float64))


def test_a_non_finite_loss_or_gradient_stops_training():
    import torch

    from hpc_dfs.training.guards import NonFiniteError, check_loss, check_metrics, clip_and_check
    with pytest.raises(NonFiniteError, match="step 3"):
        check_loss(float("nan"), 3, 0)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(NonFiniteError, match="gradient norm is inf"):
        clip_and_check([p], 0.0, 1)
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    clip_and_check([p], 0.0, 1)          # no clipping: the gradient is kept exactly
    assert p.grad.tolist() == [3.0, 4.0, 0.0]
    with pytest.raises(NonFiniteError, match="validation loss"):
        check_metrics({"val_loss": float("nan"), "n_val_cases": 1}, 0)
    assert check_metrics({"val_loss": float("nan"), "n_val_cases": 0}, 0)["n_val_cases"] == 0


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    import torch

    from hpc_dfs.contracts import checkpoint as ckpt
    state = {k: None for k in ckpt.REQUIRED_KEYS}
    state.update(model={"w": torch.tensor([1.0, float("nan")])}, model_config={"name": "unet"})
    ckpt.save(state, tmp_path / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights"):
        ckpt.load(tmp_path / "last.pt", require=ckpt.INFERENCE_KEYS)


# ----------------------------------------------------------------------------- 2. geometry
def test_spacing_is_pixdim_once_it_agrees_with_the_affine():
    assert checked_spacing((4, 5, 6), _affine(), (2.5, 0.8, 0.8)) == (2.5, 0.8, 0.8)


@pytest.mark.parametrize("shape, column, zooms, phrase", [
    ((4, 0, 6), None, (2.5, 0.8, 0.8), "zero-length axis"),
    ((4, 5, 6), 2, (2.5, 0.8, 0.8), "column 2 is zero"),
    ((4, 5, 6), None, (1.0, 0.8, 1.0), "contradictory"),
    ((4, 5, 6), None, (2.5, 0.0, 0.8), "not positive")])
def test_degenerate_or_contradictory_geometry(shape, column, zooms, phrase):
    aff = _affine()
    if column is not None:
        aff[:3, column] = 0.0
    with pytest.raises(GeometryProblem, match=phrase):
        checked_spacing(shape, aff, zooms)


# ----------------------------------------------------------------------------- 3. layout and records
@pytest.mark.parametrize("name, why", [("case_00001 ", "white space"), ("case_0000\u0661", "ASCII"),
                                       ("Case_00001", "'case_' exactly"), ("case_1", "five digits"),
                                       ("case_00001\n", "white space")])
def test_near_miss_case_names_are_named(name, why):
    from hpc_dfs.contracts.kits import CASE_RE, near_miss
    assert not CASE_RE.match(name)
    assert why in near_miss(name)


def test_case_ids_and_other_folders():
    from hpc_dfs.contracts.kits import CASE_RE, near_miss
    assert CASE_RE.match("case_00012").group(1) == "00012"
    assert near_miss("case_00012") is None and near_miss("notes") is None and near_miss("cases") is None


def test_records_duplicate_mistyped_and_empty(tmp_path):
    from hpc_dfs.data.kits_clinical import ClinicalRecordError, load_kits_records, preop_frame, risk_label
    a = {"case_id": "case_00000", "age_at_nephrectomy": 50, "malignant": True}
    b = {"case_id": "case_00001", "age_at_nephrectomy": 60, "malignant": False}
    frame, bad = preop_frame([a, b, dict(b, age_at_nephrectomy=70)], errors="collect")
    assert list(frame.index) == ["case_00000"] and "age_at_nephrectomy (60 vs 70)" in bad["case_00001"]
    frame, bad = preop_frame([a, dict(b, malignant="yes (clear cell)")], errors="collect", target="malignant")
    assert list(frame.index) == ["case_00000"] and "malignant='yes (clear cell)'" in bad["case_00001"]
    with pytest.raises(ClinicalRecordError, match="case_00001"):
        risk_label(dict(b, malignant=2))
    assert risk_label(dict(b, malignant="unknown")) is None and risk_label(dict(b, malignant="yes")) == 1
    (tmp_path / "kits.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no clinical records"):
        load_kits_records(tmp_path / "kits.json")


# ----------------------------------------------------------------------------- 4. writers
def test_a_verb_does_not_replace_another_verbs_file(tmp_path):
    from hpc_dfs import fsutil
    (tmp_path / "last.pt").write_bytes(b"weights")
    (tmp_path / "mine.html").write_text("old")
    with fsutil.writing_as("report"):
        with pytest.raises(fsutil.ForeignFileError, match="hpc-dfs train"):
            fsutil.write_text(tmp_path / "last.pt", "<html>")
        fsutil.write_text(tmp_path / "mine.html", "new")            # a name no contract fixes
    with fsutil.writing_as("train"):
        fsutil.write_bytes(tmp_path / "last.pt", b"new weights")    # its own file
    fsutil.write_text(tmp_path / "summary.json", "{}")              # a library call, outside a verb
    assert (tmp_path / "last.pt").read_bytes() == b"new weights" and (tmp_path / "mine.html").read_text() == "new"


def test_read_only_and_wrong_kind_places_are_one_error(tmp_path):
    from hpc_dfs import fsutil
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as e:   # cli.main prints it as one DiskWriteError line
        fsutil.write_text(tmp_path / "afile" / "x.json", "{}")
    assert fsutil.is_unwritable(e.value) and not fsutil.is_disk_error(e.value)
    err = fsutil.DiskWriteError(e.value.filename, e.value)
    assert err.code == 2 and "afile" in str(err) and "\n" not in str(err)
    import errno
    assert fsutil.DiskWriteError("x", OSError(errno.EROFS, "ro")).code == 4


def test_a_folder_is_held_by_one_live_run(tmp_path):
    from hpc_dfs import fsutil
    lock = fsutil.lock_folder(tmp_path / "run", "test")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    holder = subprocess.Popen(["sleep", "30"])
    try:   # another live process holds it
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "what": "hpc-dfs train"}))
        with pytest.raises(fsutil.LockedError, match="in use by hpc-dfs train"):
            fsutil.lock_folder(tmp_path / "run", "test")
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))   # its holder is gone: stale
    assert fsutil.lock_folder(tmp_path / "run", "test") == lock
    fsutil.unlock_folder(lock)
    assert not lock.exists()


# ----------------------------------------------------------------------------- 5. resume
def test_resume_refuses_settings_the_optimizer_state_would_override():
    from hpc_dfs.config import to_dict
    from hpc_dfs.training.plan import resume_changes
    stored = to_dict(load(TrainConfig, overrides=["optim.lr=0.002"]))
    assert resume_changes(stored, load(TrainConfig, overrides=["optim.lr=0.002", "schedule.epochs=9"])) == []
    changed = resume_changes(stored, load(TrainConfig, overrides=["optim.lr=0.01", "optim.optimizer='sgd'"]))
    assert [c.split()[0] for c in changed] == ["optim.lr", "optim.optimizer"]
    assert resume_changes(None, load(TrainConfig)) == []
