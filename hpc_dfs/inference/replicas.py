"""Checkpoints loaded for inference (:class:`Replica`): k-fold replicas averaged, the cascade's stage-2 replicas."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpc_dfs import fsutil
from hpc_dfs.inference.errors import InferenceError, PredictError

__all__ = ["Replica", "load_replica", "load_replicas", "load_refine_replicas", "clinical_vector"]


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
    regions: dict | None = None   # region training (hpc_dfs.data.regions): one sigmoid output per region

    @property
    def fill(self) -> list[float]:
        """Probabilities outside the slices' field of view: background (1, 0, ...), or 0 for every region."""
        return [0.0] * self.n_outputs if self.regions else [1.0] + [0.0] * (self.n_outputs - 1)

    @property
    def n_outputs(self) -> int:
        """The model's output channels: one per class (softmax), or one per region (sigmoid)."""
        return len(self.regions["classes"]) if self.regions else len(self.classes)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def load_replica(path: str | Path, weight: float, device) -> Replica:
    """Load a checkpoint (``weights_only=True``, through the schema) and build its model in eval mode."""
    from hpc_dfs.models import build_model
    from hpc_dfs.contracts import checkpoint as ckpt_schema
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
                  context=int(mcfg.get("in_channels", 1)), regions=_regions(ckpt, path, classes))
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


def _regions(ckpt: dict, path: Path, classes: list[str]) -> dict | None:
    """The checkpoint's region set (``loss.regions``), checked against its classes; None for softmax outputs."""
    regions = ckpt.get("regions")
    if regions is None:
        return None
    ok = isinstance(regions, dict) and isinstance(regions.get("classes"), list) and isinstance(
        regions.get("labels"), list) and len(regions["classes"]) == len(regions["labels"]) and all(
        0 <= int(v) < len(classes) for r in regions["classes"] for v in r) and all(
        0 <= int(v) < len(classes) for v in regions["labels"])
    if not ok:
        raise PredictError(f"checkpoint {path}: its 'regions' entry {regions!r} does not fit its classes {classes}")
    return regions


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
        if r.classes != ref.classes or r.regions != ref.regions:
            raise PredictError(f"checkpoints {ref.path} and {r.path} have different classes or regions "
                               f"({ref.classes}, regions {_name(ref)} vs {r.classes}, regions {_name(r)})")
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
        if r.classes != stage1[0].classes or r.regions != stage1[0].regions:
            raise PredictError(f"--refine-checkpoint {r.path} has classes {r.classes} (regions {_name(r)}), "
                               f"stage 1 has {stage1[0].classes} (regions {_name(stage1[0])})")
    return reps


def _name(rep: Replica) -> str:
    return rep.regions.get("name", "?") if rep.regions else "none"


def clinical_vector(rep: Replica, case_id: str, record: dict | None) -> np.ndarray:
    """Features ``(F,)`` of ``record`` with the replica's pipeline; all-missing (imputed) when None."""
    from hpc_dfs.data.kits_clinical import ClinicalRecordError, preop_frame
    try:
        frame = preop_frame([record if record is not None else {"case_id": case_id}])
    except ClinicalRecordError as e:
        raise InferenceError(f"malformed clinical record: {e.problem}") from None
    return rep.clinical_pipeline.transform(frame)[0].astype(np.float32)
