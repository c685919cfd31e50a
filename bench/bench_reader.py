"""Reader throughput side by side: hpc-dfs shard layouts vs a memmap floor vs nnU-Net v2's blosc2 files, one run.

    .venv/bin/python bench/bench_reader.py [--cases 4] [--size 256] [--slice-sizes 256,512] [--reads 1500] [--quick]

Goals: with every read checked for corruption, the default layout reaches
>= 50% of the memmap floor in slices/s and >= 2x nnU-Net v2's MB/s at the same slice size.

Every path builds the same item (image ``[1,H,W]`` float32 tensor, label ``[H,W]`` int64 tensor)
for the same random slice order, from the same arrays, with handles kept open, so the comparison is
of storage only. Paths:

- ``hpc-dfs-none`` (default layout): :class:`hpc_dfs.data.reader.SliceDataset` over uncompressed
  shards: memory-mapped slices, each read verified by its ``xxh3_64`` checksum;
- ``hpc-dfs-none-crc32``: the same, with the ``crc32`` checksum new shards get without ``xxhash``;
- ``hpc-dfs-lzf`` / ``hpc-dfs-gzip1``: compressed shards, read through HDF5 (fletcher32) and checksummed;
- ``h5py-none``: the uncompressed shards read through h5py's ``ds[s]`` (HDF5 pipeline, fletcher32),
  i.e. what format 1 did without compression: the cost of going through HDF5 per slice;
- ``hdf5plugin-blosc2-lz4``: the same arrays in HDF5 with Blosc2/LZ4 + shuffle (``hdf5plugin``) and
  fletcher32, read with ``ds[s]`` and checksummed (only when ``hdf5plugin`` is importable);
- ``npy-memmap``: uncompressed ``.npy`` read with ``np.load(mmap_mode='r')`` (the floor: no
  decompression, no checksum, no HDF5 bookkeeping);
- ``nnunet-v2-blosc2``: nnU-Net v2.8.1's on-disk format written with the ``blosc2`` package (no
  nnU-Net dependency): per case a ``(1, n, H, W)`` float32 image and int16 seg ``.b2nd``, codec LZ4HC
  level 5, NOFILTER or SHUFFLE chosen per array by a trial compression (smaller wins), block and
  chunk shapes by nnU-Net's rule for a 2D patch of one whole slice, opened ``mmap_mode='r'`` with
  one decompression thread, and read ``data[:, s:s+1]`` at random slices like its 2D loader. It
  checks nothing;
- ``nifti``: decoding the slice from ``imaging.nii.gz`` per sample (first slice size only).

MB/s counts each format's own decoded payload per slice (ours and the floor: 4+1 bytes per pixel;
nnU-Net: 4+2, its seg is int16), which favours nnU-Net in the MB/s ratio. Paths are interleaved read
by read (slice i through every path, then slice i+1; ``--rounds`` passes), so that a busy spell on a
shared machine hits every path alike; slices/s = reads / their summed time, and the rate of the
median read is reported beside it. Also measured: the deep start-up check
(``ShardSet.validate(deep=True)``) in s per GB. Files are in the page cache (a warm-up pass), as
after the first epoch. Writes ``bench/results/reader.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("BLOSC_NTHREADS", "1")  # one decompression thread for hdf5plugin, as for every path

import h5py  # noqa: E402
import torch  # noqa: E402

from hpc_dfs.config.data import PreprocessConfig  # noqa: E402
from hpc_dfs.data import shards as shardlib  # noqa: E402
from hpc_dfs.data.reader import ShardSet, SliceDataset  # noqa: E402
from hpc_dfs.fsutil import write_json  # noqa: E402
from hpc_dfs.stages.preprocess import run_preprocess  # noqa: E402


def time_interleaved(paths: dict, order, rounds: int, nifti_reads: int) -> dict:
    """Per path, the time of every read (s), the paths interleaved read by read.

    On a shared machine the load changes from millisecond to millisecond; reading slice i through every
    path before slice i+1 exposes them all to the same load. NIfTI (~1000x slower) is timed apart on the
    first ``nifti_reads`` slices. One warm-up pass first (page cache, handles).
    """
    fast = {k: g for k, (g, _) in paths.items() if k != "nifti"}
    for get, _ in paths.values():
        for i in order[:20]:
            get(int(i))
    times: dict[str, list] = {k: [] for k in paths}
    clock = time.perf_counter
    for _ in range(rounds):
        for i in order:
            i = int(i)
            for name, get in fast.items():
                t = clock()
                get(i)
                times[name].append(clock() - t)
    if "nifti" in paths:
        for i in order[:nifti_reads]:
            t = clock()
            paths["nifti"][0](int(i))
            times["nifti"].append(clock() - t)
    return times


def item(image: np.ndarray, label: np.ndarray) -> dict:
    """The item every path builds (what SliceDataset returns, less the per-case fields)."""
    return {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label.astype(np.int64))}


# ----------------------------------------------------------------------------- nnU-Net v2's format
def nnunet_blocks_chunks(shape4: tuple, patch2: tuple, itemsize: int, max_block: int = 128 << 10,
                         max_chunk: int = 6 << 20, ratio: float = 1.5) -> tuple[tuple, tuple]:
    """Block and chunk shapes of a ``(c, z, y, x)`` array for a 2D patch, by nnU-Net v2.8.1's rule.

    Written from the rule's description (``comp_blosc2_params``): channel and z extent 1; block = the
    patch rounded up to a power of two and clipped to the image, then the axis most over its target
    (min(image, 1.5 x patch)) halved until the block is at most 128 KiB; chunk = the block grown by
    block steps along y/x, the least covered axis first, up to the target, at most 6 MiB.
    """
    img = shape4[1:]
    patch = (1, *patch2)
    target = [max(1, min(img[a], math.floor(ratio * patch[a]))) for a in range(3)]
    block = [1] + [min(1 << max(0, (p - 1).bit_length()), s) for p, s in zip(patch, img)]
    while math.prod(block) * itemsize > min(max_block, max_chunk):
        ax = max((a for a in range(3) if block[a + 1] > 1), key=lambda a: (block[a + 1] / target[a], a))
        block[ax + 1] = max(1, 1 << ((block[ax + 1] - 1).bit_length() - 1))
    chunk = list(block)
    while True:
        cands = []
        for ax in (1, 2):  # 2D patch: z is never grown
            if chunk[ax + 1] >= min(img[ax], target[ax]):
                continue
            cand = list(chunk)
            cand[ax + 1] = min(cand[ax + 1] + block[ax + 1], img[ax], target[ax])
            if math.prod(cand) * itemsize <= max_chunk:
                cands.append((chunk[ax + 1] / target[ax], -img[ax], ax, cand))
        if not cands:
            return tuple(block), tuple(chunk)
        chunk = min(cands, key=lambda c: c[:3])[3]


def write_nnunet_case(arr: np.ndarray, path: Path, patch2: tuple) -> None:
    """One ``.b2nd`` array the way nnU-Net v2.8.1 saves it (LZ4HC 5, filter by trial compression)."""
    import blosc2

    blocks, chunks = nnunet_blocks_chunks(arr.shape, patch2, arr.itemsize)
    best, best_bytes = blosc2.Filter.NOFILTER, None
    for filt in (blosc2.Filter.NOFILTER, blosc2.Filter.SHUFFLE):
        cp = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1, "filters": [filt]}
        cb = blosc2.asarray(arr, chunks=chunks, blocks=blocks, cparams=cp).schunk.cbytes
        if best_bytes is None or cb < best_bytes:
            best, best_bytes = filt, cb
    cp = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1, "filters": [best]}
    blosc2.asarray(np.ascontiguousarray(arr), urlpath=str(path), mode="w", chunks=chunks, blocks=blocks, cparams=cp)


# ----------------------------------------------------------------------------- building the variants
def build_variants(tmp: Path, data: Path, size: int) -> dict:
    """Shards of every layout, the .npy floor and nnU-Net's files, all from the same arrays."""
    out, file_bytes = {}, {}
    for name, codec in (("none", "none"), ("lzf", "lzf"), ("gzip1", "gzip")):
        cfg = PreprocessConfig(slice_size=[size, size], compression=codec, compression_level=1)
        assert run_preprocess(data, tmp / f"shards-{name}", cfg) == 0
        out[name] = tmp / f"shards-{name}"
    saved, shardlib.xxhash = shardlib.xxhash, None  # the fallback checksum, as without the xxhash package
    try:
        cfg = PreprocessConfig(slice_size=[size, size], compression="none")
        assert run_preprocess(data, tmp / "shards-none-crc32", cfg) == 0
        out["none-crc32"] = tmp / "shards-none-crc32"
    finally:
        shardlib.xxhash = saved
    for name, root in out.items():
        file_bytes[name] = sum(p.stat().st_size for p in root.glob("shard-*.h5"))
    arrays = {}
    ref = ShardSet(out["none"])
    for cid in ref.case_ids:
        with h5py.File(ref.shard_path(cid), "r") as f:
            arrays[cid] = (f[cid]["image"][()], f[cid]["label"][()])
    npy = tmp / "npy"
    npy.mkdir()
    for cid, (img, lab) in arrays.items():
        np.save(npy / f"{cid}-image.npy", img)
        np.save(npy / f"{cid}-label.npy", lab)
    file_bytes["npy-memmap"] = sum(p.stat().st_size for p in npy.glob("*.npy"))
    extras = {"hdf5plugin": _blosc2_hdf5(tmp / "h5-blosc2", arrays), "nnunet": _nnunet_files(tmp / "nnunet", arrays)}
    for key, name in (("hdf5plugin", "hdf5plugin-blosc2-lz4"), ("nnunet", "nnunet-v2-blosc2")):
        if isinstance(extras[key], Path):
            file_bytes[name] = sum(p.stat().st_size for p in extras[key].iterdir())
    return {"shards": out, "npy": npy, "arrays": arrays, "file_bytes": file_bytes, **extras}


