"""Preprocessing memory: the frugal code paths give exactly what the whole-volume ones gave,
and a case that cannot fit in this rank's memory fails with one line naming it instead of an OOM kill."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from hpc_dfs.config.data import PreprocessConfig
from hpc_dfs.data import fingerprint, geometry, kits_io, plan, roi
from hpc_dfs.data.fingerprint import CasePart
from hpc_dfs.data.kits_io import CaseError, kits_affine
from hpc_dfs.data import preprocess_passes
from hpc_dfs.stages.preprocess import run_preprocess
from tests.unit.data.test_kits_io import write_records, write_tiny_case

CFG = PreprocessConfig(slice_size=[32, 32], n_folds=2, fg_samples_per_case=200, clinical="none")


# ----------------------------------------------------------------------------- the whole-volume code (main's)
def naive_apply_label_map(raw, label_map, case_id, name, out=None):
    """apply_label_map as it was: a whole-volume int64 copy of float labels, lut[raw], out == 255."""
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or np.any(raw != np.rint(raw)):
            raise CaseError(case_id, f"{name} holds non-integer label values")
        raw = raw.astype(np.int64)
    lo, hi = int(raw.min()), int(raw.max())
    allowed = sorted(label_map)
    if lo < 0 or hi > max(allowed):
        raise CaseError(case_id, f"{name} holds label value {lo if lo < 0 else hi} outside the label set {allowed}")
    lut = np.full(hi + 1, 255, dtype=np.uint8)
    for r, c in label_map.items():
        if r <= hi:
            lut[r] = c
    res = lut[raw]
    if hi >= 1 and np.any(res == 255):
        present = [b for b in sorted(set(range(hi + 1)) - set(allowed)) if np.any(raw == b)]
        raise CaseError(case_id, f"{name} holds label value {present[0]} outside the label set {allowed}")
    return res


def naive_case_part(case_id, image, label, canonical_shape, canonical_spacing, n_samples=10000, seed=0):
    idx = np.flatnonzero(label.reshape(-1))
    n_fg = int(idx.size)
    if n_fg > n_samples:
        rng = np.random.default_rng(fingerprint._case_seed(case_id, seed))
        idx = np.sort(rng.choice(idx, size=n_samples, replace=False))
    samples = image.reshape(-1)[idx].astype(np.float32)
    return CasePart(case_id, [int(s) for s in canonical_shape], [float(s) for s in canonical_spacing],
                    int(image.size), samples, n_fg)


def naive_kidney_boxes(volume, spacing, margin_mm=10.0, min_size_mm=(30.0, 64.0, 64.0), max_boxes=2,
                       min_fraction=0.1, threshold=0.5):
    from scipy import ndimage

    mask = roi.kidney_mask(volume, threshold)
    margin = [int(np.ceil(m / s)) for m, s in zip(roi._triple(margin_mm, "m"), spacing)]
    min_size = [int(np.ceil(m / s)) for m, s in zip(roi._triple(min_size_mm, "m"), spacing)]
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(comp.reshape(-1), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:max_boxes]
    keep = [int(i) for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    found = ndimage.find_objects(comp)
    boxes = []
    for i in keep:
        ranges = [roi._grown(sl.start, sl.stop, m, ms, dim) for sl, m, ms, dim in zip(found[i], margin, min_size,
                                                                                       mask.shape)]
        boxes.append(roi.Box(tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), int(sizes[i])))
    return sorted(boxes, key=lambda b: (b.centre[2], b.centre[1], b.centre[0]))


def naive_load_item(case_dir, label_map, spatial, sample=None):
    case = plan.load_case(case_dir, label_map=label_map, require_label=True)
    part = sample(case) if sample is not None else None
    hu, geom = plan.resample_image(case.image, case.affine, spatial)
    item = plan.CaseItem(case.case_id, hu, plan.prepare_label(case.label, geom), geom, case.image.shape,
                         case.spacing, case.affine, [p.name for p in (case.image_path, case.label_path) if p])
    if "refine" in spatial:
        item.refine = plan.refine_windows(case.image, case.label, case.affine, spatial)
    return item, part


def _naive(monkeypatch) -> None:
    monkeypatch.setattr(kits_io, "_read_data", lambda img, path: np.asanyarray(img.dataobj))
    monkeypatch.setattr(kits_io, "apply_label_map", naive_apply_label_map)
    monkeypatch.setattr(fingerprint, "case_part", naive_case_part)
    monkeypatch.setattr(roi, "kidney_boxes", naive_kidney_boxes)
    monkeypatch.setattr(plan, "load_item", naive_load_item)
    monkeypatch.setattr(preprocess_passes, "load_item", naive_load_item)
    monkeypatch.setattr(geometry, "_SLAB_VOXELS", 1 << 60)


def _walk(a, b, where: str = "") -> int:
    """Every attribute and dataset (dtype, shape, chunks, filters, values) equal; returns the datasets seen."""
    assert sorted(a.attrs) == sorted(b.attrs), where
    for k in a.attrs:
        assert np.array_equal(np.asarray(a.attrs[k]), np.asarray(b.attrs[k])), (where, k)
    if isinstance(a, h5py.Dataset):
        assert (a.dtype, a.shape, a.chunks, a.compression, a.fletcher32) == \
               (b.dtype, b.shape, b.chunks, b.compression, b.fletcher32), where
        assert np.array_equal(a[()], b[()]), where
        return 1
    assert list(a) == list(b), where
    return sum(_walk(a[k], b[k], f"{where}/{k}") for k in a)


# ----------------------------------------------------------------------------- the same shards
def _dataset(root: Path) -> Path:
    shapes = [(6, 24, 20), (40, 64, 72), (9, 26, 20)]
    for i, shape in enumerate(shapes):
        write_tiny_case(root, f"case_{i:05d}", shape=shape, spacing=(3.0, 1.2 + 0.1 * i, 1.2), seed=i)
    write_tiny_case(root, "case_00003", shape=(8, 28, 28), seed=3, label_dtype=np.float32)  # float labels
    return root


def test_shards_are_identical_to_the_whole_volume_pipeline(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data")
    assert run_preprocess(data, tmp_path / "new", CFG) == 0
    with monkeypatch.context() as m:
        _naive(m)
        assert run_preprocess(data, tmp_path / "old", CFG) == 0
    names = sorted(p.name for p in (tmp_path / "new").glob("shard-*.h5"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "old").glob("shard-*.h5"))
    n_refine = 0
    for name in names:
        with h5py.File(tmp_path / "new" / name, "r") as a, h5py.File(tmp_path / "old" / name, "r") as b:
            _walk(a, b, name)
            n_refine += "refine" in a[name[6:-3]]
    assert n_refine == 4  # the stage-2 windows were compared too


def test_native_reads_equal_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 2000, (7, 33, 21)).astype(np.int16)
    cases = {"le.nii.gz": vol, "be.nii.gz": vol.astype(">i2"), "plain.nii": vol,
             "f32.nii.gz": vol.astype(np.float32) / 3}
    for name, arr in cases.items():
        nib.save(nib.Nifti1Image(arr, kits_affine((3.0, 1.0, 1.0))), tmp_path / name)
    scaled = nib.Nifti1Image(vol, np.eye(4))
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    for name in [*cases, "scaled.nii.gz"]:
        img = nib.load(str(tmp_path / name))
        want, got = np.asanyarray(img.dataobj), kits_io._read_data(nib.load(str(tmp_path / name)), tmp_path / name)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
        assert got.flags.f_contiguous == want.flags.f_contiguous, name
    raw = (tmp_path / "le.nii.gz").read_bytes()
    import gzip
    cut = gzip.compress(gzip.decompress(raw)[:-100])
    (tmp_path / "cut.nii.gz").write_bytes(cut)
    with pytest.raises(CaseError, match="case_9"):
        kits_io.load_nifti(tmp_path / "cut.nii.gz", "case_9")


def test_label_map_sample_and_boxes_equal_the_whole_volume_code(monkeypatch):
    monkeypatch.setattr(kits_io, "_SLAB_VOXELS", 300)  # many slabs on small volumes
    monkeypatch.setattr(roi, "_SLAB_VOXELS", 300)
    rng = np.random.default_rng(1)
    raw = np.asfortranarray(rng.choice([0, 0, 0, 1, 2, 3], size=(9, 17, 23)).astype(np.uint8))
    lmap = {0: 0, 1: 1, 2: 2, 3: 1}
    want = naive_apply_label_map(raw, lmap, "c", "s")
    assert np.array_equal(kits_io.apply_label_map(raw, lmap, "c", "s"), want)
    assert np.array_equal(kits_io.apply_label_map(raw.astype(np.float32), lmap, "c", "s"), want)
    inplace = raw.copy(order="F")
    assert kits_io.apply_label_map(inplace, lmap, "c", "s", out=inplace) is inplace and np.array_equal(inplace, want)
    for bad in (raw.astype(np.int16) * 3, raw.astype(np.float32) + 0.5, np.where(raw == 3, 7, raw).astype(np.uint8)):
        with pytest.raises(CaseError) as e_new:
            kits_io.apply_label_map(bad, {0: 0, 1: 1, 2: 2, 9: 1}, "c", "s")
        with pytest.raises(CaseError) as e_old:
            naive_apply_label_map(bad, {0: 0, 1: 1, 2: 2, 9: 1}, "c", "s")
        assert str(e_new.value) == str(e_old.value)
    image = np.asfortranarray(rng.normal(0, 100, raw.shape).astype(np.int16))
    for n_samples in (10, 10000):
        a = fingerprint.case_part("case_1", image, want, raw.shape, (1, 1, 1), n_samples)
        b = naive_case_part("case_1", image, want, raw.shape, (1, 1, 1), n_samples)
        assert a.n_foreground == b.n_foreground and np.array_equal(a.fg_samples, b.fg_samples)
    blobs = np.zeros((30, 40, 50), np.uint8)
    blobs[5:12, 3:9, 4:10] = 1
    blobs[14:25, 20:33, 30:47] = 2
    blobs[0, 39, 49] = 1  # a speck in a corner: the bounding box is the whole volume
    probs = rng.random((3, 30, 40, 50)).astype(np.float32)
    for vol, kw in ((blobs, {}), (blobs[:, ::-1, ::-1], {"max_boxes": 3, "min_fraction": 0.0}),
                    (blobs[3:20], {"margin_mm": 2.0}), (blobs[3:20], {"margin_mm": 0.0, "min_size_mm": 0.0}),
                    (probs, {"threshold": 0.9}), (np.zeros_like(blobs), {})):
        assert roi.kidney_boxes(vol, (2.0, 1.0, 1.0), **kw) == naive_kidney_boxes(vol, (2.0, 1.0, 1.0), **kw)


def test_resampling_does_not_depend_on_the_slab(monkeypatch):
    rng = np.random.default_rng(2)
    image = rng.normal(0, 200, (11, 50, 70)).astype(np.int16)
    params = {"slice_size": [32, 32], "target_spacing": [None, 1.7, 1.7], "orientation": ["I", "P", "L"]}
    want, _ = geometry.resample_image(image, kits_affine((3.0, 0.8, 0.8)), params)
    monkeypatch.setattr(geometry, "_SLAB_VOXELS", 1)  # one slice at a time
    got, _ = geometry.resample_image(image, kits_affine((3.0, 0.8, 0.8)), params)
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- the budget
def test_a_case_too_big_for_this_rank_fails_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(plan, "_SLACK", 0)  # needs from the voxels alone: tiny cases fit in 3 MiB, the big one not
    data = tmp_path / "data"
    for i in range(3):
        write_tiny_case(data, f"case_{i:05d}", shape=(6, 24, 20), seed=i)
    write_tiny_case(data, "case_00003", shape=(40, 128, 128), seed=3)
    write_records(data, [f"case_{i:05d}" for i in range(4)])
    out = tmp_path / "shards"
    cfg = PreprocessConfig(slice_size=[32, 32], n_folds=2, fg_samples_per_case=200, memory_limit_mb=3)
    assert run_preprocess(data, out, cfg) == 1
    m = json.loads((out / "manifest.json").read_text())
    assert [c["case_id"] for c in m["cases"]] == ["case_00000", "case_00001", "case_00002"]
    (err,) = [f["error"] for f in m["failed"] if f["case_id"] == "case_00003"]
    assert "\n" not in err and err.startswith("[case_00003] needs about ")
    assert "(shape 40x128x128 int16) but this rank has 3 MB available (memory_limit_mb = 3)" in err
    assert "fewer ranks per node" in err
    assert not (out / "shard-case_00003.h5").exists() and len(list(out.glob("shard-*.h5"))) == 3
    assert err in caplog.text


def test_available_memory_is_shared_by_the_ranks_of_the_node(monkeypatch):
    monkeypatch.setattr(plan, "_meminfo_available", lambda: 24 * 10 ** 9)
    monkeypatch.setattr(plan, "_cgroup_left", lambda: None)
    assert plan.available_memory(0, 8) == (3 * 10 ** 9, "24.0 GB free / 8 ranks on this node")
    monkeypatch.setattr(plan, "_cgroup_left", lambda: 4 * 10 ** 9)  # the cgroup allows less than the node has
    assert plan.available_memory(0, 2)[0] == 2 * 10 ** 9
    assert plan.available_memory(100, 8)[0] == 100 * 2 ** 20


def test_the_need_estimate_follows_the_header(tmp_path):
    d = write_tiny_case(tmp_path, "case_00000", shape=(10, 64, 48))
    spatial = {"slice_size": [32, 32], "target_spacing": [None, None, None], "orientation": ["I", "P", "L"]}
    need, what = plan.case_memory_need(d, spatial)
    assert what == "shape 10x64x48 int16"
    native = 10 * 64 * 48 * 3  # int16 image + uint8 label
    assert native + plan._SLACK < need < 2 * native + plan._SLACK
    (d / "imaging.nii.gz").write_bytes(b"not a nifti")
    assert plan.case_memory_need(d, spatial) is None  # load_item names that problem
    plan.check_case_memory(d, spatial, limit_mb=1)  # and the check stands aside
