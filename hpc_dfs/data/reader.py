"""Reading the shards for training: manifest + validation, a slice Dataset, and the per-rank sampler.

- :class:`ShardSet` reads ``manifest.json`` and verifies the shards it lists: every shard must carry
  the manifest's preprocessing hash (``params_sha256``: a folder mixing two preprocessing runs is
  refused, naming the shard), and ``deep`` also verifies every slice's checksum (format 2,
  uncompressed: 0.16-0.27 s per GB from page cache, see ``bench/results/reader.json``). Its fold
  helpers give the case ids of a cross-validation split.
- :class:`SliceDataset` is a ``torch.utils.data.Dataset`` of axial slices of some cases. Items are
  dicts: ``image`` float32 ``[1, H, W]``, ``label`` int64 ``[H, W]``, ``clinical`` float32 ``[F]``,
  ``risk`` float32 scalar (-1 unknown), ``case_id`` str, ``slice`` int. Each slice is read through
  :class:`hpc_dfs.data.shards.CaseShard` (a memory map of the shard; the slice's checksum is checked
  on every read, a mismatch raises :class:`ShardError` naming shard, case and slice). Shards are
  opened lazily, once per process (a DataLoader worker forked after the first read reopens them:
  handles must not cross a fork), and kept open: no reopening per item.
- :class:`GlobalBatchSampler` builds each epoch's sequence of *global* batches from
  ``(seed, epoch)`` only, independent of the number of ranks, with nnU-Net-style foreground
  oversampling (a fixed share of every global batch is drawn from slices that contain the
  foreground class), and yields this rank's contiguous share of every global batch. The ranks'
  shares are the paper's P disjoint partitions of the epoch; with 1 rank and global batch B, or 4
  ranks and local batch B/4, the model sees the same samples in the same order.
- :func:`partition_balanced` splits weighted items (cases by voxels or slices) so each item goes to
  exactly one rank and the loads are balanced (validation, predict, preprocessing).

Usage::

    shards = ShardSet("data/shards").validate()
    train_ids, val_ids = shards.split(fold=0)
    ds = SliceDataset("data/shards", train_ids)
    sampler = GlobalBatchSampler(ds, global_batch_size=32, rank=parallel.rank(), world_size=parallel.size(), seed=0)
    loader = DataLoader(ds, batch_size=32 // parallel.size(), sampler=sampler, num_workers=2)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Hashable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hpc_dfs.data.roi import context_indices
from hpc_dfs.contracts.shards import ShardError, manifest_path, read_manifest
from hpc_dfs.data.shards import REFINE_GROUP, CaseShard

__all__ = ["ShardSet", "ShardError", "SliceDataset", "GlobalBatchSampler", "partition_balanced"]


# ----------------------------------------------------------------------------- partitioning
def partition_balanced(items_with_sizes: Sequence[tuple[Hashable, float]], rank: int, world: int) -> list:
    """The items of ``rank`` when weighted items are dealt to ``world`` ranks, largest first, each to
    the least loaded rank (ties: lower rank; items ordered by size then key).

    Deterministic and identical on every rank, every item on exactly one rank. Returned in the
    input order. Hand-written (15 lines): the greedy LPT rule is what is wanted and no library
    offers it as a function.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    order = sorted(range(len(items_with_sizes)), key=lambda i: (-float(items_with_sizes[i][1]),
                                                                 str(items_with_sizes[i][0])))
    loads = [0.0] * world
    owner = {}
    for i in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += float(items_with_sizes[i][1])
    return [items_with_sizes[i][0] for i in range(len(items_with_sizes)) if owner[i] == rank]