def _blosc2_hdf5(root: Path, arrays: dict):
    try:
        import hdf5plugin
    except ImportError as e:
        return f"not measured: {e}"
    root.mkdir()
    filt = hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE)
    for cid, (img, lab) in arrays.items():
        with h5py.File(root / f"{cid}.h5", "w") as f:
            for name, a in (("image", img), ("label", lab)):
                f.create_dataset(name, data=a, chunks=(1, *a.shape[1:]), fletcher32=True, **filt)
            algo = shardlib.default_checksum()
            sums = [[shardlib.slice_checksum(img[i], algo), shardlib.slice_checksum(lab[i], algo)]
                    for i in range(len(img))]
            f["slice_checksums"] = np.array(sums, dtype=np.uint64)
    return root


def _nnunet_files(root: Path, arrays: dict):
    try:
        import blosc2
    except ImportError as e:
        return f"not measured: {e}"
    blosc2.set_nthreads(1)
    root.mkdir()
    for cid, (img, lab) in arrays.items():
        patch = img.shape[1:]  # nnU-Net's 2d configuration: a patch of (about) the whole slice
        write_nnunet_case(img[None], root / f"{cid}.b2nd", patch)
        write_nnunet_case(lab[None].astype(np.int16), root / f"{cid}_seg.b2nd", patch)
    return root


