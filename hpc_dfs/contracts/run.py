"""The RUN/ folder that ``train`` writes and ``report`` reads (``hpc_dfs/CONTRACTS.md`` section 3).

    RUN/metrics.jsonl     METRICS_NAME: one :class:`MetricsRow` per epoch (:func:`read_metrics`)
    RUN/run.json          RUN_INFO_NAME: what ran (:class:`RunInfo`: torch and engine versions, git commit, device,
                          launcher; :func:`write_run_info` / :func:`read_run_info`)
    RUN/config.toml       CONFIG_NAME: the resolved configuration (:func:`write_config_toml`)
    RUN/curves.png        CURVES_NAME: loss, Dice, risk and learning rate per epoch
    RUN/checkpoints/      :mod:`hpc_dfs.contracts.checkpoint`
    RUN/locate/, RUN/refine/  the two stages of ``train --stage both``, each laid out as above (:func:`stage_dirs`)

Cross-validation (``train --folds all|K,K``): fold K is a run of its own in ``RUN/fold_K/`` (:func:`fold_dir`), laid
out as above (with ``--stage both``: ``RUN/fold_K/locate/``, ``RUN/fold_K/refine/``), plus

    RUN/fold_K/fold.json  FOLD_INFO_NAME: :class:`FoldInfo` (the fold, its validation cases, finished or not)
    RUN/cv.json           CV_NAME: :class:`CvSummary` (every fold's runs and best validation metrics, and their mean),
                          rebuilt from the fold folders by :func:`cv_summary` whenever a fold finishes

Readers take the folds from the fold folders (:func:`fold_checkpoints`), never from ``cv.json`` alone.

The best epoch is recorded in ``last.pt``'s ``metrics.best_epoch`` (:func:`best_epoch`); the epochs trained are the
complete epochs of ``metrics.jsonl`` (:func:`epochs_trained`).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional, TypedDict

from hpc_dfs.errors import EXIT_DATA, HpcDfsError
from hpc_dfs.fsutil import write_json, write_text

__all__ = ["METRICS_NAME", "RUN_INFO_NAME", "CONFIG_NAME", "CURVES_NAME", "STAGES", "RunFolderError", "MetricsRow",
           "RunInfo", "metrics_path", "read_metrics", "write_run_info", "read_run_info", "write_config_toml",
           "stage_dirs", "epochs_trained", "best_epoch", "git_commit", "package_version",
           # cross-validation
           "CV_NAME", "FOLD_INFO_NAME", "FOLD_PREFIX", "FoldInfo", "CvFold", "CvSummary", "FoldCheckpoints", "fold_dir",
           "fold_dirs", "fold_stage_dirs", "is_cv_run", "write_fold_info", "read_fold_info", "cv_summary",
           "write_cv_summary", "read_cv_summary", "fold_checkpoints"]

METRICS_NAME = "metrics.jsonl"
RUN_INFO_NAME = "run.json"
CONFIG_NAME = "config.toml"
CURVES_NAME = "curves.png"
#: the sub-folders of a ``train --stage both`` run, in the order they are trained
STAGES = ("locate", "refine")
CV_NAME = "cv.json"
FOLD_INFO_NAME = "fold.json"
#: fold K of a cross-validation run trains into RUN/fold_K
FOLD_PREFIX = "fold_"


class RunFolderError(HpcDfsError):
    """A file of the run folder cannot be read; the message names it (exit code 3)."""

    code = EXIT_DATA


class MetricsRow(TypedDict, total=False):
    """One line of ``metrics.jsonl``: one epoch (``partial_epoch`` for a row written on preemption)."""

    epoch: int
    step: int
    train_loss: float
    val_loss: Optional[float]
    kidney_dice: Optional[float]
    tumor_dice: Optional[float]
    risk_auc: Optional[float]
    risk_acc: Optional[float]
    samples_per_s: float
    allreduce_frac: float
    lr: float
    time: float
    step_s: float
    partial_epoch: bool


class RunInfo(TypedDict):
    """``run.json``: what ran, written by rank 0 when training starts."""

    hpc_dfs_version: str
    torch: str
    engine: str                  # "horovod", "mpi4py" or "single process"
    engine_version: Optional[str]
    git_commit: Optional[str]    # None outside a git checkout
    device: str
    launcher: str                # mpirun, horovodrun, horovodrun-gloo, srun or none
    world_size: int


def metrics_path(run: str | Path) -> Path:
    """``RUN/metrics.jsonl``.

    Args:
        run: the run folder (one stage's).
    """
    return Path(run) / METRICS_NAME


def read_metrics(run: str | Path) -> list[MetricsRow]:
    """The rows of ``RUN/metrics.jsonl`` (one per epoch), or [] when there is none.

    Args:
        run: the run folder.

    Raises:
        RunFolderError: a line is not JSON (named by number).
    """
    p = metrics_path(run)
    if not p.is_file():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RunFolderError(f"{p} line {i} is not JSON: {e}") from None
    return rows


def _read_json(path: Path):
    """The JSON in ``path``, or None when there is no such file; raises RunFolderError when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} cannot be read as JSON: {e}") from None


