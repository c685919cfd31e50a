"""The passes of ``hpc-dfs preprocess`` over this rank's cases: fingerprint, exchange, write, and the manifest.

Every rank runs the same code on its share of the cases (:mod:`hpc_dfs.data.preprocess_rank`); the results are
exchanged so that every rank derives the same normalisation and clinical pipeline, and rank 0 writes the manifest
(:mod:`hpc_dfs.contracts.shards`) last.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from hpc_dfs import __version__
from hpc_dfs.contracts.shards import CLINICAL_PIPELINE_NAME, MANIFEST_SCHEMA_VERSION, write_manifest
from hpc_dfs.data.fingerprint import CasePart
from hpc_dfs.data.geometry import normalise
from hpc_dfs.data.plan import (CaseItem, PreprocessError, PreprocessPlan, available_memory, case_memory_need,
                               check_case_memory, load_item, reusable_shard, source_sha)
from hpc_dfs.fsutil import DiskWriteError, write_json
from hpc_dfs.data.preprocess_rank import Rank

__all__ = ["Local", "Shared", "fingerprint_pass", "ranks_per_node", "exchange_parts", "derive", "write_pass",
           "exchange_results", "write_run_manifest"]


@dataclass
class Local:
    """This rank's fingerprint pass: its valid cases' parts and input hashes, shards to reuse, items in memory."""

    parts: dict[str, CasePart] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)
    reused: dict[str, dict] = field(default_factory=dict)   # attrs of shards already made from the same inputs
    cache: dict[str, CaseItem] = field(default_factory=dict)
    cached_bytes: int = 0


@dataclass
class Shared:
    """What every rank knows after the fingerprint exchange (identical on all of them)."""

    parts: dict[str, CasePart]       # every valid case's fingerprint part
    shas: dict[str, str]             # and the sha256 of its input files
    fingerprint: dict
    params: dict                     # the manifest's ``preprocessing`` block
    pipeline: Optional[dict]         # the fitted clinical pipeline as JSON, or None
    features: dict[str, np.ndarray]  # transformed clinical features by case
    risk: dict[str, Optional[int]]
    phash: str                       # hash of params + pipeline: a shard with another one is rewritten


def fingerprint_pass(me: Rank, plan: PreprocessPlan, mine: list[str], sparams: dict) -> Local:
    """Load, validate and sample this rank's cases, or reuse their valid shards; keep items up to ``cache_mb``
    while the memory left still holds the largest case to come (:func:`_cache_fits`)."""
    local = Local()
    needs = [(case_memory_need(plan.case_dirs[cid], sparams) or (0, ""))[0] for cid in mine]
    for i, cid in enumerate(mine):
        try:
            part, sha, reused, item = _fingerprint_case(me, plan, cid, sparams)
            if reused is not None:
                local.reused[cid] = reused
            if item is not None and _cache_fits(me, local, item, max(needs[i + 1:], default=0)):
                local.cache[cid] = item
                local.cached_bytes += item.nbytes
            local.parts[cid], local.shas[cid] = part, sha
        except Exception as e:  # CaseError, or anything unexpected about this case: still name it
            me.fail(cid, e)
        me.bar.update(1)
    return local


def _cache_fits(me: Rank, local: Local, item: CaseItem, need_next: int) -> bool:
    """Whether ``item`` may stay in memory: within ``cache_mb``, and the memory left holds the next case's need."""
    held = local.cached_bytes + item.nbytes
    if held > me.cfg.cache_mb * 2 ** 20:
        return False
    have, _ = available_memory(me.cfg.memory_limit_mb, ranks_per_node())
    return have - (held if me.cfg.memory_limit_mb else 0) >= need_next  # the system's figure already counts it


def ranks_per_node() -> int:
    from hpc_dfs import parallel

    return parallel.local_size()


