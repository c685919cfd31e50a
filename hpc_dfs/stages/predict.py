"""Whole-volume inference back to the native grid: ``hpc-dfs predict`` (the paper's steps 4 and 5).

    hpc-dfs predict --checkpoint runs/r1/checkpoints/best.pt --input data/kits --out runs/r1/pred
    mpirun -np 4 hpc-dfs predict --checkpoint f0/best.pt --checkpoint f1/best.pt --weights 0.6,0.4 \\
        --input data/kits --out pred --tta --save-raw

``--input`` is a KiTS case folder (``case_XXXXX/imaging.nii.gz``), a folder of such cases, or one
``imaging.nii.gz``. Clinical records come from ``kits.json`` beside the cases or from ``--clinical``.

Per case:

1. the CT is transformed exactly as in training, with the ``preprocessing`` parameters stored in the
   checkpoint (:func:`hpc_dfs.data.geometry.prepare_image`): reorientation, resampling, crop/pad,
   intensity normalisation;
2. the slices go through every checkpoint in batches (``torch.inference_mode``), optionally with
   flip test-time augmentation (identity, H flip, W flip, both; softmax probabilities averaged);
   several checkpoints (e.g. k-fold replicas) are combined by the weighted average of their
   probabilities -- the paper's "aggregate the predictions of each model replica";
3. the probabilities are resampled back to the native grid
   (:func:`hpc_dfs.data.geometry.restore_volume`) and the argmax is the label map, with exactly the
   input's shape and affine (its NIfTI header is copied, so qform/sform are the input's);
4. the label map is post-processed (:mod:`hpc_dfs.postprocess`, switch off with ``--no-postprocess``);
5. the case-level risk is the mean of ``sigmoid(risk_logit)`` over the slices (as in training
   validation), weighted-averaged over checkpoints.

Outputs in ``--out`` (CONTRACTS.md section 4): ``prediction_XXXXX.nii.gz`` (uint8), optionally
``probabilities_XXXXX.nii.gz`` (float32, classes on the last axis) and ``raw/prediction_XXXXX.nii.gz``
(before post-processing), ``overlay_XXXXX.png``, and, from rank 0, ``risk.csv`` and ``summary.json``
(per-case timing, status and errors).

Provenance: each case's row in ``summary.json`` holds the sha256 of the checkpoint file(s) and of the input
image, and every NIfTI written for it says ``hpc-dfs <checkpoints sha[:12]> <input sha[:12]>`` in its header's
``descrip``; ``evaluate`` refuses a prediction that is not from the run of the summary. A case that fails has
its outputs from an earlier run moved to ``--out/stale/``. Rank 0 removes ``.tmp-*`` files of a killed run
before any rank writes. A full disk stops the run with one line naming the file being written (exit code 4).

Distributed: under ``mpirun``/``srun``/``horovodrun`` the cases are split over ranks, balanced by
voxel count; each rank writes its own cases and rank 0 gathers the summary. A case's outputs depend
only on the case and the checkpoints -- batches never mix cases, the CPU thread count is fixed
(``--threads``, default 1), cuDNN runs deterministically, and NIfTI files are gzipped with
``mtime=0`` -- so they are byte-identical whatever the number of ranks.

Bad inputs (an unreadable file, a shape the model cannot take, a malformed clinical record) get one
error line naming the case and are skipped; the exit code is 1 when any case failed. A case without
a clinical record runs image-only: a fusion model gets the pipeline's imputed all-missing vector,
and ``risk.csv`` says ``clinical_used=0``. A checkpoint without preprocessing parameters, or
checkpoints that disagree on them, stop the run before any case (exit code 2), on every rank: the
ranks agree on the setup, so a problem that one rank alone sees (a file missing on its node) stops the
whole job instead of leaving the others waiting. The paths (``--checkpoint``, ``--input``, ``--out``,
``--clinical``) are arguments; every other setting is a ``PredictConfig`` field (``--config``, ``--set``).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs.errors import EXIT_DATA, EXIT_ENV, EXIT_PARTIAL, EXIT_USAGE, HpcDfsError  # cli.main catches
from hpc_dfs import __version__, parallel, fsutil
from hpc_dfs import config as cfgmod
from hpc_dfs.config.predict import PredictConfig
from hpc_dfs.data.layout import CASE_RE, IMAGE_NAME, LABEL_FILES, near_misses
from hpc_dfs.data.roi import context_indices
from hpc_dfs.log import get_logger

CLI_LONG_HELP = True  # `hpc-dfs predict --help` shows this module's whole docstring

log = get_logger("hpc_dfs.predict")

TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))  # dims of [B, 1, H, W]


class PredictError(HpcDfsError):
    """A run-level problem (checkpoints, input path, device): stops the run before any case, exit code 2."""

    code = EXIT_USAGE


class InferenceError(HpcDfsError):
    """A problem with one case: the case is skipped, the run goes on and exits with 1 (caught in :func:`run`)."""

    code = EXIT_DATA


# ----------------------------------------------------------------------------- inputs
@dataclass
class CaseInput:
    """One image to segment: its case id, image path and the id used in output names."""

    case_id: str
    image_path: Path

    @property
    def suffix(self) -> str:
        """``case_00012`` -> ``00012`` (KiTS naming); any other id is used as it is."""
        m = CASE_RE.match(self.case_id)
        return m.group(1) if m else self.case_id


def discover_inputs(path: str | Path) -> tuple[list[CaseInput], Path]:
    """Cases under ``path`` (sorted by id) and the folder where ``kits.json`` would be.

    ``path`` may be one ``imaging.nii.gz`` (or any ``.nii``/``.nii.gz``), a case folder holding
    ``imaging.nii.gz``, or a folder of ``case_XXXXX`` folders.

    Raises:
        ConfigError: ``path`` does not exist.
        PredictError: ``path`` is neither a NIfTI image nor a folder holding cases.
    """
    p = cfgmod.require_path(path, "any", "--input")
    if p.is_file():
        if not (p.name.endswith(".nii.gz") or p.name.endswith(".nii")):
            raise PredictError(f"--input {p} is a file but not a NIfTI image (.nii or .nii.gz)")
        cid = p.parent.name if CASE_RE.match(p.parent.name) else re.sub(r"\.nii(\.gz)?$", "", p.name)
        return [CaseInput(cid, p)], (p.parent.parent if CASE_RE.match(p.parent.name) else p.parent)
    if (p / IMAGE_NAME).exists():
        return [CaseInput(p.name, p / IMAGE_NAME)], p.parent
    cases = [CaseInput(d.name, d / IMAGE_NAME) for d in sorted(p.iterdir()) if d.is_dir() and CASE_RE.match(d.name)]
    for _name, why in near_misses(p) if parallel.rank() == 0 else []:
        log.warning("--input %s: skipped %s", p, why)
    if not cases:
        raise PredictError(f"--input {p} holds no case_XXXXX/ folders and no {IMAGE_NAME}")
    return cases, p


def voxel_count(image_path: Path) -> int:
    """Voxels of an image from its header only (used to balance ranks); 0 when unreadable."""
    import nibabel as nib
    try:
        return int(np.prod(nib.load(str(image_path)).shape))
    except Exception:  # the case will fail later with a proper message
        return 0


def voxel_counts(cases: list[CaseInput], rank: int, world: int) -> dict[str, int]:
    """Voxels of every case by id: each rank reads the headers of every ``world``-th case, then they share them.

    A collective when ``world > 1`` (every rank calls it), so no rank reads every header.
    """
    own = {c.case_id: voxel_count(c.image_path) for c in cases[rank::world]}
    if world == 1:
        return own
    merged: dict[str, int] = {}
    for part in parallel.allgather_object(own, name="predict.voxel_counts"):
        merged.update(part)
    return merged


def partition(cases: list[CaseInput], rank: int, world: int, counts: dict[str, int] | None = None) -> list[CaseInput]:
    """This rank's cases, balanced by voxel count (hpc_dfs.data.reader.partition_balanced).

    Args:
        cases: every case, in the same order on every rank.
        rank: this rank.
        world: the number of ranks.
        counts: voxels by case id (:func:`voxel_counts`); read from the headers here without it.
    """
    from hpc_dfs.data.reader import partition_balanced
    if counts is None:
        counts = {c.case_id: voxel_count(c.image_path) for c in cases}
    items = [(c, counts[c.case_id]) for c in cases]
    mine = partition_balanced(items, rank, world)
    return sorted(mine, key=lambda c: c.case_id)


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class Replica:
    """One loaded checkpoint: the network and what it needs to run on a new case."""

    path: Path
    weight: float
    model: Any
    preprocessing: dict
    classes: list[str]
    takes_clinical: bool          # forward(image, clinical)
    needs_clinical: bool          # the clinical input is used (not an image-only fusion)
    clinical_pipeline: Any = None
    n_clinical: int = 0
    model_name: str = ""
    info: dict = field(default_factory=dict)
    context: int = 1              # 2.5D: slices per input (the model's input channels)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def load_replica(path: str | Path, weight: float, device) -> Replica:
    """Load a checkpoint (``weights_only=True``, through the schema) and build its model in eval mode."""
    from hpc_dfs.models import build_model
    from hpc_dfs.training import checkpoint as ckpt_schema
    path = Path(path)
    try:
        ckpt = ckpt_schema.load(path, require=ckpt_schema.INFERENCE_KEYS)
    except ckpt_schema.CheckpointError as e:   # the schema's message; PredictError keeps the ranks' agreement
        raise PredictError(str(e)) from None
    pre = ckpt.get("preprocessing")
    if not isinstance(pre, dict) or not pre:
        raise PredictError(f"checkpoint {path} has no preprocessing parameters ('preprocessing'), so a new case "
                           f"cannot be transformed as in training; retrain with a current `hpc-dfs train`")
    missing = [k for k in ("slice_size", "intensity") if k not in pre]
    if missing:
        raise PredictError(f"checkpoint {path}: preprocessing parameters lack {missing}")
    classes = list(ckpt.get("classes") or pre.get("classes") or [])
    if not classes:
        raise PredictError(f"checkpoint {path} does not say its classes ('classes')")
    mcfg = dict(ckpt["model_config"])
    try:
        model = build_model(**mcfg)
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise PredictError(f"checkpoint {path}: cannot rebuild model {mcfg.get('name')!r} from model_config "
                           f"({type(e).__name__}: {e})") from None
    model.eval().to(device)
    takes = model.takes_clinical
    needs = takes and getattr(model, "clinical_encoder", None) is not None
    rep = Replica(path, float(weight), model, pre, classes, takes, needs, model_name=str(mcfg.get("name", "")),
                  info={"epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics"),
                        "stage": (ckpt.get("config") or {}).get("stage", "locate"),
                        "sha256": fsutil.sha256_file(path)},
                  context=int(mcfg.get("in_channels", 1)))
    if needs:
        from hpc_dfs.data.kits_clinical import ClinicalPipeline
        clin = ckpt.get("clinical") or {}
        if not clin.get("pipeline"):
            raise PredictError(f"checkpoint {path}: model '{rep.model_name}' uses clinical features but the "
                               f"checkpoint has no clinical pipeline ('clinical.pipeline')")
        rep.clinical_pipeline = ClinicalPipeline.from_json(clin["pipeline"])
        rep.n_clinical = rep.clinical_pipeline.n_features
        if getattr(model, "n_clinical", rep.n_clinical) != rep.n_clinical:
            raise PredictError(f"checkpoint {path}: the clinical pipeline gives {rep.n_clinical} features but the "
                               f"model expects {model.n_clinical}")
    return rep


def load_replicas(paths: list[str], weights: list[float], device) -> list[Replica]:
    """Load every checkpoint; they must agree on preprocessing and classes. Weights are normalised."""
    if not paths:
        raise PredictError("give at least one --checkpoint")
    ws = np.asarray(weights if weights else [1.0] * len(paths), dtype=np.float64)
    ws = ws / ws.sum()
    reps = [load_replica(p, w, device) for p, w in zip(paths, ws)]
    ref = reps[0]
    for r in reps[1:]:
        if _canonical(r.preprocessing) != _canonical(ref.preprocessing):
            diff = sorted(k for k in set(r.preprocessing) | set(ref.preprocessing)
                          if _canonical(r.preprocessing.get(k)) != _canonical(ref.preprocessing.get(k)))
            raise PredictError(f"checkpoints {ref.path} and {r.path} were trained with different preprocessing "
                               f"(differing keys: {', '.join(diff)}); their probabilities cannot be averaged")
        if r.classes != ref.classes:
            raise PredictError(f"checkpoints {ref.path} and {r.path} have different classes "
                               f"({ref.classes} vs {r.classes})")
        if r.context != ref.context:
            raise PredictError(f"checkpoints {ref.path} and {r.path} take {ref.context} and {r.context} slices "
                               "per input; their probabilities cannot be averaged")
    return reps


def load_refine_replicas(paths: list[Path], weights: list[float], stage1: list[Replica], device) -> list[Replica]:
    """Stage-2 (refine) checkpoints of the cascade; they must hold a refine plan and stage 1's classes.

    Raises:
        PredictError: a checkpoint without ``preprocessing.refine`` (not trained with ``--stage refine``), or
            classes that differ from stage 1's.
    """
    if not paths:
        return []
    reps = load_replicas([str(p) for p in paths], weights, device)
    for r in reps:
        if r.info.get("stage") != "refine":   # a stage-1 checkpoint carries the shards' refine plan too
            raise PredictError(f"--refine-checkpoint {r.path} was trained with --stage {r.info.get('stage')}, "
                               "not --stage refine: pass it as --checkpoint, and a stage-2 one here")
        if "refine" not in r.preprocessing:
            raise PredictError(f"--refine-checkpoint {r.path} has no stage-2 plan (preprocessing.refine): "
                               "train it with --stage refine on shards preprocessed with refine.enabled=true")
        if r.classes != stage1[0].classes:
            raise PredictError(f"--refine-checkpoint {r.path} has classes {r.classes}, stage 1 has "
                               f"{stage1[0].classes}")
    return reps


# ----------------------------------------------------------------------------- clinical records
def load_records(clinical: Path | None, data_root: Path) -> tuple[dict[str, dict], Path | None]:
    """Clinical records by case id, from ``clinical`` (``--clinical``) or kits.json beside the cases (may be none).

    Raises:
        ConfigError: ``clinical`` is given but is not a file.
        PredictError: the records cannot be read.
    """
    from hpc_dfs.data.kits_clinical import find_clinical_file, load_kits_records
    path = cfgmod.require_path(clinical, "file", "--clinical") if clinical else find_clinical_file(data_root)
    if path is None:
        return {}, None
    try:
        records = load_kits_records(path)
    except (OSError, ValueError) as e:
        raise PredictError(f"clinical records {path}: {e}") from None
    return {str(r["case_id"]): r for r in records}, path


def clinical_vector(rep: Replica, case_id: str, record: dict | None) -> np.ndarray:
    """Features ``(F,)`` of ``record`` with the replica's pipeline; all-missing (imputed) when None."""
    from hpc_dfs.data.kits_clinical import ClinicalRecordError, preop_frame
    try:
        frame = preop_frame([record if record is not None else {"case_id": case_id}])
    except ClinicalRecordError as e:
        raise InferenceError(f"malformed clinical record: {e.problem}") from None
    return rep.clinical_pipeline.transform(frame)[0].astype(np.float32)


