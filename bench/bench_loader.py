"""Loader against step on CPU: batches/s the DataLoader (with its workers) supplies vs batches/s the train step takes.

    .venv/bin/python bench/bench_loader.py [--quick] [--out bench/results]

Two settings, each measured in this one process, loader and step alternating (2 rounds, best of each):

- ``default``: 256x256 shards, batch 16, 2 DataLoader workers, DFS fusion at its default width (32);
- ``demo``: 96x96 shards, batch 8, no workers (the demo's ``--num-workers 0``), DFS fusion at width 8, instance norm.

The loader is train's: :class:`SliceDataset` over the shards with :class:`GlobalBatchSampler`'s batches of
epoch 0 (foreground oversampling on), ``torch.utils.data.DataLoader(batch_sampler=..., num_workers=...)``;
its rate is taken after the first batch (worker start-up is reported apart). The step is forward, DFS loss,
backward and SGD step on a batch from that loader (without train's augmentation, so the step measured here is
if anything faster than train's). Both at one torch thread, as a rank of ``train`` on a 2-core node gets.
Goal: loader rate > step rate at both settings. Writes ``bench/results/loader.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

sys.path.insert(0, str(benchlib.REPO))
SETTINGS = {
    "default": {"slice": 256, "batch": 16, "workers": 2, "model": {}},
    "demo": {"slice": 96, "batch": 8, "workers": 0, "model": {"base_channels": 8, "norm": "instance"}},
}


def make_shards(tmp: Path, slice_size: int, cases: int) -> Path:
    data, out = tmp / "data", tmp / f"shards{slice_size}"
    if not (data / "kits.json").exists():
        subprocess.run(benchlib.hpc("synth", "--out", str(data), "--cases", str(cases), "--size", "256",
                                    "--seed", "0", "--no-progress"),
                       check=True, env=benchlib.env(), capture_output=True)
    subprocess.run(benchlib.hpc("preprocess", "--data", str(data), "--out", str(out), "--no-progress",
                                "--slice-size", f"{slice_size},{slice_size}", "--set", "refine.enabled=false"),
                   check=True, env=benchlib.env(), capture_output=True)
    return out


def loader_rate(ds, batches: list[list[int]], workers: int) -> tuple[float, float]:
    """(batches/s after the first batch, seconds to the first batch) of train's DataLoader."""
    import torch
    t0 = time.perf_counter()
    it = iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers))
    next(it)
    t1 = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t1), t1 - t0


def step_rate(model, loss_fn, opt, batch: dict, steps: int) -> float:
    """Train steps/s (forward, loss, backward, SGD step) on one batch."""
    def step():
        opt.zero_grad(set_to_none=True)
        out = model(batch["image"], batch["clinical"])
        loss, _ = loss_fn(out, batch["label"], batch["risk"])
        loss.backward()
        opt.step()
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


def measure(name: str, s: dict, shards: Path, rounds: int, n_batches: int, steps: int) -> dict:
    import torch

    from hpc_dfs.data.reader import GlobalBatchSampler, ShardSet, SliceDataset
    from hpc_dfs.models import DFSLoss, build_model

    manifest = ShardSet(shards).manifest
    ds = SliceDataset(shards)
    sampler = GlobalBatchSampler(ds, global_batch_size=s["batch"], seed=0)
    all_b = [b.tolist() for b in sampler.global_batches(0)]
    batches = (all_b * (1 + n_batches // max(len(all_b), 1)))[:n_batches]
    n_feat = int((manifest.get("clinical") or {}).get("n_features") or 0)
    torch.manual_seed(0)
    model = build_model("dfs_fusion", n_classes=len(manifest["preprocessing"]["classes"]), n_clinical=n_feat,
                        **s["model"])
    loss_fn = DFSLoss(n_classes=len(manifest["preprocessing"]["classes"]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=batches[:1])))
    loads, starts, stepr = [], [], []
    for _ in range(rounds):
        r, t0 = loader_rate(ds, batches, s["workers"])
        loads.append(r)
        starts.append(t0)
        stepr.append(step_rate(model, loss_fn, opt, batch, steps))
    row = {"setting": name, **{k: v for k, v in s.items() if k != "model"}, "model": s["model"] or "default (32)",
           "loader_batches_per_s": round(max(loads), 2), "loader_first_batch_s": round(min(starts), 3),
           "step_batches_per_s": round(max(stepr), 4),
           "loader_over_step": round(max(loads) / max(stepr), 2),
           "all_loader": [round(v, 2) for v in loads], "all_step": [round(v, 3) for v in stepr]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, fewer batches and steps")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    rounds, n_batches, steps = (1, 16, 1) if a.quick else (2, 40, 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for name, s in SETTINGS.items():
            rows.append(measure(name, s, make_shards(Path(tmp), s["slice"], 3), rounds, n_batches, steps))
    result = {"benchmark": "loader", "rows": rows, "torch_threads": 1, "quick": a.quick,
              "goal": "loader batches/s > train-step batches/s at the default and the demo settings",
              "met": all(r["loader_over_step"] > 1 for r in rows),
              "note": "one process; loader and step alternate, best of the rounds; CPU shared with other jobs"}
    print(benchlib.write_result("loader", result, a.out))


if __name__ == "__main__":
    main()
