"""``hpc-dfs export-nnunet``: KiTS-layout data as an nnU-Net v2 raw dataset, on exactly our folds.

    hpc-dfs export-nnunet --data data/kits23 --out nnUNet_raw/Dataset220_KiTS2023
    hpc-dfs export-nnunet --data data/kits --out nnUNet_raw/Dataset064_KiTS19 --shards data/shards
    nnUNetv2_plan_and_preprocess -d 220 --verify_dataset_integrity          # with nnUNet_raw set
    cp nnUNet_raw/Dataset064_KiTS19/splits_final.json "$nnUNet_preprocessed/Dataset064_KiTS19/"

Writes ``OUT/imagesTr/case_XXXXX_0000.nii.gz`` (the CT), ``OUT/labelsTr/case_XXXXX.nii.gz`` (the ground
truth), both byte for byte, and ``OUT/dataset.json``: for KiTS23 data (a label map holding 3, cyst) the
regions of nnU-Net's own KiTS23 conversion (kidney [1, 2, 3], masses [2, 3], tumor 2, regions_class_order
[1, 3, 2]); for KiTS19 data the labels background 0, kidney 1, tumor 2 (``--labels`` forces either).
``--shards`` (a ``preprocess`` output) also writes ``OUT/splits_final.json`` from its manifest's folds, so
that nnU-Net trains and validates on exactly our split; nnU-Net reads that file from
``nnUNet_preprocessed/DatasetNNN_NAME/``, so copy it there after planning. Details:
:mod:`hpc_dfs.data.nnunet`.

Every file is written atomically; a rerun keeps identical files. An ``OUT`` that holds another dataset (a
file that differs, or cases this export does not write) is refused before anything is written (exit 2);
a case without CT or ground truth, or with labels outside 0-3, is one error line naming it (exit 3).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hpc_dfs.log import get_logger

__all__ = ["add_arguments", "main", "run"]

CLI_LONG_HELP = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The verb's options.

    Args:
        parser: the ``export-nnunet`` sub-parser.
    """
    parser.add_argument("--data", type=Path, required=True, help="KiTS-layout folder (case_XXXXX/imaging.nii.gz and "
                                                                 "segmentation.nii.gz)")
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder: nnUNet_raw/DatasetNNN_NAME")
    parser.add_argument("--shards", type=Path, default=None,
                        help="a preprocess output: its manifest's folds become OUT/splits_final.json")
    parser.add_argument("--labels", choices=("auto", "kits23", "kits19"), default="auto",
                        help="auto: KiTS23 regions when a label map holds 3 (cyst), else KiTS19 labels")


def run(data: Path, out: Path, shards: Path | None = None, labels: str = "auto") -> dict:
    """Plan, check and write the export; returns what was done.

    Args:
        data: KiTS-layout folder.
        out: ``nnUNet_raw/DatasetNNN_NAME``.
        shards: optional ``preprocess`` output for ``splits_final.json``.
        labels: ``auto``, ``kits23`` or ``kits19``.

    Raises:
        hpc_dfs.data.nnunet.NnunetExportError: see :func:`hpc_dfs.data.nnunet.plan_export`.
        hpc_dfs.errors.HpcDfsError: a case or manifest that cannot be read, a refused write.
    """
    from hpc_dfs.data.nnunet import plan_export, write_export

    log = get_logger("hpc_dfs.export_nnunet")
    t0 = time.perf_counter()
    plan = plan_export(data, out, shards_dir=shards, labels=labels)
    done = write_export(plan)
    log.info("%s: %d case(s), %s, %d file(s) written, %d identical kept%s in %.1f s", out, len(plan.case_ids),
             "KiTS23 regions (kidney, masses, tumor)" if plan.kits23 else "KiTS19 labels (kidney, tumor)",
             done["copied"], done["kept"], f", splits_final.json with {len(plan.splits)} folds" if plan.splits else "",
             time.perf_counter() - t0)
    if plan.unsplit:
        log.warning("%d exported case(s) are in no fold of %s: %s", len(plan.unsplit), shards,
                    ", ".join(plan.unsplit[:5]))
    return {"cases": plan.case_ids, "kits23": plan.kits23, **done}


def main(args: argparse.Namespace) -> int:
    """``hpc-dfs export-nnunet``: exit 0, or the error's code (one line, printed by the CLI).

    Raises:
        hpc_dfs.errors.HpcDfsError: a bad folder or case (see :func:`run`).
    """
    from hpc_dfs.config import require_path

    data = require_path(args.data, "dir", "--data")
    shards = require_path(args.shards, "dir", "--shards") if args.shards else None
    run(data, args.out, shards, args.labels)
    return 0