# ----------------------------------------------------------------------------- inference
def _forward(rep: Replica, x, clin):
    """Segmentation logits and risk logits (or None) of one batch."""
    out = rep.model(x, clinical=clin) if rep.takes_clinical else rep.model(x)
    if isinstance(out, dict):
        return out["seg_logits"], out.get("risk_logit")
    return out, None


def infer_slices(reps: list[Replica], slices: np.ndarray, clinical: list[np.ndarray | None], batch_size: int,
                 tta: bool, device) -> tuple[np.ndarray, float | None]:
    """Weighted-average softmax probabilities ``(C, n, H, W)`` of all replicas, and the case risk.

    Args:
        reps: loaded checkpoints (weights summing to 1).
        slices: normalised slices ``(n, H, W)`` from ``prepare_image`` (a replica of context k sees each slice
            with its k // 2 neighbours on either side, clamped at the ends, as in training).
        clinical: per replica its feature vector, or None for models that take no clinical input.
        batch_size: slices per forward pass.
        tta: average over the four flips of each batch.
        device: torch device.
    """
    import torch
    n = slices.shape[0]
    c = len(reps[0].classes)
    probs = np.zeros((c, n, *slices.shape[1:]), dtype=np.float32)
    risk_sum, risk_w = 0.0, 0.0
    flips = TTA_FLIPS if tta else TTA_FLIPS[:1]
    with torch.inference_mode():
        for rep, vec in zip(reps, clinical):
            rep_risk = 0.0
            has_risk = False
            idx = context_indices(n, rep.context)  # 2.5D: each slice with its neighbours as channels
            for b0 in range(0, n, batch_size):
                x = torch.from_numpy(np.ascontiguousarray(slices[idx[b0:b0 + batch_size]])).to(device)
                clin = None
                if vec is not None:
                    clin = torch.from_numpy(vec)[None].expand(x.shape[0], -1).contiguous().to(device)
                acc = None
                risk_acc = None
                for dims in flips:
                    xi = torch.flip(x, dims) if dims else x
                    seg, risk = _forward(rep, xi, clin)
                    if seg.shape[1] != c:
                        raise InferenceError(f"{rep.path.name} gives {seg.shape[1]} classes, expected {c}")
                    if seg.shape[2:] != x.shape[2:]:
                        raise InferenceError(f"{rep.path.name} gives {tuple(seg.shape[2:])} logits for "
                                          f"{tuple(x.shape[2:])} slices")
                    p = torch.softmax(seg.float(), dim=1)
                    p = torch.flip(p, dims) if dims else p
                    acc = p if acc is None else acc + p
                    if risk is not None:
                        r = torch.sigmoid(risk.float())
                        risk_acc = r if risk_acc is None else risk_acc + r
                acc = acc / len(flips)
                probs[:, b0:b0 + x.shape[0]] += (rep.weight * acc).permute(1, 0, 2, 3).cpu().numpy()
                if risk_acc is not None:
                    has_risk = True
                    rep_risk += float((risk_acc / len(flips)).double().sum())
            if has_risk:
                risk_sum += rep.weight * rep_risk / n
                risk_w += rep.weight
    return probs, (risk_sum / risk_w if risk_w > 0 else None)


