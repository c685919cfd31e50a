"""Which network a CPU run should train: training throughput of the candidates, measured in one process.

    .venv/bin/python bench/bench_cpu_models.py [--quick] [--out bench/results]

The quality benchmark and the demo are bounded by CPU time, so the network they train is chosen by
measured throughput, not by FLOPs: depthwise-separable convolutions save FLOPs but run slowly
on CPU. Each candidate trains (forward, Dice + cross-entropy loss, backward, Adam step) on random
batches of the quality benchmark's shapes, one thread (what each of its two ranks has), batch 8:

- stage 1: 1 x 96 x 96 slices; stage 2: 3 x 80 x 80 windows (2.5D, k = 3);
- DFS fusion (RUSP-Net encoder, FiLM from 24 clinical features) with and without depthwise-separable
  convolutions, at base width 8 and 16; the plain U-Net at width 8 and 16; MONAI's ``UNet`` (the
  peer: channels 16-128, 2 residual units per level) when MONAI is installed.

Reports samples/s (median of the timed steps after warm-up), parameters, and each candidate's speed
relative to the DFS fusion at width 8 with separable convolutions (what the quality rows ran).
Writes ``bench/results/cpu_models.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from hpc_dfs.models import build_model  # noqa: E402

SHAPES = {"stage 1 (1x96x96)": (1, 96, 96), "stage 2 (3x80x80)": (3, 80, 80)}
N_CLINICAL = 24


def candidates() -> dict[str, dict]:
    """name -> build_model kwargs (or ``{"monai": True}``)."""
    out = {}
    for width in (8, 16):
        for sep in (True, False):
            out[f"dfs_fusion, width {width}, {'separable' if sep else 'plain'} convs"] = dict(
                name="dfs_fusion", base_channels=width, separable=sep, norm="instance", n_clinical=N_CLINICAL)
        out[f"unet, width {width}"] = dict(name="unet", base_channels=width, norm="instance")
    try:
        import monai  # noqa: F401
        out["MONAI UNet, channels 16-128, 2 res units"] = {"monai": True}
    except ImportError:
        pass
    return out


def make(spec: dict, in_ch: int) -> torch.nn.Module:
    if spec.get("monai"):
        from monai.networks.nets import UNet
        return UNet(spatial_dims=2, in_channels=in_ch, out_channels=3, channels=(16, 32, 64, 128),
                    strides=(2, 2, 2), num_res_units=2, norm="instance")
    return build_model(in_channels=in_ch, n_classes=3, **spec)


def samples_per_s(spec: dict, shape: tuple[int, int, int], batch: int, steps: int, warmup: int) -> tuple[float, int]:
    """(median training samples/s, parameters) of one candidate at one input shape."""
    torch.manual_seed(0)
    model = make(spec, shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 3, (batch, shape[1], shape[2]))
    clin = torch.randn(batch, N_CLINICAL)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = model(x, clin) if spec.get("name") == "dfs_fusion" else model(x)
        logits = out["seg_logits"] if isinstance(out, dict) else out
        prob = logits.softmax(1)
        onehot = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float()
        dice = 1 - (2 * (prob * onehot).sum((0, 2, 3)) + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + dice.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times), sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 timed steps instead of 12")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps, warmup, batch = (4, 1, 8) if a.quick else (12, 3, 8)
    rows = []
    for name, spec in candidates().items():
        for shape_name, shape in SHAPES.items():
            sps, params = samples_per_s(spec, shape, batch, steps, warmup)
            rows.append({"model": name, "input": shape_name, "samples_per_s": round(sps, 1), "params": params})
            print(f"[cpu_models] {name:45s} {shape_name:18s} {sps:7.1f} samples/s  {params:,} params", flush=True)
    ref = {r["input"]: r["samples_per_s"] for r in rows if r["model"] == "dfs_fusion, width 8, separable convs"}
    for r in rows:
        r["vs_quality_rows_model"] = round(r["samples_per_s"] / ref[r["input"]], 2)
    result = {"benchmark": "cpu_models", "quick": a.quick, "batch": batch, "threads": 1, "timed_steps": steps,
              "reference": "dfs_fusion, width 8, separable convs (what the quality rows and the demo train)",
              "rows": rows, "torch": torch.__version__}
    path = benchlib.write_result("cpu_models", result, a.out)
    print(f"[cpu_models] wrote {path}", flush=True)


if __name__ == "__main__":
    main()
