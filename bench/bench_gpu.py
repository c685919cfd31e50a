"""GPU benchmark: training step rate, peak memory, reader vs step, and 1-GPU horovodrun and torchrun runs.

    bench/gpu.sh                      # on a GPU machine: ~3-4 min on one GPU, writes bench/results/gpu.json
    bench/gpu.sh --dry-run            # on CPU: tiny sizes, 1-2 steps, proves every part runs (make test)
    .venv/bin/python bench/bench_gpu.py [--dry-run] [--out FILE] [--models unet,...] [--sizes 512,256]

What it measures, in one process unless said:

1. **training steps/s** of ``rusp_net_dw``, ``dfs_fusion`` and ``unet`` (their default widths) at 512^2
   and 256^2 slices, batch 16, in fp32 and in AMP bf16 (``torch.autocast``): forward, DFS loss,
   backward and an Adam step on random batches already on the GPU, ``--warmup`` then ``--steps``
   timed steps between two ``cuda.synchronize()``; ``cudnn.benchmark`` on, as train sets it;
2. **peak GPU memory** of each configuration (``torch.cuda.max_memory_allocated``); an OOM is
   recorded as such, not fatal;
3. **reader vs step**: slices/s of :class:`hpc_dfs.data.reader.SliceDataset` (one process, and a
   DataLoader with ``--workers`` workers) on synth shards of the same slice size, against the
   samples/s each configuration consumes (ratio > 1: the reader keeps up);
4. **the CUDA path through the real CLI**: ``horovodrun -np 1 -H localhost:1 hpc-dfs train`` for 50
   steps on those shards with ``model.norm=batch`` and ``amp=auto`` (fp16 + GradScaler), which takes
   ``hvd.SyncBatchNorm``, ``optimizer.synchronize()`` + ``skip_synchronize()`` and the device chosen
   from the local rank; its log line naming the device and its metrics are recorded, and the
   SyncBatchNorm class that ``parallel.convert_sync_batchnorm`` picks here is checked;
5. **the torch engine through the real CLI**: the same training under ``torchrun --standalone
   --nproc_per_node 1 -m hpc_dfs train`` (torch.distributed with NCCL on CUDA, ``torch.nn.SyncBatchNorm``),
   so both engines' samples/s sit side by side in one JSON (``torchrun_train``); then
   ``bench/bench_engines.py --device cuda`` times both engines' NCCL allreduce from 4 KB to 64 MB on the
   node's GPUs (one rank per GPU; ``engines`` in the JSON; skipped by ``--dry-run``, which has no NCCL).

Without CUDA, ``gpu.sh`` (``--require-cuda``) stops at once with exit status 4, and a plain
``bench_gpu.py`` (as ``hpc-dfs bench --all`` runs it) says it skipped and exits 0; ``--dry-run``
runs everything on the CPU at 32^2, batch 2, 1-2 steps, and writes its JSON to ``--out`` (default
``bench/results/gpu-dry-run.json``, never ``gpu.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hpc_dfs.errors import EXIT_ENV  # noqa: E402
from hpc_dfs.fsutil import write_json  # noqa: E402

PY = sys.executable
MODELS = ("rusp_net_dw", "dfs_fusion", "unet")


def environment() -> dict:
    """What the figures were measured on: the card, torch/CUDA and Horovod's build."""
    env = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import horovod.torch as hvd
        env.update(horovod=__import__("horovod").__version__, horovod_nccl=bool(hvd.nccl_built()),
                   horovod_gloo=bool(hvd.gloo_built()), horovod_mpi=bool(hvd.mpi_built()))
    except ImportError as e:
        env["horovod"] = f"not importable: {e}"
    return env


