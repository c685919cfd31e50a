"""The PRED/ folder that ``predict`` writes and ``evaluate`` and ``report`` read (``hpc_dfs/CONTRACTS.md`` section 4).

    PRED/prediction_XXXXX.nii.gz      :func:`prediction_name` (uint8 class map, the input's shape and affine)
    PRED/probabilities_XXXXX.nii.gz   optional (float32, classes on the last axis)
    PRED/raw/prediction_XXXXX.nii.gz  optional, before post-processing (RAW_DIR)
    PRED/overlay_XXXXX.png            optional picture of the case
    PRED/risk.csv                     RISK_NAME: ``case_id, risk_prob, clinical_used`` (:func:`risk_csv`)
    PRED/summary.json                 SUMMARY_NAME: :class:`Summary` (:func:`write_summary` / :func:`read_summary`)
    PRED/stale/                       STALE_DIR: earlier outputs of a case that failed in this run

Provenance: every NIfTI written for a case has the header ``descrip`` :func:`descrip` of the checkpoints' and the
input's sha256, and the case's summary row holds :class:`Provenance`; ``evaluate`` compares the two.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, TypedDict

from hpc_dfs.contracts.kits import PRED_RE, SUBMISSION_RE, case_suffix, prediction_name
from hpc_dfs.fsutil import write_json, write_text

__all__ = ["SUMMARY_NAME", "RISK_NAME", "RAW_DIR", "STALE_DIR", "PRED_RE", "prediction_name", "case_files",
           "Provenance", "SummaryCase", "Summary", "descrip", "risk_csv", "write_summary",
           "read_summary", "case_id_of"]

SUMMARY_NAME = "summary.json"
RISK_NAME = "risk.csv"
RAW_DIR = "raw"
STALE_DIR = "stale"


class Provenance(TypedDict):
    """Where a case's outputs come from."""

    checkpoints_sha256: str   # of the one checkpoint, or of the space-joined sha256s of several
    input_sha256: str
    descrip: str              # the NIfTI header's descrip: :func:`descrip`


class SummaryCase(TypedDict, total=False):
    """One case of ``summary.json``; ``status`` is ``ok`` or ``failed`` (with ``error``)."""

    case_id: str
    status: str
    error: str
    risk_prob: Optional[float]
    clinical_used: bool
    provenance: Provenance
    cascade: dict[str, Any]
    seconds: dict[str, float]


class Summary(TypedDict, total=False):
    """``summary.json``: the run and its cases."""

    hpc_dfs_version: str
    world_size: int                          # ranks that predicted
    threads_per_rank: int
    device: str
    #: one entry per ``--checkpoint``: path, weight, model, epoch, metrics, stage, sha256
    checkpoints: list[dict[str, Any]]
    refine_checkpoints: list[dict[str, Any]]  # the cascade's stage 2 (with its 2.5D ``context``)
    classes: list[str]
    preprocessing: dict[str, Any]            # the checkpoints' (they agree)
    clinical_source: Optional[str]
    input: str
    out: str
    config: dict[str, Any]                   # the resolved PredictConfig
    n_cases: int
    n_ok: int
    n_failed: int
    wall_seconds: float
    cases: list[SummaryCase]


def case_files(out_dir: Path, case_id: str, raw: bool = True, probabilities: bool = True,
               overlay: bool = True) -> dict[str, Path]:
    """The files of one case in PRED/: ``prediction`` always, the others when asked for.

    Args:
        out_dir: the prediction folder.
        case_id: the case (``case_00012`` gives ``prediction_00012.nii.gz``).
        raw: include ``raw/prediction_XXXXX.nii.gz``.
        probabilities: include ``probabilities_XXXXX.nii.gz``.
        overlay: include ``overlay_XXXXX.png``.
    """
    sfx = case_suffix(case_id)
    files = {"prediction": out_dir / prediction_name(case_id)}
    if raw:
        files["raw"] = out_dir / RAW_DIR / prediction_name(case_id)
    if probabilities:
        files["probabilities"] = out_dir / f"probabilities_{sfx}.nii.gz"
    if overlay:
        files["overlay"] = out_dir / f"overlay_{sfx}.png"
    return files


def descrip(checkpoints_sha256: str, input_sha256: str) -> str:
    """The NIfTI header's ``descrip`` of a prediction: ``hpc-dfs <checkpoints sha[:12]> <input sha[:12]>``.

    Args:
        checkpoints_sha256: :attr:`Provenance.checkpoints_sha256`.
        input_sha256: the input image's sha256.
    """
    return f"hpc-dfs {checkpoints_sha256[:12]} {input_sha256[:12]}"


def risk_csv(rows: list[SummaryCase]) -> str:
    """``risk.csv`` of the summary rows: ``case_id, risk_prob, clinical_used`` of every case that was written.

    Args:
        rows: the cases of the summary.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "risk_prob", "clinical_used"])
    for r in rows:
        if r.get("status") == "ok":
            w.writerow([r["case_id"], "" if r["risk_prob"] is None else repr(float(r["risk_prob"])),
                        int(bool(r["clinical_used"]))])
    return buf.getvalue()


def write_summary(out_dir: Path, summary: Summary) -> Path:
    """Write ``PRED/risk.csv`` (of the summary's cases), then ``PRED/summary.json``, each atomically (rank 0, after
    every case); returns the summary's path.

    Args:
        out_dir: the prediction folder.
        summary: the run and its cases.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: a file cannot be written.
    """
    write_text(out_dir / RISK_NAME, risk_csv(summary["cases"]))
    path = out_dir / SUMMARY_NAME
    write_json(path, summary)
    return path


def read_summary(pred_dir: Path) -> Optional[Summary]:
    """``PRED/summary.json``, or None when the folder has none (not written by predict, or unfinished).

    Args:
        pred_dir: the prediction folder.

    Raises:
        OSError, ValueError: the file is there but cannot be read as JSON (callers name the file).
    """
    path = pred_dir / SUMMARY_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def case_id_of(pred_name: str) -> str | None:
    """The case of a prediction file name, or None for names that follow neither KiTS naming.

    ``prediction_00012.nii.gz`` (``hpc-dfs predict``) and ``case_00012.nii.gz`` (the KiTS challenge's
    submission naming, which nnU-Net's predictions of a KiTS dataset carry) are both ``case_00012``.

    Args:
        pred_name: a file name in a prediction folder.
    """
    m = PRED_RE.match(pred_name) or SUBMISSION_RE.match(pred_name)
    return f"case_{m.group(1)}" if m else None
