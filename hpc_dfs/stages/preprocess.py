"""KiTS-layout CT + clinical records -> verified HDF5 shards and manifest.json, split over MPI ranks.

    hpc-dfs preprocess --data DATA --out SHARDS [--config FILE] [--slice-size 256,256] [--fail-fast]
    mpirun -np 4 hpc-dfs preprocess --data DATA --out SHARDS        # or srun, horovodrun --gloo

Steps (every rank runs the same code; ``hpc_dfs.dist`` gives rank and size):

1. list the cases; read the clinical records (only pre-operative fields become inputs) and check
   them; read every image header (cheap): voxel counts weigh the cases, and spacings and fields
   of view give the target spacing before any volume is decoded;
2. split the cases across ranks balanced by voxels (:func:`hpc_dfs.data.reader.partition_balanced`);
3. **fingerprint**: each rank loads and validates its cases, samples their foreground voxels and
   resamples them (kept in memory up to ``cache_mb`` so most cases are decoded once); the samples
   are gathered and combined in case-id order, so every rank derives the same normalisation
   whatever the number of ranks;
4. fit the clinical pipeline (impute/scale/one-hot) on the valid training cases;
5. each rank writes one shard per case (``shard-<case_id>.h5``, atomically), skipping cases whose
   shard is already valid for the same inputs and parameters (resume after a crash);
6. rank 0 gathers the results and writes ``clinical_pipeline.json`` then ``manifest.json``.

A bad case (missing imaging, truncated gzip, shape or affine mismatch, labels outside the set,
non-finite voxels, missing or malformed clinical record) is reported once as
``[case_00007] problem``, nothing is written for it, the other cases are still done, and the exit
status is 1 with a summary of the failed cases. ``--fail-fast`` stops at the first one.

The per-case transform (:func:`prepare_image`, :func:`prepare_label`) and its inverse
(:func:`restore_volume`) live in :mod:`hpc_dfs.data.geometry` and are re-exported here; ``predict``
uses them with the manifest's ``preprocessing`` block to reproduce training exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from hpc_dfs import __version__
from hpc_dfs.data.geometry import (make_geometry, normalise, prepare_image, prepare_label, resample_image,  # noqa: F401
                                   restore_labels, restore_volume)
from hpc_dfs.fsutil import clean_stale_tmp, sha256_file, write_json
from hpc_dfs.log import get_logger

__all__ = ["prepare_image", "prepare_label", "restore_volume", "restore_labels", "run_preprocess",
           "add_arguments", "main", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
CLI_LONG_HELP = True


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hpc_dfs.config import add_arguments as add_cfg
    from hpc_dfs.config.data import PreprocessConfig

    parser.add_argument("--data", required=True, type=Path, help="KiTS-layout input folder (case_XXXXX/, kits.json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first bad case (default: do the "
                        "others and report all at the end)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bar on rank 0 (default: when stderr is a terminal)")
    add_cfg(parser, PreprocessConfig)


def main(args: argparse.Namespace) -> int:
    from hpc_dfs.config import from_args
    from hpc_dfs.config.data import PreprocessConfig

    cfg = from_args(PreprocessConfig, args)  # a ConfigError is reported by hpc_dfs.cli (one line, exit 2)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return run_preprocess(args.data, args.out, cfg, fail_fast=args.fail_fast, progress=progress)


# ----------------------------------------------------------------------------- helpers
def _params_hash(params: dict, pipeline: Optional[dict]) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, "preprocessing": params, "clinical": pipeline}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _source_sha(case_dir: Path) -> str:
    """sha256 over the case's input files (imaging, then ground truth), hex."""
    from hpc_dfs.data.kits_io import IMAGE_NAME, find_label_file

    h = hashlib.sha256()
    for p in (case_dir / IMAGE_NAME, find_label_file(case_dir)):
        if p is not None and p.exists():
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def _assign_folds(case_ids: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """Folds by case: a seeded permutation of the sorted ids, dealt round-robin."""
    ids = sorted(case_ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(i % n_folds) for i, j in enumerate(perm)}


class _Abort(Exception):
    """Raised inside the case loops to stop at the first bad case (--fail-fast)."""


def run_preprocess(data_dir: str | Path, out_dir: str | Path, cfg=None, fail_fast: bool = False,
                   progress: bool = False) -> int:
    """Run the preprocessing stage on this rank (call under mpirun for several). Returns the exit status."""
    from hpc_dfs import dist
    from hpc_dfs.config import to_dict
    from hpc_dfs.config.data import PreprocessConfig, parse_label_map
    from hpc_dfs.data import clinical as clin
    from hpc_dfs.data import fingerprint as fpm
    from hpc_dfs.data.kits_io import (CLASSES, IMAGE_NAME, LABEL_MAPS, CaseError, detect_dataset, find_label_file,
                                      list_cases, load_case, read_header)
    from hpc_dfs.data.reader import partition_balanced
    from hpc_dfs.data.shards import shard_name

    cfg = cfg or PreprocessConfig()
    dist.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    rank, world = dist.rank(), dist.size()
    dist.configure_threads()
    log = get_logger("hpc_dfs.preprocess")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if cfg.clinical != "none":  # import sklearn now (~1.5 s), not inside the timed stage on every rank
        import sklearn.compose  # noqa: F401
    t_start = time.time()  # after dist.init() and imports: the logged time is the stage's own work

    # -- 1. cases, clinical records, headers (identical on every rank, no communication)
    try:
        case_dirs = list_cases(data_dir)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    dataset = detect_dataset(data_dir) if cfg.dataset == "auto" else cfg.dataset
    label_map = LABEL_MAPS[dataset] if cfg.label_map == "auto" else parse_label_map(cfg.label_map)
    n_classes = max(label_map.values()) + 1
    classes = CLASSES[:n_classes] if n_classes <= len(CLASSES) else [f"class_{i}" for i in range(n_classes)]
    errors: dict[str, str] = {}

    clin_file: Optional[Path] = None
    if cfg.clinical == "auto":
        clin_file = clin.find_clinical_file(data_dir)
        if clin_file is None:
            log.error("no clinical records in %s (kits.json, kits23.json or clinical.csv): pass --clinical FILE, "
                      "or --clinical none to preprocess CT only", data_dir)
            return 2
    elif cfg.clinical != "none":
        clin_file = Path(cfg.clinical)
    records_by_id: dict[str, dict] = {}
    frame = None
    if clin_file is not None:
        try:
            records = clin.load_kits_records(clin_file)
        except (FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            return 2
        records_by_id = {str(r["case_id"]): r for r in records}
        frame, bad = clin.preop_frame(records, errors="collect")
        for cd in case_dirs:
            if cd.name not in records_by_id:
                errors[cd.name] = f"[{cd.name}] clinical record missing from {clin_file.name}"
            elif cd.name in bad:
                errors[cd.name] = bad[cd.name]

    metas, skipped = {}, []
    for cd in case_dirs:
        if cd.name in errors:
            continue
        if find_label_file(cd) is None and (cd / IMAGE_NAME).exists():
            skipped.append(cd.name)  # test cases without ground truth: predict's business, not training's
            continue
        try:
            shape, _, affine = read_header(cd / IMAGE_NAME, cd.name)
            g = make_geometry(shape, affine, {"slice_size": [1, 1]})
            metas[cd.name] = {"case_id": cd.name, "shape": g["canonical_shape"], "spacing": g["canonical_spacing"],
                              "n_voxels": int(np.prod(shape))}
        except CaseError:
            metas[cd.name] = None  # reported with the full message when the case is loaded below
    if rank == 0:
        for msg in errors.values():
            log.error("%s", msg)
        if skipped:
            log.warning("skipping %d case(s) without ground truth: %s", len(skipped), ", ".join(skipped))
    if errors and fail_fast:
        return _summary(log, rank, errors)
    readable = [m for m in metas.values() if m is not None]
    if not readable:
        if rank == 0:
            log.error("no readable labelled case in %s", data_dir)
        return _summary(log, rank, errors) if errors else 2
    # the target spacing needs only headers: known before any volume is decoded
    spatial = fpm.spatial_fingerprint(readable)
    sparams = fpm.spatial_params(spatial, cfg)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_stale = clean_stale_tmp(out_dir)
        if n_stale:
            log.info("removed %d temporary file(s) left by an interrupted run", n_stale)
    dist.barrier()

    # -- 2. balanced split
    mine = partition_balanced([(cid, (m or {}).get("n_voxels", 0)) for cid, m in metas.items()], rank, world)
    case_dir_of = {cd.name: cd for cd in case_dirs}
    bar = _progress(progress and rank == 0, total=2 * len(mine), desc=f"preprocess (rank 0 of {world})")
    new_errors: dict[str, str] = {}

    def fail(cid: str, err: Exception) -> None:
        msg = str(err) if str(err).startswith(f"[{cid}]") else f"[{cid}] {type(err).__name__}: {err}"
        new_errors[cid] = msg
        log.error("%s", msg)
        if fail_fast:
            raise _Abort()

    # -- 3. load + validate + foreground sample; resampled HU slices kept in memory up to cache_mb
    parts: dict[str, fpm.CasePart] = {}
    reused: dict[str, dict] = {}
    local_sha: dict[str, str] = {}
    cache: dict[str, tuple] = {}
    cached_bytes = 0
    try:
        for cid in mine:
            cd = case_dir_of[cid]
            try:
                sha = _source_sha(cd) if (cd / IMAGE_NAME).exists() else ""
                prev = _reusable_shard(out_dir / shard_name(cid), cid, sha)
                if prev is not None:
                    attrs, samples = prev
                    m = attrs["fingerprint_part"]
                    part = fpm.CasePart(cid, m["shape"], m["spacing"], m["n_voxels"], samples, m["n_foreground"])
                    reused[cid] = attrs
                else:
                    case = load_case(cd, label_map=label_map, require_label=True)
                    meta = metas[cid]
                    part = fpm.case_part(cid, case.image, case.label, meta["shape"], meta["spacing"],
                                         cfg.fg_samples_per_case, cfg.seed)
                    hu, geom = resample_image(case.image, case.affine, sparams)
                    labels = prepare_label(case.label, geom)
                    item = (hu, labels, geom, case.image.shape, case.spacing, case.affine,
                            [p.name for p in (case.image_path, case.label_path) if p is not None])
                    del case
                    if cached_bytes + hu.nbytes + labels.nbytes <= cfg.cache_mb * 2 ** 20:
                        cache[cid] = item
                        cached_bytes += hu.nbytes + labels.nbytes
                parts[cid] = part
                local_sha[cid] = sha
            except Exception as e:  # CaseError, or anything unexpected about this case: still name it
                fail(cid, e)
            bar.update(1)
    except _Abort:
        return _summary(log, rank, new_errors, fail_fast=True, world=world)

    gathered = dist.allgather_object(
        ({cid: (p.meta(), p.fg_samples, local_sha[cid]) for cid, p in parts.items()}, new_errors),
        name="preprocess.fingerprint")
    all_parts: dict[str, fpm.CasePart] = {}
    shas: dict[str, str] = {}
    for rank_parts, rank_errors in gathered:
        errors.update(rank_errors)
        for cid, (m, samples, sha) in rank_parts.items():
            all_parts[cid] = fpm.CasePart(cid, m["shape"], m["spacing"], m["n_voxels"], samples, m["n_foreground"])
            shas[cid] = sha
    if not all_parts:
        if rank == 0:
            log.error("no valid case to preprocess in %s", data_dir)
        return _summary(log, rank, errors) if errors else 2
    try:
        fingerprint = {**spatial, "foreground": fpm.intensity_fingerprint(all_parts.values(), cfg.percentiles)}
        params = fpm.derive_params(fingerprint, cfg, classes, label_map)
    except ValueError as e:
        if rank == 0:
            log.error("%s", e)
        return 2

    # -- 4. clinical pipeline, fitted on the valid training cases only
    valid_ids = sorted(all_parts)
    pipeline = None
    feats: dict[str, np.ndarray] = {cid: np.zeros(0, np.float32) for cid in valid_ids}
    if frame is not None:
        pipe = clin.ClinicalPipeline().fit(frame.loc[valid_ids])
        x = pipe.transform(frame.loc[valid_ids])
        feats = {cid: x[i] for i, cid in enumerate(valid_ids)}
        pipeline = pipe.to_json()
    risk = {cid: clin.risk_label(records_by_id[cid]) if cid in records_by_id else None for cid in valid_ids}
    phash = _params_hash(params, pipeline)
    params_json = json.dumps(params, sort_keys=True)

    # -- 5. shards of this rank's valid cases
    results: dict[str, dict] = {}
    n_skipped = 0
    try:
        for cid in mine:
            if cid not in all_parts:
                bar.update(1)
                continue
            shard = out_dir / shard_name(cid)
            try:
                prev = reused.get(cid)
                if (prev is not None and prev.get("params_sha256") == phash
                        and prev.get("risk_label") == (-1 if risk[cid] is None else risk[cid])):
                    results[cid] = prev["manifest_entry"]
                    n_skipped += 1
                else:
                    item = cache.pop(cid, None)
                    if item is None:
                        case = load_case(case_dir_of[cid], label_map=label_map, require_label=True)
                        hu, geom = resample_image(case.image, case.affine, sparams)
                        item = (hu, prepare_label(case.label, geom), geom, case.image.shape, case.spacing,
                                case.affine, [p.name for p in (case.image_path, case.label_path) if p is not None])
                        del case
                    results[cid] = _write_case(cid, shard, item, params, params_json, phash, feats[cid], risk[cid],
                                               all_parts[cid], shas[cid], cfg)
                    del item
            except Exception as e:
                fail(cid, e)
            bar.update(1)
    except _Abort:
        return _summary(log, rank, new_errors, fail_fast=True, world=world)
    bar.close()

    gathered = dist.allgather_object((results, new_errors, n_skipped), name="preprocess.results")
    all_results: dict[str, dict] = {}
    n_reused = 0
    for rank_results, rank_errors, rank_skipped in gathered:
        all_results.update(rank_results)
        errors.update(rank_errors)
        n_reused += rank_skipped

    # -- 6. manifest (rank 0, last)
    if rank == 0:
        folds = _assign_folds([cd.name for cd in case_dirs], cfg.n_folds, cfg.seed)
        cases = []
        for cid in sorted(all_results):
            entry = dict(all_results[cid])
            entry["fold"] = folds[cid]
            cases.append(entry)
        clinical_block = {"pipeline_file": None, "n_features": 0, "feature_names": [], "target": "malignant",
                          "source": None}
        if pipeline is not None:
            write_json(out_dir / "clinical_pipeline.json", pipeline)
            names = clin.ClinicalPipeline.from_json(pipeline).feature_names()
            clinical_block = {"pipeline_file": "clinical_pipeline.json", "n_features": len(names),
                              "feature_names": names, "target": "malignant", "source": clin_file.name}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "hpc_dfs_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": dataset,
            "source": str(data_dir.resolve()),
            "shards": [c["shard"] for c in cases],
            "cases": cases,
            "n_folds": cfg.n_folds,
            "fingerprint": fingerprint,
            "preprocessing": params,
            "clinical": clinical_block,
            "config": to_dict(cfg),
            "failed": [{"case_id": k, "error": v} for k, v in sorted(errors.items())],
            "skipped_unlabelled": skipped,
            "world_size": world,
            "params_sha256": phash,
        }
        write_json(out_dir / "manifest.json", manifest)
        n_in = sum(c["n_voxels_in"] for c in cases)
        log.info("wrote %s: %d case(s) (%d preprocessed, %d already valid) in %.1f s on %d rank(s), %.1f Mvoxels in",
                 out_dir / "manifest.json", len(cases), len(cases) - n_reused, n_reused, time.time() - t_start, world,
                 n_in / 1e6)
    dist.barrier()
    return _summary(log, rank, errors) if errors else 0


def _reusable_shard(shard: Path, cid: str, sha: str):
    """(attrs, fg_samples) of an existing shard that verifies and was made from the same input files, else None."""
    import h5py
    from hpc_dfs.data.shards import read_case_attrs, validate_shard

    if not sha or not shard.exists():
        return None
    ok, _why = validate_shard(shard, cid)
    if not ok:
        return None
    attrs = read_case_attrs(shard, cid)
    if attrs.get("source_sha256") != sha:
        return None
    with h5py.File(shard, "r") as f:
        return attrs, f[cid]["fg_samples"][()]


def _write_case(cid: str, shard: Path, item: tuple, params: dict, params_json: str, phash: str,
                clinical: np.ndarray, risk: Optional[int], part, sha: str, cfg) -> dict:
    from hpc_dfs.data.shards import write_case_shard

    hu, labels, geom, shape, spacing, affine, files = item
    slices = normalise(hu, params["intensity"])
    n_classes = len(params["classes"])
    present = np.stack([(labels == c).reshape(len(labels), -1).any(axis=1) for c in range(n_classes)], axis=1)
    slices_with = {name: int(present[:, c].sum()) for c, name in enumerate(params["classes"]) if c > 0}
    entry = {"case_id": cid, "shard": shard.name, "n_slices": int(len(slices)),
             "risk_label": risk, "n_voxels_in": int(np.prod(shape)), "slices_with": slices_with,
             "source_sha256": sha}
    attrs = {
        "case_id": cid, "original_shape": [int(v) for v in shape], "spacing": [float(v) for v in spacing],
        "affine": np.asarray(affine).tolist(), "orientation": "".join(geom["codes"]),
        "source_sha256": sha, "risk_label": -1 if risk is None else int(risk), "preprocessing": params_json,
        "geometry": geom, "params_sha256": phash, "fingerprint_part": part.meta(), "manifest_entry": entry,
        "source_files": files,
    }
    write_case_shard(shard, cid, slices, labels, present, clinical, part.fg_samples, attrs,
                     compression=cfg.compression, level=cfg.compression_level)
    return entry


def _summary(log, rank: int, errors: dict, fail_fast: bool = False, world: int = 1) -> int:
    """Log the failed cases (rank 0, or the failing rank under --fail-fast) and return 1."""
    if rank == 0 or fail_fast:
        lines = "\n".join(f"  {v}" for _, v in sorted(errors.items()))
        log.error("%d case(s) failed%s:\n%s", len(errors), " (stopped at the first: --fail-fast)" if fail_fast else
                  "; the other cases were written", lines)
    if fail_fast and world > 1:
        from hpc_dfs import dist
        dist.abort(1)
    return 1


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