# ----------------------------------------------------------------------------- manifest
class ShardSet:
    """The manifest of a shards folder, with verification and fold splits.

    Args:
        shards_dir: folder written by ``hpc-dfs preprocess``.
    """

    def __init__(self, shards_dir: str | os.PathLike):
        self.root = Path(shards_dir)
        self.manifest = read_manifest(self.root)
        self.cases = {c["case_id"]: c for c in self.manifest["cases"]}

    @property
    def case_ids(self) -> list[str]:
        return sorted(self.cases)

    @property
    def preprocessing(self) -> dict:
        return self.manifest["preprocessing"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["preprocessing"]["classes"]

    @property
    def n_clinical(self) -> int:
        return int(self.manifest["clinical"]["n_features"])

    def clinical_pipeline(self) -> Optional[dict]:
        """Content of ``clinical_pipeline.json`` (None when the shards carry no clinical features)."""
        f = self.manifest["clinical"].get("pipeline_file")
        return json.loads((self.root / f).read_text()) if f else None

    def shard_path(self, case_id: str) -> Path:
        return self.root / self.cases[case_id]["shard"]

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        """(train ids, validation ids) of cross-validation fold ``fold``."""
        n = int(self.manifest["n_folds"])
        if not 0 <= fold < n:
            raise ValueError(f"fold {fold} outside 0..{n - 1}")
        val = [c for c in self.case_ids if self.cases[c]["fold"] == fold]
        train = [c for c in self.case_ids if self.cases[c]["fold"] != fold]
        return train, val

    @property
    def params_sha256(self) -> str:
        """The preprocessing hash every shard of this folder must carry (manifest key ``params_sha256``)."""
        h = self.manifest.get("params_sha256")
        if not h:
            raise ShardError(f"{manifest_path(self.root)} has no params_sha256 (written by an older hpc-dfs): "
                             "rerun preprocess")
        return str(h)

    def validate(self, deep: bool = True, case_ids: Optional[Sequence[str]] = None) -> "ShardSet":
        """Check every listed shard: complete, same preprocessing hash as the manifest, and (deep) every
        slice's and chunk's checksum.

        Args:
            deep: read everything back (0.16-0.27 s per GB of uncompressed shards from page cache).
            case_ids: the cases to check (default all).

        Raises:
            ShardError: naming the first shard that fails and why.
        """
        from hpc_dfs.data.shards import validate_shard

        expected = self.params_sha256
        _check_statistics(self.manifest, manifest_path(self.root))
        for cid in case_ids or self.case_ids:
            ok, why = validate_shard(self.shard_path(cid), cid, deep=deep, params_sha256=expected)
            if not ok:
                raise ShardError(f"[{cid}] shard failed verification: {why} (rerun preprocess to rewrite it)")
        return self


def _check_statistics(manifest: dict, path: Path) -> None:
    """The manifest's intensity statistics (clip, mean, std) are finite and the std positive.

    Raises:
        ShardError: names the manifest and the value: every shard normalised with it is NaN.
    """
    intensity = (manifest.get("preprocessing") or {}).get("intensity") or {}
    values = {"clip": intensity.get("clip"), "mean": intensity.get("mean"), "std": intensity.get("std")}
    for key, v in values.items():
        nums = v if isinstance(v, list) else [v]
        if v is None or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in nums):
            raise ShardError(f"{path}: preprocessing.intensity.{key} is {v!r}, not a finite number: every shard "
                             "normalised with it is invalid; rerun preprocess")
    if values["std"] <= 0:
        raise ShardError(f"{path}: preprocessing.intensity.std is {values['std']!r}, not positive; rerun preprocess")