# ----------------------------------------------------------------------------- writing NIfTI
def nifti_gz_bytes(array: np.ndarray, ref_img, level: int = 6, descrip: str | None = None) -> bytes:
    """Gzipped NIfTI-1 bytes of ``array`` with ``ref_img``'s header (affine, qform/sform codes, zooms).

    Written by hand (nibabel serialises, :mod:`gzip` compresses with ``mtime=0`` and no file name)
    so that the same array gives the same bytes on every rank and every run. ``descrip`` (at most 79
    characters) replaces the header's description: predict's provenance (see :func:`provenance`).
    """
    import nibabel as nib
    hdr = ref_img.header.copy()
    if descrip is not None:
        hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    img = nib.Nifti1Image(array, ref_img.affine, header=hdr)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=level, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- one case
def _read_case(case: CaseInput) -> tuple[np.ndarray, np.ndarray, Any]:
    """The image array, its affine and its NIfTI image (whose header the outputs copy); raises InferenceError."""
    import nibabel as nib

    from hpc_dfs.data.kits_io import CaseError, load_nifti
    try:
        image, affine, _ = load_nifti(case.image_path, case.case_id)  # checks: present, decodable, 3-D
        img = nib.load(str(case.image_path))  # header only: the outputs copy it
    except CaseError as e:
        raise InferenceError(e.problem if case.image_path.name in e.problem else f"{case.image_path}: {e.problem}") \
            from None
    if min(image.shape) < 1:
        raise InferenceError(f"{case.image_path.name} has an empty axis, shape {image.shape}")
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise InferenceError(f"{case.image_path.name} holds NaN or infinite voxels")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InferenceError(f"{case.image_path.name} has a degenerate affine; its orientation cannot be read")
    return image, affine, img


