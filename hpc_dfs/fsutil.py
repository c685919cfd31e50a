"""Atomic file writing: every file hpc-dfs writes goes through here.

A file is written under a temporary name in the same directory, flushed and fsync'ed, and then
renamed over the final name (``os.replace`` is atomic on POSIX). A run killed at any moment leaves
either the old file, the complete new one, or a ``.tmp-*`` file that no reader ever opens.

A full disk (or quota, read-only or too-large file) while writing is a :class:`DiskWriteError`: one line naming
the file being written, exit status ``EXIT_ENV`` (4), the temporary file removed. HDF5 files are built in memory
(:func:`atomic_h5`) and written with plain ``write()`` calls, because libhdf5 crashes (SIGSEGV) when a flush
fails with ENOSPC at close.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from hpc_dfs.errors import EXIT_ENV, EXIT_USAGE, HpcDfsError

TMP_PREFIX = ".tmp-"
#: errno values that mean "the file system cannot take this write"; they become a DiskWriteError
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
#: a place that may not be written (permissions): also a DiskWriteError, exit 4 (environment)
ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
#: a path that is the wrong kind of thing (a file where a folder must be, a folder where a file must be): exit 2
PATH_ERRNOS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EEXIST})
_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskWriteError(HpcDfsError):
    """The file system refused a write (full disk, quota, read-only, file too large); names the final path.

    Args:
        path: the file being written (its final name, not the temporary one).
        err: the ``OSError`` of the write.
    """

    code = EXIT_ENV

    def __init__(self, path: str | os.PathLike, err: OSError) -> None:
        why = os.strerror(err.errno) if err.errno else str(err)
        fix = ("free space and rerun" if err.errno in _SPACE else
               "write somewhere else (--out), or make that place writable" if err.errno not in PATH_ERRNOS else
               "a file and a folder are in each other's way: choose another --out")
        super().__init__(f"cannot write {path}: {why} (errno {errno.errorcode.get(err.errno, err.errno)}); "
                         f"nothing partial was left under that name: {fix}")
        self.path, self.errno = Path(path), err.errno
        if err.errno in PATH_ERRNOS:
            self.code = EXIT_USAGE


def is_disk_error(err: BaseException) -> bool:
    """True for an ``OSError`` whose errno is one of :data:`DISK_ERRNOS` (what :func:`atomic_path` converts)."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


def is_unwritable(err: BaseException) -> bool:
    """True for an ``OSError`` that says a place cannot be written: :data:`DISK_ERRNOS`, :data:`ACCESS_ERRNOS` or
    :data:`PATH_ERRNOS`. ``cli.main`` prints such an error as one :class:`DiskWriteError` line, not a traceback."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS | ACCESS_ERRNOS | PATH_ERRNOS


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed to ``path``.

    Use this for libraries that want a file name (h5py, nibabel, torch.save, matplotlib)::

        with atomic_path(out / "x.h5") as tmp:
            with h5py.File(tmp, "w") as f: ...

    Raises:
        DiskWriteError: the file system refused the write (ENOSPC, EDQUOT, EROFS, EFBIG): names ``path``.
    """
    path = Path(path)
    sfx = suffix if suffix is not None else "".join(path.suffixes[-2:])  # keep .nii.gz etc. for libraries
    check_owner(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", suffix=sfx, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the usual umask-based mode for shared filesystems
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if is_disk_error(e):
            raise DiskWriteError(path, e) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically.

    Raises:
        DiskWriteError: the file system refused the write; names ``path``.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, **kwargs: Any) -> Iterator[Any]:
    """An ``h5py.File`` built in memory and written to ``path`` atomically when the block ends without error.

    libhdf5 segfaults when a write fails (ENOSPC) while it flushes at close; in memory it never sees a failed
    write, and the image is written here with ``write()``, whose failure is a clean :class:`DiskWriteError`::

        with atomic_h5(out / "shard.h5", track_order=True) as f:
            f.create_dataset(...)

    Args:
        path: the final file.
        **kwargs: passed to ``h5py.File`` (not ``driver``: the file is an ``io.BytesIO``).

    Raises:
        DiskWriteError: the file system refused the write; names ``path``.
    """
    import io

    import h5py

    buf = io.BytesIO()  # h5py's file-object driver: libhdf5 writes into memory (faster than its "core" driver)
    f = h5py.File(buf, "w", **kwargs)
    try:
        yield f
    finally:
        f.close()
    with atomic_path(path, suffix=".h5") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def clean_stale_tmp(directory: str | os.PathLike) -> int:
    """Remove ``.tmp-*`` leftovers of killed runs in ``directory``; returns how many."""
    n = 0
    for p in Path(directory).glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


