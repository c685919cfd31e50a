"""Six classes of failure, each with trials of its own, through the real CLI on the battery's tiny
data set: (1) non-finite or absurd intensities and settings, (2) degenerate or contradictory geometry, (3) layout
and records that are almost right, (4) writers and their outputs, (5) signals and resume, (6) settings that
cannot work.

Every trial gets a verdict, recorded in the tally: ``clear`` (one clear error, or one line that reports it, naming
the case or file and saying what is wrong; everything good written and nothing that existed harmed), ``valid`` (a
valid input, handled as such), ``confusing`` (an error, but a traceback, a flood, or a line that does not say
what is wrong), ``silent`` (exit 0 on a bad input, or a valid input handled wrongly) or ``lost`` (something that
existed, or a good case's output, damaged or missing). The figure line counts them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import nibabel as nib
import numpy as np
import pytest

from tests.faults import harness as H
from tests.faults.conftest import PREDICT_FLAGS, SLICE
from tests.faults.test_bad_inputs import BAD, GOOD, good_predictions_equal, good_shards_valid
from tests.launch import REPO, job_env

PARALLEL = int(os.environ.get("FAULTS_PARALLEL", "2"))
LOCK_NAME = ".hpc-dfs.lock"   # hpc_dfs.fsutil.LOCK_NAME, written out so that the trials also run on older code
LOST = "lost: "   # a check's problem that starts so makes the verdict "lost"


# ----------------------------------------------------------------------------- trials and verdicts
@dataclass
class Trial:
    name: str
    cls: int                  # the issue's class, 1..6
    verb: str
    names: tuple              # the error line names one of these (the case or the file)
    build: Callable           # (world, tmp) -> (args, check or None); check(res) -> [problems]
    phrase: str = ""          # ... and says this (case-insensitive): what is wrong
    expect: str = "error"     # "error": a bad input; "ok": a valid one, exit 0
    one_line: bool = True     # refused before any work: exactly one error line
    cli_line: bool = True     # ... and it is cli.main's ``hpc-dfs VERB: error:``
    rc: Optional[int] = None  # the documented exit status, when the trial pins it
    root: bool = False        # needs a read-only mount (root)


def verdict(trial: Trial, res: H.Run, check: Optional[Callable]) -> tuple[str, list[str]]:
    """The trial's verdict and the problems that gave it."""
    problems = list(check(res)) if check is not None else []
    if any(p.startswith(LOST) for p in problems):
        return "lost", problems
    if trial.expect == "reported":   # exit 0, and one warning line names it and says what is wrong
        said = [ln for ln in res.stderr.splitlines() if "WARNING" in ln and trial.phrase.lower() in ln.lower()
                and any(n.lower() in ln.lower() for n in trial.names)]
        if res.returncode != 0 or "Traceback" in res.output:
            return "confusing", problems + [f"rc {res.returncode}: {res.stderr[-1500:]}"]
        return ("clear", []) if said and not problems else ("silent", problems + ["no warning line reports it"])
    if trial.expect == "ok":
        if res.returncode != 0 or "Traceback" in res.output:
            return "confusing", problems + [f"rc {res.returncode} on a valid input: {res.stderr[-1500:]}"]
        return ("silent", problems) if problems else ("valid", [])
    if res.returncode == 0:
        return "silent", problems + ["exit 0 on a bad input"]
    signalled = trial.rc is not None and trial.rc > 128 and res.returncode == trial.rc  # 128+N: stopped on a signal
    unclear = [p for p in H.clear_error(res, trial.verb, *trial.names, one_line=trial.one_line,
                                        cli_line=trial.cli_line) if not (signalled and p.startswith("rc "))]
    problems += [] if all(p.startswith(f"{trial.verb} stderr tail") for p in unclear) else unclear
    lines = [ln for ln in res.stderr.splitlines() if H.ERROR_LINE.search(ln)]
    if trial.phrase and not any(trial.phrase.lower() in ln.lower() for ln in lines):
        problems.append(f"no error line says {trial.phrase!r}: {lines[:3]}")
    if trial.rc is not None and res.returncode != trial.rc:
        problems.append(f"rc {res.returncode}, the documented status is {trial.rc}")
    return ("confusing", problems) if problems else ("clear", [])


