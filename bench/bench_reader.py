"""Reader throughput (slices/s, one process) vs an uncompressed .npy memmap floor and vs decoding NIfTI per sample.

    .venv/bin/python bench/bench_reader.py [--cases 4] [--size 256] [--slice-size 256] [--reads 1500]

Goals: SliceDataset >= 50% of the memmap floor and >= 10x the NIfTI path. Every path builds
the same item (image [1,H,W] float32 tensor, label [H,W] int64 tensor) for the same random
slice order, so the comparison is of storage only:

- ``hdf5-<codec>``: :class:`hpc_dfs.data.reader.SliceDataset` over shards written with lzf,
  gzip level 1 and no compression (all with fletcher32 and per-slice chunks);
- ``npy-memmap``: the same arrays saved as uncompressed ``.npy`` and read with ``np.load(mmap_mode='r')``
  (the floor: no decompression, no checksum, no HDF5 bookkeeping);
- ``nifti``: per sample, open the case's ``imaging.nii.gz``/``segmentation.nii.gz``, decode that
  slice (gzip streams must be decompressed up to it) and apply the preprocessing transform.

Files are in the page cache for every path (one warm-up pass), as they are after the first
epoch. Writes ``bench/results/reader.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from hpc_dfs.config.data import PreprocessConfig  # noqa: E402
from hpc_dfs.stages.preprocess import run_preprocess  # noqa: E402
from hpc_dfs.data.reader import SliceDataset  # noqa: E402
from hpc_dfs.fsutil import write_json  # noqa: E402


def time_reads(get, order) -> float:
    for i in order[:50]:  # warm-up (page cache, handles)
        get(int(i))
    t = time.perf_counter()
    for i in order:
        get(int(i))
    return len(order) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slice-size", type=int, default=256)
    ap.add_argument("--reads", type=int, default=1500)
    ap.add_argument("--nifti-reads", type=int, default=60)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "hpc_dfs", "synth", "--out", str(data), "--cases", str(a.cases),
                        "--size", str(a.size), "--min-slices", "40", "--max-slices", "64"], check=True, cwd=REPO,
                       capture_output=True)
        sizes = {}
        for codec in ("lzf", "gzip", "none"):
            cfg = PreprocessConfig(slice_size=[a.slice_size] * 2, compression=codec, compression_level=1)
            assert run_preprocess(data, tmp / f"shards-{codec}", cfg) == 0
            sizes[codec] = sum(p.stat().st_size for p in (tmp / f"shards-{codec}").glob("shard-*.h5"))
        ds = SliceDataset(tmp / "shards-lzf")
        rng = np.random.default_rng(0)
        order = rng.integers(0, len(ds), a.reads)
        # the memmap floor: the very same arrays, uncompressed .npy
        import h5py
        mm = {}
        for cid in ds.case_ids:
            with h5py.File(ds.shards.shard_path(cid), "r") as f:
                np.save(tmp / f"{cid}-image.npy", f[cid]["image"][()])
                np.save(tmp / f"{cid}-label.npy", f[cid]["label"][()])
            mm[cid] = (np.load(tmp / f"{cid}-image.npy", mmap_mode="r"), np.load(tmp / f"{cid}-label.npy", mmap_mode="r"))

        def get_npy(i):
            cid, s = ds.index[i]
            img, lab = mm[cid]
            return {"image": torch.from_numpy(np.array(img[s]))[None],
                    "label": torch.from_numpy(lab[s].astype(np.int64))}

        import nibabel as nib
        from hpc_dfs.data.geometry import prepare_image, prepare_label
        params = ds.shards.preprocessing

        def get_nifti(i):
            cid, s = ds.index[i]
            img = nib.load(str(data / cid / "imaging.nii.gz"))
            seg = nib.load(str(data / cid / "segmentation.nii.gz"))
            x = np.asanyarray(img.dataobj[s:s + 1])
            y = np.asanyarray(seg.dataobj[s:s + 1])
            sl, g = prepare_image(x, img.affine, params)  # KiTS orientation: axis 0 is the slice axis
            lab = prepare_label(y, g)
            return {"image": torch.from_numpy(sl[0])[None], "label": torch.from_numpy(lab[0].astype(np.int64))}

        results["npy-memmap"] = time_reads(get_npy, order)
        for codec in ("lzf", "gzip", "none"):
            d = SliceDataset(tmp / f"shards-{codec}")
            results[f"hdf5-{codec}"] = time_reads(d.__getitem__, order)
        results["nifti"] = time_reads(get_nifti, order[: a.nifti_reads])
        n_slices = len(ds)
    floor = results["npy-memmap"]
    out = {
        "benchmark": "reader", "cases": a.cases, "slices": n_slices, "slice_size": a.slice_size, "reads": a.reads,
        "slices_per_s": {k: round(v, 1) for k, v in results.items()},
        "fraction_of_memmap_floor": {k: round(v / floor, 3) for k, v in results.items() if k.startswith("hdf5")},
        "speedup_vs_nifti": {k: round(v / results["nifti"], 1) for k, v in results.items() if k.startswith("hdf5")},
        "shard_MB": {k: round(v / 1e6, 2) for k, v in sizes.items()},
        "goals": {"fraction_of_memmap_floor": 0.5, "speedup_vs_nifti": 10},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "note": "one process, 1 thread, files in page cache; CPU shared with other work while measured",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "reader.json", out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