# ----------------------------------------------------------------------------- dataset
class SliceDataset(Dataset):
    """Axial slices of ``case_ids`` from the shards in ``shards_dir`` (all cases when None).

    Args:
        shards_dir: folder with ``manifest.json``.
        case_ids: the cases of this split.
        transform: optional callable applied to each item dict (augmentation).
        group: ``"main"`` (the whole slices, cascade stage 1) or ``"refine"`` (the stage-2 kidney windows).
        context: 2.5D: slices per item (odd); item ``image`` is ``[context, H, W]``: the slice and its
            ``context // 2`` neighbours on either side, clamped at the ends of the case (of the window for
            ``refine``), as predict builds them.

    Raises:
        ShardError: a case that is not in the manifest, a shard of other parameters, or no refine group.
    """

    def __init__(self, shards_dir: str | os.PathLike, case_ids: Optional[Sequence[str]] = None, transform=None,
                 group: str = "main", context: int = 1):
        if group not in ("main", REFINE_GROUP) or context < 1 or context % 2 == 0:
            raise ValueError(f"SliceDataset: group must be 'main' or '{REFINE_GROUP}' and context odd >= 1, got "
                             f"{group!r}, {context}")
        self.shards = ShardSet(shards_dir)
        ids = list(case_ids) if case_ids is not None else self.shards.case_ids
        unknown = [c for c in ids if c not in self.shards.cases]
        if unknown:
            raise ShardError(f"case(s) not in {manifest_path(self.shards.root)}: {', '.join(unknown[:5])}")
        self.case_ids = ids
        self.transform = transform
        self.part = None if group == "main" else REFINE_GROUP
        self.context = int(context)
        self.classes = self.shards.classes
        self._clinical: dict[str, torch.Tensor] = {}
        self._risk: dict[str, float] = {}
        index, present, neighbours = [], [], []
        for cid in ids:
            n, cp, stack = self._read_case_meta(cid)
            present.append(cp)
            neighbours.append(len(index) + context_indices(n, self.context, stack))
            index.extend((cid, s) for s in range(n))
        self.index = index
        #: per item the slice indices (within its case) of its 2.5D context
        self._context = np.concatenate(neighbours) if neighbours else np.zeros((0, self.context), np.int64)
        #: (n_slices, C) uint8: 1 where class c occurs in slice i (for foreground oversampling)
        self.classes_present = np.concatenate(present) if present else np.zeros((0, len(self.classes)), np.uint8)
        self._files: dict[str, CaseShard] = {}
        self._pid: Optional[int] = None

    def _read_case_meta(self, cid: str) -> tuple[int, np.ndarray, Optional[np.ndarray]]:
        """(slices, classes_present, window of each slice or None) of one case; its clinical vector and risk."""
        import h5py
        path = self.shards.shard_path(cid)
        with h5py.File(path, "r") as f:
            g = f[cid]
            _check_params(path, cid, g.attrs.get("params_sha256", ""), self.shards.params_sha256)
            self._clinical[cid] = torch.from_numpy(g["clinical"][()].astype(np.float32))
            self._risk[cid] = float(g.attrs["risk_label"])
            if self.part is None:
                return int(self.shards.cases[cid]["n_slices"]), g["classes_present"][()], None
            if self.part not in g:
                raise ShardError(f"{path.name} ({cid}) has no stage-2 windows ('{self.part}' group): preprocess "
                                 f"again with refine.enabled=true")
            r = g[self.part]
            n = int(r["image"].shape[0])
            return n, r["classes_present"][()][:n], r["stack"][()][:n]

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, cid: str) -> CaseShard:
        """The case's :class:`CaseShard`, opened once per process and kept (no reopening per item)."""
        if self._pid != os.getpid():  # first use in this process (or a forked worker): fresh handles
            self._files = {}
            self._pid = os.getpid()
        h = self._files.get(cid)
        if h is None:
            h = self._files[cid] = CaseShard(self.shards.shard_path(cid), cid, self.part)
        return h

    def __getitem__(self, i: int) -> dict:
        cid, s = self.index[i]
        shard = self._shard(cid)
        img, lab = shard.read(s)
        if self.context == 1:
            image = torch.from_numpy(img)[None]
        else:  # the neighbours of the same case (window); the centre slice is the one just read
            first = i - s
            image = torch.from_numpy(np.stack([img if j == i else shard.read(int(j - first))[0]
                                               for j in self._context[i]]))
        label = torch.from_numpy(lab.astype(np.int64))
        item = {"image": image, "label": label, "clinical": self._clinical[cid],
                "risk": torch.tensor(self._risk[cid], dtype=torch.float32), "case_id": cid, "slice": s}
        return self.transform(item) if self.transform is not None else item

    def permute_clinical(self, rng: np.random.Generator) -> dict[str, str]:
        """Give every case another case's clinical vector and risk (a derangement when there are 2+ cases).

        The fusion ablation's control: a model that does as well with these records does not use them.
        Returns the mapping case -> the case whose record it now has.
        """
        ids = list(self.case_ids)
        perm = list(ids)
        if len(ids) > 1:
            order = rng.permutation(len(ids))
            perm = [ids[j] for j in np.roll(order, 1)]  # a cycle over a random order: nobody keeps its own
            perm = [perm[int(np.flatnonzero(order == i)[0])] for i in range(len(ids))]
        mapping = dict(zip(ids, perm))
        clinical, risk = dict(self._clinical), dict(self._risk)
        self._clinical = {c: clinical[mapping[c]] for c in ids}
        self._risk = {c: risk[mapping[c]] for c in ids}
        return mapping

    def slices_with(self, class_index: int | Sequence[int]) -> np.ndarray:
        """Dataset indices of slices containing ``class_index`` (any of them, if several)."""
        cls = [class_index] if isinstance(class_index, int) else list(class_index)
        return np.flatnonzero(self.classes_present[:, cls].any(axis=1))

    def close(self) -> None:
        for h in self._files.values():
            h.close()
        self._files = {}

    def __getstate__(self):  # pickling for spawn-started workers: handles are reopened there
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state


