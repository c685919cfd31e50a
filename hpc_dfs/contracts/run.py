"""The RUN/ folder that ``train`` writes and ``report`` reads (``hpc_dfs/CONTRACTS.md`` section 3).

    RUN/metrics.jsonl     METRICS_NAME: one :class:`MetricsRow` per epoch (:func:`read_metrics`)
    RUN/run.json          RUN_INFO_NAME: what ran (:class:`RunInfo`: torch and engine versions, git commit, device,
                          launcher; :func:`write_run_info` / :func:`read_run_info`)
    RUN/config.toml       CONFIG_NAME: the resolved configuration (:func:`write_config_toml`)
    RUN/curves.png        CURVES_NAME: loss, Dice, risk and learning rate per epoch
    RUN/checkpoints/      :mod:`hpc_dfs.contracts.checkpoint`
    RUN/locate/, RUN/refine/  the two stages of ``train --stage both``, each laid out as above (:func:`stage_dirs`)

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
           "stage_dirs", "epochs_trained", "best_epoch", "git_commit", "package_version"]

METRICS_NAME = "metrics.jsonl"
RUN_INFO_NAME = "run.json"
CONFIG_NAME = "config.toml"
CURVES_NAME = "curves.png"
#: the sub-folders of a ``train --stage both`` run, in the order they are trained
STAGES = ("locate", "refine")


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
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} cannot be read as JSON: {e}") from None


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
