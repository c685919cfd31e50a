"""2-rank preprocessing under mpirun equals a 1-process run, array for array; bad cases are reported by id."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from tests.launch import engine_params, hpc_dfs_cmd, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--slice-size", "48,48", "--n-folds", "3", "--fg-samples-per-case", "2000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi") / "data"
    res = launch(hpc_dfs_cmd("synth", "--out", root, "--cases", 5, "--seed", 1, "--size", 64,
                             "--min-slices", 8, "--max-slices", 14), launcher="none", timeout=300)
    assert res.returncode == 0, res.output
    return root


def _content(shards):
    arrays, attrs = {}, {}
    for p in sorted(shards.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for g in f:
                datasets = []  # every dataset of the case, the stage-2 windows' refine/ group included
                f[g].visititems(lambda d, obj, out=datasets: out.append((d, obj))
                                if isinstance(obj, h5py.Dataset) else None)
                for d, ds in datasets:
                    assert ds.fletcher32, f"{p.name}:{g}/{d}"
                    arrays[f"{p.name}/{g}/{d}"] = ds[()]
                attrs[g] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f[g].attrs.items()}
    return arrays, attrs


@pytest.mark.parametrize("launcher", engine_params("mpirun", "horovodrun", "torchrun", train=False))
def test_two_ranks_equal_one_process(data, tmp_path, launcher):
    one, two = tmp_path / "one", tmp_path / "two"
    res1 = launch(hpc_dfs_cmd("preprocess", "--data", data, "--out", one, *ARGS), launcher="none", timeout=300)
    assert res1.returncode == 0, res1.output
    res2 = launch(hpc_dfs_cmd("preprocess", "--data", data, "--out", two, *ARGS), np=2, launcher=launcher, timeout=300)
    assert res2.returncode == 0, res2.output
    a1, t1 = _content(one)
    a2, t2 = _content(two)
    # 5 cases x (6 datasets (shard format 2: slice_checksums) + 5 of the stage-2 refine/ group)
    assert a1.keys() == a2.keys() and len(a1) == 5 * (6 + 5)
    for k in a1:
        assert np.array_equal(a1[k], a2[k]), k
    assert t1 == t2
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    for key in ("cases", "shards", "fingerprint", "preprocessing", "clinical"):
        assert m1[key] == m2[key], key
    assert (one / "clinical_pipeline.json").read_text() == (two / "clinical_pipeline.json").read_text()


def test_truncated_case_is_reported_and_the_rest_written(data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    img = bad / "case_00003" / "imaging.nii.gz"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    out = tmp_path / "shards"
    res = launch(hpc_dfs_cmd("preprocess", "--data", bad, "--out", out, *ARGS), np=2, launcher="mpirun", timeout=300)
    assert res.returncode != 0
    assert "[case_00003] imaging.nii.gz: truncated gzip" in res.output
    assert "1 case(s) failed" in res.output
    m = json.loads((out / "manifest.json").read_text())
    assert [c["case_id"] for c in m["cases"]] == ["case_00000", "case_00001", "case_00002", "case_00004"]
    assert not (out / "shard-case_00003.h5").exists()


def test_unusable_folder_exits_2_on_every_rank_without_a_hang(tmp_path):
    """A PreprocessError is raised on every rank alike (same plan everywhere): all ranks exit, none waits."""
    (tmp_path / "empty").mkdir()
    res = launch(hpc_dfs_cmd("preprocess", "--data", tmp_path / "empty", "--out", tmp_path / "out", *ARGS), np=2,
                 launcher="mpirun", timeout=120)
    assert not res.timed_out and res.returncode == 2, res.output
    assert "hpc-dfs preprocess: error: no case folders" in res.output
    assert not (tmp_path / "out" / "manifest.json").exists()
