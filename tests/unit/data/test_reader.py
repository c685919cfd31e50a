"""Reader: ShardSet validation and folds, SliceDataset items and lazy handles, GlobalBatchSampler, partitioning."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpc_dfs.stages.preprocess import run_preprocess
from hpc_dfs.data.reader import GlobalBatchSampler, ShardError, ShardSet, SliceDataset, partition_balanced
from tests.unit.stages.test_preprocess import CFG, make_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    make_dataset(root / "data", 5)
    assert run_preprocess(root / "data", root / "shards", CFG) == 0
    return root / "shards"


def test_shardset_folds_and_validation(shards):
    s = ShardSet(shards).validate()
    assert s.case_ids == [f"case_{i:05d}" for i in range(5)]
    seen = []
    for fold in range(2):
        train, val = s.split(fold)
        assert not set(train) & set(val) and sorted(train + val) == s.case_ids
        seen += val
    assert sorted(seen) == s.case_ids  # every case validates in exactly one fold
    assert s.classes == ["background", "kidney", "tumor"] and s.n_clinical > 0
    with pytest.raises(ShardError, match="manifest.json does not exist"):
        ShardSet(shards / "nope")


def test_slice_dataset_items(shards):
    ds = SliceDataset(shards, ["case_00001", "case_00003"])
    assert len(ds) == 8 + 7
    item = ds[3]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    assert item["clinical"].dtype == torch.float32 and item["clinical"].shape == (ShardSet(shards).n_clinical,)
    assert item["risk"].dtype == torch.float32 and item["risk"].ndim == 0 and float(item["risk"]) in (0.0, 1.0)
    assert item["case_id"] == "case_00001" and item["slice"] == 3
    with h5py.File(shards / "shard-case_00001.h5", "r") as f:
        assert np.array_equal(item["image"][0].numpy(), f["case_00001"]["image"][3])
    # tumour slices are found from classes_present
    tum = ds.slices_with(2)
    assert tum.size > 0 and all(int((ds[int(i)]["label"] == 2).sum()) > 0 for i in tum)


def test_handles_open_lazily_once_per_process(shards):
    ds = SliceDataset(shards, ["case_00000", "case_00002"])
    assert ds._files == {}
    ds[0]
    first = ds._files["case_00000"]
    ds[1]
    assert ds._files["case_00000"] is first and len(ds._files) == 1  # no reopening per item
    ds._pid = -1  # as seen from a forked worker: handles are not inherited
    ds[2]
    assert ds._files["case_00000"] is not first and ds._pid == os.getpid()
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == len(ds)
    assert torch.equal(batches[0]["image"][1], ds[1]["image"])


def test_global_batches_are_independent_of_world_size(shards):
    ds = SliceDataset(shards)
    ref = GlobalBatchSampler(ds, 8, rank=0, world_size=1, seed=3, fg_fraction=0.25)
    ref.set_epoch(2)
    glob = ref.global_batches()
    for world in (2, 4):
        shares = []
        for r in range(world):
            s = GlobalBatchSampler(ds, 8, rank=r, world_size=world, seed=3, fg_fraction=0.25)
            s.set_epoch(2)
            shares.append(np.array(list(s)).reshape(-1, 8 // world))
            assert len(s) == len(ref) // world
        rebuilt = np.concatenate(shares, axis=1)  # rank r holds columns r*B/W .. (r+1)*B/W
        assert np.array_equal(rebuilt, glob)
    assert np.array_equal(np.array(list(ref)).reshape(-1, 8), glob)
    other = GlobalBatchSampler(ds, 8, seed=3, fg_fraction=0.25)
    other.set_epoch(3)
    assert not np.array_equal(other.global_batches(), glob)
    other.set_epoch(2)
    assert np.array_equal(other.global_batches(), glob)  # deterministic from (seed, epoch)


def test_foreground_oversampling_and_disjoint_shares(shards):
    ds = SliceDataset(shards)
    tumour = set(ds.slices_with(2).tolist())
    base_rate = len(tumour) / len(ds)
    s = GlobalBatchSampler(ds, 10, rank=0, world_size=2, seed=0, fg_fraction=0.5)
    batches = s.global_batches()
    fg_share = np.mean([np.isin(b, list(tumour)).mean() for b in batches])
    assert fg_share >= 0.5 and fg_share > base_rate
    # the random (non-oversampled) part is a permutation: no slice drawn twice from it
    plain = GlobalBatchSampler(ds, 10, seed=0, fg_fraction=0.0).global_batches().reshape(-1)
    assert len(set(plain.tolist())) == plain.size
    r0 = set(GlobalBatchSampler(ds, 10, rank=0, world_size=2, seed=0, fg_fraction=0.0))
    r1 = set(GlobalBatchSampler(ds, 10, rank=1, world_size=2, seed=0, fg_fraction=0.0))
    assert not r0 & r1
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(ds, 10, rank=0, world_size=3)


def test_partition_balanced():
    items = [(f"c{i}", s) for i, s in enumerate([100, 5, 60, 40, 30, 30, 10, 90])]
    parts = [partition_balanced(items, r, 3) for r in range(3)]
    flat = sorted(x for p in parts for x in p)
    assert flat == sorted(k for k, _ in items)  # each item exactly once
    loads = [sum(dict(items)[k] for k in p) for p in parts]
    assert max(loads) - min(loads) <= 100  # greedy LPT bound: at most the largest item
    assert parts == [partition_balanced(items, r, 3) for r in range(3)]  # deterministic
    assert partition_balanced(items, 0, 1) == [k for k, _ in items]
    with pytest.raises(ValueError):
        partition_balanced(items, 3, 3)


def test_validate_detects_corruption(shards, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    p = copy / "shard-case_00004.h5"
    with h5py.File(p, "r") as f:
        off = f["case_00004"]["label"].id.get_chunk_info(1).byte_offset
    raw = bytearray(p.read_bytes())
    raw[off + 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"\[case_00004\] shard failed verification"):
        ShardSet(copy).validate()


# ----------------------------------------------------------------------------- integrity ------------------------
def _flip(path, dataset: str, case_id: str, chunk: int, at: int = 100, n: int = 4) -> None:
    """Flip ``n`` bytes inside chunk ``chunk`` of ``case_id/dataset``, as disk corruption would."""
    with h5py.File(path, "r") as f:
        off = f[case_id][dataset].id.get_chunk_info(chunk).byte_offset
    raw = bytearray(path.read_bytes())
    raw[off + at:off + at + n] = bytes(b ^ 0xFF for b in raw[off + at:off + at + n])
    path.write_bytes(bytes(raw))


@pytest.fixture()
def copy(shards, tmp_path):
    import shutil
    shutil.copytree(shards, tmp_path / "copy")
    return tmp_path / "copy"


def test_shards_are_format_2_with_a_checksum_per_slice(shards):
    from hpc_dfs.data.shards import SHARD_SCHEMA_VERSION, slice_checksum
    with h5py.File(shards / "shard-case_00002.h5", "r") as f:
        g = f["case_00002"]
        assert g.attrs["schema_version"] == SHARD_SCHEMA_VERSION == 2
        sums = g["slice_checksums"][()]
        assert sums.shape == (g["image"].shape[0], 2) and sums.dtype == np.uint64
        algo = g.attrs["checksum"]
        assert sums[3, 0] == slice_checksum(g["image"][3], algo) and sums[3, 1] == slice_checksum(g["label"][3], algo)


def test_corrupt_chunk_is_named_on_read_and_found_at_start_up(copy):
    from hpc_dfs.errors import HpcDfsError
    p = copy / "shard-case_00002.h5"
    _flip(p, "image", "case_00002", chunk=3)
    ds = SliceDataset(copy, ["case_00002"])
    assert ds[2]["image"].shape == (1, 32, 32)  # the other slices still read
    with pytest.raises(ShardError) as e:
        ds[3]
    msg = str(e.value)
    assert "shard-case_00002.h5" in msg and "case_00002" in msg and "slice 3" in msg and "\n" not in msg
    assert isinstance(e.value, HpcDfsError) and e.value.code == 3
    ShardSet(copy).validate(deep=False)  # the cheap check does not read the slices...
    with pytest.raises(ShardError, match=r"\[case_00002\] shard failed verification: .*slice 3"):
        ShardSet(copy).validate(deep=True)  # ...the deep one (train's start-up check) finds it


def test_corrupt_label_and_worker_errors_keep_one_line(copy):
    _flip(copy / "shard-case_00001.h5", "label", "case_00001", chunk=0, at=7, n=1)
    ds = SliceDataset(copy, ["case_00001"])
    loader = DataLoader(ds, batch_size=2, num_workers=1)
    with pytest.raises(ShardError) as e:
        list(loader)
    assert str(e.value).startswith("shard-case_00001.h5 (case_00001): slice 0: label") and "\n" not in str(e.value)


def test_shard_from_another_preprocessing_run_is_refused(copy, tmp_path):
    """Hole 1, reader side: a shard whose params_sha256 is not the manifest's is refused, by name."""
    other = tmp_path / "other"
    make_dataset(tmp_path / "data", 5)
    from tests.unit.stages.test_preprocess import CFG
    from dataclasses import replace
    assert run_preprocess(tmp_path / "data", other, replace(CFG, intensity="window")) == 0
    (copy / "shard-case_00003.h5").write_bytes((other / "shard-case_00003.h5").read_bytes())
    with pytest.raises(ShardError, match=r"\[case_00003\] .*shard-case_00003.h5.*other parameters"):
        ShardSet(copy).validate(deep=False)
    with pytest.raises(ShardError, match=r"shard-case_00003.h5 \(case_00003\) was preprocessed with other"):
        SliceDataset(copy)
    SliceDataset(copy, ["case_00001"])  # the consistent shards still read