def _clinical_inputs(case: CaseInput, reps: list[Replica], records: dict[str, dict],
                     clinical_source: Path | None) -> tuple[list[np.ndarray | None], bool]:
    """Per replica the case's clinical vector (None for image-only models), and whether a record was used."""
    record = records.get(case.case_id)
    needed = any(r.needs_clinical for r in reps)
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
    sfx = case.suffix
    files = {"prediction": out_dir / f"prediction_{sfx}.nii.gz"}
    if cfg is None or cfg.save_raw:
        files["raw"] = out_dir / "raw" / f"prediction_{sfx}.nii.gz"
    if cfg is None or cfg.save_probabilities:
        files["probabilities"] = out_dir / f"probabilities_{sfx}.nii.gz"
    if cfg is None or cfg.overlays:
        files["overlay"] = out_dir / f"overlay_{sfx}.png"
    return files


def provenance(case: CaseInput, reps: list[Replica], refine: list[Replica] | None = None) -> dict[str, str]:
    """Where a case's outputs come from: the sha256 of the checkpoint files and of the input image.

    ``descrip`` (``hpc-dfs <checkpoints sha[:12]> <input sha[:12]>``) goes into every NIfTI header written for
    the case, the rest into its summary.json row; ``evaluate`` compares them.
    """
    shas = [r.info.get("sha256") or fsutil.sha256_file(r.path) for r in list(reps) + list(refine or [])]
    ckpts = shas[0] if len(shas) == 1 else hashlib.sha256(" ".join(shas).encode()).hexdigest()
    image = fsutil.sha256_file(case.image_path)
    return {"checkpoints_sha256": ckpts, "input_sha256": image, "descrip": f"hpc-dfs {ckpts[:12]} {image[:12]}"}


