"""KiTS metrics of predicted label maps against ground truth: ``hpc-dfs evaluate``.

    hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json
    hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json --strict   # missing = error
    mpirun -np 8 hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json  # cases split over ranks

``--regions kits23`` runs the official KiTS23 evaluation instead (:mod:`hpc_dfs.metrics.kits23`): kidney and
masses {1,2,3}, masses {2,3} and tumour {2}, each with Dice and surface Dice at 1.0331, 1.1329 and 1.1498 mm; a
region empty in both truth and prediction scores 1, empty in one of them 0; per case, per region and the mean over
regions (the leaderboard's figure). Beside the JSON it writes the official ``evaluation.csv`` columns
(``caseID,Dice_kidney,Dice_masses,Dice_tumor,SD_kidney,SD_masses,SD_tumor`` and an ``average`` row).
Predictions may be named ``case_XXXXX.nii.gz`` (the challenge's and nnU-Net's naming) or ``prediction_XXXXX``;
predicted cysts (label 3) are scored::

    hpc-dfs evaluate --pred nnUNet_results/.../validation --gt kits23/dataset --out eval.json --regions kits23

Predictions are matched to ground truth by KiTS naming: ``PRED/prediction_XXXXX.nii.gz`` is compared
with ``GT/case_XXXXX/segmentation.nii.gz`` (or KiTS21's ``aggregated_MAJ_seg.nii.gz``). Per case and
per region it computes:

- **KiTS19 official metrics**: kidney Dice on the composite ``label > 0`` (kidney + tumour [+ cyst]),
  tumour Dice on ``label == 2``; their mean is the KiTS19 score (``kits_score``).
- **IoU** (Jaccard) of both regions and their mean (``mean_iou``).
- **HD95** in mm with the voxel spacing of the ground-truth header, from
  :func:`monai.metrics.compute_hausdorff_distance` (MONAI's definition: the larger of the two directed
  95th-percentile surface distances).
- **Surface Dice** (normalised surface distance) at the KiTS21 tolerances, from
  :func:`monai.metrics.compute_surface_dice` with ``use_subvoxels=True`` (surfel areas, as DeepMind's
  ``surface-distance`` package that the KiTS21 evaluation uses). Tolerances: 2.178 mm for kidney+masses
  and 1.536 mm for tumour (neheller/kits21, ``kits21/configuration/labels.py``, ``HEC_NSD_TOLERANCES_MM``).

Empty masks (the KiTS convention, ``kits21/evaluation/metrics.py``):

==================  ======  =====  ============  ======
prediction / truth  Dice    IoU    surface Dice  HD95
==================  ======  =====  ============  ======
both empty          1       1      1             0
only one empty      0       0      0             null
==================  ======  =====  ============  ======

An undefined HD95 is written as ``null`` and left out of the mean; ``mean.n_hd95_undefined`` counts
them. Every other metric is defined for every case.

**Tumour detection** (per case, :func:`tumour_detection`). Components are 6-connected (face
neighbours, as in :mod:`hpc_dfs.postprocess`). Every ground-truth tumour component (``label == 2``)
is put on the patient's left or right by the world x (RAS, from the ground truth's affine) of its
centroid against a midline: the midpoint between the x centroids of the two largest ground-truth
kidney components (``label > 0``), or the centre of the grid when the ground truth has fewer than two.
Each ground-truth tumour component is then

- **hit**: at least one voxel of it is predicted tumour;
- **wrong kidney**: not hit, and the largest false-positive tumour component lies on the other side of
  the midline (the model found "the" tumour, in the other kidney);
- **missed**: otherwise.

A **false-positive component** is a predicted tumour component that touches no ground-truth tumour
voxel. Columns: ``tumor_ml_gt``, ``tumor_ml_pred``, ``n_tumors_gt``, ``n_tumors_hit``,
``n_tumors_missed``, ``n_tumors_wrong_kidney``, ``n_fp_components``, ``fp_ml`` and a one-word
``detection`` (``hit``, ``missed``, ``wrong kidney``, ``partial``, ``no tumour``); the JSON also lists
every component (``tumors``: volume, side, status).

**Missing predictions** (a ground-truth case without ``prediction_XXXXX``) are scored as an
all-background prediction, as KiTS does: Dice 0 for a region the ground truth has (1 when it has
none), every tumour missed. Their rows are ``missing_cases`` in the JSON and marked in the tables;
``mean`` is over the evaluated predictions (``mean.n_cases``), and ``mean_all`` over every
ground-truth case, missing ones counted (``mean_all.n_cases``, ``mean_all.n_missing``). ``--strict``
makes a missing prediction an error (exit code 3) instead.

**Provenance.** When ``PRED/summary.json`` (written by ``hpc-dfs predict``) records each case's provenance,
every prediction must be an ``ok`` case of that run, with the ``descrip`` of its NIfTI header equal to the
summary's (the checkpoint and input sha256): a stale file of another run is an error naming it (exit code 3).

**Out-of-fold.** A folder written by ``predict --oof`` (each fold's validation cases by its own model) is scored as
one pooled set (``mean``: nnU-Net's pooled validation), and per fold: ``oof.per_fold``, and the mean and SD of the
folds' means (``oof.fold_mean``, ``oof.fold_sd``); each case row names its ``fold``.

**Labels.** A prediction may hold only 0 (background), 1 (kidney) and 2 (tumour); any other value is
an error naming the case (ground truth may also hold KiTS21's 3, cyst, counted as kidney).

Outputs (all atomic): ``FILE.json`` (``{"cases": [...], "mean": {...}, ...}``), ``FILE.csv`` and
``FILE.md``. When raw (not post-processed) predictions are available (``--pred-raw``, or ``PRED/raw``
written by ``predict --save-raw``) the Dice of both is reported, so the effect of post-processing is
visible (``postprocessing`` in the JSON, a second table in the markdown).

Dice and IoU are counted with numpy (two sums; MONAI's versions need one-hot float tensors of the
whole volume and return NaN for empty-vs-empty, which KiTS defines as 1); the tests check them
against ``monai.metrics.DiceMetric`` and ``MeanIoU``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hpc_dfs import config as cfgmod, parallel
from hpc_dfs.config.predict import EvaluateConfig
from hpc_dfs.contracts.evaluation import write_kits23_outputs, write_outputs
from hpc_dfs.contracts.kits import EVAL_LABEL_FILES, find_label_file
from hpc_dfs.contracts.prediction import RAW_DIR
from hpc_dfs.errors import EXIT_DATA, EXIT_PARTIAL
from hpc_dfs.log import get_logger
from hpc_dfs.metrics.cases import (EvaluationError, evaluate_files, evaluate_missing, mean_of, raw_dice, summarise,
                                   summarise_all)
from hpc_dfs.metrics.folders import check_provenance, fold_figures, match_predictions
from hpc_dfs.metrics import kits23
from hpc_dfs.metrics.intervals import case_intervals

CLI_LONG_HELP = True  # `hpc-dfs evaluate --help` shows this module's whole docstring

log = get_logger("hpc_dfs.evaluate")


# ----------------------------------------------------------------------------- aggregation and writing


def _evaluate_one(cid: str, pred_path: Path | None, gt_path: Path | None, gt_dir: Path, raw_dir: Path | None,
                  cfg: EvaluateConfig) -> dict[str, Any]:
    if gt_path is None:
        raise EvaluationError(f"{pred_path.name} has no ground truth: none of {', '.join(EVAL_LABEL_FILES)} "
                              f"in {gt_dir / cid}")
    if pred_path is None:
        return {"case_id": cid, **evaluate_missing(gt_path, cfg)}
    row = {"case_id": cid, **evaluate_files(pred_path, gt_path, cfg)}
    if raw_dir is not None:
        row.update(raw_dice(raw_dir, pred_path, gt_path))
    log.info("%s: kidney Dice %.4f, tumour Dice %.4f, detection %s", cid, row["kidney_dice"], row["tumor_dice"],
             row["detection"])
    return row


def _evaluate_share(work: list, gt_dir: Path, raw_dir: Path | None, cfg: EvaluateConfig) -> tuple[list, list]:
    """This rank's share of the work, gathered on every rank in case order: (rows, errors)."""
    rank, world = parallel.rank(), parallel.size()
    mine = work
    if world > 1:  # each rank evaluates a share, balanced by file size; results are gathered in case order
        from hpc_dfs.data.reader import partition_balanced
        mine = partition_balanced([(w, (w[1] or w[2]).stat().st_size) for w in work], rank, world)
    rows, errors = [], []
    for cid, pred_path, gt_path in mine:
        try:
            rows.append(_evaluate_one(cid, pred_path, gt_path, gt_dir, raw_dir, cfg))
        except EvaluationError as e:
            log.error("%s: %s", cid, e)
            errors.append({"case_id": cid, "error": str(e)})
    if world > 1:
        parts = parallel.allgather_object((rows, errors))
        rows = [r for part in parts for r in part[0]]
        errors = [e for part in parts for e in part[1]]
    return sorted(rows, key=lambda c: c["case_id"]), sorted(errors, key=lambda e: e["case_id"])