def judge(trial: Trial, res: H.Run, check: Optional[Callable]) -> None:
    v, problems = verdict(trial, res, check)
    H.record("bad_input", kind=trial.name, clear=v in ("clear", "valid"), verdict=v, rc=res.returncode,
             issue_class=trial.cls)
    assert v in ("clear", "valid"), f"{trial.name}: {v}\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- ways to break a data folder
def _nifti(path: Path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def _scale_image(factor: float, dtype, case: str = BAD) -> Callable[[Path], None]:
    def breaker(d: Path) -> None:
        arr, img = _nifti(d / case / "imaging.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(dtype) * factor, img.affine), str(d / case / "imaging.nii.gz"))
    return breaker


def complex_image(d: Path) -> None:
    arr, img = _nifti(d / BAD / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(arr.astype(np.complex64) * (1 + 1j), img.affine), str(d / BAD / "imaging.nii.gz"))


def _both(d: Path, fn: Callable) -> None:
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        fn(d / BAD / name)


def zero_affine_column(d: Path) -> None:
    def one(p: Path) -> None:
        arr, img = _nifti(p)
        aff = img.affine.copy()
        aff[:3, 2] = 0.0
        new = nib.Nifti1Image(arr, None)
        new.header.set_sform(aff, code=1)
        new.header.set_qform(None, code=0)
        new.header.set_zooms(img.header.get_zooms())
        nib.save(new, str(p))
    _both(d, one)


def pixdim_contradicts_affine(d: Path, names=("imaging.nii.gz", "segmentation.nii.gz")) -> None:
    for name in names:
        arr, img = _nifti(d / BAD / name)
        new = nib.Nifti1Image(arr, img.affine, header=img.header.copy())
        new.header["pixdim"][1] = -1.0
        new.header["pixdim"][3] = 0.0
        nib.save(new, str(d / BAD / name))


def zero_length_axis(d: Path) -> None:
    def one(p: Path) -> None:
        arr, img = _nifti(p)
        nib.save(nib.Nifti1Image(arr[:, :0], img.affine), str(p))
    _both(d, one)


def _records(d: Path) -> list[dict]:
    return json.loads((d / "kits.json").read_text())


def _write_records(d: Path, recs) -> None:
    (d / "kits.json").write_text(json.dumps(recs))


def rename_bad(new_name: str, add_record: bool = False) -> Callable[[Path], None]:
    def breaker(d: Path) -> None:
        (d / BAD).rename(d / new_name)
        if add_record:
            recs = _records(d)
            _write_records(d, recs + [dict(next(r for r in recs if r["case_id"] == BAD), case_id=new_name)])
    return breaker


def duplicate_record(d: Path) -> None:
    recs = _records(d)
    rec = dict(next(r for r in recs if r["case_id"] == BAD))
    rec["age_at_nephrectomy"] = int(rec["age_at_nephrectomy"]) + 20
    _write_records(d, recs + [rec])


def malignant_mistyped(d: Path) -> None:
    _write_records(d, [dict(r, malignant="yes (clear cell)") if r["case_id"] == BAD else r for r in _records(d)])


def records_of_other_cases(d: Path) -> None:
    _write_records(d, [dict(r, case_id="case_1" + r["case_id"][-4:]) for r in _records(d)])


def extra_records(d: Path) -> None:
    recs = _records(d)
    _write_records(d, recs + [dict(recs[0], case_id="case_00099")])


def float32_image(d: Path) -> None:
    for cid in (BAD, *GOOD):
        arr, img = _nifti(d / cid / "imaging.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(np.float32), img.affine), str(d / cid / "imaging.nii.gz"))


# ----------------------------------------------------------------------------- building the runs
def _data(world, tmp, breaker=None) -> Path:
    d = world.copy(world.data, tmp / "data")
    if breaker:
        breaker(d)
    return d


def preprocess_trial(name, cls, breaker, phrase, names=(BAD,), per_case=True, extra=()):
    """A broken case (per case: the good cases written and valid, the bad one not listed) or a broken data set
    (one ``hpc-dfs preprocess: error:`` line)."""
    def build(world, tmp):
        d, out = _data(world, tmp, breaker), tmp / "shards"
        check = (lambda res: _lost_if(good_shards_valid(out))) if per_case else None
        return ("preprocess", "--data", d, "--out", out, *SLICE, *extra), check
    return Trial(name, cls, "preprocess", names, build, phrase, one_line=not per_case, cli_line=not per_case)


def _lost_if(problems: list[str]) -> list[str]:
    """A good output that is missing or wrong is lost; an output of the bad case is silent acceptance."""
    return [p if ("bad case" in p or f"prediction_{BAD[-5:]}" in p) else LOST + p for p in problems]


def refused(name, cls, verb, names, phrase, args_fn, cli_line=True, rc=None):
    """A run refused before any work, in one line."""
    def build(world, tmp):
        return (verb, *args_fn(world, tmp)), None
    return Trial(name, cls, verb, names, build, phrase, cli_line=cli_line, rc=rc)


def _train(world, tmp, *extra, out="run", epochs=1):
    return ("--shards", world.shards, "--out", tmp / out, "--epochs", epochs, *H.TRAIN_TINY, *extra)


def _unchanged(*paths: Path) -> Callable:
    """A check that ``paths`` (files or folders) still hold what they held when the run was built."""
    before = {p: _digest(p) for p in paths}

    def check(res) -> list[str]:
        return [f"{LOST}{p} was changed by the run" for p, d in before.items() if _digest(p) != d]
    return check


def _digest(p: Path) -> dict:
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return {str(q): q.read_bytes() for q in files}


def _rerun_with_bad_case(world, tmp):
    """The good shards folder, and the data with one more case whose intensities are absurd (float64 x 1e40),
    rerun as the README documents. A new case folder is a new data set (its header joins the spatial fingerprint
    and the folds, as a case that failed for a moment would), so the good shards may be rewritten: but valid,
    with the intensity statistics of the good cases alone (they used to come out NaN, every shard with them)."""
    d, shards = _data(world, tmp), world.copy(world.shards, tmp / "shards")
    shutil.copytree(d / BAD, d / "case_00004")
    _scale_image(1e40, np.float64, "case_00004")(d)
    recs = _records(d)
    _write_records(d, recs + [dict(recs[1], case_id="case_00004")])
    ref = json.loads((world.shards / "manifest.json").read_text())

    def check(res) -> list[str]:
        if not H.shards_read_as_valid(shards):
            return [LOST + "the shards folder no longer reads as valid"]
        man = json.loads((shards / "manifest.json").read_text())
        problems = [] if [c["case_id"] for c in man["cases"]] == [*sorted((BAD, *GOOD))] else [
            f"{LOST}the manifest lists {[c['case_id'] for c in man['cases']]}"]
        if man["preprocessing"]["intensity"] != ref["preprocessing"]["intensity"]:
            problems.append(f"{LOST}the intensity statistics moved: {man['preprocessing']['intensity']} (the good "
                            f"cases give {ref['preprocessing']['intensity']})")
        return problems
    return ("preprocess", "--data", d, "--out", shards, *SLICE), check


def _same_shards_as_world(world, tmp, breaker):
    d, out = _data(world, tmp, breaker), tmp / "shards"
    ref = H.ref_arrays(world, "shards")
    return ("preprocess", "--data", d, "--out", out, *SLICE), lambda res: H.same_shards(H.shard_arrays(out), ref)


def _predict(world, tmp, breaker):
    ref = world.pred
    d, out = _data(world, tmp, breaker), tmp / "pred"
    check = good_predictions_equal(ref)
    return (("predict", "--checkpoint", world.checkpoint, "--input", d, "--out", out, *PREDICT_FLAGS),
            lambda res: _lost_if(check(out)))


def _nan_checkpoint(world, tmp):
    from hpc_dfs.contracts import checkpoint as ckpt
    state = ckpt.load(world.checkpoint)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name].view(-1)[0] = float("nan")
    ckpt.save(state, tmp / "last.pt")   # through the schema: its digest matches, only the weights are wrong
    return "--checkpoint", tmp / "last.pt", "--input", world.data, "--out", tmp / "pred"


def _refine_checkpoint(world, tmp):
    from hpc_dfs.contracts import checkpoint as ckpt
    state = ckpt.load(world.checkpoint)
    state["config"] = dict(state["config"], stage="refine")
    ckpt.save(state, tmp / "refine.pt")
    return "--checkpoint", tmp / "refine.pt", "--input", world.data, "--out", tmp / "pred"


def _nan_manifest_statistics(world, tmp):
    s = world.copy(world.shards, tmp / "shards")
    man = json.loads((s / "manifest.json").read_text())
    man["preprocessing"]["intensity"]["mean"] = float("nan")
    (s / "manifest.json").write_text(json.dumps(man))
    return "--shards", s, "--out", tmp / "run", "--epochs", 1, *H.TRAIN_TINY


def _evaluate_gt_pixdim(world, tmp):
    d = _data(world, tmp, lambda d: pixdim_contradicts_affine(d, ("segmentation.nii.gz",)))
    return ("evaluate", "--pred", world.pred, "--gt", d, "--out", tmp / "eval.json", "--no-surface-metrics"), None


def _report_onto_checkpoint(world, tmp):
    run = world.copy(world.run, tmp / "run")
    return ("report", run, "--out", run / "checkpoints" / "last.pt"), _unchanged(run / "checkpoints")


def _evaluate_onto(world, tmp, folder: str, name: str):
    src = {"pred": world.pred, "shards": world.shards}[folder]
    dst = world.copy(src, tmp / folder)
    return (("evaluate", "--pred", world.pred, "--gt", world.data, "--out", dst / name, "--no-surface-metrics"),
            _unchanged(dst))


def _synth_into_data(world, tmp):
    d = _data(world, tmp)
    return ("synth", "--out", d, "--cases", 2, "--size", 48, "--min-slices", 6, "--max-slices", 8), _unchanged(d)


def _a_file(tmp) -> Path:
    (tmp / "afile").write_text("not a folder\n")
    return tmp / "afile"


def _clinical_records(world, tmp, breaker):
    d = _data(world, tmp, breaker)
    return "--data", d / "kits.json", "--out", tmp / "clin", "--target", "malignant", "--folds", 2


def _resume(world, tmp, *extra):
    world.copy(world.run, tmp / "run")
    return _train(world, tmp, "--resume", *extra, epochs=2)


def _resume_more(world, tmp):
    run = world.copy(world.run, tmp / "run")
    return ("train", *_train(world, tmp, "--resume", epochs=2)), lambda res: (
        [] if [r["epoch"] for r in H.metrics_rows(run)] == [1, 2] else [f"rows {H.metrics_rows(run)}"])


def _stale_lock(world, tmp):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp / "run").mkdir()
    lock = tmp / "run" / LOCK_NAME
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "what": "hpc-dfs train"}))

    def check(res) -> list[str]:
        return ([f"{lock} is still there"] if lock.exists() else []) + (
            [] if (tmp / "run" / "checkpoints" / "last.pt").is_file() else ["no last.pt"])
    return ("train", *_train(world, tmp)), check


