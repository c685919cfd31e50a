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

from hpc_dfs.errors import EXIT_ENV, HpcDfsError

TMP_PREFIX = ".tmp-"
#: errno values that mean "the file system cannot take this write"; they become a DiskWriteError
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class DiskWriteError(HpcDfsError):
    """The file system refused a write (full disk, quota, read-only, file too large); names the final path.

    Args:
        path: the file being written (its final name, not the temporary one).
        err: the ``OSError`` of the write.
    """

    code = EXIT_ENV

    def __init__(self, path: str | os.PathLike, err: OSError) -> None:
        why = os.strerror(err.errno) if err.errno else str(err)
        super().__init__(f"cannot write {path}: {why} (errno {errno.errorcode.get(err.errno, err.errno)}); "
                         "nothing partial was left under that name: free space and rerun")
        self.path, self.errno = Path(path), err.errno


def is_disk_error(err: BaseException) -> bool:
    """True for an ``OSError`` whose errno is one of :data:`DISK_ERRNOS`."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


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
