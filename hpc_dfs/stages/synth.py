"""Synthetic KiTS data: CT volumes in the exact KiTS layout, so the real code path runs without the real CT.

    hpc-dfs synth --out DATA --cases 8 --seed 0                       # full phantoms + phantom kits.json
    hpc-dfs synth --out DATA --from-labels ../shared/data/kits19/labels \\
                  --kits-json ../shared/data/kits19/kits.json --cases case_00002,case_00004

Two renderers share one CT painter (:func:`render_ct`):

- **phantoms**: a torso with subcutaneous fat, abdominal wall muscle, mesenteric fat/soft-tissue
  texture, bowel (gas, fluid, oral contrast), liver, spleen, spine (cortical and cancellous bone,
  canal), psoas muscles, aorta and IVC, two bean-shaped kidneys with cortex and medulla, and one
  tumour of varied size on one kidney. The clinical record is drawn first and drives the image:
  the tumour diameter *is* the ``radiographic_size``, BMI sets the fat thickness, and
  ``malignant`` (drawn from size, age and sex by a logistic model) sets the histologic subtype,
  whose enhancement pattern the tumour shows (clear cell: hyper-enhancing with necrosis;
  papillary: hypo-enhancing; oncocytoma: central scar; angiomyolipoma: fat).
- **from labels**: the same painter around a real KiTS19 label map (kidney 1, tumour 2); the body,
  spine and organs are placed around the real kidneys, the tumour follows the case's real
  histologic subtype, and the real clinical record is attached. The segmentation file is copied
  byte for byte and the image gets its exact affine.

Every case varies: contrast phase (non-contrast, corticomedullary, nephrographic, excretory),
global HU offset and gain, noise level, partial-volume blur, organ sizes and positions. Output
is deterministic for a seed (each case has its own seeded generator, so case 7 does not change
when more cases are asked for). Files are written atomically; a rerun keeps valid existing cases.
Under ``mpirun`` the cases are split across ranks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from hpc_dfs.data.synth import phantom_case, render_from_labels
from hpc_dfs.log import get_logger

__all__ = ["run_synth", "add_arguments", "main"]

CLI_LONG_HELP = True


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hpc_dfs.config import add_arguments as add_cfg
    from hpc_dfs.config.data import SynthConfig

    parser.add_argument("--out", required=True, type=Path, help="output folder (KiTS layout)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bar on rank 0 (default: when stderr is a terminal)")
    add_cfg(parser, SynthConfig)


def main(args: argparse.Namespace) -> int:
    from hpc_dfs.config import from_args
    from hpc_dfs.config.data import SynthConfig

    cfg = from_args(SynthConfig, args)  # a ConfigError is reported by hpc_dfs.cli (one line, exit 2)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return run_synth(args.out, cfg, progress=progress)


def _case_is_valid(case_dir: Path) -> bool:
    """Both files present (they are only ever renamed into place complete) with matching headers."""
    import nibabel as nib
    try:
        a = nib.load(str(case_dir / "imaging.nii.gz"))
        b = nib.load(str(case_dir / "segmentation.nii.gz"))
        return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)
    except Exception:
        return False


def run_synth(out: str | Path, cfg, progress: bool = False) -> int:
    """Write the synthetic data set; returns the exit status."""
    from hpc_dfs import dist
    from hpc_dfs.data.clinical import load_kits_records
    from hpc_dfs.data.kits_io import save_nifti_atomic
    from hpc_dfs.fsutil import write_bytes, write_json

    dist.init(horovod=False)  # ranks + object collectives only (mpi4py under MPI launchers)
    rank, world = dist.rank(), dist.size()
    log = get_logger("hpc_dfs.synth")
    out = Path(out)
    jobs: list[tuple[str, Optional[Path]]] = []
    records: dict[str, dict] = {}
    if cfg.from_labels:
        labels_dir = Path(cfg.from_labels)
        if not labels_dir.is_dir():
            log.error("--from-labels %s is not a folder", labels_dir)
            return 2
        available = sorted(p.parent.name for p in labels_dir.glob("case_*/segmentation.nii.gz"))
        if not available:
            log.error("no case_XXXXX/segmentation.nii.gz under %s", labels_dir)
            return 2
        spec = cfg.cases.strip()
        wanted = available[:int(spec)] if spec.isdigit() else [c.strip() for c in spec.split(",") if c.strip()]
        missing = [c for c in wanted if c not in available]
        if missing:
            log.error("no label map for %s under %s", ", ".join(missing), labels_dir)
            return 2
        if cfg.kits_json:
            try:
                recs = {r["case_id"]: r for r in load_kits_records(cfg.kits_json)}
            except (FileNotFoundError, ValueError) as e:
                log.error("%s", e)
                return 2
            absent = [c for c in wanted if c not in recs]
            if absent:
                log.warning("no clinical record in %s for %s", cfg.kits_json, ", ".join(absent))
            records = {c: recs[c] for c in wanted if c in recs}
        jobs = [(c, labels_dir / c / "segmentation.nii.gz") for c in wanted]
    else:
        jobs = [(f"case_{i:05d}", None) for i in range(cfg.first_case, cfg.first_case + int(cfg.cases))]
    mine = jobs[rank::world]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc="synth", unit="case", file=sys.stderr)
    made = {}
    n_kept = 0
    for cid, lab_path in mine:
        case_dir = out / cid
        if _case_is_valid(case_dir):
            n_kept += 1
            if lab_path is None:  # the record is re-derived from the seed, without rendering
                made[cid] = phantom_case(int(cid[5:]), cfg, cfg.seed, render=False)[3]
        else:
            if lab_path is not None:
                ct, _raw, affine = render_from_labels(lab_path, records.get(cid), cfg.seed)
                save_nifti_atomic(ct, affine, case_dir / "imaging.nii.gz", dtype=np.int16)
                write_bytes(case_dir / "segmentation.nii.gz", lab_path.read_bytes())  # the real file, as is
            else:
                ct, lab, affine, record = phantom_case(int(cid[5:]), cfg, cfg.seed)
                save_nifti_atomic(lab, affine, case_dir / "segmentation.nii.gz", dtype=np.uint8)
                save_nifti_atomic(ct, affine, case_dir / "imaging.nii.gz", dtype=np.int16)
                made[cid] = record
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    gathered = dist.allgather_object(made, name="synth.records")
    if rank == 0:
        if not cfg.from_labels:
            for part in gathered:
                records.update(part)
        write_json(out / "kits.json", [records[c] for c, _ in jobs if c in records])
        log.info("wrote %d case(s) to %s (%d already there and kept), kits.json with %d record(s)",
                 len(jobs) - n_kept, out, n_kept, len(records))
    dist.barrier()
    return 0