# ----------------------------------------------------------------------------- the read paths
def getters(v: dict, data: Path, with_nifti: bool) -> dict:
    """name -> (get(i) building the item of dataset index i, payload bytes per slice)."""
    ds = {name: SliceDataset(root) for name, root in v["shards"].items()}
    index = ds["none"].index
    h, w = v["arrays"][index[0][0]][0].shape[1:]
    ours = h * w * 5
    out = {f"hpc-dfs-{name}": (d.__getitem__, ours) for name, d in ds.items()}
    mm = {cid: (np.load(v["npy"] / f"{cid}-image.npy", mmap_mode="r"),
                np.load(v["npy"] / f"{cid}-label.npy", mmap_mode="r")) for cid in v["arrays"]}

    def get_npy(i):
        cid, s = index[i]
        img, lab = mm[cid]
        return item(np.array(img[s]), lab[s])

    out["npy-memmap"] = (get_npy, ours)
    out["h5py-none"] = (_h5py_getter(v["shards"]["none"], index, "image", "label"), ours)
    if isinstance(v["hdf5plugin"], Path):
        import hdf5plugin  # noqa: F401 (registers the Blosc2 filter)
        files = {cid: h5py.File(v["hdf5plugin"] / f"{cid}.h5", "r") for cid in v["arrays"]}
        algo = shardlib.default_checksum()

        def get_b2h5(i):
            cid, s = index[i]
            f = files[cid]
            img, lab = f["image"][s], f["label"][s]
            want = f["slice_checksums"][s]
            if shardlib.slice_checksum(img, algo) != want[0] or shardlib.slice_checksum(lab, algo) != want[1]:
                raise RuntimeError(f"{cid} slice {s}: checksum mismatch")
            return item(img, lab)

        out["hdf5plugin-blosc2-lz4"] = (get_b2h5, ours)
    if isinstance(v["nnunet"], Path):
        out["nnunet-v2-blosc2"] = (_nnunet_getter(v["nnunet"], index, list(v["arrays"])), h * w * 6)
    if with_nifti:
        out["nifti"] = (_nifti_getter(data, index, ds["none"].shards.preprocessing), ours)
    return out


