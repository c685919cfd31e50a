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
from tests.unit.test_preprocess import CFG, make_dataset


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
