"""The ``--progress`` option of the data stages and the tqdm bar it turns on (rank 0 only).

    add_progress_argument(parser)                       # in add_arguments
    bar = progress_bar(wants_progress(args) and rank == 0, total=n, desc="synth", unit="case")
    bar.update(1); bar.close()                          # a no-op bar when disabled
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_progress_argument", "wants_progress", "progress_bar"]


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--progress/--no-progress`` (default: a bar when stderr is a terminal).

    Args:
        parser: the verb's parser.
    """
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bar on rank 0 (default: when stderr is a terminal)")


def wants_progress(args: argparse.Namespace) -> bool:
    """``--progress`` as given, else whether stderr is a terminal.

    Args:
        args: parsed arguments holding ``progress`` (True, False or None).
    """
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "step"):
    """A tqdm bar on stderr, or an object with the same ``update``/``close`` that does nothing.

    Args:
        enabled: whether to show it (callers pass ``progress and rank == 0``).
        total: number of updates expected.
        desc: the bar's label.
        unit: what one update counts.
    """
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