def test_old_and_future_formats(tmp_path, monkeypatch):
    from hpc_dfs.data import shards as sh
    img = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    lab = (img > 0).astype(np.uint8)
    # format 1 (before slice checksums): LZF + fletcher32, no schema_version; still readable
    p1 = tmp_path / "v1.h5"
    with h5py.File(p1, "w") as f:
        g = f.create_group("c")
        for name, a in (("image", img), ("label", lab)):
            g.create_dataset(name, data=a, chunks=(1, 8, 8), compression="lzf", fletcher32=True)
        for name, a in (("classes_present", np.ones((4, 2), np.uint8)), ("clinical", np.zeros(2, np.float32)),
                        ("fg_samples", np.zeros(3, np.float32))):
            g.create_dataset(name, data=a, fletcher32=True, chunks=a.shape)
        g.attrs["complete"] = 1
    assert sh.validate_shard(p1) == (True, "")
    with sh.CaseShard(p1, "c") as s:
        assert s.version == 1 and np.array_equal(s.read(2)[0], img[2])
    # crc32 shards (written where xxhash is missing) verify with crc32 wherever they are read
    monkeypatch.setattr(sh, "xxhash", None)
    p2 = sh.write_case_shard(tmp_path / "v2.h5", "c", img, lab, np.ones((4, 2)), np.zeros(2), np.zeros(3), {})
    with h5py.File(p2, "r") as f:
        assert f["c"].attrs["checksum"] == "crc32"
    with sh.CaseShard(p2, "c") as s:
        assert s._mm is not None and np.array_equal(s.read(1)[0], img[1]) and np.array_equal(s.read(1)[1], lab[1])
    with h5py.File(p2, "r+") as f:
        f["c"].attrs["schema_version"] = 3
    with pytest.raises(ShardError, match="v2.h5 \\(c\\): shard schema_version 3, this hpc-dfs reads 1 to 2"):
        sh.CaseShard(p2, "c")
    assert "schema_version 3" in sh.validate_shard(p2)[1]