def _h5py_getter(root: Path, index, *names):
    sset = ShardSet(root)
    handles = {cid: h5py.File(sset.shard_path(cid), "r") for cid in sset.case_ids}
    dsets = {cid: tuple(f[cid][n] for n in names) for cid, f in handles.items()}

    def get(i):
        cid, s = index[i]
        img, lab = dsets[cid]
        return item(img[s], lab[s])

    return get


def _nnunet_getter(root: Path, index, case_ids):
    import blosc2

    blosc2.set_nthreads(1)
    dp = {"nthreads": 1}
    files = {cid: (blosc2.open(urlpath=str(root / f"{cid}.b2nd"), mode="r", dparams=dp, mmap_mode="r"),
                   blosc2.open(urlpath=str(root / f"{cid}_seg.b2nd"), mode="r", dparams=dp, mmap_mode="r"))
             for cid in case_ids}

    def get(i):
        cid, s = index[i]
        data, seg = files[cid]
        return item(data[:, s:s + 1][0, 0], seg[:, s:s + 1][0, 0])

    return get


def _nifti_getter(data: Path, index, params):
    import nibabel as nib

    from hpc_dfs.data.geometry import prepare_image, prepare_label

    def get(i):
        cid, s = index[i]
        img = nib.load(str(data / cid / "imaging.nii.gz"))
        seg = nib.load(str(data / cid / "segmentation.nii.gz"))
        sl, g = prepare_image(np.asanyarray(img.dataobj[s:s + 1]), img.affine, params)  # KiTS: axis 0 = slices
        return item(sl[0], prepare_label(np.asanyarray(seg.dataobj[s:s + 1]), g)[0])

    return get


def deep_check_cost(v: dict) -> dict:
    """Seconds per GB of ``ShardSet.validate(deep=True)`` (the start-up check), per layout, files cached."""
    out = {}
    for name in ("none", "lzf"):
        root = v["shards"][name]
        sset = ShardSet(root)
        sset.validate(deep=True)  # warm
        t = time.perf_counter()
        sset.validate(deep=True)
        dt = time.perf_counter() - t
        payload = sum(a.nbytes + b.nbytes for a, b in v["arrays"].values())
        out[name] = {"s": round(dt, 4), "s_per_GB_payload": round(dt / (payload / 1e9), 3),
                     "s_per_GB_file": round(dt / (v["file_bytes"][name] / 1e9), 3)}
    return out