def _fingerprint_case(me: Rank, plan: PreprocessPlan, cid: str,
                      sparams: dict) -> tuple[CasePart, str, Optional[dict], Optional[CaseItem]]:
    """(part, input sha, attrs of a reusable shard or None, the loaded item or None) of one case."""
    from hpc_dfs.data import fingerprint as fpm
    from hpc_dfs.data.shards import shard_name

    cd, cfg = plan.case_dirs[cid], me.cfg
    sha = source_sha(cd)
    prev = reusable_shard(me.out_dir / shard_name(cid), cid, sha)
    if prev is not None:
        attrs, samples = prev
        return CasePart.from_meta(attrs["fingerprint_part"], samples), sha, attrs, None
    meta = plan.metas[cid]
    check_case_memory(cd, sparams, cfg.memory_limit_mb, ranks_per_node())
    item, part = load_item(cd, plan.label_map, sparams, sample=lambda case: fpm.case_part(
        cid, case.image, case.label, meta["shape"], meta["spacing"], cfg.fg_samples_per_case, cfg.seed))
    return part, sha, None, item


def exchange_parts(me: Rank, local: Local, errors: dict[str, str]) -> tuple[dict[str, CasePart], dict[str, str]]:
    """Every rank's parts and input hashes, on every rank; the failed cases are added to ``errors``."""
    from hpc_dfs import parallel

    gathered = parallel.allgather_object(
        ({cid: (p.meta(), p.fg_samples, local.shas[cid]) for cid, p in local.parts.items()}, me.failed),
        name="preprocess.fingerprint")
    parts: dict[str, CasePart] = {}
    shas: dict[str, str] = {}
    for rank_parts, rank_errors in gathered:
        errors.update(rank_errors)
        for cid, (meta, samples, sha) in rank_parts.items():
            parts[cid] = CasePart.from_meta(meta, samples)
            shas[cid] = sha
    return parts, shas


def derive(me: Rank, plan: PreprocessPlan, spatial: dict, parts: dict[str, CasePart],
            shas: dict[str, str]) -> Shared:
    """The normalisation from the merged fingerprint, and the clinical pipeline fitted on the valid cases.

    Raises:
        PreprocessError: the fingerprint gives no usable parameters.
    """
    from hpc_dfs.data import kits_clinical as clin
    from hpc_dfs.data import fingerprint as fpm

    try:
        fingerprint = {**spatial, "foreground": fpm.intensity_fingerprint(parts.values(), me.cfg.percentiles)}
        params = fpm.derive_params(fingerprint, me.cfg, plan.classes, plan.label_map)
    except ValueError as e:
        raise PreprocessError(str(e)) from None
    valid_ids = sorted(parts)
    pipeline = _fit_clinical(me, plan, valid_ids)
    features = {cid: np.zeros(0, np.float32) for cid in valid_ids}
    if pipeline is not None:
        x = clin.ClinicalPipeline.from_json(pipeline).transform(plan.frame.loc[valid_ids])
        features = {cid: x[i] for i, cid in enumerate(valid_ids)}
    risk = {cid: clin.risk_label(plan.records[cid]) if cid in plan.records else None for cid in valid_ids}
    return Shared(parts, shas, fingerprint, params, pipeline, features, risk, _params_hash(params, pipeline))


def _fit_clinical(me: Rank, plan: PreprocessPlan, valid_ids: list[str]) -> Optional[dict]:
    """The clinical pipeline fitted on the valid cases, as JSON, on every rank; None without clinical records.

    One rank (``me.fit_rank``) fits it, the only one to import sklearn (~1.5 s of every rank's start-up
    otherwise), and sends the JSON; every rank, that one too, then transforms from the JSON, so the features
    are the same whatever the number of ranks (the transform reads only the fitted numbers, which JSON
    carries exactly).
    """
    from hpc_dfs import parallel
    from hpc_dfs.data import kits_clinical as clin

    if plan.frame is None:
        return None
    pipeline, problem = None, None
    if me.rank == me.fit_rank:
        try:
            pipeline = clin.ClinicalPipeline().fit(plan.frame.loc[valid_ids]).to_json()
        except Exception as e:  # the other ranks wait for the pipeline: they stop too, naming the problem
            problem = e
    if me.world > 1:
        pipeline, why = parallel.broadcast_object((pipeline, None if problem is None else repr(problem)),
                                              root=me.fit_rank, name="preprocess.clinical_pipeline")
        if why is not None and problem is None:
            raise PreprocessError(f"fitting the clinical pipeline failed on rank {me.fit_rank}: {why}")
    if problem is not None:
        raise problem
    return pipeline


