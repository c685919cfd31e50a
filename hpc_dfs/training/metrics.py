"""Validation metrics counted once per case, and the ``metrics.jsonl`` log.

Validation cases are split over ranks (each case goes to exactly one rank, whole), so no case is
padded or duplicated. Each rank accumulates, per case, the sufficient statistics of a 3D Dice over
the case's slices and its risk predictions (:class:`CaseAccumulator`); the per-case records are
gathered to every rank and :func:`summarise` turns them into the run's metrics.

Dice conventions:

- **kidney** is the composite "kidney + tumour [+ cyst]" region (``label > 0``), as in KiTS19's first score
  and KiTS23's "kidney and masses"; **tumour** is ``label == 2``; with a cyst class (KiTS23 data) **masses**
  is tumour or cyst, KiTS23's second region. A region-trained run (``loss.regions``) is scored on the labels
  its regions give (:func:`predicted_labels`), so its figures compare with a softmax run's.
- Per case ``2|P.G| / (|P| + |G|)``; a case whose ground truth lacks the structure counts 0 if the
  prediction has it and is left out (NaN) if neither has it. The run's figure is the mean over cases.
- **risk** per case is the mean of ``sigmoid(risk_logit)`` over its slices; AUC (scikit-learn) over
  cases with a known label (None when only one class is present) and accuracy at 0.5.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from hpc_dfs.fsutil import write_text

__all__ = ["CaseAccumulator", "predicted_labels", "summarise", "MetricsLog", "score", "clean", "epoch_line"]


class CaseAccumulator:
    """Per-case Dice statistics and risk predictions of the validation slices seen by this rank.

    Args:
        classes: the shards' class names; with a ``cyst`` class the KiTS23 region ``masses`` (tumour or cyst)
            is counted too.
        regions: the run's region set (:func:`hpc_dfs.data.regions.resolve_regions`), or None for softmax outputs.
    """

    def __init__(self, classes: list[str] | None = None, regions: dict | None = None) -> None:
        self.cases: dict[str, dict] = {}
        self.regions = regions
        self.masses = [i for i, c in enumerate(classes) if c in ("tumor", "cyst")] if "cyst" in (classes or []) \
            else None

    @torch.no_grad()
    def update(self, seg_logits: torch.Tensor, label: torch.Tensor, risk_logit: torch.Tensor | None,
               risk: torch.Tensor, case_ids: Iterable[str]) -> None:
        pred = predicted_labels(seg_logits, self.regions)
        label = label.to(pred.device)
        regions = {"kidney": (pred > 0, label > 0), "tumor": (pred == 2, label == 2)}
        if self.masses is not None:
            m = torch.tensor(self.masses, device=pred.device)
            regions["masses"] = (torch.isin(pred, m), torch.isin(label, m))
        sums = {}
        for name, (p, g) in regions.items():
            sums[name] = torch.stack([(p & g).sum((1, 2)), p.sum((1, 2)), g.sum((1, 2))], 1).cpu().double()
        prob = torch.sigmoid(risk_logit.float()).cpu().double() if risk_logit is not None else None
        risk = risk.cpu().double()
        for i, cid in enumerate(case_ids):
            c = self.cases.setdefault(cid, {"case_id": cid, **{name: [0.0, 0.0, 0.0] for name in regions},
                                            "risk_sum": 0.0, "n_slices": 0, "risk_label": float(risk[i])})
            for name in regions:
                c[name] = [a + float(b) for a, b in zip(c[name], sums[name][i])]
            if prob is not None:
                c["risk_sum"] += float(prob[i])
            c["n_slices"] += 1

    def records(self) -> list[dict]:
        return list(self.cases.values())


def predicted_labels(seg_logits: torch.Tensor, regions: dict | None = None) -> torch.Tensor:
    """Class indices ``[B, H, W]`` of logits ``[B, C, H, W]``: the argmax, or with ``regions`` each region's label
    where its sigmoid exceeds 0.5 (logit > 0), in the set's order (:mod:`hpc_dfs.data.regions`).

    Args:
        seg_logits: the model's segmentation logits.
        regions: the run's region set, or None for softmax outputs.
    """
    if regions is None:
        return seg_logits.argmax(1)
    pred = torch.zeros(seg_logits.shape[:1] + seg_logits.shape[2:], dtype=torch.long, device=seg_logits.device)
    for i, lab in enumerate(regions["labels"]):
        pred[seg_logits[:, i] > 0] = int(lab)
    return pred


def _dice(inter: float, p: float, g: float) -> float:
    if g == 0:
        return float("nan") if p == 0 else 0.0
    return 2.0 * inter / (p + g)


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(records: list[dict]) -> dict:
    """Run-level metrics from the per-case records of all ranks (each case once)."""
    ids = [r["case_id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise RuntimeError(f"validation counted cases {dup} more than once (each case must go to one rank)")
    kidney = [_dice(*r["kidney"]) for r in records]
    tumor = [_dice(*r["tumor"]) for r in records]
    masses = [_dice(*r["masses"]) for r in records if "masses" in r]
    known = [r for r in records if r["risk_label"] >= 0 and r["n_slices"] > 0]
    probs = np.array([r["risk_sum"] / r["n_slices"] for r in known])
    labels = np.array([int(round(r["risk_label"])) for r in known])
    auc = acc = float("nan")
    if len(known):
        acc = float(np.mean((probs >= 0.5) == (labels == 1)))
        if len(set(labels.tolist())) == 2:
            from sklearn.metrics import roc_auc_score
            auc = float(roc_auc_score(labels, probs))
    per_case = {r["case_id"]: {"kidney_dice": k, "tumor_dice": t} for r, k, t in zip(records, kidney, tumor)}
    out = {"kidney_dice": _nanmean(kidney), "tumor_dice": _nanmean(tumor), "risk_auc": auc, "risk_acc": acc,
           "n_val_cases": len(records), "per_case": per_case}
    if records and len(masses) == len(records):   # 4 classes (cyst) or KiTS23 regions: the masses region too
        out["masses_dice"] = _nanmean(masses)
        for r, m in zip(records, masses):
            per_case[r["case_id"]]["masses_dice"] = m
    return out


def score(metrics: dict) -> float:
    """The validation score that picks ``best.pt``: mean of kidney and tumour Dice, and of masses Dice where the
    classes hold a cyst (KiTS23's three regions); NaNs ignored."""
    keys = ("kidney_dice", "tumor_dice") + (("masses_dice",) if "masses_dice" in metrics else ())
    s = _nanmean([metrics.get(k, float("nan")) if metrics.get(k) is not None else float("nan") for k in keys])
    return -math.inf if math.isnan(s) else s


def clean(obj):
    """NaN/inf -> None and numpy scalars -> Python, so the result is strict JSON (and TOML/torch-safe)."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON object per epoch, rewritten atomically on every append.

    On resume, lines of epochs after the checkpoint's are dropped, so the file always describes the
    run that produced the current weights.
    """

    def __init__(self, path: str | Path, keep_until_epoch: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        if keep_until_epoch is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("epoch", 0) <= keep_until_epoch:
                        self.rows.append(row)

    def append(self, row: dict) -> None:
        self.rows.append(clean(row))
        write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rows))


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def epoch_line(row: dict, epoch: int, epochs: int, world: int, completed: bool, is_best: bool,
               train_time: float) -> str:
    """The one log line of an epoch: losses, Dice, risk, throughput, allreduce share, learning rate.

    Args:
        row: the epoch's ``metrics.jsonl`` row.
        epoch: the epoch, counted from 0.
        epochs: the epochs configured.
        world: the number of ranks.
        completed: the epoch ran to its end (not stopped by ``max_steps``).
        is_best: the epoch gave the best validation score so far.
        train_time: seconds this rank trained in the epoch.
    """
    step = row["step"]
    masses = f", masses Dice {_fmt(row['masses_dice'])}" if "masses_dice" in row else ""
    return ("epoch %d/%d step %s | train loss %s | val loss %s, kidney Dice %s, tumour Dice %s%s, "
            "risk AUC %s acc %s | %.1f samples/s (%.1f per rank, slowest %.1f) | allreduce %.1f%% of "
            "step time | lr %.3g | %.1f s%s") % (
        epoch + 1, epochs, f"{step}" if completed else f"{step} (stopped by max_steps mid-epoch)",
        _fmt(row["train_loss"], ".4f"), _fmt(row["val_loss"], ".4f"), _fmt(row["kidney_dice"]),
        _fmt(row["tumor_dice"]), masses, _fmt(row["risk_auc"]), _fmt(row["risk_acc"]), row["samples_per_s"],
        row["samples_per_s"] / world, min(row["samples_per_s_per_rank"]), 100 * row["allreduce_frac"], row["lr"],
        train_time, " (best)" if is_best else "")
