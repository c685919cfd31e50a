"""``hpc-dfs synth``: synthetic CT in the exact KiTS layout, so the real code path runs without the real CT.

    hpc-dfs synth --out DATA --cases 8 --seed 0                       # full phantoms + phantom kits.json
    hpc-dfs synth --out DATA --from-labels ../shared/data/kits19/labels \\
                  --kits-json ../shared/data/kits19/kits.json --cases case_00002,case_00004
    mpirun -np 4 hpc-dfs synth --out DATA --cases 64                  # the cases split across ranks

Writes ``DATA/case_XXXXX/imaging.nii.gz`` and ``segmentation.nii.gz`` (CONTRACTS.md section 1) and
``DATA/kits.json`` (rank 0, last; ``kits23.json`` when ``--kits-json`` is one, as in the KiTS23 layout, so that
``preprocess`` recognises KiTS23 data and its labels). The two renderers, **phantoms** (the clinical record is
drawn first and drives the image) and **from labels** (CT painted around a real KiTS19 or KiTS23 label map,
whose file is copied byte for byte and whose real record is attached), are described in :mod:`hpc_dfs.data.synth`.

**Tumour contrast that the default look draws** (tumour minus kidney parenchyma, HU, before the per-case
offset of N(0, 10) HU, the texture of +-25 HU and the scanner noise of SD 6-28 HU; the phase is drawn per case:
non-contrast 10 %, corticomedullary 35 %, nephrographic 40 %, excretory 15 %)::

    phase              clear cell  papillary  chromophobe  cc-papillary  oncocytoma  angiomyolipoma
    non-contrast           +10         +5         +10          +10          +10          -10
    corticomedullary       +25        -75         -25          -15           -5          -85
    nephrographic          -31       -112         -71          -63          -55         -123
    excretory              -32        -94         -62          -56          -50         -106

So about one case in ten (non-contrast), and some corticomedullary ones, carry a tumour within the noise of the
kidney: invisible by construction, as a small tumour on a non-contrast CT is. The generator keeps them (real data
has them too); ``hpc-dfs evaluate`` measures each tumour's contrast in the image and flags the ones below 1
kidney SD as *faint*, and the report and ``eval.md`` show each tumour's contrast beside its detection and the
detection rate of faint and clear tumours apart.

Output is deterministic for a seed (each case has its own seeded generator, so case 7 does not change
when more cases are asked for). Files are written atomically; a rerun keeps valid existing cases.
A bad ``--from-labels``, ``--kits-json`` or ``--cases`` is one error line and exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from hpc_dfs.config import ConfigError, require_path
from hpc_dfs.contracts.kits import CLINICAL_NAME, IMAGE_NAME, KITS23_CLINICAL_NAME, LABEL_NAME
from hpc_dfs.data.progress import add_progress_argument, progress_bar, wants_progress
from hpc_dfs.data.synth import check_out_folder, phantom_case, render_from_labels
from hpc_dfs.log import get_logger

__all__ = ["run_synth", "add_arguments", "main"]

CLI_LONG_HELP = True

#: one case to write: its id and, when rendering around real labels, the label map it copies
Job = tuple[str, Optional[Path]]


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The verb's options: ``--out``, ``--progress`` and every field of :class:`~hpc_dfs.config.data.SynthConfig`.

    Args:
        parser: the ``synth`` sub-parser.
    """
    from hpc_dfs.config import add_arguments as add_cfg
    from hpc_dfs.config.data import SynthConfig

    parser.add_argument("--out", required=True, type=Path, help="output folder (KiTS layout)")
    add_progress_argument(parser)
    add_cfg(parser, SynthConfig)


def main(args: argparse.Namespace) -> int:
    """Run ``hpc-dfs synth`` from parsed arguments; returns the exit status.

    Args:
        args: the parsed ``synth`` arguments.

    Raises:
        ConfigError: a bad setting, ``--out`` is a file, or a bad ``--from-labels``/``--kits-json``/``--cases``.
    """
    from hpc_dfs.config import from_args
    from hpc_dfs.config.data import SynthConfig

    cfg = from_args(SynthConfig, args)
    if args.out.exists():
        require_path(args.out, "dir", "--out")
    return run_synth(args.out, cfg, progress=wants_progress(args))