# ----------------------------------------------------------------------------- 1-2. step rate and memory
def step_rate(name: str, size: int, batch: int, precision: str, device: torch.device, warmup: int, steps: int,
              n_clinical: int, base_channels: int | None) -> dict:
    """Steps/s and peak memory of one configuration (random data on the device)."""
    from hpc_dfs.models import DFSLoss, build_model, count_parameters

    torch.manual_seed(0)
    model = build_model(name, n_clinical=n_clinical, base_channels=base_channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = DFSLoss(n_classes=3)
    image = torch.randn(batch, 1, size, size, device=device)
    label = torch.randint(0, 3, (batch, size, size), device=device)
    clinical = torch.randn(batch, n_clinical, device=device)
    risk = torch.randint(0, 2, (batch,), device=device).float()
    amp = precision == "bf16" and device.type == "cuda"
    cuda = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(image, clinical) if name == "dfs_fusion" else model(image)
            loss, _ = loss_fn(out, label, risk)
        loss.backward()
        opt.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    row = {"model": name, "size": size, "batch": batch, "precision": precision, "autocast": amp,
           "params": count_parameters(model)}
    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        row.update(steps_per_s=round(steps / dt, 3), samples_per_s=round(steps * batch / dt, 1),
                   step_ms=round(1e3 * dt / steps, 2))
    except torch.OutOfMemoryError:
        row.update(steps_per_s=None, error="out of memory")
    if cuda:
        row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if cuda:  # the model and optimizer die with this frame; give their memory back before the next one
        step = model = opt = None
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- 3. reader vs step
def make_shards(tmp: Path, size: int, cases: int) -> Path:
    """Synth cases and shards at ``size`` through the real CLI."""
    data, shards = tmp / f"data-{size}", tmp / f"shards-{size}"
    run([PY, "-m", "hpc_dfs", "synth", "--out", data, "--cases", cases, "--size", max(64, size), "--min-slices", 24,
         "--max-slices", 40, "--no-progress"])
    run([PY, "-m", "hpc_dfs", "preprocess", "--data", data, "--out", shards, "--slice-size", f"{size},{size}",
         "--n-folds", 2, "--no-progress"])
    return shards


def reader_rate(shards: Path, reads: int, workers: int, batch: int) -> dict:
    """Slices/s of SliceDataset in this process and through a DataLoader with ``workers`` workers."""
    import numpy as np
    from torch.utils.data import DataLoader

    from hpc_dfs.data.reader import SliceDataset

    ds = SliceDataset(shards)
    order = np.random.default_rng(0).integers(0, len(ds), reads).tolist()
    for i in order[:20]:
        ds[i]
    t = time.perf_counter()
    for i in order:
        ds[i]
    one = reads / (time.perf_counter() - t)
    loader = DataLoader(ds, batch_size=batch, sampler=order, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    t = time.perf_counter()
    n = sum(b["image"].shape[0] for b in loader)
    return {"slices_per_s_one_process": round(one, 1), "workers": workers,
            "slices_per_s_dataloader": round(n / (time.perf_counter() - t), 1), "reads": reads}


# ----------------------------------------------------------------------------- 4. the CUDA path via the CLI
def horovod_train(shards: Path, out: Path, steps: int, batch: int, dry: bool, engine: str = "horovod") -> dict:
    """``hpc-dfs train`` for ``steps`` steps on one GPU: under ``horovodrun -np 1`` (engine horovod) or
    ``torchrun --nproc_per_node 1`` (engine torch: NCCL); what its log and metrics show."""
    if engine == "horovod":
        hvdrun = shutil.which("horovodrun") or str(Path(PY).parent / "horovodrun")
        prefix = [hvdrun, "-np", 1, "-H", "localhost:1", PY, "-m", "hpc_dfs"]
    else:
        prefix = [str(Path(PY).parent / "torchrun"), "--standalone", "--nproc_per_node", 1, "-m", "hpc_dfs"]
    cmd = prefix + ["train", "--shards", shards, "--out", out, "--epochs", 1, "--steps-per-epoch", steps,
                    "--batch-size", batch, "--num-workers", 0 if dry else 4, "--log-every", 10, "--set",
                    "model.norm=batch", "--set", "amp=auto", "--engine", engine]
    if dry:
        cmd += ["--set", "model.base_channels=8"]
    t = time.perf_counter()
    res = run(cmd, check=False)
    wall = time.perf_counter() - t
    text = res.stdout + res.stderr
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    device_line = next((ln.strip() for ln in text.splitlines() if "rank(s) x" in ln and " on " in ln), None)
    return {"command": " ".join(map(str, cmd)), "rc": res.returncode, "wall_s": round(wall, 1),
            "device_line": device_line, "on_cuda": bool(device_line and " on cuda" in device_line),
            "steps": rows[-1].get("step") if rows else None,
            "samples_per_s": rows[-1].get("samples_per_s") if rows else None,
            "output_tail": text[-1500:] if res.returncode else None}


def engines_allreduce(dry: bool) -> dict | None:
    """``bench/bench_engines.py --device cuda`` on the node's GPUs (None on a dry run: no NCCL on CPU)."""
    if dry or not torch.cuda.is_available():
        return None
    out = Path(tempfile.mkdtemp(prefix="bench_engines_")) / "engines-gpu.json"
    res = run([PY, str(REPO / "bench" / "bench_engines.py"), "--device", "cuda", "--np",
               max(1, torch.cuda.device_count()), "--out", out], check=False)
    if res.returncode:
        return {"rc": res.returncode, "output_tail": (res.stdout + res.stderr)[-1500:]}
    return json.loads(out.read_text())


def syncbn_class() -> str:
    """The BatchNorm class ``parallel.convert_sync_batchnorm`` gives here (hvd.SyncBatchNorm on CUDA + Horovod)."""
    from hpc_dfs import parallel
    from hpc_dfs.models import build_model

    m = parallel.convert_sync_batchnorm(build_model("dfs_fusion", n_clinical=4, base_channels=8, norm="batch"))
    kinds = {f"{type(x).__module__}.{type(x).__name__}" for x in m.modules() if "BatchNorm" in type(x).__name__}
    return ", ".join(sorted(kinds))


def run(cmd: list, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if check and res.returncode:
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}\n{res.stdout[-2000:]}"
                         f"\n{res.stderr[-2000:]}")
    return res


# ----------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 1-2 steps: checks that everything runs")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/gpu.json, "
                                                          "or gpu-dry-run.json with --dry-run)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default="512,256")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=50, help="steps of the horovodrun training")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the reader measurement")
    p.add_argument("--require-cuda", action="store_true", help="exit 4 without CUDA (gpu.sh passes it); without "
                   "it a CPU machine skips the benchmark with exit 0, as `hpc-dfs bench --all` needs")
    p.add_argument("--quick", action="store_true", help="fewer timed steps (hpc-dfs bench --quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.steps = 3, 8
    if a.dry_run:
        a.sizes, a.batch, a.warmup, a.steps, a.train_steps, a.workers = "32", 2, 1, 1, 2, 1
    a.out = a.out or REPO / "bench" / "results" / ("gpu-dry-run.json" if a.dry_run else "gpu.json")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if not a.dry_run and not torch.cuda.is_available():
        if not a.require_cuda:  # `hpc-dfs bench --all` on a CPU machine: nothing to measure, not a failure
            print("bench_gpu: skipped: no CUDA device here, so no GPU figures (run bench/gpu.sh on a GPU node)")
            return 0
        print("bench_gpu: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU node, "
              "or pass --dry-run to check the script on CPU", file=sys.stderr)
        return EXIT_ENV
    env = environment()
    device = torch.device("cuda", 0) if env["cuda_available"] and not a.dry_run else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    sizes = [int(s) for s in a.sizes.split(",")]
    base = 8 if a.dry_run else None
    steps = [step_rate(m, s, a.batch, prec, device, a.warmup, a.steps, 8, base)
             for s in sizes for m in a.models.split(",") for prec in ("fp32", "bf16")]
    for r in steps:
        print(json.dumps(r), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        tmp = Path(tmp)
        shards = {s: make_shards(tmp, s, 2 if a.dry_run else 4) for s in sizes}
        readers = {s: reader_rate(shards[s], 20 if a.dry_run else 400, a.workers, a.batch) for s in sizes}
        for r in steps:
            rd = readers[r["size"]]["slices_per_s_dataloader"]
            r["reader_over_step"] = round(rd / r["samples_per_s"], 2) if r.get("samples_per_s") else None
        train = horovod_train(shards[sizes[-1]], tmp / "run", a.train_steps, a.batch, a.dry_run)
        torch_train = horovod_train(shards[sizes[-1]], tmp / "run_torch", a.train_steps, a.batch, a.dry_run, "torch")
    report = {"benchmark": "gpu", "dry_run": a.dry_run, "device": str(device), "environment": env,
              "settings": {"sizes": sizes, "batch": a.batch, "warmup": a.warmup, "steps": a.steps,
                           "models": a.models.split(","), "base_channels": base or "model default"},
              "steps": steps, "reader": {str(k): v for k, v in readers.items()},
              "horovodrun_train": train, "torchrun_train": torch_train, "engines": engines_allreduce(a.dry_run),
              "syncbn_class": syncbn_class(), "wall_s": round(time.perf_counter() - t0, 1),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(a.out, report)
    print(json.dumps({k: report[k] for k in ("device", "horovodrun_train", "torchrun_train", "syncbn_class",
                                             "wall_s")}, indent=1))
    ok = True
    for name, t in (("horovodrun", train), ("torchrun", torch_train)):
        if t["rc"] != 0 or not (a.dry_run or t["on_cuda"]):
            print(f"bench_gpu: error: the {name} training failed (rc {t['rc']}, on_cuda {t['on_cuda']})",
                  file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