def write_run_info(run: str | Path, info: RunInfo) -> Path:
    """Write ``RUN/run.json`` atomically; returns its path.

    Args:
        run: the run folder.
        info: what ran.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file cannot be written.
    """
    path = Path(run) / RUN_INFO_NAME
    write_json(path, info)
    return path


def read_run_info(run: str | Path) -> Optional[RunInfo]:
    """``RUN/run.json``, or None for a run written before it existed.

    Args:
        run: the run folder.

    Raises:
        RunFolderError: the file is there but is not JSON.
    """
    path = Path(run) / RUN_INFO_NAME
    return _read_json(path)


def write_config_toml(run: str | Path, config: dict) -> Path:
    """Write the resolved configuration as ``RUN/config.toml`` (one ``[section]`` table each, None left out).

    Args:
        run: the run folder.
        config: the configuration as a nested dict (``hpc_dfs.config.to_dict``).

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file cannot be written.
    """
    import tomli_w

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
    path = Path(run) / CONFIG_NAME
    write_text(path, tomli_w.dumps(drop_none(config)))
    return path


def stage_dirs(run: str | Path) -> dict[str, Path]:
    """``{"locate": RUN/locate, "refine": RUN/refine}``: where ``train --stage both`` writes each stage.

    Args:
        run: the folder given to ``train --out``.
    """
    return {s: Path(run) / s for s in STAGES}


def epochs_trained(rows: list[MetricsRow], last: dict | None) -> int | None:
    """Whole epochs trained: the last complete epoch of metrics.jsonl, else ``last.pt``'s epoch (never best.pt).

    Args:
        rows: the rows of ``metrics.jsonl``.
        last: ``last.pt`` without its tensors, or None.
    """
    done = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int) and not r.get("partial_epoch")]
    if done:
        return max(done)
    return (last or {}).get("epoch")


def best_epoch(rows: list[MetricsRow], last: dict | None, best: dict | None) -> int | None:
    """The epoch best.pt holds: recorded in last.pt's metrics, else best.pt's epoch.

    Args:
        rows: the rows of ``metrics.jsonl`` (unused: the record is in the checkpoints).
        last: ``last.pt`` without its tensors, or None.
        best: ``best.pt`` without its tensors, or None.
    """
    recorded = ((last or {}).get("metrics") or {}).get("best_epoch")
    if isinstance(recorded, int):
        return recorded
    return (best or {}).get("epoch")


def git_commit(short: bool = False) -> Optional[str]:
    """The commit of the hpc-dfs checkout that runs, or None (not a git checkout, or no git).

    Args:
        short: the abbreviated hash instead of the full one.
    """
    cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_version(name: str) -> Optional[str]:
    """The installed version of package ``name``, or None when it is not installed.

    Args:
        name: the distribution name (``torch``, ``horovod``).
    """
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- cross-validation (train --folds)


class FoldInfo(TypedDict):
    """``RUN/fold_K/fold.json``: one fold of a cross-validation run, written by rank 0 when the fold starts and again
    (``finished`` true) when every stage of it has trained its epochs."""

    fold: int
    n_folds: int
    stage: str                 # locate, refine or both (then RUN/fold_K/locate and RUN/fold_K/refine)
    val_cases: list[str]       # the manifest's cases of this fold: validated on here, predicted by it in --oof
    n_train_cases: int
    manifest_sha256: str
    shards: str
    epochs: int                # asked for
    finished: bool


class CvFold(TypedDict):
    """One fold of ``cv.json``: its folder (relative to RUN) and, per stage, epochs, best epoch and best metrics."""

    fold: int
    run: str
    finished: bool
    n_val_cases: int
    stages: dict[str, dict]    # {stage: {run, epochs, best_epoch, best: {metric: value}}}


