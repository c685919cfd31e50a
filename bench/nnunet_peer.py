"""nnU-Net v2 as the peer row of ``bench quality``: the real package, our split, a CPU-fitted plan, a budget.

    from nnunet_peer import NnUNetPeer
    peer = NnUNetPeer(work / "nnunet")
    peer.prepare(train_data, shards)                  # export, fingerprint, plan, CPU plan, preprocess, split
    info = peer.train(budget_s=60, tag="x1")           # nnUNetv2_train ... -tr nnUNetTrainerBudget
    peer.predict("x1", val_data, out_dir)              # nnUNetv2_predict -> case_XXXXX.nii.gz

Every nnU-Net step is its own command-line tool, run from the peer environment ``bench/.venv-nnunet``
(``bench/nnunet_venv.sh`` makes it: nnunetv2 2.8.1 on the CPU torch of ``.venv``):

1. ``hpc-dfs export-nnunet --data TRAIN --out nnUNet_raw/Dataset501_HpcDfsQuality --shards SHARDS``: the
   training cases, byte for byte, and ``splits_final.json`` from the manifest's folds (copied to
   ``nnUNet_preprocessed``), so that nnU-Net's fold 0 holds out exactly the cases hpc-dfs's fold 0 does.
2. ``nnUNetv2_extract_fingerprint --verify_dataset_integrity`` and ``nnUNetv2_plan_experiment``: nnU-Net's own
   plans. Then the **CPU-fitted plan** :data:`CPU_PLAN`, a configuration ``2d_cpu`` that inherits nnU-Net's
   ``2d`` (normalisation, network blocks, features per stage) and changes only what the CPU budget needs:
   in-plane spacing 2 mm (nnU-Net's 2d plan keeps the native ~0.8 mm, 512x512 slices), patch 224x224
   (one window covers a slice at 2 mm), batch 2 (nnU-Net's plan: 12), and as many stages as that patch
   allows (6, pooling to 7x7), as nnU-Net's planner derives them.
   ``nnUNetv2_preprocess -c 2d_cpu`` then resamples the data to it.
3. ``nnUNetv2_train 501 2d_cpu 0 -tr nnUNetTrainerBudget -device cpu``: nnU-Net's trainer with a wall-clock
   budget (``bench/nnunet_budget_trainer.py``), and one background augmentation process
   (``nnUNet_n_proc_DA=1``) beside the training process on the 2 cores.
4. ``nnUNetv2_predict ... -chk checkpoint_final.pth --disable_tta``: nnU-Net's sliding-window predictor
   (mirroring off, as hpc-dfs predicts without TTA by default), writing ``case_XXXXX.nii.gz``, which
   ``hpc-dfs evaluate`` scores as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = Path(os.environ.get("NNUNET_VENV", REPO / "bench" / ".venv-nnunet"))
DATASET = "Dataset501_HpcDfsQuality"
DATASET_ID = "501"
CONFIG = "2d_cpu"
TRAINER = "nnUNetTrainerBudget"
#: the CPU-fitted plan (see the module docstring): what differs from nnU-Net's own 2d configuration
CPU_PLAN = {"in_plane_spacing_mm": 2.0, "patch_size": [224, 224], "batch_size": 2, "n_stages": 6,
            "augmentation_processes": 1, "iterations_per_epoch": 25, "tta": False}


def _log(msg: str) -> None:
    print(f"[quality:nnunet] {msg}", flush=True)


class NnUNetPeer:
    """The nnU-Net peer's folders and steps (every step skips itself when its output is there).

    Args:
        root: the peer's working folder (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` under it).
    """

    def __init__(self, root: Path):
        self.root = root
        self.raw = root / "nnUNet_raw"
        self.pre = root / "nnUNet_preprocessed"

    def _env(self, results: Path | None = None) -> dict:
        env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                   nnUNet_results=str(results or self.root / "nnUNet_results"),
                   nnUNet_n_proc_DA=str(CPU_PLAN["augmentation_processes"]), PYTHONUNBUFFERED="1")
        env["PATH"] = f"{PEER_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("OMP_NUM_THREADS", None)     # nnUNetv2_train sets torch's threads to the cores itself
        return env

    def _run(self, args: list[str], log: Path, env: dict | None = None) -> float:
        log.parent.mkdir(parents=True, exist_ok=True)
        _log(" ".join(args))
        t = time.perf_counter()
        with open(log, "a") as f:
            res = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env or self._env(), cwd=REPO)
        if res.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"[quality:nnunet] failed ({res.returncode}): {' '.join(args)}\n{tail}")
        return time.perf_counter() - t

    # ---------------------------------------------------------------------------------------------- set-up
    def ensure_venv(self) -> None:
        """Make ``bench/.venv-nnunet`` (pinned nnunetv2) and put the budget trainer where nnU-Net finds trainers."""
        subprocess.run(["bash", str(REPO / "bench" / "nnunet_venv.sh")], check=True,
                       env=dict(os.environ, BASE_PY=sys.executable, NNUNET_VENV=str(PEER_VENV)))
        site = subprocess.run([str(PEER_VENV / "bin" / "python"), "-c",
                               "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        # beside nnUNetTrainer.py, not in a subpackage: nnU-Net's trainer lookup imports the modules of this folder
        # before its subpackages, and its primus subpackage imports timm -> torchvision, whose PyPI wheel is a
        # CUDA build that cannot load beside the CPU torch (RuntimeError: operator torchvision::nms does not exist)
        dest = Path(site) / "training" / "nnUNetTrainer"
        for name, text in (("nnunet_budget_trainer.py", (REPO / "bench" / "nnunet_budget_trainer.py").read_text()),):
            if not (dest / name).exists() or (dest / name).read_text() != text:
                tmp = dest / f".tmp-{name}"
                tmp.write_text(text)
                os.replace(tmp, dest / name)

    def prepare(self, train_data: Path, shards: Path) -> None:
        """Export our training cases and split, plan with nnU-Net, add the CPU plan, preprocess it."""
        self.ensure_venv()
        logs = self.root / "logs"
        raw = self.raw / DATASET
        if not (raw / "dataset.json").exists():
            self._run([sys.executable, "-m", "hpc_dfs", "export-nnunet", "--data", str(train_data),
                       "--out", str(raw), "--shards", str(shards)], logs / "export.log", env=dict(os.environ))
        plans = self.pre / DATASET / "nnUNetPlans.json"
        if not plans.exists():
            self._run(["nnUNetv2_extract_fingerprint", "-d", DATASET_ID, "-np", "2", "--verify_dataset_integrity"],
                      logs / "fingerprint.log")
            self._run(["nnUNetv2_plan_experiment", "-d", DATASET_ID], logs / "plan.log")
        self._add_cpu_plan(plans)
        shutil.copyfile(raw / "splits_final.json", self.pre / DATASET / "splits_final.json")
        done = self.root / f".preprocessed_{CONFIG}"      # not in nnU-Net's folder: it reads every file there
        if not done.exists():
            self._run(["nnUNetv2_preprocess", "-d", DATASET_ID, "-c", CONFIG, "-np", "2"], logs / "preprocess.log")
            done.write_text("")

    @staticmethod
    def _add_cpu_plan(plans_path: Path) -> None:
        """Add the ``2d_cpu`` configuration to nnU-Net's plans (inheriting ``2d``; see :data:`CPU_PLAN`)."""
        plans = json.loads(plans_path.read_text())
        base = plans["configurations"]["2d"]
        arch = json.loads(json.dumps(base["architecture"]))
        kw, n = arch["arch_kwargs"], CPU_PLAN["n_stages"]
        kw["n_stages"] = n
        for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
            kw[key] = kw[key][:n]
        kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:n - 1]
        z = base["spacing"][0] if len(base["spacing"]) == 3 else None
        spacing = ([z] if z is not None else []) + [CPU_PLAN["in_plane_spacing_mm"]] * 2
        cfg = {"inherits_from": "2d", "data_identifier": f"nnUNetPlans_{CONFIG}", "spacing": spacing,
               "patch_size": CPU_PLAN["patch_size"], "batch_size": CPU_PLAN["batch_size"], "architecture": arch}
        if plans["configurations"].get(CONFIG) != cfg:
            plans["configurations"][CONFIG] = cfg
            tmp = plans_path.with_name(".tmp-" + plans_path.name)
            tmp.write_text(json.dumps(plans, indent=2))
            os.replace(tmp, plans_path)

    # ------------------------------------------------------------------------------------- train, predict
    def results(self, tag: str) -> Path:
        return self.root / f"results_{tag}"

    def model_dir(self, tag: str) -> Path:
        return self.results(tag) / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}" / "fold_0"

    def train(self, budget_s: float, tag: str, iters: int = CPU_PLAN["iterations_per_epoch"]) -> dict:
        """Train fold 0 within ``budget_s`` seconds (skipped when done); returns the trainer's ``budget.json``.

        Args:
            budget_s: the wall-clock training budget.
            tag: names the model (``results_TAG``).
            iters: training iterations per epoch (the stop is checked at epoch ends).
        """
        done = self.model_dir(tag) / "budget.json"
        if not done.exists():
            env = self._env(self.results(tag))
            env["HPC_DFS_BUDGET_S"] = str(budget_s)
            env["HPC_DFS_NNUNET_ITERS"] = str(iters)
            if self.model_dir(tag).exists():      # an interrupted run: start it again (nnU-Net resumes by epoch)
                shutil.rmtree(self.model_dir(tag))
            self._run(["nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-device", "cpu"],
                      self.root / "logs" / f"train_{tag}.log", env)
        return json.loads(done.read_text())

    def predict(self, tag: str, data: Path, out: Path) -> Path:
        """Predict every case of a KiTS-layout folder with the ``tag`` model into ``out`` (``case_XXXXX.nii.gz``)."""
        if (out / ".done").exists():
            return out
        images = out.parent / f"{out.name}_imagesTs"
        images.mkdir(parents=True, exist_ok=True)
        for case in sorted(p for p in data.glob("case_*") if p.is_dir()):
            link = images / f"{case.name}_0000.nii.gz"
            if not link.exists():
                link.symlink_to((case / "imaging.nii.gz").resolve())
        self._run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", DATASET_ID, "-c", CONFIG,
                   "-tr", TRAINER, "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_tta",
                   "-npp", "1", "-nps", "1"], self.root / "logs" / f"predict_{tag}_{data.name}.log",
                  self._env(self.results(tag)))
        (out / ".done").write_text("")
        return out
