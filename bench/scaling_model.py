"""Scaling model of data-parallel training with ring-allreduce, for 8..512 GPUs.

    .venv/bin/python bench/scaling_model.py [--from bench/results/train.json] [--out bench/results/scaling_model.json]

Per optimizer step, each GPU computes for ``T_c`` and the gradients (``S`` bytes) are ring-allreduced:

    T_ar(n) = 2 (n-1)/n * S / B  +  2 (n-1) * alpha

(bandwidth term: each byte crosses each link twice, in reduce-scatter and all-gather; latency term:
2(n-1) ring steps of ``alpha`` each). Weak scaling (same per-GPU batch) gives the efficiency

    E(n) = T_c / (T_c + max(0, T_ar(n) - f * T_backward))

where ``f`` is the share of the allreduce that Horovod hides behind the backward pass (its gradient
hooks start allreducing while later layers still compute; Tensor Fusion batches the small tensors).
``f = 0`` is the pessimistic no-overlap bound, ``f = 1`` full overlap; ``T_backward = 2/3 T_c``.

Assumptions (stated in the JSON and the README table):

- link bandwidth ``B`` = 100 and 200 Gb/s per GPU (InfiniBand HDR100 / HDR200), 80% achieved;
- ``alpha`` = 5 us per ring step (NCCL over InfiniBand, inter-node);
- ``T_c``: measured on this machine's CPU (``bench/bench_train.py``), and, for GPUs, estimated from the
  model's FLOPs (``hpc_dfs.models.count_flops``; backward = 2x forward) at an assumed achieved
  throughput (default 50 TFLOP/s, mixed precision on an A100/H100-class GPU) -- *not measured*;
- fp32 gradients (fp16 compression halves ``S``).

Calibration against Horovod's published anchor (Sergeev & Del Balso 2018: ~90% efficiency at 512
GPUs for ResNet-101, P100 GPUs, 25 Gb/s RoCE): the same formula with ResNet-101's 44.5 M parameters,
~0.55 s per batch-64 step on a P100 and 25 Gb/s gives the ``resnet101_anchor`` rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPUS = (8, 16, 32, 64, 128, 256, 512)
BANDWIDTHS_GBPS = (100.0, 200.0)
LINK_EFFICIENCY = 0.8
ALPHA_S = 5e-6
BACKWARD_SHARE = 2.0 / 3.0


def ring_allreduce_s(n: int, nbytes: float, gbps: float, alpha: float = ALPHA_S,
                     link_eff: float = LINK_EFFICIENCY) -> float:
    """Seconds for a ring-allreduce of ``nbytes`` over ``n`` ranks on ``gbps`` Gb/s links."""
    if n <= 1:
        return 0.0
    bw = gbps * 1e9 / 8 * link_eff
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha


def efficiency(t_compute: float, t_ar: float, overlap: float) -> float:
    exposed = max(0.0, t_ar - overlap * BACKWARD_SHARE * t_compute)
    return t_compute / (t_compute + exposed)


def table(name: str, t_compute: float, nbytes: float, gbps_list=BANDWIDTHS_GBPS, gpus=GPUS) -> list[dict]:
    rows = []
    for gbps in gbps_list:
        for n in gpus:
            t_ar = ring_allreduce_s(n, nbytes, gbps)
            rows.append({"case": name, "gpus": n, "link_gbps": gbps, "t_compute_s": t_compute,
                         "grad_bytes": nbytes, "t_allreduce_s": t_ar,
                         "efficiency_no_overlap": efficiency(t_compute, t_ar, 0.0),
                         "efficiency_full_overlap": efficiency(t_compute, t_ar, 1.0)})
    return rows


def gpu_step_estimate(model_kwargs: dict, batch: int, size: int, tflops: float) -> tuple[float, int, int]:
    """(seconds per step, parameters, forward FLOPs per sample) of a model from its FLOP count."""
    import torch
    from hpc_dfs.models import build_model, count_flops, count_parameters
    with torch.device("meta"):
        model = build_model(**model_kwargs)
    flops = count_flops(model, (1, 1, size, size))
    return 3 * flops * batch / (tflops * 1e12), count_parameters(model), flops


def markdown(rows: list[dict]) -> str:
    lines = ["| case | link | " + " | ".join(f"{n} GPUs" for n in GPUS) + " |",
             "|---|---|" + "---|" * len(GPUS)]
    keyed: dict = {}
    for r in rows:
        keyed.setdefault((r["case"], r["link_gbps"]), {})[r["gpus"]] = r
    for (case, gbps), by_n in keyed.items():
        cells = [f"{100 * by_n[n]['efficiency_no_overlap']:.0f}-{100 * by_n[n]['efficiency_full_overlap']:.0f}%"
                 for n in GPUS]
        lines.append(f"| {case} | {gbps:g} Gb/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build(measured: dict | None, tflops: float = 50.0, batch: int = 16, size: int = 256,
          n_clinical: int = 24) -> dict:
    rows: list[dict] = []
    cases = {}
    # the DFS fusion model at the cluster defaults, compute estimated from FLOPs
    for label, kw in {"dfs_fusion (base 32)": dict(name="dfs_fusion", n_clinical=n_clinical),
                      "unet (base 64)": dict(name="unet", n_classes=3)}.items():
        t_c, params, flops = gpu_step_estimate(kw, batch, size, tflops)
        cases[label] = {"t_compute_s": t_c, "params": params, "grad_bytes": 4 * params,
                        "forward_gflops_per_sample": flops / 1e9, "source": f"FLOPs at {tflops:g} TFLOP/s, "
                        f"batch {batch}/GPU, {size}x{size}"}
        rows += table(f"{label}, GPU est.", t_c, 4 * params)
    if measured:
        t_c = measured["t_compute_s"]
        cases["bench model, CPU measured"] = {**measured, "source": "bench/bench_train.py np=1 step time"}
        rows += table("bench model, CPU measured", t_c, measured["grad_bytes"])
    anchor = table("resnet101_anchor", 0.55, 4 * 44.5e6, gbps_list=(25.0,))
    rows += anchor
    return {"assumptions": {"link_gbps": list(BANDWIDTHS_GBPS), "link_efficiency": LINK_EFFICIENCY,
                            "alpha_s_per_ring_step": ALPHA_S, "backward_share_of_compute": BACKWARD_SHARE,
                            "gpu_tflops_achieved": tflops, "batch_per_gpu": batch, "slice_size": size,
                            "gradients": "fp32 (fp16 compression halves grad_bytes)",
                            "efficiency": "weak scaling; range = no overlap .. full overlap with backward"},
            "cases": cases, "rows": rows, "markdown": markdown(rows),
            "anchor_note": "Horovod reports ~90% at 512 GPUs for ResNet-101 (P100, 25 Gb/s); the model gives "
                           f"{100 * anchor[-1]['efficiency_no_overlap']:.0f}-"
                           f"{100 * anchor[-1]['efficiency_full_overlap']:.0f}%"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", type=Path, default=REPO / "bench" / "results" / "train.json",
                   help="bench_train.py results (for the CPU-measured compute time); optional")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scaling_model.json")
    p.add_argument("--tflops", type=float, default=50.0, help="assumed achieved GPU throughput")
    p.add_argument("--batch", type=int, default=16, help="per-GPU batch")
    p.add_argument("--size", type=int, default=256, help="slice size")
    a = p.parse_args(argv)
    measured = None
    if a.src.is_file():
        m = json.loads(a.src.read_text())
        if m.get("scaling_input"):
            measured = m["scaling_input"]
    result = build(measured, a.tflops, a.batch, a.size)
    from hpc_dfs.fsutil import write_json
    write_json(a.out, result)
    print(result["markdown"])
    print(result["anchor_note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
