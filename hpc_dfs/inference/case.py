"""One case through the predictor: read, transform as in training, infer, restore, cascade, post-process, write."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs import fsutil
from hpc_dfs.config.predict import PredictConfig
from hpc_dfs.contracts import prediction as pred_contract
from hpc_dfs.contracts.kits import IMAGE_NAME, find_label_file
from hpc_dfs.inference.cases import DUPLICATE, CaseInput
from hpc_dfs.inference.errors import InferenceError
from hpc_dfs.inference.nifti import nifti_gz_bytes
from hpc_dfs.inference.replicas import Replica, clinical_vector
from hpc_dfs.inference.slices import infer_slices
from hpc_dfs.log import get_logger

__all__ = ["predict_case", "case_outputs", "provenance", "move_aside"]

log = get_logger("hpc_dfs.predict")


_STEPS = ("start", "load", "preprocess", "inference", "restore", "postprocess", "write")


def predict_case(case: CaseInput, reps: list[Replica], cfg: PredictConfig, records: dict[str, dict],
                 clinical_source: Path | None, out_dir: Path, device,
                 refine: list[Replica] | None = None) -> dict[str, Any]:
    """Segment one case and write its outputs; returns its summary row.

    With ``refine`` replicas this is the cascade: stage 1's native probabilities give the kidney boxes,
    stage 2 segments each box's window at its finer spacing, and its probabilities replace stage 1's there.

    Raises:
        InferenceError: the case cannot be read, transformed or segmented; the message names the problem.
    """
    import nibabel as nib

    from hpc_dfs.data.geometry import restore_volume
    from hpc_dfs.postprocess import postprocess
    t = {"start": time.perf_counter()}
    image, affine, img = _read_case(case)
    origin = provenance(case, reps, refine)
    t["load"] = time.perf_counter()
    clin, clinical_used = _clinical_inputs(case, reps, records, clinical_source)
    slices, geometry = _transform(case, image, affine, reps[0].preprocessing)
    t["preprocess"] = time.perf_counter()
    probs, risk = infer_slices(reps, slices, clin, cfg.batch_size, cfg.tta, device)
    t["inference"] = time.perf_counter()
    native = restore_volume(probs, geometry, fill=reps[0].fill)
    del probs
    cascade = None
    if refine:
        native, cascade = _refine(case, image, affine, native, refine, cfg, records, clinical_source, device)
    label = _labels(native, reps[0])
    if label.shape != image.shape:  # restore_volume guarantees it; this guards the contract
        raise InferenceError(f"restored shape {label.shape} differs from the input's {image.shape}")
    t["restore"] = time.perf_counter()
    clean, pp_info = postprocess(label, affine, cfg.postprocess, reps[0].classes, image=image)
    t["postprocess"] = time.perf_counter()
    files = _write_case(case, cfg, out_dir, img, {"clean": clean, "raw": label, "native": native}, image, affine,
                        origin["descrip"])
    del native
    t["write"] = time.perf_counter()

    voxel_ml = float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
    seconds = {k: round(t[k] - t[prev], 4) for prev, k in zip(_STEPS[:-1], _STEPS[1:])}
    seconds["total"] = round(t["write"] - t["start"], 4)
    return {
        "case_id": case.case_id, "image": str(case.image_path), "shape": [int(s) for s in image.shape],
        "clinical_used": clinical_used, "status": "ok", "risk_prob": risk,
        "orientation": "".join(nib.aff2axcodes(affine)), "n_slices_model": int(slices.shape[0]),
        "volumes_ml": {name: int(np.count_nonzero(clean == i)) * voxel_ml
                       for i, name in enumerate(reps[0].classes) if i > 0},
        "postprocess": pp_info, "files": {k: v.relative_to(out_dir).as_posix() for k, v in files.items()},
        "seconds": seconds, "provenance": origin, **({"cascade": cascade} if cascade is not None else {}),
    }


def _refine(case: CaseInput, image: np.ndarray, affine: np.ndarray, native: np.ndarray, refine: list[Replica],
            cfg: PredictConfig, records: dict[str, dict], clinical_source: Path | None, device):
    """Stage 2 of the cascade on one case: (native probabilities, the summary's ``cascade`` entry)."""
    from hpc_dfs.data.refine import refine_in_boxes
    clin, _ = _clinical_inputs(case, refine, records, clinical_source)

    def infer(sl: np.ndarray) -> np.ndarray:
        return infer_slices(refine, sl, clin, cfg.batch_size, cfg.tta, device)[0]

    native, boxes = refine_in_boxes(image.astype(np.float32, copy=False), affine, native, refine[0].preprocessing,
                                    infer, regions=refine[0].regions is not None, blend=cfg.refine_blend)
    if not boxes:
        log.warning("%s: stage 1 found no kidney, so there is no box for stage 2; the stage-1 labels are kept",
                    case.case_id)
    return native, {"boxes": boxes, "stage": "refine" if boxes else "locate (no kidney found by stage 1)"}


def _labels(native: np.ndarray, rep: Replica) -> np.ndarray:
    """The class map of the native probabilities: the argmax, or for a region-trained model each region's label
    over the earlier ones (nnU-Net's ``regions_class_order``, :func:`hpc_dfs.data.regions.region_labels`)."""
    if rep.regions is None:
        return np.argmax(native, axis=0).astype(np.uint8)
    from hpc_dfs.data.regions import region_labels
    return region_labels(native, rep.regions["labels"])


def _read_case(case: CaseInput) -> tuple[np.ndarray, np.ndarray, Any]:
    """The image array, its affine and its NIfTI image (whose header the outputs copy); raises InferenceError."""
    import nibabel as nib

    from hpc_dfs.data.checks import IntensityProblem, check_intensities
    from hpc_dfs.data.kits_io import CaseError, load_nifti
    try:
        image, affine, _ = load_nifti(case.image_path, case.case_id)  # checks: present, decodable, 3-D
        img = nib.load(str(case.image_path))  # header only: the outputs copy it
    except CaseError as e:
        raise InferenceError(e.problem if case.image_path.name in e.problem else f"{case.image_path}: {e.problem}") \
            from None
    if min(image.shape) < 1:
        raise InferenceError(f"{case.image_path.name} has an empty axis, shape {image.shape}")
    try:  # the check preprocess makes: complex, non-finite as float32, not CT
        check_intensities(image)
    except IntensityProblem as e:
        raise InferenceError(f"{case.image_path.name} {e}") from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InferenceError(f"{case.image_path.name} has a degenerate affine; its orientation cannot be read")
    return image, affine, img


def _clinical_inputs(case: CaseInput, reps: list[Replica], records: dict[str, dict],
                     clinical_source: Path | None) -> tuple[list[np.ndarray | None], bool]:
    """Per replica the case's clinical vector (None for image-only models), and whether a record was used."""
    record = records.get(case.case_id)
    needed = any(r.needs_clinical for r in reps)
    if needed and record is not None and DUPLICATE in record:   # which record is meant: not guessed
        raise InferenceError(record[DUPLICATE])
    if needed and record is None:
        where = clinical_source if clinical_source else "no clinical file (kits.json) found"
        log.warning("%s: no clinical record (%s); running image-only with the imputed all-missing clinical vector",
                    case.case_id, where)
    vectors = [clinical_vector(rep, case.case_id, record) if rep.needs_clinical else None for rep in reps]
    return vectors, needed and record is not None


def _transform(case: CaseInput, image: np.ndarray, affine: np.ndarray, preprocessing: dict) -> tuple[np.ndarray, Any]:
    """The model's slices of the case and the geometry to restore them (as in training); raises InferenceError."""
    import nibabel as nib

    from hpc_dfs.data.geometry import prepare_image
    try:
        return prepare_image(image.astype(np.float32, copy=False), affine, preprocessing)
    except Exception as e:
        raise InferenceError(f"cannot transform {case.image_path.name} (shape {image.shape}, orientation "
                          f"{''.join(nib.aff2axcodes(affine))}) as in training: {type(e).__name__}: {e}") from None


def _write_case(case: CaseInput, cfg: PredictConfig, out_dir: Path, img, maps: dict[str, np.ndarray],
                image: np.ndarray, affine: np.ndarray, descrip: str | None = None) -> dict[str, Path]:
    """Write the case's files (``maps``: ``clean``, ``raw`` labels and ``native`` probabilities ``(C, ...)``)."""
    from hpc_dfs.visualize import save_case_overlay
    files = case_outputs(case, out_dir, cfg)
    fsutil.write_bytes(files["prediction"], nifti_gz_bytes(maps["clean"], img, cfg.compress_level, descrip))
    if "raw" in files:
        fsutil.write_bytes(files["raw"], nifti_gz_bytes(maps["raw"], img, cfg.compress_level, descrip))
    if "probabilities" in files:
        probabilities = np.ascontiguousarray(np.moveaxis(maps["native"], 0, -1))
        fsutil.write_bytes(files["probabilities"], nifti_gz_bytes(probabilities, img, cfg.compress_level, descrip))
    if "overlay" in files:
        save_case_overlay(files["overlay"], image, maps["clean"], _ground_truth(case, image.shape), affine,
                          title=case.case_id)
    return files


def case_outputs(case: CaseInput, out_dir: Path, cfg: PredictConfig | None = None) -> dict[str, Path]:
    """The files predict writes for ``case`` under ``cfg`` (without ``cfg``: every file it may write)."""
    return pred_contract.case_files(out_dir, case.case_id, raw=cfg is None or cfg.save_raw,
                                    probabilities=cfg is None or cfg.save_probabilities,
                                    overlay=cfg is None or cfg.overlays)


def provenance(case: CaseInput, reps: list[Replica], refine: list[Replica] | None = None) -> dict[str, str]:
    """Where a case's outputs come from: the sha256 of the checkpoint files and of the input image.

    ``descrip`` (``hpc-dfs <checkpoints sha[:12]> <input sha[:12]>``) goes into every NIfTI header written for
    the case, the rest into its summary.json row; ``evaluate`` compares them.
    """
    shas = [r.info.get("sha256") or fsutil.sha256_file(r.path) for r in list(reps) + list(refine or [])]
    ckpts = shas[0] if len(shas) == 1 else hashlib.sha256(" ".join(shas).encode()).hexdigest()
    image = fsutil.sha256_file(case.image_path)
    return {"checkpoints_sha256": ckpts, "input_sha256": image, "descrip": pred_contract.descrip(ckpts, image)}


def move_aside(case: CaseInput, out_dir: Path) -> list[Path]:
    """Move the outputs of ``case`` already in ``out_dir`` (an earlier run's, or this run's part) to ``stale/``.

    Called when the case fails, so that no prediction of another run stays beside this run's summary.json.
    """
    moved = []
    for p in case_outputs(case, out_dir).values():
        if p.is_file():
            dst = out_dir / pred_contract.STALE_DIR / p.relative_to(out_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dst)
            moved.append(dst)
    if moved:
        log.warning("%s failed: moved its earlier outputs aside to %s (%s)", case.case_id,
                    out_dir / pred_contract.STALE_DIR,
                    ", ".join(p.name for p in moved))
    return moved


def _ground_truth(case: CaseInput, shape: tuple[int, ...]) -> np.ndarray | None:
    """The case's ground truth beside its image, for the overlay (prediction | truth | errors); None if absent."""
    import nibabel as nib
    ref = case.image_path.parent if case.image_path.name == IMAGE_NAME else case.image_path   # KiTS or nnU-Net
    path = find_label_file(ref)
    if path is None:
        return None
    try:
        gt = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception:  # an unreadable truth only costs the overlay its truth panel
        return None
    return gt.astype(np.uint8) if gt.shape == tuple(shape) else None