class CvSummary(TypedDict):
    """``RUN/cv.json``: the folds of a cross-validation run and, per stage, the mean of the folds' best metrics."""

    schema_version: int
    n_folds: int
    stage: str
    folds: list[CvFold]
    missing_folds: list[int]   # folds of the manifest without a finished fold folder
    mean: dict[str, dict]      # {stage: {metric: mean over the finished folds}}


class FoldCheckpoints(TypedDict):
    """What an ensemble or an out-of-fold prediction takes of one finished fold: its best checkpoints."""

    fold: int
    locate: Optional[Path]     # stage 1 (None for a fold trained with --stage refine alone)
    refine: Optional[Path]     # the cascade's stage 2 (None for a fold trained with --stage locate)
    val_cases: list[str]


def fold_dir(run: str | Path, fold: int) -> Path:
    """``RUN/fold_K``: where ``train --folds`` trains fold ``K``.

    Args:
        run: the folder given to ``train --out``.
        fold: the manifest fold held out.
    """
    return Path(run) / f"{FOLD_PREFIX}{int(fold)}"


def fold_dirs(run: str | Path) -> dict[int, Path]:
    """The ``RUN/fold_K`` folders present, by K (empty for a run of one fold).

    Args:
        run: the folder given to ``train --out``.
    """
    out = {}
    root = Path(run)
    if root.is_dir():
        for d in root.iterdir():
            k = d.name[len(FOLD_PREFIX):]
            if d.name.startswith(FOLD_PREFIX) and k.isdigit() and d.is_dir():
                out[int(k)] = d
    return dict(sorted(out.items()))


def is_cv_run(run: str | Path) -> bool:
    """Whether ``run`` is a cross-validation run (it holds ``fold_K/`` folders).

    Args:
        run: a folder.
    """
    return bool(fold_dirs(run))


def fold_stage_dirs(fold_run: str | Path, stage: str) -> dict[str, Path]:
    """The run folder of each stage a fold trains: ``{stage: RUN/fold_K}``, or :func:`stage_dirs` for ``both``.

    Args:
        fold_run: ``RUN/fold_K``.
        stage: locate, refine or both.
    """
    return stage_dirs(fold_run) if stage == "both" else {stage: Path(fold_run)}


def write_fold_info(fold_run: str | Path, info: FoldInfo) -> Path:
    """Write ``RUN/fold_K/fold.json`` atomically; returns its path.

    Args:
        fold_run: ``RUN/fold_K``.
        info: the fold.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file cannot be written.
    """
    path = Path(fold_run) / FOLD_INFO_NAME
    write_json(path, info)
    return path


def read_fold_info(fold_run: str | Path) -> Optional[FoldInfo]:
    """``RUN/fold_K/fold.json``, or None when the fold folder has none (not started by ``train --folds``).

    Args:
        fold_run: ``RUN/fold_K``.

    Raises:
        RunFolderError: the file is there but is not a JSON object with ``fold``, ``n_folds`` and ``val_cases``.
    """
    path = Path(fold_run) / FOLD_INFO_NAME
    if not path.is_file():
        return None
    info = _read_json(path)
    if not isinstance(info, dict) or any(k not in info for k in ("fold", "n_folds", "val_cases")):
        raise RunFolderError(f"{path} is not a fold record of `hpc-dfs train --folds` (fold, n_folds, val_cases)")
    return info


def _stage_record(run: Path, stage_run: Path) -> dict:
    """Epochs trained, best epoch and the best epoch's validation metrics of one stage's run folder."""
    from hpc_dfs.contracts import checkpoint
    rec: dict = {"run": stage_run.relative_to(run).as_posix(), "epochs": None, "best_epoch": None, "best": {}}
    last, best = checkpoint.last_path(stage_run), checkpoint.best_path(stage_run)
    if last.is_file():
        meta = checkpoint.read_meta(last)
        rec["epochs"] = meta.get("epoch")
        rec["best_epoch"] = (meta.get("metrics") or {}).get("best_epoch")
    if best.is_file():
        metrics = checkpoint.read_meta(best).get("metrics") or {}
        rec["best"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("best_epoch",)}
    return rec


