"""Is this environment the one the proofs were measured in? ``requirements.lock`` against what is installed.

``make setup`` installs the lock's versions (as pip constraints) and records in ``.venv/.hpc_dfs-installed``
which lock it used. The np=2 == np=1 bounds of ``tests/distributed`` were measured under those versions; in an
environment installed otherwise (``HPC_DFS_LOCK=none``, conda, a user's own venv) the tests still run, and
:func:`note` says which versions differ, in the pytest header and in the proofs' failure messages.
"""
from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def canonical(name: str) -> str:
    """PEP 503 normalised name (``Jinja2`` and ``jinja2``, ``typing_extensions`` and ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of the lock's ``name==version`` lines.

    Raises:
        ValueError: a line that is neither a comment nor ``name==version``, naming the line.
    """
    out = {}
    for n, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise ValueError(f"{lock}:{n}: not a name==version line: {line!r}")
        out[canonical(m.group(1))] = m.group(2)
    return out


def installed_version(name: str) -> str | None:
    """The installed distribution's version without a local label (``2.13.0+cpu`` -> ``2.13.0``), or None."""
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def differences(lock: Path = LOCK) -> dict[str, tuple[str, str | None]]:
    """``{name: (locked, installed or None)}`` for every locked package whose installed version differs.

    Horovod and its build's own dependencies (:data:`HOROVOD_ONLY`) count only where Horovod was wanted: a set-up
    made with ``ENGINE=torch make setup`` has none of them, by design.
    """
    skip = set() if horovod_wanted() else HOROVOD_ONLY
    return {n: (v, have) for n, v in locked(lock).items() if n not in skip and (have := installed_version(n)) != v}


#: what an ``ENGINE=torch make setup`` lacks against the lock: Horovod and what only its build installs (cffi for
#: its extension build, and cffi's pycparser), as measured in such a set-up
HOROVOD_ONLY = frozenset({"horovod", "cffi", "pycparser"})


def horovod_wanted() -> bool:
    """False in an environment that ``ENGINE=torch make setup`` installed (its stamp says ``horovod=none``)."""
    stamp = Path(sys.prefix) / ".hpc_dfs-installed"
    return not (stamp.is_file() and "horovod=none" in stamp.read_text().split())


def installed_from_lock(lock: Path = LOCK) -> bool:
    """Whether ``make setup`` installed this environment from this very lock (its stamp names the lock's sha256)."""
    stamp = Path(sys.prefix) / ".hpc_dfs-installed"
    if not stamp.is_file() or not lock.is_file():
        return False
    return f"lock={hashlib.sha256(lock.read_bytes()).hexdigest()}" in stamp.read_text().split()


def note(lock: Path = LOCK) -> str:
    """One line for a reader of a proof's result: the locked versions, or which ones differ here."""
    diff = differences(lock)
    if not diff:
        return "environment: the versions of requirements.lock, under which the proofs' bounds were measured"
    shown = ", ".join(f"{n} {have or 'missing'} (locked {v})" for n, (v, have) in sorted(diff.items())[:8])
    more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
    return (f"environment differs from requirements.lock: {shown}{more}; the proofs' bounds were measured under "
            "the locked versions (make setup installs them)")