def _definitions(cfg: EvaluateConfig) -> dict[str, str]:
    return {"kidney": "label > 0", "tumor": "label == 2", "kits_score": "(kidney_dice + tumor_dice) / 2",
            "mean_iou": "(kidney_iou + tumor_iou) / 2",
            "hd95": f"MONAI compute_hausdorff_distance, percentile {cfg.hd_percentile}, mm",
            "surface_dice": "MONAI compute_surface_dice(use_subvoxels=True), KiTS21 tolerances",
            "empty": "both empty: dice=iou=surface_dice=1, hd95=0; one empty: dice=iou=surface_dice=0, "
                     "hd95=null (left out of means)",
            "detection": "6-connected components; a ground-truth tumour component is hit when a voxel of it is "
                         "predicted tumour, wrong kidney when not hit and the largest false-positive tumour component "
                         "lies on the other side of the midline (between the two largest ground-truth kidney "
                         "components, world x), else missed; a false-positive component touches no ground-truth tumour",
            "missing": "a missing prediction is scored as all background (mean_all); mean is over evaluated cases"}


def _raw_dir(pred_dir: Path, pred_raw: Path | None) -> Path | None:
    if pred_raw is not None:
        if not pred_raw.is_dir():
            raise EvaluationError(f"--pred-raw directory {pred_raw} does not exist")
        return pred_raw
    return pred_dir / RAW_DIR if (pred_dir / RAW_DIR).is_dir() else None


