"""``hpc-dfs``: one command, one verb per pipeline stage (argument parsing only).

    hpc-dfs synth       write KiTS-layout synthetic CT (full phantoms, or around real label maps)
    hpc-dfs preprocess  KiTS-layout data -> verified HDF5 shards + manifest (MPI-parallel)
    hpc-dfs train       train the DFS fusion model with Horovod (1..N ranks)
    hpc-dfs predict     whole-volume inference back to native geometry (MPI-parallel)
    hpc-dfs evaluate    KiTS19 metrics of predictions against ground truth
    hpc-dfs clinical    Clinical-GRU k-fold experiment with baselines and SHAP
    hpc-dfs models      parameter and FLOP summary of every model
    hpc-dfs report      one HTML report of a run
    hpc-dfs bench       run the benchmarks in bench/

Each verb lives in its own module, which provides ``add_arguments(parser)`` and ``main(args) -> int``.
Only the module of the verb being run is imported, so ``hpc-dfs --help`` is instant.

The stage contract: a stage raises :class:`hpc_dfs.errors.HpcDfsError` (or a subclass) for a problem the
user can fix; :func:`main` alone catches it, writes ``hpc-dfs VERB: error: <message>`` as one line on
stderr and exits with the error's ``code``.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

VERBS: dict[str, tuple[str, str]] = {
    "synth": ("hpc_dfs.stages.synth", "write KiTS-layout synthetic CT (phantoms, or around real label maps)"),
    "preprocess": ("hpc_dfs.stages.preprocess", "KiTS-layout data -> HDF5 shards + manifest.json (MPI-parallel)"),
    "train": ("hpc_dfs.stages.train", "train the DFS fusion model with Horovod ring-allreduce"),
    "predict": ("hpc_dfs.stages.predict", "segment cases and write prediction_XXXXX.nii.gz (MPI-parallel)"),
    "evaluate": ("hpc_dfs.stages.evaluate", "KiTS19 Dice, IoU, HD95 and surface Dice of predictions"),
    "clinical": ("hpc_dfs.stages.clinical", "Clinical-GRU k-fold experiment, sklearn baselines, SHAP"),
    "models": ("hpc_dfs.stages.models", "parameters and GFLOPs of every model"),
    "report": ("hpc_dfs.stages.report", "one self-contained HTML report of a run"),
    "bench": ("hpc_dfs.stages.bench", "run the benchmarks in bench/ and write JSON results"),
    "export-nnunet": ("hpc_dfs.stages.export_nnunet", "KiTS-layout data -> nnU-Net v2 raw dataset (+ our folds)"),
}

EPILOG = """launch examples:
  hpc-dfs synth --out data/kits --cases 8 --seed 0
  mpirun -np 2 hpc-dfs preprocess --data data/kits --out data/shards
  horovodrun -np 2 --gloo hpc-dfs train --shards data/shards --out runs/r1
  srun --mpi=pmix hpc-dfs train --shards data/shards --out runs/r1   (inside sbatch, see slurm/)
  hpc-dfs predict --checkpoint runs/r1/checkpoints/best.pt --input data/kits --out runs/r1/pred
  hpc-dfs evaluate --pred runs/r1/pred --gt data/kits --out runs/r1/eval.json
"""


class _StderrOfTheMoment(logging.Handler):
    """Writes a record, as it is, to the ``sys.stderr`` of the moment (a redirected or captured stderr gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stderr must not hide the exit code
            self.handleError(record)


#: The one error line of a verb. A logger of its own (not the rank-tagged stage format) so that the line
#: is exactly ``hpc-dfs VERB: error: ...`` and log captures (pytest's caplog) see it like stage logs.
_error_line = logging.getLogger("hpc_dfs.cli")
_error_line.addHandler(_StderrOfTheMoment())
_error_line.setLevel(logging.ERROR)
_error_line.propagate = False


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``hpc-dfs`` parser; only ``verb``'s module is imported and adds its arguments."""
    parser = argparse.ArgumentParser(
        prog="hpc-dfs", description="Distributed Fusion Segmentation of kidney tumours (CT + clinical data).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from hpc_dfs import __version__
    parser.add_argument("--version", action="version", version=f"hpc-dfs {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter if name != verb else
                           argparse.RawDescriptionHelpFormatter)
        if name == verb:
            mod = importlib.import_module(module)
            if mod.__doc__:
                p.description = mod.__doc__.strip().split("\n\n")[0] if not getattr(mod, "CLI_LONG_HELP", False) \
                    else mod.__doc__
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; the exit code is the stage's, or the ``code`` of the :class:`HpcDfsError` it raised.

    Ctrl-C, or a SIGTERM (what ``mpirun`` sends the ranks on Ctrl-C) from the start on, is one line and exit
    128 + the signal's number.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    old_term = _sigterm_interrupts()
    try:
        return _run_verb(argv, verb)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (mpirun passes Ctrl-C on to the ranks as SIGTERM)
        why = str(e) if str(e) in ("SIGTERM", "SIGINT") else "SIGINT"
        _error_line.error("hpc-dfs %s: error: interrupted by %s: stopped; every file written so far is complete "
                          "(written atomically), so rerunning the same command continues", verb, why)
        return 128 + int(getattr(signal, why))
    finally:
        _restore_sigterm(old_term)


def _run_verb(argv: list[str], verb: str | None) -> int:
    parser = build_parser(verb if verb in VERBS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    from hpc_dfs import fsutil
    from hpc_dfs.errors import HpcDfsError
    try:
        with fsutil.writing_as(args.verb):  # no verb replaces a file that another verb wrote
            return int(args._main(args) or 0)
    except HpcDfsError as e:  # the one error base of every stage: one line naming the file or case, its code
        _error_line.error("hpc-dfs %s: error: %s", args.verb, e)
        return e.code
    except OSError as e:  # a place that cannot be written (read-only, a file where a folder must be): one line
        if not (fsutil.is_unwritable(e) and e.filename):
            raise
        err = fsutil.DiskWriteError(e.filename, e)
        _error_line.error("hpc-dfs %s: error: %s", args.verb, err)
        return err.code


def _interrupt(signum: int, frame) -> None:  # noqa: ARG001 (signal handler signature)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _sigterm_interrupts():
    """SIGTERM stops a verb as Ctrl-C does (a message and a clean stop, not a silent death); returns the old
    handler. ``train`` installs its own handler while it trains (preemption: a checkpoint and exit 75)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _restore_sigterm(old) -> None:
    if old is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, old)


def run(argv: list[str] | None = None) -> NoReturn:
    """The program's entry point (``python -m hpc_dfs``): :func:`main`, then exit without the interpreter's teardown.

    Tearing down an interpreter that imported torch, pandas and sklearn takes 1-2 s of CPU (measured on
    2 cores), on every rank, after the work is done: part of every command's serial time. So, once
    :func:`main` has returned, MPI is finalized (mpi4py backend), the ``atexit`` handlers run (logging,
    multiprocessing), the streams are flushed and the process exits with :func:`os._exit`. Every file
    hpc-dfs writes is closed by then (written atomically). Under Horovod, with threads other than daemons
    still running, or when :func:`main` raises, the exit is the ordinary one.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    code = main(argv)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    parallel = sys.modules.get("hpc_dfs.parallel")  # imported by the verb, or not needed here
    if others or (parallel is not None and not parallel.finish_for_exit()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