# ----------------------------------------------------------------------------- the stage
def run_synth(out: str | Path, cfg, progress: bool = False) -> int:
    """Write the synthetic data set (this rank's share of the cases; rank 0 writes ``kits.json``).

    Args:
        out: the output folder (created).
        cfg: a :class:`~hpc_dfs.config.data.SynthConfig`.
        progress: show a tqdm bar on rank 0.

    Returns:
        0.

    Raises:
        ConfigError: ``--from-labels`` is not a folder or lacks a wanted case, or ``--kits-json`` is unreadable.
    """
    from hpc_dfs import parallel
    from hpc_dfs.fsutil import write_json

    parallel.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    rank, world = parallel.rank(), parallel.size()
    log = get_logger("hpc_dfs.synth")
    out = Path(out)
    jobs, records = _label_jobs(cfg, log) if cfg.from_labels else (_phantom_jobs(cfg), {})
    check_out_folder(out, [c for c, _ in jobs])  # never into another data set
    mine = jobs[rank::world]
    bar = progress_bar(progress and rank == 0, total=len(mine), desc="synth", unit="case")
    made: dict[str, dict] = {}
    n_kept = 0
    for cid, lab_path in mine:
        kept, record = _write_case(out / cid, cid, lab_path, records.get(cid), cfg)
        n_kept += kept
        if record is not None:
            made[cid] = record
        bar.update(1)
    bar.close()
    gathered = parallel.allgather_object(made, name="synth.records")
    if rank == 0:
        if not cfg.from_labels:
            for part in gathered:
                records.update(part)
        name = (KITS23_CLINICAL_NAME if cfg.kits_json and Path(cfg.kits_json).name == KITS23_CLINICAL_NAME
                else CLINICAL_NAME)
        write_json(out / name, [records[c] for c, _ in jobs if c in records])  # KiTS23 records keep their name
        log.info("wrote %d case(s) to %s (%d already there and kept), %s with %d record(s)",
                 len(jobs) - n_kept, out, n_kept, name, len(records))
    parallel.barrier()
    return 0


def _phantom_jobs(cfg) -> list[Job]:
    """``case_<first_case>`` .. ``case_<first_case + cases - 1>``, rendered from the seed alone."""
    return [(f"case_{i:05d}", None) for i in range(cfg.first_case, cfg.first_case + int(cfg.cases))]


def _label_jobs(cfg, log) -> tuple[list[Job], dict[str, dict]]:
    """The wanted cases of ``--from-labels`` and their records from ``--kits-json`` (if given).

    Raises:
        ConfigError: the folder is missing or holds no (or not every wanted) label map; kits.json is unreadable.
    """
    labels_dir = require_path(cfg.from_labels, "dir", "--from-labels")
    available = sorted(p.parent.name for p in labels_dir.glob(f"case_*/{LABEL_NAME}"))
    if not available:
        raise ConfigError(f"--from-labels {labels_dir}: no case_XXXXX/{LABEL_NAME} in it")
    spec = cfg.cases.strip()
    wanted = available[:int(spec)] if spec.isdigit() else [c.strip() for c in spec.split(",") if c.strip()]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ConfigError(f"--from-labels {labels_dir}: no label map for {', '.join(missing)}")
    jobs = [(c, labels_dir / c / LABEL_NAME) for c in wanted]
    if not cfg.kits_json:
        return jobs, {}
    from hpc_dfs.data.kits_clinical import load_kits_records
    try:
        recs = {r["case_id"]: r for r in load_kits_records(cfg.kits_json)}
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--kits-json: {e}") from None
    absent = [c for c in wanted if c not in recs]
    if absent:
        log.warning("no clinical record in %s for %s", cfg.kits_json, ", ".join(absent))
    return jobs, {c: recs[c] for c in wanted if c in recs}


def _write_case(case_dir: Path, cid: str, lab_path: Optional[Path], record: Optional[dict],
                cfg) -> tuple[bool, Optional[dict]]:
    """Render and write one case unless a valid one is there; returns (kept, phantom record or None)."""
    from hpc_dfs.data.kits_io import save_nifti_atomic
    from hpc_dfs.fsutil import write_bytes

    if _case_is_valid(case_dir):
        if lab_path is None:  # the record is re-derived from the seed, without rendering
            return True, phantom_case(int(cid[5:]), cfg, cfg.seed, render=False)[3]
        return True, None
    if lab_path is not None:
        ct, _raw, affine = render_from_labels(lab_path, record, cfg.seed, style=cfg.style)
        save_nifti_atomic(ct, affine, case_dir / IMAGE_NAME, dtype=np.int16)
        write_bytes(case_dir / LABEL_NAME, lab_path.read_bytes())  # the real file, as is
        return False, None
    ct, lab, affine, phantom_record = phantom_case(int(cid[5:]), cfg, cfg.seed)
    save_nifti_atomic(lab, affine, case_dir / LABEL_NAME, dtype=np.uint8)
    save_nifti_atomic(ct, affine, case_dir / IMAGE_NAME, dtype=np.int16)
    return False, phantom_record


def _case_is_valid(case_dir: Path) -> bool:
    """Both files present (they are only ever renamed into place complete) with matching headers."""
    import nibabel as nib
    try:
        a = nib.load(str(case_dir / IMAGE_NAME))
        b = nib.load(str(case_dir / LABEL_NAME))
        return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)
    except Exception:
        return False