def move_aside(case: CaseInput, out_dir: Path) -> list[Path]:
    """Move the outputs of ``case`` already in ``out_dir`` (an earlier run's, or this run's part) to ``stale/``.

    Called when the case fails, so that no prediction of another run stays beside this run's summary.json.
    """
    moved = []
    for p in case_outputs(case, out_dir).values():
        if p.is_file():
            dst = out_dir / "stale" / p.relative_to(out_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dst)
            moved.append(dst)
    if moved:
        log.warning("%s failed: moved its earlier outputs aside to %s (%s)", case.case_id, out_dir / "stale",
                    ", ".join(p.name for p in moved))
    return moved


def _ground_truth(case: CaseInput, shape: tuple[int, ...]) -> np.ndarray | None:
    """The case's ground truth beside its image, for the overlay (prediction | truth | errors); None if absent."""
    import nibabel as nib
    for name in LABEL_FILES:
        path = case.image_path.parent / name
        if path.is_file():
            try:
                gt = np.asanyarray(nib.load(str(path)).dataobj)
            except Exception:  # an unreadable truth only costs the overlay its truth panel
                return None
            return gt.astype(np.uint8) if gt.shape == tuple(shape) else None
    return None


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
    native = restore_volume(probs, geometry)
    del probs
    cascade = None
    if refine:
        native, cascade = _refine(case, image, affine, native, refine, cfg, records, clinical_source, device)
    label = np.argmax(native, axis=0).astype(np.uint8)
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
        "postprocess": pp_info, "files": {k: v.name if k != "raw" else f"raw/{v.name}" for k, v in files.items()},
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
                                    infer)
    if not boxes:
        log.warning("%s: stage 1 found no kidney, so there is no box for stage 2; the stage-1 labels are kept",
                    case.case_id)
    return native, {"boxes": boxes, "stage": "refine" if boxes else "locate (no kidney found by stage 1)"}


