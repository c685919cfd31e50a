"""Atomic writes: the final name holds either the old or the complete new content, never a partial one."""
import json
import os

import pytest

from hpc_dfs.fsutil import TMP_PREFIX, atomic_path, clean_stale_tmp, sha256_file, write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "partial')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))   # the temporary file is gone too


def test_temp_name_keeps_double_suffix_and_is_hidden(tmp_path):
    with atomic_path(tmp_path / "prediction_00001.nii.gz") as tmp:
        assert tmp.name.startswith(TMP_PREFIX) and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"abc")
    assert (tmp_path / "prediction_00001.nii.gz").read_bytes() == b"abc"
    assert sha256_file(tmp_path / "prediction_00001.nii.gz") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_clean_stale_tmp(tmp_path):
    (tmp_path / (TMP_PREFIX + "a.h5.123")).write_bytes(b"junk")
    (tmp_path / "keep.h5").write_bytes(b"ok")
    assert clean_stale_tmp(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == ["keep.h5"]


def test_atomic_files_get_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_is_one_error_naming_the_final_file(tmp_path):
    """ENOSPC while writing is a DiskWriteError (exit 4) naming the file, nothing partial left."""
    import errno

    from hpc_dfs.errors import EXIT_ENV, HpcDfsError
    from hpc_dfs.fsutil import DiskWriteError
    target = tmp_path / "manifest.json"
    write_json(target, {"v": 1})
    with pytest.raises(DiskWriteError) as e:
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "part')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(e.value, HpcDfsError) and e.value.code == EXIT_ENV
    assert str(target) in str(e.value) and "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert json.loads(target.read_text()) == {"v": 1} and not list(tmp_path.glob(TMP_PREFIX + "*"))
    with pytest.raises(PermissionError):  # other OSErrors are not disguised as a full disk
        with atomic_path(target):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_atomic_h5_is_built_in_memory_and_written_whole(tmp_path):
    import h5py
    import numpy as np

    from hpc_dfs.fsutil import atomic_h5
    path = tmp_path / "s.h5"
    with atomic_h5(path, track_order=True) as f:
        f.create_dataset("x", data=np.arange(12, dtype=np.float32).reshape(3, 4), chunks=(1, 4), fletcher32=True)
        assert not path.exists() and not list(tmp_path.glob(TMP_PREFIX + "*"))  # nothing on disk until the end
    with h5py.File(path, "r") as f:
        assert f["x"][()].sum() == 66 and f["x"].fletcher32
    with pytest.raises(RuntimeError):
        with atomic_h5(tmp_path / "t.h5") as f:
            f.create_dataset("y", data=[1, 2])
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["s.h5"]
