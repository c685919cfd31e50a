"""Bad inputs across the verbs, through the real CLI: each must end in ONE clear error line naming the case or
file (rc > 0, not 1, no signal, no traceback), and the good cases' outputs must be complete and valid.

Each kind is recorded in the battery's tally (``bad inputs, N clear``) whether it passes or not.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from tests.faults import harness as H
from tests.faults.conftest import PREDICT_FLAGS, SLICE
from tests.launch import UCI_CKD

BAD = "case_00001"          # the case every data fault is put in
GOOD = ("case_00000", "case_00002", "case_00003")
PARALLEL = int(os.environ.get("FAULTS_PARALLEL", "2"))  # bad-input runs at a time


# ----------------------------------------------------------------------------- ways to break a data folder
def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _save(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def image_2d(d: Path) -> None:
    arr, aff = _nifti(d / BAD / "imaging.nii.gz")
    _save(d / BAD / "imaging.nii.gz", arr[0], aff)


def seg_shape_mismatch(d: Path) -> None:
    arr, aff = _nifti(d / BAD / "segmentation.nii.gz")
    _save(d / BAD / "segmentation.nii.gz", arr[:-2], aff)


def seg_affine_mismatch(d: Path) -> None:
    arr, aff = _nifti(d / BAD / "segmentation.nii.gz")
    aff = aff.copy()
    aff[:3, :3] *= 2.0
    _save(d / BAD / "segmentation.nii.gz", arr, aff)


def seg_label_out_of_set(d: Path) -> None:
    arr, aff = _nifti(d / BAD / "segmentation.nii.gz")
    arr = arr.copy()
    arr[0, :4, :4] = 7
    _save(d / BAD / "segmentation.nii.gz", arr, aff)


def image_nan(d: Path) -> None:
    arr, aff = _nifti(d / BAD / "imaging.nii.gz")
    arr = arr.astype(np.float32)
    arr[1, 10:20, 10:20] = np.nan
    _save(d / BAD / "imaging.nii.gz", arr, aff)


def no_imaging(d: Path) -> None:
    (d / BAD / "imaging.nii.gz").unlink()


def drop_clinical_record(d: Path) -> None:
    recs = [r for r in json.loads((d / "kits.json").read_text()) if r["case_id"] != BAD]
    (d / "kits.json").write_text(json.dumps(recs))


def malformed_kits_json(d: Path) -> None:
    (d / "kits.json").write_text('[{"case_id": "case_00000", "age_at_nephrectomy": ')


# ----------------------------------------------------------------------------- checks of the good outputs
def good_shards_valid(out: Path) -> list[str]:
    from hpc_dfs.data.shards import validate_shard
    problems = []
    for cid in GOOD:
        ok, why = validate_shard(out / f"shard-{cid}.h5", cid, deep=True)
        if not ok:
            problems.append(f"good case {cid}: {why}")
    if (out / "manifest.json").exists():
        listed = [c["case_id"] for c in json.loads((out / "manifest.json").read_text())["cases"]]
        if BAD in listed:
            problems.append(f"the bad case {BAD} is listed in the manifest")
        if not H.shards_read_as_valid(out):
            problems.append("the manifest of the good cases does not read as valid")
    return problems


def good_predictions_equal(ref: Path) -> Callable[[Path], list[str]]:
    def check(out: Path) -> list[str]:
        problems = []
        for cid in GOOD:
            name = f"prediction_{cid[-5:]}.nii.gz"
            if not (out / name).exists():
                problems.append(f"{name} of a good case is missing")
        problems += [d for d in H.same_predictions(out, ref, require_all=False)]
        if (out / f"prediction_{BAD[-5:]}.nii.gz").exists():
            problems.append(f"a prediction was written for the bad case {BAD}")
        return problems
    return check


# ----------------------------------------------------------------------------- the kinds
@dataclass
class Kind:
    name: str
    verb: str
    names: tuple            # the error line must name one of these
    build: Callable         # (world, tmp) -> (args, out folder or None, good-output check or None)
    one_line: bool = False  # refused before any work starts: exactly one error line in all ...
    cli_line: bool = False  # ... and it is cli.main's ``hpc-dfs VERB: error:`` (a raised HpcDfsError)


def _data(world, tmp, breaker=None) -> Path:
    d = world.copy(world.data, tmp / "data")
    if breaker:
        breaker(d)
    return d


def preprocess_kind(name, breaker, names=(BAD,), per_case=True):
    """A broken case (per_case: the other cases must be written and valid) or a broken data set (refused before
    any work, in one ``hpc-dfs preprocess: error:`` line)."""
    def build(world, tmp):
        d, out = _data(world, tmp, breaker), tmp / "shards"
        return ("preprocess", "--data", d, "--out", out, *SLICE), out, good_shards_valid if per_case else None
    return Kind(name, "preprocess", names, build, one_line=not per_case, cli_line=not per_case)


def predict_kind(name, breaker, names=(BAD,)):
    def build(world, tmp):
        ref = world.pred
        d, out = _data(world, tmp, breaker), tmp / "pred"
        return (("predict", "--checkpoint", world.checkpoint, "--input", d, "--out", out, *PREDICT_FLAGS), out,
                good_predictions_equal(ref))
    return Kind(name, "predict", names, build)


def simple(name, verb, names, args_fn, one_line=True, cli_line=True):
    """A run refused before it starts work (by default: one ``hpc-dfs VERB: error:`` line and nothing else)."""
    def build(world, tmp):
        return (verb, *args_fn(world, tmp)), None, None
    return Kind(name, verb, names, build, one_line=one_line, cli_line=cli_line and one_line)


#: train's checks of the shards run on every rank and are logged by rank 0 as one ERROR line (SetupError, exit 2)
TRAIN_SETUP = dict(one_line=True, cli_line=False)
#: evaluate scores the cases it can and logs one error per bad prediction (exit 1): not before work starts
PER_CASE = dict(one_line=False)


def _ckpt_foreign(world, tmp):
    p = tmp / "foreign.pt"
    p.write_text("this is not a checkpoint\n")
    return "--checkpoint", p, "--input", world.data, "--out", tmp / "pred"


def _ckpt_truncated(world, tmp):
    p = tmp / "last.pt"
    shutil.copyfile(world.checkpoint, p)
    truncate(p, 0.6)
    return "--checkpoint", p, "--input", world.data, "--out", tmp / "pred"


def _pred_with(world, tmp, change) -> Path:
    """A copy of the reference predictions with case 00001's array changed, its header (and so predict's
    provenance in ``descrip``) kept: as if predict itself had written the bad array."""
    pred = world.copy(world.pred, tmp / "pred")
    path = pred / f"prediction_{BAD[-5:]}.nii.gz"
    img = nib.load(str(path))
    arr, aff = change(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(arr, aff, header=img.header), str(path))
    return pred


def _label9(arr, aff):
    arr[arr == 1] = 9
    return arr, aff


def _eval_args(pred, world, tmp):
    return "--pred", pred, "--gt", world.data, "--out", tmp / "eval.json", "--no-surface-metrics"


def _shards_without(world, tmp, what):
    s = world.copy(world.shards, tmp / "shards")
    (s / what).unlink()
    return "--shards", s, "--out", tmp / "run", "--epochs", 1, *H.TRAIN_TINY


def _shards_garbled_manifest(world, tmp):
    s = world.copy(world.shards, tmp / "shards")
    (s / "manifest.json").write_text('{"schema_version": 1, "cases": [')
    return "--shards", s, "--out", tmp / "run", "--epochs", 1, *H.TRAIN_TINY


def _empty(tmp) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _kits_garbled(world, tmp):
    p = tmp / "kits.json"
    p.write_text("[{]")
    return "--data", p, "--out", tmp / "clin", "--target", "malignant", "--folds", 2


KINDS = [
    preprocess_kind("preprocess_truncated_nifti", lambda d: truncate(d / BAD / "imaging.nii.gz")),
    preprocess_kind("preprocess_truncated_segmentation", lambda d: truncate(d / BAD / "segmentation.nii.gz", 0.3)),
    preprocess_kind("hole3_preprocess_2d_nifti", image_2d),
    preprocess_kind("preprocess_shape_mismatch", seg_shape_mismatch),
    preprocess_kind("preprocess_affine_mismatch", seg_affine_mismatch),
    preprocess_kind("preprocess_label_out_of_set", seg_label_out_of_set),
    preprocess_kind("preprocess_nan_voxels", image_nan),
    preprocess_kind("preprocess_no_imaging", no_imaging),
    preprocess_kind("preprocess_missing_clinical_record", drop_clinical_record),
    preprocess_kind("preprocess_malformed_kits_json", malformed_kits_json, names=("kits.json",),
                    per_case=False),
    simple("preprocess_bad_set_key", "preprocess", ("nope",),
           lambda w, t: ("--data", w.data, "--out", t / "s", "--set", "nope=1")),
    simple("preprocess_bad_set_value", "preprocess", ("slice_size",),
           lambda w, t: ("--data", w.data, "--out", t / "s", "--set", "slice_size=abc")),
    simple("preprocess_missing_data_folder", "preprocess", ("no_such_folder",),
           lambda w, t: ("--data", t / "no_such_folder", "--out", t / "s")),
    simple("preprocess_empty_data_folder", "preprocess", ("empty",),
           lambda w, t: ("--data", _empty(t), "--out", t / "s")),
    simple("train_missing_shards_folder", "train", ("no_such_shards",),
           lambda w, t: ("--shards", t / "no_such_shards", "--out", t / "run"), **TRAIN_SETUP),
    simple("train_no_manifest", "train", ("manifest.json",), lambda w, t: _shards_without(w, t, "manifest.json"),
           **TRAIN_SETUP),
    simple("train_malformed_manifest", "train", ("manifest.json",), _shards_garbled_manifest, **TRAIN_SETUP),
    simple("train_missing_shard_file", "train", ("case_00002",),
           lambda w, t: _shards_without(w, t, "shard-case_00002.h5"), **TRAIN_SETUP),
    simple("train_bad_set_key", "train", ("model.nope",),
           lambda w, t: ("--shards", w.shards, "--out", t / "run", "--set", "model.nope=1")),
    simple("train_bad_set_value", "train", ("epochs",),
           lambda w, t: ("--shards", w.shards, "--out", t / "run", "--set", "epochs=many")),
    simple("predict_foreign_checkpoint", "predict", ("foreign.pt",), _ckpt_foreign),
    simple("predict_truncated_checkpoint", "predict", ("last.pt",), _ckpt_truncated),
    simple("predict_missing_input", "predict", ("no_such_input",),
           lambda w, t: ("--checkpoint", w.checkpoint, "--input", t / "no_such_input", "--out", t / "pred")),
    predict_kind("predict_truncated_nifti", lambda d: truncate(d / BAD / "imaging.nii.gz")),
    predict_kind("predict_2d_nifti", image_2d),
    simple("hole6_evaluate_label_9", "evaluate", (BAD, f"prediction_{BAD[-5:]}"),
           lambda w, t: _eval_args(_pred_with(w, t, _label9), w, t), **PER_CASE),
    simple("evaluate_prediction_shape_mismatch", "evaluate", (BAD, f"prediction_{BAD[-5:]}"),
           lambda w, t: _eval_args(_pred_with(w, t, lambda a, f: (a[:-1], f)), w, t), **PER_CASE),
    simple("evaluate_missing_gt_folder", "evaluate", ("no_such_gt",),
           lambda w, t: ("--pred", w.pred, "--gt", t / "no_such_gt", "--out", t / "eval.json")),
    simple("evaluate_empty_pred_folder", "evaluate", ("empty",),
           lambda w, t: ("--pred", _empty(t), "--gt", w.data, "--out", t / "eval.json")),
    simple("hole6_clinical_target_nope", "clinical", ("nope",),
           lambda w, t: ("--data", UCI_CKD / "kidney_disease.csv", "--target", "nope", "--out", t / "clin")),
    simple("clinical_missing_file", "clinical", ("no_such.csv",),
           lambda w, t: ("--data", t / "no_such.csv", "--out", t / "clin")),
    simple("clinical_malformed_kits_json", "clinical", ("kits.json",), _kits_garbled),
    simple("report_missing_run", "report", ("no_such_run",), lambda w, t: (t / "no_such_run",)),
]


@pytest.fixture(scope="session")
def bad_runs(request, world, tmp_path_factory, uci_ckd_dir) -> dict:
    """Every selected kind's input built, then all run, two at a time (the runs are independent)."""
    selected = [it.callspec.params["kind"] for it in request.session.items
                if getattr(it, "originalname", "") == "test_bad_input_is_one_clear_error"]
    built = {k.name: (k, *k.build(world, tmp_path_factory.mktemp(k.name))) for k in selected}
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = {name: pool.submit(H.cli, *b[1]) for name, b in built.items()}
        return {name: (built[name], f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_bad_input_is_one_clear_error(kind: Kind, bad_runs):
    (_, args, out, good_check), res = bad_runs[kind.name]
    problems = H.clear_error(res, kind.verb, *kind.names, one_line=kind.one_line, cli_line=kind.cli_line)
    if good_check is not None and out is not None:
        problems += good_check(out)
    H.record("bad_input", kind=kind.name, clear=not problems, rc=res.returncode)
    assert not problems, f"{kind.name}: " + "\n".join(problems)