# ----------------------------------------------------------------------------- summary
def risk_csv(rows: list[dict]) -> str:
    """``risk.csv`` of the summary rows: ``case_id, risk_prob, clinical_used`` of every case that was written."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "risk_prob", "clinical_used"])
    for r in rows:
        if r.get("status") == "ok":
            w.writerow([r["case_id"], "" if r["risk_prob"] is None else repr(float(r["risk_prob"])),
                        int(bool(r["clinical_used"]))])
    return buf.getvalue()


def _write_summary(rows: list[dict], setup: Setup, cfg: PredictConfig, paths: PredictPaths, threads: int,
                   seconds: float) -> None:
    """Rank 0: ``risk.csv`` and ``summary.json`` of all ranks' rows, and the closing log lines."""
    failed = [r for r in rows if r["status"] != "ok"]
    fsutil.write_text(paths.out / "risk.csv", risk_csv(rows))
    reps = setup.reps
    summary = {
        "hpc_dfs_version": __version__, "world_size": parallel.size(), "threads_per_rank": threads,
        "device": str(setup.device),
        "checkpoints": [{"path": str(r.path), "weight": r.weight, "model": r.model_name, **r.info} for r in reps],
        "refine_checkpoints": [{"path": str(r.path), "weight": r.weight, "model": r.model_name, "context": r.context,
                                **r.info} for r in setup.refine],
        "classes": reps[0].classes, "preprocessing": reps[0].preprocessing,
        "clinical_source": str(setup.clinical_source) if setup.clinical_source else None,
        "input": str(paths.input), "out": str(paths.out),
        "config": cfgmod.to_dict(cfg), "n_cases": len(rows), "n_ok": len(rows) - len(failed),
        "n_failed": len(failed), "wall_seconds": round(seconds, 3), "cases": rows,
    }
    fsutil.write_json(paths.out / "summary.json", summary)
    log.info("%d of %d cases written to %s in %.1f s", len(rows) - len(failed), len(rows), paths.out,
             summary["wall_seconds"])
    if failed:
        log.error("%d of %d cases failed (%s); their errors are above and in %s", len(failed), len(rows),
                  ", ".join(r["case_id"] for r in failed), paths.out / "summary.json")


# ----------------------------------------------------------------------------- the run
@dataclass
class PredictPaths:
    """The paths of a run: argparse arguments (``--checkpoint``, ``--input``, ``--out``, ``--clinical``)."""

    checkpoints: list[Path]
    input: Path
    out: Path
    clinical: Path | None = None
    refine_checkpoints: list[Path] = field(default_factory=list)


@dataclass
class Setup:
    """What every rank has checked and loaded before the first case."""

    device: Any
    cases: list[CaseInput]
    reps: list[Replica]
    records: dict[str, dict]
    clinical_source: Path | None
    refine: list[Replica] = field(default_factory=list)


def _device(choice: str):
    """The torch device for ``--device auto|cpu|cuda``; raises PredictError when CUDA is asked for but absent."""
    import torch
    if choice == "cpu":
        return torch.device("cpu")
    device = parallel.device()
    if choice == "cuda" and device.type != "cuda":
        raise PredictError("--device cuda asked for but CUDA is not available")
    return device


