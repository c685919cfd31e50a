"""One self-contained HTML report of a run that a researcher can trust at a glance: ``hpc-dfs report``.

    hpc-dfs report runs/r1                                   # -> runs/r1/report.html
    hpc-dfs report runs/cascade                              # a `train --stage both` folder: both stages
    hpc-dfs report runs/cv --eval runs/cv/oof/eval.json      # a `train --folds` run: per fold and pooled
    hpc-dfs report runs/r1 --pred runs/r1/pred --eval runs/r1/eval.json --clinical clin/ --shards shards/ --out r1.html

It reads only the files the stages wrote (CONTRACTS.md), never their code:

============================  ===========================================================
source                        section
============================  ===========================================================
RUN/checkpoints/last.pt       run facts (epochs trained, ranks, effective batch and LR), the
RUN/checkpoints/best.pt       configuration that applies; best.pt: the best epoch, the model
SHARDS/manifest.json          data: cases, train/validation split, fingerprint (``--shards``)
RUN/run.json                  what ran: torch, Horovod, git commit, launcher, device
RUN/metrics.jsonl             curves (loss, Dice, risk, LR per epoch, best epoch marked),
                              epochs trained, total time, every epoch's metrics
PRED/summary.json, risk.csv   prediction: per-case timing, volumes, P(malignant) beside the truth
EVAL.json                     per-case table ranked by a named metric, tumour detection, effect
                              of post-processing, overlays through the ground-truth tumour
CLIN/metrics.json,            clinical metrics with AUC confidence intervals, ROC with chance and
CLIN/predictions.csv, *.png   majority-class lines, calibration plot, SHAP pictures with captions
============================  ===========================================================

At the top, a **warnings box** lists, one line each: every tumour missed or found in the wrong
kidney, a tumour Dice below 0.2, validation metrics over fewer than 10 cases, a risk AUC whose 95 %
confidence interval contains 0.5 (Hanley-McNeil for the validation AUC, a case bootstrap for the
clinical models), surface-Dice tolerances below the voxel size, the evaluated checkpoint's epoch
differing from the last one trained, and missing or failed predictions.

The epochs trained come from ``metrics.jsonl`` (else ``last.pt``), never from ``best.pt``. The
environment (torch, Horovod, git commit, launcher, device) is what train recorded in ``RUN/run.json``
(or, for older runs, a checkpoint's ``environment``); what is not recorded is shown as "not recorded",
beside the values of the machine that wrote the report (labelled so).

The page is built by :mod:`hpc_dfs.report`; this module is the command.

A cascade folder (``train --stage both``: ``RUN/locate`` and ``RUN/refine``, no ``RUN/checkpoints``)
is reported as one run: stage 2's configuration and facts, each stage's curves and validation metrics
(stage 1 first), each stage's training warnings, and the cascade's predictions and evaluation.

A cross-validation folder (``train --folds``: ``RUN/fold_K``) gets a cross-validation section: every fold's best
validation metrics (per stage) with their mean and SD, and the pooled out-of-fold evaluation per fold and pooled
(``--eval`` when it is one, else ``RUN/oof/eval.json``); the settings, data and curves shown are the first fold's.

Defaults: ``--pred RUN/pred``, ``--eval PRED/../eval.json`` or ``RUN/eval.json``, ``--out RUN/report.html``,
``--shards`` the folder the run was trained on. A missing source leaves its section with one line
saying what is missing and which command makes it. Images are embedded as base64 PNGs and the page
loads nothing from the network, so the single file can be mailed or attached to a ticket.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hpc_dfs import fsutil
from hpc_dfs.config import require_path
from hpc_dfs.errors import HpcDfsError
from hpc_dfs.log import get_logger
from hpc_dfs.report import ReportError, build_report

CLI_LONG_HELP = True  # `hpc-dfs report --help` shows this module's whole docstring

log = get_logger("hpc_dfs.report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's arguments: the run folder and the other stages' outputs (``type=Path``)."""
    parser.add_argument("run", type=Path, help="run folder written by `hpc-dfs train` (RUN)")
    parser.add_argument("--pred", type=Path, default=None, help="predictions folder (default RUN/pred)")
    parser.add_argument("--eval", dest="eval_path", type=Path, default=None,
                        help="evaluation JSON (default PRED/../eval.json or RUN/eval.json)")
    parser.add_argument("--clinical", type=Path, default=None, help="output folder of `hpc-dfs clinical` (CLIN)")
    parser.add_argument("--shards", type=Path, default=None, help="shards folder, for case counts and the split")
    parser.add_argument("--out", type=Path, default=None, help="HTML file to write (default RUN/report.html)")


def main(args: argparse.Namespace) -> int:
    """``hpc-dfs report``: write the HTML page.

    Raises:
        HpcDfsError: a folder or file argument does not exist, or a source cannot be read (code 2).
    """
    try:
        require_path(args.run, "dir", "run folder")
    except HpcDfsError as e:
        raise ReportError(str(e)) from None
    for flag, p, kind in (("--pred", args.pred, "dir"), ("--eval", args.eval_path, "file"),
                          ("--clinical", args.clinical, "dir"), ("--shards", args.shards, "dir")):
        if p is not None:
            require_path(p, kind, flag)
    text = build_report(args.run, args.pred, args.eval_path, args.clinical, args.shards)
    out = args.out or Path(args.run) / "report.html"
    fsutil.write_text(out, text)
    log.info("wrote %s (%.1f kB)", out, len(text) / 1024)
    return 0