def _evaluate_own(world, tmp):
    (tmp / "eval.json").write_text("{}\n")   # an earlier evaluation's file: evaluate's own name

    def check(res) -> list[str]:
        return [] if "cases" in json.loads((tmp / "eval.json").read_text()) else ["eval.json was not rewritten"]
    return ("evaluate", "--pred", world.pred, "--gt", world.data, "--out", tmp / "eval.json",
            "--no-surface-metrics"), check


def _synth_rerun(world, tmp):
    d = _data(world, tmp)
    return ("synth", "--out", d, "--cases", 4, "--size", 48, "--min-slices", 6, "--max-slices", 8, "--seed", 0), \
        _unchanged(d)


_RO: list[Path] = []   # the read-only mount of this session (empty: not root, those trials are skipped)


def _ro(tmp) -> Path:
    return _RO[0] / tmp.name


_TRAIN_TOO_DEEP = ("--set", "model.depth=5")   # 32x32 shards: 2**5 = 32 pools a slice to 1x1

TRIALS = [
    # 1. non-finite or absurd intensities, and absurd settings
    preprocess_trial("c1_preprocess_float64_times_1e40", 1, _scale_image(1e40, np.float64), "non-finite"),
    preprocess_trial("c1_preprocess_complex_image", 1, complex_image, "complex"),
    preprocess_trial("c1_preprocess_implausible_hu", 1, _scale_image(1000.0, np.float32), "implausible"),
    Trial("c1_preprocess_rerun_with_absurd_case_keeps_good_shards", 1, "preprocess", ("case_00004",),
          _rerun_with_bad_case, "non-finite", one_line=False, cli_line=False),
    refused("c1_preprocess_set_in_plane_spacing_inf", 1, "preprocess", ("in_plane_spacing",), "finite",
            lambda w, t: ("--data", w.data, "--out", t / "s", *SLICE, "--set", "in_plane_spacing=inf")),
    refused("c1_preprocess_window_inf", 1, "preprocess", ("window",), "finite",
            lambda w, t: ("--data", w.data, "--out", t / "s", *SLICE, "--intensity", "window", "--set",
                          "window=[-200, inf]")),
    refused("c1_train_lr_1e12", 1, "train", ("optim.lr",), "1e+12", lambda w, t: _train(w, t, "--lr", "1e12")),
    refused("c1_train_dice_weight_nan", 1, "train", ("loss.dice_weight",), "finite",
            lambda w, t: _train(w, t, "--set", "loss.dice_weight=nan")),
    Trial("c1_train_diverges_stops_with_one_error", 1, "train", ("step 1",),
          lambda w, t: (("train", *_train(w, t, "--set", "loss.dice_weight=1e38")),
                        lambda res: [f"{LOST}a checkpoint was written: {sorted(os.listdir(t / 'run' / 'checkpoints'))}"]
                        if any((t / "run" / "checkpoints").glob("*.pt")) else []), "gradient norm is inf", rc=3),
    refused("c1_predict_checkpoint_with_nan_weights", 1, "predict", ("last.pt",), "non-finite weights",
            _nan_checkpoint),
    refused("c1_train_shards_with_nan_manifest_statistics", 1, "train", ("manifest.json",), "not a finite number",
            _nan_manifest_statistics, cli_line=False),
    Trial("c1_preprocess_float32_ct_is_valid", 1, "preprocess", (), lambda w, t: _same_shards_as_world(
        w, t, float32_image), expect="ok"),
    # 2. geometry that disagrees or degenerates
    preprocess_trial("c2_preprocess_zero_affine_column", 2, zero_affine_column, "degenerate affine"),
    preprocess_trial("c2_preprocess_pixdim_contradicts_affine", 2, pixdim_contradicts_affine, "contradictory"),
    preprocess_trial("c2_preprocess_zero_length_axis", 2, zero_length_axis, "zero-length axis"),
    Trial("c2_predict_pixdim_contradicts_affine", 2, "predict", (BAD,),
          lambda w, t: _predict(w, t, pixdim_contradicts_affine), "contradictory", one_line=False, cli_line=False),
    Trial("c2_evaluate_gt_pixdim_contradicts_affine", 2, "evaluate", (BAD, "segmentation.nii.gz"),
          _evaluate_gt_pixdim, "contradictory", one_line=False, cli_line=False),
    # 3. layout and records that are almost right
    preprocess_trial("c3_preprocess_trailing_space_folder", 3, rename_bad(BAD + " "), "white space"),
    preprocess_trial("c3_preprocess_non_ascii_digits", 3, rename_bad("case_0000\u0661", add_record=True), "ASCII",
                     names=("case_0000\u0661",)),
    preprocess_trial("c3_preprocess_duplicate_records_disagree", 3, duplicate_record, "age_at_nephrectomy"),
    preprocess_trial("c3_preprocess_malignant_mistyped", 3, malignant_mistyped, "malignant="),
    preprocess_trial("c3_preprocess_empty_kits_json", 3, lambda d: (d / "kits.json").write_text("[]"),
                     "no clinical records", names=("kits.json",), per_case=False),
    preprocess_trial("c3_preprocess_no_usable_record", 3, records_of_other_cases, "no usable clinical record",
                     names=("kits.json",), per_case=False),
    refused("c3_clinical_duplicate_records", 3, "clinical", (BAD,), "two clinical records",
            lambda w, t: _clinical_records(w, t, duplicate_record)),
    refused("c3_clinical_malignant_mistyped", 3, "clinical", (BAD,), "malignant=",
            lambda w, t: _clinical_records(w, t, malignant_mistyped)),
    Trial("c3_preprocess_records_of_absent_cases_are_valid", 3, "preprocess", (),
          lambda w, t: _same_shards_as_world(w, t, extra_records), expect="ok"),
    Trial("c3_predict_duplicate_records_disagree", 3, "predict", (BAD,),
          lambda w, t: _predict(w, t, duplicate_record), "age_at_nephrectomy", one_line=False, cli_line=False),
    Trial("c3_predict_trailing_space_folder_is_reported", 3, "predict", (BAD + " ",),
          lambda w, t: _predict(w, t, rename_bad(BAD + " ")), "white space", expect="reported"),
    # 4. writers and their outputs
    refused("c4_report_out_onto_checkpoint", 4, "report", ("last.pt",), "refusing to overwrite", lambda w, t: ()),
    refused("c4_evaluate_out_onto_summary", 4, "evaluate", ("summary.json",), "refusing to overwrite",
            lambda w, t: ()),
    refused("c4_evaluate_out_onto_manifest", 4, "evaluate", ("manifest.json",), "refusing to overwrite",
            lambda w, t: ()),
    refused("c4_synth_into_existing_data", 4, "synth", ("data",), "already holds a data set", lambda w, t: ()),
    refused("c4_train_out_is_a_file", 4, "train", ("afile",), "file exists",
            lambda w, t: ("--shards", w.shards, "--out", _a_file(t)), cli_line=False, rc=2),
    refused("c4_predict_out_is_a_file", 4, "predict", ("afile",), "file exists",
            lambda w, t: ("--checkpoint", w.checkpoint, "--input", w.data, "--out", _a_file(t)), rc=2),
    refused("c4_clinical_out_is_a_file", 4, "clinical", ("afile",), "file exists",
            lambda w, t: ("--data", w.data / "kits.json", "--out", _a_file(t), "--folds", 2), rc=2),
    refused("c4_train_out_read_only", 4, "train", ("read-only",), "read-only file system",
            lambda w, t: ("--shards", w.shards, "--out", _ro(t)), cli_line=False, rc=4),
    refused("c4_predict_out_read_only", 4, "predict", ("read-only",), "read-only file system",
            lambda w, t: ("--checkpoint", w.checkpoint, "--input", w.data, "--out", _ro(t)), rc=4),
    refused("c4_clinical_out_read_only", 4, "clinical", ("read-only",), "read-only file system",
            lambda w, t: ("--data", w.data / "kits.json", "--out", _ro(t), "--folds", 2), rc=4),
    refused("c4_evaluate_out_read_only", 4, "evaluate", ("read-only",), "read-only file system",
            lambda w, t: ("--pred", w.pred, "--gt", w.data, "--out", _ro(t) / "eval.json"), rc=4),
    Trial("c4_train_takes_over_a_stale_lock", 4, "train", (), lambda w, t: _stale_lock(w, t), expect="ok"),
    Trial("c4_evaluate_rewrites_its_own_eval_json", 4, "evaluate", (), lambda w, t: _evaluate_own(w, t),
          expect="ok"),
    Trial("c4_synth_rerun_into_its_own_folder_is_valid", 4, "synth", (), lambda w, t: _synth_rerun(w, t),
          expect="ok"),
    # 5. resume (the signals have tests of their own below)
    refused("c5_train_resume_with_changed_lr", 5, "train", ("optim.lr",), "keeps its settings",
            lambda w, t: _resume(w, t, "--lr", "0.01"), cli_line=False),
    refused("c5_train_resume_adam_run_with_sgd", 5, "train", ("optim.optimizer",), "keeps its settings",
            lambda w, t: _resume(w, t, "--optimizer", "sgd"), cli_line=False),
    Trial("c5_train_resume_with_more_epochs_is_valid", 5, "train", (), lambda w, t: _resume_more(w, t),
          expect="ok"),
    # 6. settings that cannot work
    refused("c6_preprocess_slice_size_8", 6, "preprocess", ("slice_size",), "2x2",
            lambda w, t: ("--data", w.data, "--out", t / "s", "--slice-size", "8,8")),
    refused("c6_preprocess_set_z_spacing_nan", 6, "preprocess", ("z_spacing",), "finite",
            lambda w, t: ("--data", w.data, "--out", t / "s", *SLICE, "--set", "z_spacing=nan")),
    refused("c6_train_model_too_deep_for_the_slices", 6, "train", ("model.depth",), "1x1",
            lambda w, t: _train(w, t, *_TRAIN_TOO_DEEP), cli_line=False),
    refused("c6_predict_refine_checkpoint_as_checkpoint", 6, "predict", ("refine.pt",), "--refine-checkpoint",
            _refine_checkpoint),
]
#: trials whose arguments and check come from a builder of their own (not ``refused``'s arguments alone)
_BUILT = {"c4_report_out_onto_checkpoint": _report_onto_checkpoint,
          "c4_evaluate_out_onto_summary": lambda w, t: _evaluate_onto(w, t, "pred", "summary.json"),
          "c4_evaluate_out_onto_manifest": lambda w, t: _evaluate_onto(w, t, "shards", "manifest.json"),
          "c4_synth_into_existing_data": _synth_into_data}