def cv_summary(run: str | Path) -> CvSummary:
    """The ``cv.json`` of a cross-validation run, built from its fold folders (``fold.json`` and checkpoints).

    Args:
        run: the folder given to ``train --out``.

    Raises:
        RunFolderError: a ``fold.json`` cannot be read, or the folds disagree on the number of folds.
        hpc_dfs.contracts.checkpoint.CheckpointError: a fold's checkpoint cannot be read (named).
    """
    run = Path(run)
    folds, n_folds, stage = [], set(), None
    for k, d in fold_dirs(run).items():
        info = read_fold_info(d)
        if info is None:
            continue
        n_folds.add(int(info["n_folds"]))
        stage = info.get("stage", "locate")
        stages = {s: _stage_record(run, sd) for s, sd in fold_stage_dirs(d, stage).items()}
        folds.append({"fold": k, "run": d.name, "finished": bool(info.get("finished")),
                      "n_val_cases": len(info["val_cases"]), "stages": stages})
    if len(n_folds) > 1:
        raise RunFolderError(f"the folds of {run} were trained on shards with different numbers of folds "
                             f"({sorted(n_folds)}): one cross-validation run holds the folds of one manifest")
    n = n_folds.pop() if n_folds else 0
    done = [f for f in folds if f["finished"]]
    mean: dict[str, dict] = {}
    for f in done:
        for s, rec in f["stages"].items():
            for m, v in rec["best"].items():
                mean.setdefault(s, {}).setdefault(m, []).append(float(v))
    mean = {s: {m: sum(v) / len(v) for m, v in ms.items() if len(v) == len(done)} for s, ms in mean.items()}
    return {"schema_version": 1, "n_folds": n, "stage": stage or "locate", "folds": folds,
            "missing_folds": sorted(set(range(n)) - {f["fold"] for f in done}), "mean": mean}


def write_cv_summary(run: str | Path, summary: CvSummary) -> Path:
    """Write ``RUN/cv.json`` atomically; returns its path.

    Args:
        run: the folder given to ``train --out``.
        summary: :func:`cv_summary` of it.

    Raises:
        hpc_dfs.fsutil.DiskWriteError: the file cannot be written.
    """
    path = Path(run) / CV_NAME
    write_json(path, summary)
    return path


def read_cv_summary(run: str | Path) -> Optional[CvSummary]:
    """``RUN/cv.json``, or None when ``run`` has none (not a cross-validation run).

    Args:
        run: the folder given to ``train --out``.

    Raises:
        RunFolderError: the file is there but is not JSON.
    """
    path = Path(run) / CV_NAME
    return _read_json(path)


def fold_checkpoints(run: str | Path) -> list[FoldCheckpoints]:
    """Every fold's best checkpoints (both stages' for a cascade), once every fold of the manifest has finished.

    Args:
        run: a cross-validation run (``train --folds``: ``RUN/fold_K/``).

    Raises:
        RunFolderError: ``run`` holds no fold folder, or (one error naming them all) folds are missing, unfinished,
            lack their ``best.pt``, or disagree on the number of folds or the shards they trained on.
    """
    from hpc_dfs.contracts import checkpoint
    run = Path(run)
    dirs = fold_dirs(run)
    if not dirs:
        raise RunFolderError(f"{run} holds no {FOLD_PREFIX}K/ folders: not a cross-validation run "
                             "(`hpc-dfs train --folds all`)")
    out, problems, n_folds, manifests = [], [], set(), set()
    for k, d in dirs.items():
        info = read_fold_info(d)
        if info is None:
            problems.append(f"{d.name} has no {FOLD_INFO_NAME} (not started by `hpc-dfs train --folds`)")
            continue
        n_folds.add(int(info["n_folds"]))
        manifests.add(info.get("manifest_sha256"))
        stages = fold_stage_dirs(d, info.get("stage", "locate"))
        best = {s: checkpoint.best_path(sd) for s, sd in stages.items()}
        lacking = [str(p.relative_to(run)) for p in best.values() if not p.is_file()]
        if not info.get("finished") or lacking:
            problems.append(f"{d.name} is not finished ({'no ' + ', '.join(lacking) if lacking else 'still training'}"
                            f"; resume it: `hpc-dfs train --folds {k} --resume`)")
            continue
        out.append({"fold": k, "locate": best.get("locate"), "refine": best.get("refine"),
                    "val_cases": list(info["val_cases"])})
    if len(manifests) > 1:
        problems.append("the folds were trained on different shards (their fold.json manifest_sha256 differ)")
    if len(n_folds) > 1:
        problems.append(f"the folds disagree on the number of folds ({sorted(n_folds)})")
    elif n_folds:
        missing = sorted(set(range(n_folds.pop())) - set(dirs))
        if missing:
            problems.append(f"fold(s) {', '.join(map(str, missing))} missing (train them: `hpc-dfs train --folds "
                            f"{','.join(map(str, missing))}`)")
    if problems:
        raise RunFolderError(f"cross-validation run {run}: {'; '.join(problems)}")
    return out