def evaluate_dirs(pred_dir: Path, gt_dir: Path, cfg: EvaluateConfig | None = None,
                  pred_raw: Path | None = None) -> dict[str, Any]:
    """Evaluate every prediction in ``pred_dir`` against ``gt_dir``; returns the result dict (not written).

    Args:
        pred_dir: folder with ``prediction_XXXXX.nii.gz``.
        gt_dir: KiTS-layout folder with ``case_XXXXX/segmentation.nii.gz``.
        cfg: metric settings; ``cfg.strict`` makes a missing prediction an error.
        pred_raw: predictions before post-processing (default ``pred_dir/raw`` when it exists).

    Raises:
        EvaluationError: a folder is missing or empty, a prediction is not from the run of ``summary.json``
            (:func:`check_provenance`), or (``strict``) a ground-truth case has no prediction.
    """
    cfg = cfg or EvaluateConfig()
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pairs, missing = match_predictions(pred_dir, gt_dir)
    check_provenance(pred_dir, pairs)
    if missing and cfg.strict:
        raise EvaluationError(f"{len(missing)} ground-truth case(s) have no prediction in {pred_dir}: "
                              f"{', '.join(missing)} (--strict)", code=EXIT_DATA)
    raw_dir = _raw_dir(pred_dir, pred_raw)
    work = pairs + [(c, None, find_label_file(gt_dir / c, EVAL_LABEL_FILES)) for c in missing]
    rows, errors = _evaluate_share(work, gt_dir, raw_dir, cfg)
    cases = [r for r in rows if r.get("status") != "missing prediction"]
    missing_rows = [r for r in rows if r.get("status") == "missing prediction"]
    if parallel.rank() == 0:
        for c in missing:
            log.warning("%s has ground truth but no prediction in %s: scored as all background in mean_all "
                        "(--strict makes it an error)", c, pred_dir)
    result: dict[str, Any] = {
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "definitions": _definitions(cfg),
        "tolerances_mm": {"kidney": cfg.kidney_tolerance_mm, "tumor": cfg.tumor_tolerance_mm},
        "cases": cases, "mean": summarise(cases), "missing_cases": missing_rows,
        "mean_all": summarise_all(cases, missing_rows), "errors": errors, "missing_predictions": missing,
        "intervals": case_intervals(cases),
    }
    oof = fold_figures(pred_dir, cases, missing_rows)   # predict --oof: the pooled set's folds, each case's fold
    if oof is not None:
        result["oof"] = oof
    if raw_dir is not None and cases:
        raw = {k: mean_of(c[f"{k}_raw"] for c in cases) for k in ("kidney_dice", "tumor_dice", "kits_score")}
        post = {k: result["mean"][k] for k in ("kidney_dice", "tumor_dice", "kits_score")}
        for k, v in raw.items():
            result["mean"][f"{k}_raw"] = v
        result["postprocessing"] = {"raw_dir": str(raw_dir), "raw": raw, "postprocessed": post,
                                    "delta": {k: post[k] - raw[k] for k in raw}}
    return result


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The folders (``type=Path``) and the :class:`EvaluateConfig` settings as flags."""
    parser.add_argument("--pred", type=Path, required=True,
                        help="directory with prediction_XXXXX.nii.gz (or case_XXXXX.nii.gz: the KiTS submission and "
                             "nnU-Net naming)")
    parser.add_argument("--gt", type=Path, required=True,
                        help="KiTS-layout directory with case_XXXXX/segmentation.nii.gz")
    parser.add_argument("--out", type=Path, required=True, help="output JSON (CSV and markdown are written beside it)")
    parser.add_argument("--pred-raw", type=Path, default=None,
                        help="predictions before post-processing, to report its effect (default: PRED/raw when it "
                             "exists)")
    cfgmod.add_arguments(parser, EvaluateConfig)


def main(args: argparse.Namespace) -> int:
    """``hpc-dfs evaluate``: exit 0, or 1 when some predictions could not be evaluated.

    Raises:
        HpcDfsError: a bad setting or folder (code 2), or a missing prediction under ``--strict`` (code 3).
    """
    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    cfg = cfgmod.from_args(EvaluateConfig, args)
    pred_dir = cfgmod.require_path(args.pred, "dir", "--pred")
    gt_dir = cfgmod.require_path(args.gt, "dir", "--gt")
    pred_raw = cfgmod.require_path(args.pred_raw, "dir", "--pred-raw") if args.pred_raw else None
    if cfg.regions == "kits23":
        return _main_kits23(pred_dir, gt_dir, args.out)
    result = evaluate_dirs(pred_dir, gt_dir, cfg, pred_raw)
    if parallel.rank() != 0:
        return EXIT_PARTIAL if result["errors"] else 0
    paths = write_outputs(result, args.out)
    m, ma = result["mean"], result["mean_all"]
    if result["cases"]:
        log.info("%d cases: kidney Dice %.4f, tumour Dice %.4f, KiTS19 score %.4f; tumours %d hit, %d missed, %d in "
                 "the wrong kidney, %d false-positive components -> %s", m["n_cases"], m["kidney_dice"],
                 m["tumor_dice"], m["kits_score"], ma["n_tumors_hit"], ma["n_tumors_missed"],
                 ma["n_tumors_wrong_kidney"], ma["n_fp_components"], ", ".join(map(str, paths)))
    if ma["n_missing"]:
        log.warning("with the %d missing prediction(s) scored as all background (n=%d): kidney Dice %.4f, tumour "
                    "Dice %.4f", ma["n_missing"], ma["n_cases"], ma["kidney_dice"], ma["tumor_dice"])
    if result["errors"]:
        log.error("%d of %d predictions could not be evaluated (listed in %s)", len(result["errors"]),
                  len(result["errors"]) + len(result["cases"]), paths[0])
        return EXIT_PARTIAL
    return 0


def _main_kits23(pred_dir: Path, gt_dir: Path, out: Path) -> int:
    """``--regions kits23``: the official KiTS23 evaluation of every predicted case, on rank 0.

    Raises:
        Kits23Error: a folder holds no prediction, a case lacks its ground truth, or a file cannot be scored.
    """
    if parallel.rank() != 0:
        return 0
    rows = kits23.score_folder(pred_dir, gt_dir)
    result = {"regions": "kits23", "pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
              "tolerances_mm": dict(kits23.TOLERANCES_MM), "columns": list(kits23.CSV_COLUMNS),
              "cases": [{"case_id": cid, **row} for cid, row in rows.items()], "mean": kits23.summarise(rows)}
    paths = write_kits23_outputs(result, out, kits23.to_csv(rows))
    m = result["mean"]
    log.info("%d cases (KiTS23 regions): Dice %.4f kidney, %.4f masses, %.4f tumour; mean Dice %.4f, mean surface "
             "Dice %.4f -> %s", m["n_cases"], m["Dice_kidney"], m["Dice_masses"], m["Dice_tumor"], m["mean_dice"],
             m["mean_sd"], ", ".join(map(str, paths)))
    return 0