def test_compressed_layout_is_checked_on_every_read_too(tmp_path):
    from hpc_dfs.data import shards as sh
    img = np.random.default_rng(1).normal(size=(3, 16, 16)).astype(np.float32)
    p = sh.write_case_shard(tmp_path / "z.h5", "c", img, np.zeros(img.shape, np.uint8), np.ones((3, 2)),
                            np.zeros(2), np.zeros(3), {}, compression="lzf")
    with sh.CaseShard(p, "c") as s:
        assert s._mm is None and np.array_equal(s.read(2)[0], img[2])
    _flip(p, "image", "c", chunk=1, at=5)
    with sh.CaseShard(p, "c") as s:
        with pytest.raises(ShardError, match=r"z.h5 \(c\): slice 1 "):
            s.read(1)
    assert not sh.validate_shard(p)[0]


@pytest.mark.slow
def test_train_stops_before_the_first_step_on_a_corrupt_shard(copy, tmp_path):
    """End to end: `hpc-dfs train` names the corrupt shard, case and slice at start-up."""
    import subprocess
    import sys
    from tests.launch import REPO, job_env
    _flip(copy / "shard-case_00002.h5", "image", "case_00002", chunk=3)
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "hpc_dfs", "train", "--shards", str(copy), "--out", str(run),
                          "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--num-workers", "0",
                          "--set", "model.base_channels=8"], cwd=REPO, env=job_env(), capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "shard-case_00002.h5 (case_00002): slice 3: image" in out and "Traceback" not in out
    assert not (run / "checkpoints" / "last.pt").exists()