# ----------------------------------------------------------------------------- who owns a file
#: the lock file of a folder held by a run (:func:`lock_folder`)
LOCK_NAME = ".hpc-dfs.lock"
_writer: list[str] = []   # the verb running in this process (set by cli.main); empty for library calls


class ForeignFileError(HpcDfsError):
    """A verb was about to replace a file that another verb wrote; names the file and its owner (exit 2)."""

    code = EXIT_USAGE


@contextlib.contextmanager
def writing_as(verb: str) -> Iterator[None]:
    """Within the block, :func:`atomic_path` refuses to replace a file that a verb other than ``verb`` owns.

    Args:
        verb: the ``hpc-dfs`` verb running (``cli.main`` sets it around the verb).
    """
    _writer.append(verb)
    try:
        yield
    finally:
        _writer.pop()


def check_owner(path: str | os.PathLike) -> None:
    """Refuse to replace an existing file that another verb owns (only while a verb runs, see :func:`writing_as`).

    Args:
        path: the file about to be written.

    Raises:
        ForeignFileError: ``path`` exists and belongs to another verb; the message names both.
    """
    if not _writer or not os.path.lexists(path):
        return
    from hpc_dfs.contracts.owners import owner_of  # the contracts' names (they import this module)
    owner, me = owner_of(path), _writer[-1]
    if owner is not None and owner != me:
        raise ForeignFileError(f"refusing to overwrite {path}: it is written by `hpc-dfs {owner}`, not by "
                               f"`hpc-dfs {me}`; choose another --out")
    if os.path.isdir(path):
        raise ForeignFileError(f"cannot write {path}: it is a folder; choose another --out")


# ----------------------------------------------------------------------------- a folder held by one run
class LockedError(HpcDfsError):
    """Another live run holds the folder (exit 2); names the folder, the holder and the lock file."""

    code = EXIT_USAGE


def _stat_field(pid: int, index: int) -> str | None:
    """Field ``index + 3`` of /proc/PID/stat (the fields after the command name), None when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index]
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a live holder from a reused pid."""
    return _stat_field(pid, 19)


def _proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (field 3 of /proc/PID/stat), None when it cannot be read."""
    return _stat_field(pid, 0)


def _holder_alive(holder: dict) -> bool:
    """True unless the holder is certainly gone (same host, and its pid is dead, a zombie, or now another process).

    A killed process whose parent has not reaped it (a rank orphaned by a killed launcher, in a container whose
    PID 1 reaps nothing) still answers ``kill(pid, 0)``; its state ``Z`` says it is gone.
    """
    import socket
    if holder.get("host") != socket.gethostname():
        return True   # another node: its processes cannot be seen from here
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _proc_state(pid) in ("Z", "X"):
        return False
    started = _start_time(pid)
    return started is None or holder.get("start") in (None, started)


def lock_folder(folder: str | os.PathLike, what: str) -> Path:
    """Hold ``folder`` for this process (a lock file with pid and host), released when the process exits.

    A second run into the same folder is refused while the first lives. A lock left by a killed run (same host,
    its pid gone) is stale: it is taken over, with a warning. A lock from another host cannot be checked: the
    error says which file to remove if that run is gone.

    Args:
        folder: the run folder (created).
        what: the run, named in the lock and in another run's error (``"hpc-dfs train"``).

    Returns:
        The lock file.

    Raises:
        LockedError: a live run holds the folder.
        DiskWriteError: the folder cannot be created or written.
    """
    import atexit
    import logging
    import socket
    import time

    folder = Path(folder)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "what": what,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_unwritable(e):
            raise DiskWriteError(folder, e) from None
        raise
    try:
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return path   # this process holds it already (a verb run twice in one process)
                if holder is not None and _holder_alive(holder):
                    raise LockedError(
                        f"{folder} is in use by {holder.get('what', 'another run')} (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}): wait for it to end or choose another "
                        f"--out; if that run is gone, remove {path}") from None
                logging.getLogger("hpc_dfs.fsutil").warning("%s: taking over the stale lock of %s", folder,
                                                            holder or "an unreadable lock file")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            atexit.register(unlock_folder, path)
            return path
    except OSError as e:
        if is_unwritable(e):
            raise DiskWriteError(path, e) from None
        raise
    raise LockedError(f"{folder}: could not take the lock {path} (other runs keep taking it)")


def _read_lock(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def unlock_folder(path: str | os.PathLike) -> None:
    """Remove the lock file ``path`` if this process holds it (a no-op otherwise).

    Args:
        path: the lock file :func:`lock_folder` returned.
    """
    holder = _read_lock(Path(path))
    if holder is not None and holder.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            Path(path).unlink()