def _setup(cfg: PredictConfig, paths: PredictPaths) -> Setup:
    """Check the paths, load the checkpoints and records, create ``--out`` (raises HpcDfsError)."""
    device = _device(cfg.device)
    for ckpt in paths.checkpoints:
        cfgmod.require_path(ckpt, "file", "--checkpoint")
    cases, data_root = discover_inputs(paths.input)
    reps = load_replicas([str(p) for p in paths.checkpoints], cfg.weights, device)
    for r in (r for r in reps if r.info.get("stage") == "refine"):   # the mirror of load_refine_replicas' check
        raise PredictError(f"--checkpoint {r.path} was trained with --stage refine (a stage-2 checkpoint): pass it "
                           "as --refine-checkpoint, and a --stage locate one here")
    for ckpt in paths.refine_checkpoints:
        cfgmod.require_path(ckpt, "file", "--refine-checkpoint")
    refine = load_refine_replicas(paths.refine_checkpoints, cfg.refine_weights, reps, device)
    records, clinical_source = load_records(paths.clinical, data_root)
    paths.out.mkdir(parents=True, exist_ok=True)
    if parallel.rank() == 0:  # before any rank writes: the ranks agree on the setup (a collective) right after this
        n_stale = sum(fsutil.clean_stale_tmp(d) for d in (paths.out, paths.out / "raw") if d.is_dir())
        if n_stale:
            log.info("removed %d temporary file(s) left in %s by an interrupted run", n_stale, paths.out)
    return Setup(device, cases, reps, records, clinical_source, refine)


def _setup_on_every_rank(cfg: PredictConfig, paths: PredictPaths) -> Setup:
    """:func:`_setup` on every rank, and the ranks agree: when it failed on any rank, it raises on all of them.

    So a problem seen by one rank only (a file missing on one node) stops the job instead of leaving
    the other ranks waiting in a collective.
    """
    setup, error = None, None
    try:
        setup = _setup(cfg, paths)
    except HpcDfsError as e:
        error = e
    reports = parallel.allgather_object(None if error is None else (str(error), error.code))
    if error is not None:
        raise error
    for r, report in enumerate(reports):
        if report:
            raise PredictError(f"rank {r}: {report[0]}", code=report[1])
    return setup


def _predict_all(cases: list[CaseInput], setup: Setup, cfg: PredictConfig, out_dir: Path) -> list[dict]:
    """Summary rows of ``cases``; a case that fails gets one error line and a ``failed`` row, the others go on.

    A failed case's outputs already in ``out_dir`` are moved aside (:func:`move_aside`). A full disk stops this
    rank's loop: the case and those after it get ``failed`` rows with ``disk_full`` set (see :func:`run`).
    """
    rows, disk_full = [], None
    for i, case in enumerate(cases):
        row = {"case_id": case.case_id, "status": "failed", "image": str(case.image_path)}
        if disk_full is not None:
            rows.append({**row, "error": f"not attempted: {disk_full}", "disk_full": True, "rank": parallel.rank()})
            continue
        try:
            row = predict_case(case, setup.reps, cfg, setup.records, setup.clinical_source, out_dir, setup.device,
                               refine=setup.refine)
            log.info("[%d/%d] %s done in %.2f s%s", i + 1, len(cases), case.case_id, row["seconds"]["total"],
                     "" if row["risk_prob"] is None else f", risk {row['risk_prob']:.3f}")
        except fsutil.DiskWriteError as e:
            disk_full = str(e)
            log.error("%s: %s", case.case_id, e)
            row.update(error=str(e), disk_full=True)
        except InferenceError as e:
            log.error("%s: %s -- skipped", case.case_id, e)
            row["error"] = str(e)
        except Exception as e:  # an unexpected failure of one case must not stop the others
            log.error("%s: %s: %s -- skipped", case.case_id, type(e).__name__, e)
            row["error"] = f"{type(e).__name__}: {e}"
        if row["status"] != "ok":
            _move_aside_quietly(case, out_dir)
        row["rank"] = parallel.rank()
        rows.append(row)
    return rows


def _move_aside_quietly(case: CaseInput, out_dir: Path) -> None:
    """:func:`move_aside`, where a failure to move (a full disk) only costs a warning: the case failed anyway."""
    try:
        move_aside(case, out_dir)
    except OSError as e:
        log.warning("%s: could not move its earlier outputs aside (%s)", case.case_id, e)