for _t in TRIALS:
    if _t.name in _BUILT:
        _t.build = _BUILT[_t.name]
    _t.root = "read_only" in _t.name


@pytest.fixture(scope="session")
def read_only(tmp_path_factory):
    """A read-only tmpfs (root only): where a stage's --out cannot be written."""
    where = tmp_path_factory.mktemp("read_only")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)],
                                           capture_output=True, timeout=30).returncode != 0:
        yield None
        return
    _RO.append(where)
    yield where
    _RO.clear()
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def class_runs(request, world, tmp_path_factory, read_only) -> dict:
    """Every selected trial built, then run two at a time."""
    selected = [it.callspec.params["trial"] for it in request.session.items
                if getattr(it, "originalname", "") == "test_trial" and hasattr(it, "callspec")]
    selected = [t for t in selected if not (t.root and read_only is None)]
    built = {t.name: (t, *t.build(world, tmp_path_factory.mktemp(t.name))) for t in selected}
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = {name: pool.submit(H.cli, *b[1]) for name, b in built.items()}
        return {name: (built[name], f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("trial", TRIALS, ids=[t.name for t in TRIALS])
def test_trial(trial: Trial, class_runs, read_only):
    if trial.root and read_only is None:
        pytest.skip("a read-only mount needs root")
    (_, _args, check), res = class_runs[trial.name]
    judge(trial, res, check)


# ----------------------------------------------------------------------------- runs that need a second process
def _start(args) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in H._command(args, 1)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=job_env(), cwd=REPO, start_new_session=True)


def _wait(what: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> bool:
    t_end = time.monotonic() + timeout
    while not what() and proc.poll() is None and time.monotonic() < t_end:
        time.sleep(0.02)
    return what()


def _finish(proc: subprocess.Popen, timeout: float = 180) -> H.Run:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        H.kill_tree(proc.pid)
        out, err = proc.communicate()
        return H.Run(-9, out, err + "\n[faults] TIMEOUT", timed_out=True)
    return H.Run(proc.returncode, out, err)


def test_c4_two_trains_into_one_out(world, tmp_path):
    """A second ``train`` into the folder a live run holds gets one error naming it; the first run is unharmed."""
    trial = Trial("c4_two_trains_into_one_out", 4, "train", ("run",), None, "in use by hpc-dfs train",
                  cli_line=False, rc=2)
    out = tmp_path / "run"
    first = _start(("train", *_train(world, tmp_path, epochs=40)))
    held = _wait(lambda: (out / LOCK_NAME).exists() or (out / "config.toml").exists(), first)
    second = H.cli("train", *_train(world, tmp_path, epochs=1))
    if first.poll() is None:
        os.kill(first.pid, signal.SIGUSR1)   # preempted: last.pt, exit 75
    done = _finish(first)

    def check(res) -> list[str]:
        problems = [] if held else ["the first run never held its folder"]
        if done.returncode not in (0, 75) or H.load_checkpoint(out / "checkpoints" / "last.pt") is None:
            problems.append(f"{LOST}the first run did not finish cleanly (rc {done.returncode}): {done.stderr[-800:]}")
        return problems
    judge(trial, second, check)


def test_c5_sigterm_in_the_last_step_of_an_epoch(world, tmp_path):
    """One step per epoch, so the signal lands in an epoch's last step: that epoch's validation, metrics row,
    epoch checkpoint and scheduler step are still done (exit 75), and the resumed run has every epoch's row."""
    trial = Trial("c5_sigterm_in_the_last_step_of_an_epoch", 5, "train", (), None, expect="ok")
    epochs = 20
    out, args = tmp_path / "run", ("train", *_train(world, tmp_path, "--steps-per-epoch", 1, epochs=epochs))
    proc = _start(args)
    seen = ""
    while proc.poll() is None and "steps/epoch" not in seen:
        seen += proc.stderr.readline()
    time.sleep(0.3)   # the loop has installed its handler and runs its one-step epochs
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    stopped = _finish(proc)
    seen += stopped.stderr
    rows = [r["epoch"] for r in H.metrics_rows(out)]
    at = H.load_checkpoint(out / "checkpoints" / "last.pt")
    problems = []
    if stopped.returncode == 75:   # stopped at the end of epoch k, the one the signal landed in: all of it done
        k = at["epoch"] if at else -1
        if at is None or at["step"] != k or rows != list(range(1, k + 1)) or not \
                (out / "checkpoints" / f"epoch_{k:04d}.pt").exists():
            problems.append(f"{LOST}stopped in the last step of an epoch, but last.pt is at epoch "
                            f"{at and at['epoch']}, step {at and at['step']}, rows {rows}")
        res = H.cli(*args, "--resume")
    else:   # the signal landed in the last epoch's step: the run is complete
        res = stopped
        if stopped.returncode != 0:
            problems.append(f"the signalled run exited {stopped.returncode}: {seen[-800:]}")
    final = H.load_checkpoint(out / "checkpoints" / "last.pt")
    rows = [r["epoch"] for r in H.metrics_rows(out)]
    if rows != list(range(1, epochs + 1)) or final is None or final["epoch"] != epochs:
        problems.append(f"{LOST}after the resume: rows {rows}, last.pt epoch {final and final['epoch']}")
    elif (final.get("scheduler") or {}).get("last_epoch") != epochs:
        problems.append(f"the scheduler stepped {final['scheduler'].get('last_epoch')} times in {epochs} epochs")
    judge(trial, res, lambda r: problems)


def test_c5_sigterm_stops_preprocess_with_one_line(world, tmp_path):
    """SIGTERM (what mpirun passes on for Ctrl-C) mid-run: one line and exit 143; the rerun completes."""
    trial = Trial("c5_sigterm_stops_preprocess_with_one_line", 5, "preprocess", ("SIGTERM",), None,
                  "interrupted by SIGTERM", rc=143)
    out, args = tmp_path / "shards", ("preprocess", "--data", world.data, "--out", tmp_path / "shards", *SLICE)
    proc = _start(args)
    _wait(lambda: out.is_dir() and any(p.name.startswith(H.TMP_PREFIX) or p.suffix == ".h5" for p in out.iterdir()),
          proc)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    res = _finish(proc)

    def check(r) -> list[str]:
        rerun = H.cli(*args)
        if rerun.returncode != 0:
            return [f"{LOST}the rerun failed: {rerun.stderr[-800:]}"]
        return _lost_if(H.same_shards(H.shard_arrays(out), H.ref_arrays(world, "shards")))
    if res.returncode == 0:
        pytest.skip("preprocess finished before the signal on this machine")
    judge(trial, res, check)