# ----------------------------------------------------------------------------- one slice size
def measure(tmp: Path, a, size: int, first: bool) -> dict:
    """Every path at one slice size, interleaved block by block; the medians and the ratios."""
    data = tmp / f"data-{size}"
    subprocess.run([sys.executable, "-m", "hpc_dfs", "synth", "--out", str(data), "--cases", str(a.cases),
                    "--size", str(max(a.size, size)), "--min-slices", "40", "--max-slices", "64"], check=True,
                   cwd=REPO, capture_output=True)
    (tmp / f"v-{size}").mkdir()
    v = build_variants(tmp / f"v-{size}", data, size)
    paths = getters(v, data, with_nifti=first)
    n = len(SliceDataset(v["shards"]["none"]))
    reads = a.reads if size <= 256 else max(200, a.reads // 3)
    order = np.random.default_rng(0).integers(0, n, reads)
    times = time_interleaved(paths, order, a.rounds, a.nifti_reads)
    med = {k: len(t) / sum(t) for k, t in times.items()}  # slices/s over all reads (the mean read time)
    mbs = {k: med[k] * paths[k][1] / 1e6 for k in med}
    floor, peer = med["npy-memmap"], mbs.get("nnunet-v2-blosc2")
    return {
        "slice_size": size, "cases": a.cases, "slices": n, "reads": reads, "rounds": a.rounds,
        "slices_per_s": {k: round(x, 1) for k, x in med.items()},
        "slices_per_s_from_median_read": {k: round(1 / statistics.median(t), 1) for k, t in times.items()},
        "timed_reads": {k: len(t) for k, t in times.items()},
        "MB_per_s": {k: round(x, 1) for k, x in mbs.items()},
        "payload_bytes_per_slice": {k: p[1] for k, p in paths.items()},
        "fraction_of_memmap_floor": {k: round(x / floor, 3) for k, x in med.items()},
        "MB_per_s_vs_nnunet": {k: round(x / peer, 2) for k, x in mbs.items()} if peer else None,
        "speedup_vs_nifti": ({k: round(x / med["nifti"], 1) for k, x in med.items() if k.startswith("hpc-dfs")}
                             if "nifti" in med else None),
        "file_MB": {k: round(b / 1e6, 2) for k, b in v["file_bytes"].items()},
        "deep_check": deep_check_cost(v),
        "checksum": shardlib.default_checksum(),
        "nnunet_blocks_chunks_image": list(map(list, nnunet_blocks_chunks((1, n, size, size), (size, size), 4))),
        "missing": {k: v[k] for k in ("hdf5plugin", "nnunet") if not isinstance(v[k], Path)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="synth image size (at least the slice size is used)")
    ap.add_argument("--slice-sizes", default="256,512")
    ap.add_argument("--reads", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the random order")
    ap.add_argument("--nifti-reads", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="2 cases, 256x256 only, 600 reads, 1 pass (bench --quick)")
    a = ap.parse_args()
    if a.quick:
        a.cases, a.slice_sizes, a.reads, a.rounds = 2, "256", 600, 1
    torch.set_num_threads(1)
    sizes = [int(s) for s in a.slice_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(Path(tmp), a, size, first=(i == 0)) for i, size in enumerate(sizes)]
    out = {
        "benchmark": "reader",
        "default_layout": "hpc-dfs-none",
        "runs": runs,
        "goals": {"fraction_of_memmap_floor": 0.5, "MB_per_s_vs_nnunet": 2.0, "speedup_vs_nifti": 10},
        "met": {f"{r['slice_size']}": {"floor": r["fraction_of_memmap_floor"]["hpc-dfs-none"] >= 0.5,
                                       "nnunet": bool(r["MB_per_s_vs_nnunet"]) and
                                       r["MB_per_s_vs_nnunet"]["hpc-dfs-none"] >= 2.0} for r in runs},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg(), "gpu": None},
        "note": ("one process, 1 thread, files in page cache, paths interleaved read by read; the CPU was shared "
                 "with other work while measured (see load_avg_at_end)"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "reader.json", out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