def _params_hash(params: dict, pipeline: Optional[dict]) -> str:
    blob = json.dumps({"schema": MANIFEST_SCHEMA_VERSION, "preprocessing": params, "clinical": pipeline},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_pass(me: Rank, plan: PreprocessPlan, mine: list[str], local: Local, shared: Shared,
                sparams: dict) -> tuple[dict[str, dict], int]:
    """Write the shards of this rank's valid cases; returns their manifest entries and how many were kept."""
    results: dict[str, dict] = {}
    n_reused = 0
    for cid in mine:
        if cid in shared.parts:
            try:
                results[cid], kept = _write_or_keep(me, plan, cid, local, shared, sparams)
                n_reused += kept
            except DiskWriteError:
                raise  # not this case's problem: every case after it would fail the same way
            except Exception as e:
                me.fail(cid, e)
        me.bar.update(1)
    return results, n_reused


def _write_or_keep(me: Rank, plan: PreprocessPlan, cid: str, local: Local, shared: Shared,
                   sparams: dict) -> tuple[dict, bool]:
    """(manifest entry, kept): the shard is kept when it was made with the same parameters and risk label."""
    from hpc_dfs.data.shards import shard_name

    prev = local.reused.get(cid)
    risk = shared.risk[cid]
    if (prev is not None and prev.get("params_sha256") == shared.phash
            and prev.get("risk_label") == (-1 if risk is None else risk)):
        return prev["manifest_entry"], True
    item = local.cache.pop(cid, None)
    if item is None:  # beyond cache_mb (or a shard to redo): decoded again
        check_case_memory(plan.case_dirs[cid], sparams, me.cfg.memory_limit_mb, ranks_per_node())
        item, _ = load_item(plan.case_dirs[cid], plan.label_map, sparams)
    return _write_case(me.out_dir / shard_name(cid), item, shared, me.cfg), False


def _write_case(shard: Path, item: CaseItem, shared: Shared, cfg) -> dict:
    """Normalise one item and write its shard (atomically); returns its manifest entry."""
    from hpc_dfs.data.shards import write_case_shard

    cid = item.case_id
    risk, part, sha = shared.risk[cid], shared.parts[cid], shared.shas[cid]
    params, labels = shared.params, item.labels
    slices = normalise(item.hu, params["intensity"])
    present, slices_with = _present(labels, params["classes"])
    entry = {"case_id": cid, "shard": shard.name, "n_slices": int(len(slices)),
             "risk_label": risk, "n_voxels_in": int(np.prod(item.original_shape)), "slices_with": slices_with,
             "source_sha256": sha}
    refine = None
    if item.refine is not None:  # the cascade's stage-2 windows, normalised like the slices
        r = item.refine
        r_present, r_with = _present(r["label"], params["classes"])
        refine = {"image": normalise(r["hu"], params["intensity"]), "label": r["label"], "stack": r["stack"],
                  "classes_present": r_present, "boxes": r["boxes"]}
        entry.update({"n_refine_slices": int(len(r["label"])), "n_refine_windows": len(r["boxes"]),
                      "refine_slices_with": r_with})
    attrs = {
        "case_id": cid, "original_shape": [int(v) for v in item.original_shape],
        "spacing": [float(v) for v in item.spacing], "affine": np.asarray(item.affine).tolist(),
        "orientation": "".join(item.geometry["codes"]), "source_sha256": sha,
        "risk_label": -1 if risk is None else int(risk), "preprocessing": json.dumps(params, sort_keys=True),
        "geometry": item.geometry, "params_sha256": shared.phash, "fingerprint_part": part.meta(),
        "manifest_entry": entry, "source_files": item.source_files,
    }
    write_case_shard(shard, cid, slices, labels, present, shared.features[cid], part.fg_samples, attrs,
                     compression=cfg.compression, level=cfg.compression_level, refine=refine)
    return entry


def _present(labels: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """(n, C) 1 where class c occurs in slice i, and the count of slices holding each foreground class."""
    # any() over the slice axes, not reshape(n, -1): a case without kidney has n = 0 stage-2 slices
    present = np.stack([(labels == c).any(axis=(1, 2)) for c in range(len(classes))], axis=1)
    return present, {name: int(present[:, c].sum()) for c, name in enumerate(classes) if c > 0}


def exchange_results(me: Rank, results: dict[str, dict], n_reused: int,
                      errors: dict[str, str]) -> tuple[dict[str, dict], int]:
    """Every rank's manifest entries and kept-shard count; the failed cases are added to ``errors``."""
    from hpc_dfs import parallel

    gathered = parallel.allgather_object((results, me.failed, n_reused), name="preprocess.results")
    all_results: dict[str, dict] = {}
    total_reused = 0
    for rank_results, rank_errors, rank_reused in gathered:
        all_results.update(rank_results)
        errors.update(rank_errors)
        total_reused += rank_reused
    return all_results, total_reused


def write_run_manifest(me: Rank, plan: PreprocessPlan, shared: Shared, results: dict[str, dict], errors: dict[str, str],
                    n_reused: int, t_start: float) -> None:
    """Rank 0: ``clinical_pipeline.json``, then ``manifest.json`` (CONTRACTS.md section 2), then one log line."""
    from hpc_dfs.config import to_dict

    cfg = me.cfg
    folds = _assign_folds(list(plan.case_dirs), cfg.n_folds, cfg.seed)
    cases = [dict(results[cid], fold=folds[cid]) for cid in sorted(results)]
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "hpc_dfs_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": plan.dataset,
        "source": str(plan.data_dir.resolve()),
        "shards": [c["shard"] for c in cases],
        "cases": cases,
        "n_folds": cfg.n_folds,
        "fingerprint": shared.fingerprint,
        "preprocessing": shared.params,
        "clinical": _clinical_block(me.out_dir, plan, shared.pipeline),
        "config": to_dict(cfg),
        "failed": [{"case_id": k, "error": v} for k, v in sorted(errors.items())],
        "skipped_unlabelled": plan.skipped,
        "world_size": me.world,
        "params_sha256": shared.phash,
    }
    path = write_manifest(me.out_dir, manifest)
    n_in = sum(c["n_voxels_in"] for c in cases)
    me.log.info("wrote %s: %d case(s) (%d preprocessed, %d already valid) in %.1f s on %d rank(s), %.1f Mvoxels in",
                path, len(cases), len(cases) - n_reused, n_reused, time.time() - t_start,
                me.world, n_in / 1e6)


def _assign_folds(case_ids: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """Folds by case: a seeded permutation of the sorted ids, dealt round-robin."""
    ids = sorted(case_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(i % n_folds) for i, j in enumerate(perm)}


def _clinical_block(out_dir: Path, plan: PreprocessPlan, pipeline: Optional[dict]) -> dict:
    """The manifest's ``clinical`` block; writes ``clinical_pipeline.json`` when there is a pipeline."""
    from hpc_dfs.data.kits_clinical import ClinicalPipeline

    if pipeline is None:
        return {"pipeline_file": None, "n_features": 0, "feature_names": [], "target": "malignant", "source": None}
    write_json(out_dir / CLINICAL_PIPELINE_NAME, pipeline)
    names = ClinicalPipeline.from_json(pipeline).feature_names()
    return {"pipeline_file": CLINICAL_PIPELINE_NAME, "n_features": len(names), "feature_names": names,
            "target": "malignant", "source": plan.clinical_file.name}