def run(cfg: PredictConfig, paths: PredictPaths) -> int:
    """Predict every case of ``paths.input``, this rank's share of them; the exit code is the same on all ranks.

    Returns:
        0 when every case was written, 1 when some failed (each named in the log and in summary.json).

    Raises:
        HpcDfsError: a problem that stops the run before any case (raised on every rank, see
            :func:`_setup_on_every_rank`), or a full disk (exit 4, the file named; on every rank).
    """
    import torch

    from hpc_dfs.parallel.phases import PhaseClock
    clock = PhaseClock()
    clock.mark("start+imports")
    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    rank, world = parallel.rank(), parallel.size()
    threads = parallel.configure_threads(cfg.threads if cfg.threads > 0 else None)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    clock.mark("dist_init")
    t0 = time.perf_counter()
    setup = _setup_on_every_rank(cfg, paths)
    clock.mark("setup")
    reps = setup.reps
    if rank == 0:
        log.info("%d cases on %d rank(s), %d checkpoint(s) [%s], TTA %s, post-processing %s, %d thread(s)/rank, %s",
                 len(setup.cases), world, len(reps), ", ".join(f"{r.path.name}:{r.weight:.3g}" for r in reps),
                 "on" if cfg.tta else "off", "on" if cfg.postprocess.enabled else "off", threads, setup.device)
        if any(r.needs_clinical for r in reps):
            log.info("clinical records: %s", setup.clinical_source or "none found (all cases run image-only)")
    mine = partition(setup.cases, rank, world, voxel_counts(setup.cases, rank, world)) if world > 1 else setup.cases
    clock.mark("partition")
    rows = _predict_all(mine, setup, cfg, paths.out)
    clock.mark("cases")
    gathered = sorted((r for part in parallel.allgather_object(rows) for r in part), key=lambda r: r["case_id"])
    clock.mark("gather")
    problem = None
    if rank == 0:
        try:
            _write_summary(gathered, setup, cfg, paths, threads, time.perf_counter() - t0)
        except fsutil.DiskWriteError as e:
            problem = str(e)
    clock.mark("summary")
    problem = parallel.broadcast_object(problem)  # also the barrier: no rank leaves before the summary is written
    clock.mark("barrier")
    log.debug("phases rank=%d world=%d cases=%s %s", rank, world, ",".join(c.case_id for c in mine), clock.json())
    problem = problem or next((r["error"] for r in gathered if r.get("disk_full")), None)
    if problem:  # every rank raises the same one line (exit 4)
        raise PredictError(problem, code=EXIT_ENV)
    return EXIT_PARTIAL if any(r["status"] != "ok" for r in gathered) else 0


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hpc-dfs predict`` options: the paths, then every :class:`PredictConfig` setting as a flag."""
    parser.add_argument("--checkpoint", dest="checkpoints", action="append", type=Path, default=[], metavar="CKPT",
                        help="checkpoint (.pt) written by `hpc-dfs train`; repeat to average several replicas")
    parser.add_argument("--refine-checkpoint", dest="refine_checkpoints", action="append", type=Path, default=[],
                        metavar="CKPT", help="cascade: a stage-2 checkpoint (`hpc-dfs train --stage refine`); repeat "
                                             "to average several; without it predict runs stage 1 alone")
    parser.add_argument("--refine-weights", dest="cfg__refine_weights", default=None, metavar="W1,W2,...",
                        type=lambda s: [float(v) for v in s.split(",") if v.strip()],
                        help="one weight per --refine-checkpoint (default equal)")
    parser.add_argument("--input", type=Path, default=None, metavar="PATH",
                        help="a case folder, a folder of case_XXXXX/ folders, or one imaging.nii.gz")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (created)")
    parser.add_argument("--clinical", type=Path, default=None, metavar="JSON",
                        help="clinical records (KiTS schema); default: kits.json beside the cases")
    parser.add_argument("--weights", dest="cfg__weights", default=None, metavar="W1,W2,...",
                        type=lambda s: [float(v) for v in s.split(",") if v.strip()],
                        help="one weight per --checkpoint for the weighted average of probabilities (default equal)")
    parser.add_argument("--postprocess", dest="cfg__postprocess.enabled", action=argparse.BooleanOptionalAction,
                        default=None, help="connected-component post-processing (default on; "
                                           "fine-tune with --set postprocess.<key>=...)")
    cfgmod.add_arguments(parser, PredictConfig, skip=("weights", "refine_weights"))


def main(args: argparse.Namespace) -> int:
    """Read the settings and paths, check what needs no rank, and :func:`run`.

    Raises:
        ConfigError: a bad setting, ``--input``/``--out`` missing, or not one ``--weights`` per ``--checkpoint``.
    """
    cfg = cfgmod.from_args(PredictConfig, args)
    if not args.input or not args.out:
        raise cfgmod.ConfigError("--input and --out are required")
    if not args.checkpoints:
        raise PredictError("give at least one --checkpoint")
    if cfg.weights and len(cfg.weights) != len(args.checkpoints):
        raise cfgmod.ConfigError(f"got {len(cfg.weights)} --weights for {len(args.checkpoints)} --checkpoint; give "
                                 f"one weight per checkpoint or none")
    if cfg.refine_weights and len(cfg.refine_weights) != len(args.refine_checkpoints):
        raise cfgmod.ConfigError(f"got {len(cfg.refine_weights)} --refine-weights for "
                                 f"{len(args.refine_checkpoints)} --refine-checkpoint")
    return run(cfg, PredictPaths(list(args.checkpoints), args.input, args.out, args.clinical,
                                 list(args.refine_checkpoints)))