def _check_params(path: Path, cid: str, have: Any, expected: str) -> None:
    """Refuse a shard whose preprocessing hash is not the manifest's (a folder mixing two runs)."""
    have = have.decode() if isinstance(have, bytes) else str(have)
    if have != expected:
        raise ShardError(f"{path.name} ({cid}) was preprocessed with other parameters than its manifest "
                         f"(params_sha256 {have[:12]}... vs {expected[:12]}...): rerun preprocess")


# ----------------------------------------------------------------------------- sampler
class GlobalBatchSampler(Sampler[int]):
    """Per-rank indices of the epoch's global batches (see the module docstring).

    Args:
        dataset: a :class:`SliceDataset` (or anything with ``len`` and ``slices_with``).
        global_batch_size: samples per optimizer step over all ranks; divisible by ``world_size``.
        rank, world_size: this rank and the number of ranks.
        seed: base seed; the epoch's sequence depends only on ``(seed, epoch)``.
        fg_fraction: share of each global batch drawn from slices with the foreground class.
        fg_class: class index (or indices) that counts as foreground; default the last class
            (tumour). None disables oversampling.
        drop_last: drop the last incomplete global batch (default True, so every rank steps equally).
    """

    def __init__(self, dataset, global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 fg_fraction: float = 0.33, fg_class: Optional[int | Sequence[int]] = -1, drop_last: bool = True):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} ranks")
        if not 0 <= fg_fraction <= 1:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("GlobalBatchSampler: the dataset is empty")
        self.global_batch = int(global_batch_size)
        self.local_batch = self.global_batch // world_size
        self.rank, self.world = int(rank), int(world_size)
        self.seed, self.epoch = int(seed), 0
        if fg_class is None or fg_fraction == 0:
            self.fg = np.zeros(0, dtype=np.int64)
        else:
            n_cls = len(getattr(dataset, "classes", [])) or 1
            cls = fg_class if not isinstance(fg_class, int) or fg_class >= 0 else n_cls + fg_class
            self.fg = np.asarray(dataset.slices_with(cls), dtype=np.int64)
        self.n_fg_per_batch = int(round(fg_fraction * self.global_batch)) if self.fg.size else 0
        self.n_batches = self.n // self.global_batch if drop_last else -(-self.n // self.global_batch)
        self.n_batches = max(self.n_batches, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self, epoch: Optional[int] = None) -> np.ndarray:
        """``(n_batches, global_batch)`` dataset indices of an epoch (same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        k_fg = self.n_fg_per_batch
        k_rand = self.global_batch - k_fg
        need = self.n_batches * k_rand
        perm = rng.permutation(self.n)
        if need > self.n:  # tiny dataset: cycle through further permutations
            perm = np.concatenate([perm] + [rng.permutation(self.n) for _ in range(need // self.n)])
        rand = perm[:need].reshape(self.n_batches, k_rand)
        if k_fg:
            reps = -(-self.n_batches * k_fg // self.fg.size)
            fg = np.concatenate([rng.permutation(self.fg) for _ in range(reps)])[:self.n_batches * k_fg]
            batches = np.concatenate([rand, fg.reshape(self.n_batches, k_fg)], axis=1)
        else:
            batches = rand
        # mix foreground and random draws inside each batch so every rank gets its share of both
        return np.stack([b[rng.permutation(self.global_batch)] for b in batches])

    def __iter__(self) -> Iterator[int]:
        b = self.global_batches()
        lo = self.rank * self.local_batch
        return iter(b[:, lo:lo + self.local_batch].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.n_batches * self.local_batch
