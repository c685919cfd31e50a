"""Segmentation quality on real KiTS19 anatomy: hpc-dfs beside nnU-Net v2 at equal wall-clock budgets, and the ablation.

    hpc-dfs bench quality                        # make quality: both sections, bench/results/quality.json
    hpc-dfs bench quality --quick                # the smoke run of the tests (4 + 2 cases, one small budget)
    .venv/bin/python bench/bench_quality.py [--sections curve,ablation] [--base-seconds S] [--budgets 1,3,9]
                                            [--unseen-budgets 1,3,9] [--eval-data DIR --out OUT] [--table]

CT is rendered by ``hpc-dfs synth --from-labels`` around real KiTS19 label maps (``../shared/data/kits19``;
the CT of KiTS19 cannot be had here): 12 fixed training cases and 20 disjoint validation cases, each scored
by ``hpc-dfs evaluate`` (3-D KiTS19 Dice, tumour detection) with its 95 % bootstrap interval over cases

- on the validation cases rendered by ``synth``'s default painter ("our renderer"), and
- on the same cases rendered in the held-out ``streak`` style, which no row trains on ("unseen renderer").

Sections (``--sections``):

- ``curve``: **hpc-dfs beside nnU-Net v2**, each given the same wall-clock training budget on the same 2
  cores, at ``--budgets`` (1x, 3x, 9x) of ``--base-seconds`` (60 s): the hpc-dfs cascade (locate + refine,
  FiLM, 2 ranks under ``mpirun``; half the budget per stage) and nnU-Net (``bench/nnunet_peer.py``: the
  real ``nnunetv2`` 2.8.1 in its own environment, our training cases and our fold 0 through
  ``hpc-dfs export-nnunet --shards``, a CPU-fitted 2d plan, nnU-Net's trainer stopped at the budget,
  ``nnUNetv2_predict``). The learning curve goes to ``quality_curve.png``.
- ``ablation``: the rest of the design at 3x the base budget (``ABLATION_X``): single stage, the fusion
  ablation (image only, late, FiLM with the clinical records shuffled as a control), domain randomisation,
  4x the training cases, 2.5D context 1 and 5, randomisation as augmentation only. A cascade row of the
  ablation trains exactly the steps and epochs of its reference (the FiLM cascade at 3x), so that it differs
  from it in one thing only, not also in what the calibration under the load of the moment planned; a
  single-stage row trains within the whole budget.

- ``robustness`` (not in the default sections): rows aimed at the unseen renderer, trained at the curve's largest
  budget and scored on both renders: the FiLM cascade trained on every training case twice, in the default look
  and in synth's randomised look (``train_mix``).

**How hpc-dfs keeps to a budget.** Each training configuration is first run for 3 short epochs (a
calibration, not counted), which gives its wall seconds per step and per validation. A budgeted run then keeps
the rows' recipe (10 epochs, 2 validations, batch 8 per rank, lr 0.002) and sets the steps per epoch so that
the epochs and validations fill the stage's half of the budget; an epoch stays within one pass over the
training slices, so a long budget trains more epochs instead. ``train_s`` is the time measured
(the epochs' span in ``metrics.jsonl``), not the plan. nnU-Net's ``train_s`` is its trainer's own measure
(``budget.json``). Neither counts process start-up, data loading before the first step, or prediction.

Every row of ``quality.json`` carries ``system`` (``hpc-dfs`` or ``nnunet``), ``budget_x``, ``budget_s``,
``train_s``, ``n_val_cases`` and, for ``kidney_dice``, ``tumor_dice`` and ``tumor_detection_rate``,
``{mean, ci95: [lo, hi], n}`` on our renderer; ``detection_by_size`` (< 10, 10-50, > 50 ml); and ``unseen``
with the same figures on the unseen renderer (None where ``--unseen-budgets`` left it out).
``--eval-data DIR --out OUT`` also predicts every case of a KiTS-layout folder (images with labels) with the
hpc-dfs cascade row that scored best on the validation renders, and with nnU-Net at the largest budget, and
puts ``eval_data`` into ``OUT/quality.json``. A second run reuses the finished steps in ``--work``; a finished curve
row that was not scored on the unseen renderer is scored there when a later run's ``--unseen-budgets`` has its
budget.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_report  # noqa: E402  (bench/ is not a package)
from nnunet_peer import CPU_PLAN, NnUNetPeer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LABELS = REPO.parent / "shared" / "data" / "kits19"

#: fixed, disjoint case lists (KiTS19 training cases with at most 110 slices, so that a CPU run fits)
TRAIN = ["case_00004", "case_00007", "case_00009", "case_00010", "case_00011", "case_00012", "case_00013",
         "case_00015", "case_00017", "case_00020", "case_00021", "case_00023"]
VAL = ["case_00034", "case_00035", "case_00037", "case_00039", "case_00041", "case_00106", "case_00107",
       "case_00108", "case_00109", "case_00110", "case_00113", "case_00117", "case_00119", "case_00121",
       "case_00122", "case_00126", "case_00127", "case_00129", "case_00130", "case_00134"]
#: four times the training cases (the first 48 such cases outside VAL; TRAIN are its first 12)
TRAIN_X4 = ["case_00004", "case_00007", "case_00009", "case_00010", "case_00011", "case_00012", "case_00013",
            "case_00015", "case_00017", "case_00020", "case_00021", "case_00023", "case_00024", "case_00025",
            "case_00028", "case_00030", "case_00038", "case_00044", "case_00045", "case_00048", "case_00050",
            "case_00051", "case_00054", "case_00055", "case_00056", "case_00057", "case_00058", "case_00061",
            "case_00062", "case_00064", "case_00065", "case_00069", "case_00070", "case_00074", "case_00075",
            "case_00076", "case_00077", "case_00080", "case_00083", "case_00085", "case_00087", "case_00088",
            "case_00089", "case_00090", "case_00092", "case_00094", "case_00097", "case_00099"]

#: what every hpc-dfs row trains with, but for the steps per epoch (set by the budget)
RECIPE = {
    "train": "--epochs 10 --batch-size 8 --lr 0.002 --set schedule.val_every=5",
    "model": "--set model.base_channels=8 --set model.norm=instance --num-workers 0 --seed 0",
    "slice_size": "96,96",
    "preprocess_refine": "--set refine.spacing=1.6 --set refine.slice_size=80,80 --set refine.margin_mm=12",
}
EPOCHS, VALIDATIONS = 10, 2
CALIBRATION = {"epochs": 3, "steps": 10}
BASE_SECONDS, BUDGETS, ABLATION_X = 60.0, (1, 3, 9), 3
#: the smoke run: the fewest slices (38-64 training, 34 and 43 validation), so that nnU-Net's 2d inference is short
QUICK = {"train": ["case_00004", "case_00007", "case_00010", "case_00021"], "val": ["case_00110", "case_00113"],
         "train_x4": TRAIN_X4[:8], "base_s": 10.0, "budgets": (1,),
         "calibration": {"epochs": 3, "steps": 2}, "nnunet_iters": 2}
DR_AUG = "--set augmentation.domain_random_prob=0.5"
MIX_ID_SHIFT = 90000   # the randomised copies of the training cases in ``train_mix``
FILM = "--set model.fusion=film"


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args: list[str], np_: int = 1, log: Path | None = None) -> float:
    """Run ``hpc-dfs ARGS`` (under mpirun when np_ > 1); returns its wall time. Exits on failure."""
    cmd = [sys.executable, "-m", "hpc_dfs", *args]
    if np_ > 1:
        cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
               "-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED", *cmd]
    t = time.perf_counter()
    print("[quality]", " ".join(args), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"[quality] failed ({res.returncode}): hpc-dfs {' '.join(args)}\n{res.stderr[-4000:]}")
    return time.perf_counter() - t


def _once(marker: Path, args: list[str], np_: int = 1, log: Path | None = None) -> float:
    """:func:`_run` unless ``marker`` exists (a finished step of an earlier run)."""
    return 0.0 if marker.exists() else _run(args, np_, log)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- data
class Data:
    """The renders and shards a run needs, made on first use (and kept in ``work`` for the next run)."""

    STYLES = {"train": ("train", "default"), "train_dr": ("train", "random"), "train_x4": ("train_x4", "default"),
              "val": ("val", "default"), "val_unseen": ("val", "streak")}

    def __init__(self, work: Path, cases: dict):
        self.work, self.cases = work, cases

    def render(self, name: str) -> Path:
        if name == "train_mix":
            return self._mix()
        ids, style = self.STYLES[name]
        d = self.work / name
        _once(d / "kits.json", ["synth", "--out", str(d), "--from-labels", str(LABELS / "labels"), "--kits-json",
                                str(LABELS / "kits.json"), "--cases", ",".join(self.cases[ids]),
                                "--set", f"style={style}"], 2)
        return d

    def _mix(self) -> Path:
        """Every training case twice, in the default look and in the randomised one (its case id + 90000).

        The folder links the two renders' case folders and holds both sets of records: domain randomisation
        as half the training data (SynthSeg trains on synthetic images only; the row ``train_dr`` does that).
        """
        d = self.work / "train_mix"
        if (d / "kits.json").exists():
            return d
        tmp = d.with_name(f".tmp-{d.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        records = []
        for src, shift in ((self.render("train"), 0), (self.render("train_dr"), MIX_ID_SHIFT)):
            for rec in json.loads((src / "kits.json").read_text()):
                new = f"case_{int(rec['case_id'][5:]) + shift:05d}"
                (tmp / new).symlink_to((src / rec["case_id"]).resolve(), target_is_directory=True)
                records.append({**rec, "case_id": new})
        (tmp / "kits.json").write_text(json.dumps(records, indent=1) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        return d

    def shards(self, name: str) -> Path:
        name = "train" if name == "train_aug" else name      # the same shards; only the augmentation differs
        d = self.work / f"shards_{name}"
        _once(d / "manifest.json", ["preprocess", "--data", str(self.render(name)), "--out", str(d), "--slice-size",
                                    RECIPE["slice_size"], *RECIPE["preprocess_refine"].split()], 2)
        return d


# ------------------------------------------------------------------------------------ hpc-dfs, budgeted
def _epoch_times(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_seconds(run: Path) -> float:
    """A run's training time: the span of its epoch ends plus one median epoch (the first epoch's own length)."""
    rows = _epoch_times(run)
    if len(rows) < 2:
        return 0.0
    gaps = sorted(b["time"] - a["time"] for a, b in zip(rows, rows[1:]))
    return rows[-1]["time"] - rows[0]["time"] + gaps[len(gaps) // 2]


def _train_run(run: Path, shards: Path, stage: str, args: list[str], epochs: int) -> None:
    from hpc_dfs.contracts import checkpoint
    last = run / "checkpoints" / "last.pt"
    if last.exists() and int(checkpoint.read_meta(last).get("epoch", 0)) >= epochs:
        return
    _run(["train", "--shards", str(shards), "--out", str(run), "--stage", stage, *args,
          *(["--resume"] if last.exists() else [])], 2, run / "train.log")


def calibrate(work: Path, shards: Path, stage: str, extra: str, cal: dict) -> dict:
    """Wall seconds per training step and per validation of one configuration, from a short run of its own.

    Three epochs, validated only at the end: epoch 2's wall time over its steps is the wall time of a step
    (loading, augmentation and the allreduce included, which the trainer's ``step_s`` leaves out), and what
    epoch 3 takes beyond its steps is a validation.
    """
    key = f"{stage}_{hashlib.sha256(f'{shards}|{extra}'.encode()).hexdigest()[:10]}"
    run = work / "calibration" / key
    args = (RECIPE["train"].split() + RECIPE["model"].split() + extra.split()
            + ["--steps-per-epoch", str(cal["steps"]), "--set", f"schedule.val_every={cal['epochs']}"])
    args[args.index("--epochs") + 1] = str(cal["epochs"])
    _train_run(run, shards, stage, args, cal["epochs"])
    t = [r["time"] for r in _epoch_times(run)]
    step_s = (t[1] - t[0]) / cal["steps"]
    slices = re.search(r"(\d+) training slices", (run / "train.log").read_text())
    per_step = 2 * int(RECIPE["train"].split("--batch-size ")[1].split()[0])    # 2 ranks x the batch per rank
    return {"step_s": step_s, "val_s": max(0.0, t[2] - t[1] - cal["steps"] * step_s), "run": str(run),
            "max_steps": int(slices.group(1)) // per_step if slices else 10**6}


def budget_plan(stage_s: float, cal: dict) -> tuple[int, int]:
    """(steps per epoch, epochs) that fill ``stage_s`` seconds with the steps and :data:`VALIDATIONS` validations.

    :data:`EPOCHS` epochs of as many steps as fit, while an epoch stays within one pass over the training slices
    (``cal["max_steps"]``); past that, more epochs of one pass each (a longer budget trains longer, as it would).
    """
    total = max(EPOCHS, int((stage_s - VALIDATIONS * cal["val_s"]) / cal["step_s"]))
    steps = min(max(1, total // EPOCHS), cal["max_steps"])
    return steps, max(EPOCHS, round(total / steps))


def train_budgeted(ctx: dict, name: str, stage: str, data_key: str, extra: str, budget_s: float,
                   plan: tuple[int, int] | None = None) -> tuple[Path, dict]:
    """Train one stage of an hpc-dfs row within ``budget_s`` seconds; returns its best checkpoint and facts.

    With ``plan`` (steps per epoch, epochs) the stage trains exactly that, not a calibrated plan: the ablation's
    rows train the steps of their reference, so that a row differs from it in one thing only.
    """
    shards = ctx["data"].shards(data_key)
    cal = None if plan else calibrate(ctx["work"], shards, stage, extra, ctx["calibration"])
    steps, epochs = plan or budget_plan(budget_s, cal)
    run = ctx["work"] / "runs" / name
    args = (RECIPE["train"].split() + RECIPE["model"].split() + extra.split()
            + ["--steps-per-epoch", str(steps), "--set", f"schedule.val_every={max(1, epochs // VALIDATIONS)}"])
    args[args.index("--epochs") + 1] = str(epochs)
    _train_run(run, shards, stage, args, epochs)
    return run / "checkpoints" / "best.pt", {"stage": stage, "steps_per_epoch": steps, "epochs": epochs,
                                             "calibration": cal, "plan": "the reference's" if plan else "budget",
                                             "train_s": round(train_seconds(run), 1), "budget_s": budget_s}


# -------------------------------------------------------------------------------------------- scoring
PER_CASE = ("kidney_dice", "tumor_dice")


def _figures(ev: Path) -> dict:
    """A row's figures from its ``eval.json``; ``per_case`` (each case's Dice) lets two rows be compared paired."""
    m = json.loads(ev.read_text())
    iv = m.get("intervals") or {}
    return {"n_val_cases": len(m["cases"]), "kidney_dice": iv.get("kidney_dice"), "tumor_dice": iv.get("tumor_dice"),
            "tumor_detection_rate": iv.get("tumor_detection_rate"), "detection_by_size": iv.get("detection_by_size"),
            "missing_predictions": m.get("missing_predictions", []),
            "per_case": {k: {c["case_id"]: c.get(k) for c in m["cases"]} for k in PER_CASE}}


PEER_SYSTEM = "nnunet"


def row_tag(system: str, name: str, budget_x: float) -> str:
    """The folder name of a row's predictions under ``WORK/pred``."""
    if system == PEER_SYSTEM:
        return f"nnunet_x{budget_x:g}"
    return f"{name}_x{budget_x:g}".replace(", ", "_").replace(" ", "-").replace("(", "").replace(")", "")


def backfill_per_case(work: Path, rows: list[dict]) -> None:
    """Give rows of an earlier run that predate ``per_case`` their per-case Dice, from their ``eval`` files."""
    for r in rows:
        for block, key in ((r, "val"), (r.get("unseen"), "val_unseen")):
            ev = work / "pred" / row_tag(r["system"], r["row"], r["budget_x"]) / f"eval_{key}.json"
            if block is not None and "per_case" not in block and ev.is_file():
                block["per_case"] = _figures(ev)["per_case"]


def evaluate(pred: Path, gt: Path, ev: Path) -> dict:
    _once(ev, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(ev), "--no-surface-metrics"])
    return _figures(ev)


def score_hpc(ctx: dict, tag: str, ckpts: list[str], data_key: str) -> dict:
    gt = ctx["data"].render(data_key)
    pred = ctx["work"] / "pred" / tag / data_key
    _once(pred / "summary.json", ["predict", *ckpts, "--input", str(gt), "--out", str(pred)], 2)
    return evaluate(pred, gt, pred.parent / f"eval_{data_key}.json")


def score_nnunet(ctx: dict, tag: str, data_key: str) -> dict:
    gt = ctx["data"].render(data_key)
    pred = ctx["peer"].predict(tag, gt, ctx["work"] / "pred" / f"nnunet_{tag}" / data_key)
    return evaluate(pred, gt, pred.parent / f"eval_{data_key}.json")


def score_unseen(ctx: dict, row: dict) -> dict:
    """The unseen renderer's figures for a finished row (its checkpoints, or nnU-Net's model of that budget)."""
    tag = row_tag(row["system"], row["row"], row["budget_x"])
    if row["system"] == PEER_SYSTEM:
        return score_nnunet(ctx, f"x{row['budget_x']:g}", "val_unseen")
    flags = ["--checkpoint", "--refine-checkpoint"]
    return score_hpc(ctx, tag, [x for pair in zip(flags, row["checkpoints"]) for x in pair], "val_unseen")


def _row(section: str, system: str, name: str, budget_x: float, ctx: dict, train_s: float, ours: dict,
         unseen: dict | None, **extra) -> dict:
    return {"section": section, "system": system, "row": name, "budget_x": budget_x,
            "budget_s": round(budget_x * ctx["base_s"], 1), "train_s": train_s, **ours, "unseen": unseen, **extra}


# ----------------------------------------------------------------------------------------------- rows
def hpc_row(ctx: dict, section: str, name: str, kind: str, data_key: str, extra: str, budget_x: float,
            plans: dict | None = None) -> dict:
    """Train (both stages of a cascade, half the budget each) and score one hpc-dfs row.

    ``plans`` (stage -> (steps per epoch, epochs)) replaces the budget's plan for those stages of a cascade.
    """
    plans = plans if kind == "cascade" and plans else {}
    aug = DR_AUG if data_key in ("train_dr", "train_aug") else ""
    budget = budget_x * ctx["base_s"]
    tag = row_tag("hpc-dfs", name, budget_x)
    stage_s = budget if kind == "locate" else budget / 2
    suffix = "" if data_key == "train" else f"_{data_key}"
    locate, f1 = train_budgeted(ctx, f"locate{suffix}_x{budget_x:g}_{'single' if kind == 'locate' else 'cascade'}",
                                "locate", data_key, aug, stage_s, plans.get("locate"))
    ckpts, stages = ["--checkpoint", str(locate)], [f1]
    if kind == "cascade":
        refine, f2 = train_budgeted(ctx, f"refine_{tag}", "refine", data_key, f"{aug} {extra}", stage_s,
                                    plans.get("refine"))
        ckpts += ["--refine-checkpoint", str(refine)]
        stages.append(f2)
    unseen = score_hpc(ctx, tag, ckpts, "val_unseen") if budget_x in ctx["unseen_budgets"] else None
    return _row(section, "hpc-dfs", name, budget_x, ctx, round(sum(s["train_s"] for s in stages), 1),
                score_hpc(ctx, tag, ckpts, "val"), unseen, stages=kind, training_data=data_key,
                n_train_cases=len(ctx["cases"]["train_x4" if data_key == "train_x4" else "train"]),
                settings=" ".join(x for x in (extra, aug) if x), stage_runs=stages, checkpoints=ckpts[1::2])


def nnunet_row(ctx: dict, budget_x: float) -> dict:
    tag = f"x{budget_x:g}"
    info = ctx["peer"].train(budget_x * ctx["base_s"], tag, ctx["nnunet_iters"])
    unseen = score_nnunet(ctx, tag, "val_unseen") if budget_x in ctx["unseen_budgets"] else None
    return _row("curve", "nnunet", "nnU-Net v2 2d (CPU-fitted plan)", budget_x, ctx, info["train_s"],
                score_nnunet(ctx, tag, "val"), unseen, stages="single (2d)", training_data="train",
                n_train_cases=len(ctx["cases"]["train"]), settings=json.dumps(CPU_PLAN), nnunet=info,
                model_dir=str(ctx["peer"].model_dir(tag)))


CASCADE = ("hpc-dfs cascade, FiLM", "cascade", "train", FILM)
ABLATION = [  # name, stage(s), training data, refine-stage settings; the fusion ablation first
    ("cascade, image only", "cascade", "train", "--set model.fusion=image"),
    ("cascade, late fusion", "cascade", "train", "--set model.fusion=late"),
    ("cascade, FiLM, clinical shuffled (control)", "cascade", "train", f"{FILM} --set data.shuffle_clinical=true"),
    ("single stage", "locate", "train", ""),
    ("single stage, domain randomised", "locate", "train_dr", ""),
    ("cascade, FiLM, domain randomised", "cascade", "train_dr", FILM),
    ("cascade, FiLM, 48 training cases", "cascade", "train_x4", FILM),
    ("cascade, FiLM, context 1", "cascade", "train", f"{FILM} --set data.context=1"),
    ("cascade, FiLM, context 5", "cascade", "train", f"{FILM} --set data.context=5"),
    ("cascade, FiLM, randomised augmentation only", "cascade", "train_aug", FILM),
]


ROBUSTNESS = [  # rows for the unseen renderer, at the curve's largest budget, scored on both renders
    ("cascade, FiLM, default + randomised renders", "cascade", "train_mix", FILM),
]


def _save(result: dict, out_dir: Path) -> None:
    """``quality.json`` (atomically, after every row: an interrupted run keeps what it finished) and its report."""
    _write_json(out_dir / "quality.json", result)
    quality_report.write(result, out_dir)


def run_sections(ctx: dict, result: dict, sections: list[str], max_rows: int | None) -> None:
    rows, done = result["rows"], {(r["row"], r["budget_x"]) for r in result["rows"]}

    def add(make, key):
        if key not in done:
            rows.append({**make(), "load_avg_after": [round(x, 2) for x in os.getloadavg()]})
            done.add(key)
            r = rows[-1]
            print(f"[quality] {r['system']} {r['row']} x{r['budget_x']:g}: train {r['train_s']} s, kidney "
                  f"{(r['kidney_dice'] or {}).get('mean')}, tumour {(r['tumor_dice'] or {}).get('mean')}", flush=True)
            _save(result, ctx["out"])
    if "curve" in sections:
        ctx["peer"].prepare(ctx["data"].render("train"), ctx["data"].shards("train"))
        for b in ctx["budgets"]:
            add(lambda b=b: hpc_row(ctx, "curve", *CASCADE, b), (CASCADE[0], b))
            add(lambda b=b: nnunet_row(ctx, b), ("nnU-Net v2 2d (CPU-fitted plan)", b))
        for r in rows:   # a row of an earlier run that skipped the unseen renderer at a budget now asked for
            if r["section"] == "curve" and r.get("unseen") is None and r["budget_x"] in ctx["unseen_budgets"]:
                r["unseen"] = score_unseen(ctx, r)
                print(f"[quality] {r['system']} x{r['budget_x']:g} on the unseen renderer: kidney "
                      f"{(r['unseen']['kidney_dice'] or {}).get('mean')}", flush=True)
                _save(result, ctx["out"])
    if "robustness" in sections:
        top = max(ctx["budgets"])
        ctx["unseen_budgets"] = tuple(sorted({*ctx["unseen_budgets"], top}))
        for name, kind, key, extra in ROBUSTNESS:
            add(lambda r=(name, kind, key, extra): hpc_row(ctx, "robustness", *r, top), (name, top))
    if "ablation" in sections:
        chosen = ABLATION[:max_rows] if max_rows else ABLATION
        result["ablation_rows_not_run"] = [r[0] for r in ABLATION[len(chosen):]]
        add(lambda: hpc_row(ctx, "ablation", *CASCADE, ABLATION_X), (CASCADE[0], ABLATION_X))
        ref = next(r for r in rows if r["row"] == CASCADE[0] and r["budget_x"] == ABLATION_X)
        plans = {s["stage"]: (s["steps_per_epoch"], s["epochs"]) for s in ref["stage_runs"]}
        for name, kind, key, extra in chosen:   # a cascade row trains its reference's steps; a single stage, its budget
            add(lambda r=(name, kind, key, extra): hpc_row(ctx, "ablation", *r, ABLATION_X, plans), (name, ABLATION_X))


def eval_data(ctx: dict, result: dict, data: Path) -> None:
    """Predict and score a KiTS-layout folder with the best hpc-dfs cascade row and nnU-Net's largest budget."""
    cascades = [r for r in result["rows"] if r["system"] == "hpc-dfs" and r["stages"] == "cascade"]
    best = max(cascades, key=quality_report.selection_score)
    ckpts = ["--checkpoint", best["checkpoints"][0], "--refine-checkpoint", best["checkpoints"][1]]
    pred = ctx["out"] / "eval_data"
    _run(["predict", *ckpts, "--input", str(data), "--out", str(pred)], 2)
    out = {"path": str(data), "hpc-dfs": {"row": best["row"], "budget_x": best["budget_x"],
                                         **evaluate(pred, data, ctx["out"] / "eval_data.json")},
           "selection": "the hpc-dfs cascade row with the highest mean of kidney and tumour Dice over both "
                        "validation renders (ours and unseen, where scored)"}
    peers = [r for r in result["rows"] if r["system"] == "nnunet"]
    if peers:
        top = max(peers, key=lambda r: r["budget_x"])
        npred = ctx["peer"].predict(f"x{top['budget_x']:g}", data, ctx["out"] / "eval_data_nnunet")
        out["nnunet"] = {"budget_x": top["budget_x"], **evaluate(npred, data, ctx["out"] / "eval_data_nnunet.json")}
    result["eval_data"] = out


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 training and 2 validation cases, budget 1x of 10 s, "
                                                         "the curve only: a smoke run, not a result")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work_quality", help="working folder (reused)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where quality.json goes")
    ap.add_argument("--sections", default=None,
                    help="curve,ablation,robustness (default curve,ablation; --quick: curve)")
    ap.add_argument("--base-seconds", type=float, default=None, help=f"the 1x budget (default {BASE_SECONDS:g} s)")
    ap.add_argument("--budgets", default=None, help="budget multiples of the curve (default 1,3,9)")
    ap.add_argument("--unseen-budgets", default=None,
                    help="the budgets also scored on the unseen renderer (default: every budget)")
    ap.add_argument("--eval-data", type=Path, default=None, help="also predict and score this KiTS-layout folder")
    ap.add_argument("--max-rows", type=int, default=None, metavar="K",
                    help="only the first K ablation rows (the fusion ablation is the first 3)")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of OUT/quality.json and exit")
    a = ap.parse_args()
    if a.table:
        print(quality_report.markdown(json.loads((a.out / "quality.json").read_text())))
        return
    if not (LABELS / "labels").is_dir():
        raise SystemExit(f"[quality] needs the real KiTS19 label maps in {LABELS / 'labels'}")
    q = a.quick
    cases = {"train": QUICK["train"] if q else TRAIN, "val": QUICK["val"] if q else VAL,
             "train_x4": QUICK["train_x4"] if q else TRAIN_X4}
    budgets = _floats(a.budgets) if a.budgets else (QUICK["budgets"] if q else BUDGETS)
    sections = (a.sections or ("curve" if q else "curve,ablation")).split(",")
    work = a.work / ("quick" if q else "full")
    ctx = {"work": work, "out": a.out, "cases": cases, "data": Data(work, cases), "budgets": budgets,
           "base_s": a.base_seconds or (QUICK["base_s"] if q else BASE_SECONDS),
           "unseen_budgets": _floats(a.unseen_budgets) if a.unseen_budgets else budgets,
           "calibration": QUICK["calibration"] if q else CALIBRATION, "peer": NnUNetPeer(work / "nnunet"),
           "nnunet_iters": QUICK["nnunet_iters"] if q else CPU_PLAN["iterations_per_epoch"]}
    t0 = time.perf_counter()
    old = a.out / "quality.json"
    prior = json.loads(old.read_text()) if old.exists() else {}
    same = prior.get("quick") == q and prior.get("base_s") == ctx["base_s"] and prior.get("schema") == 2
    result = {"schema": 2, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
              "no GPU", "quick": q, "base_s": ctx["base_s"], "budgets": list(budgets),
              "unseen_budgets": list(ctx["unseen_budgets"]), "ablation_x": ABLATION_X, "cases": cases,
              "recipe": RECIPE, "epochs": EPOCHS, "validations": VALIDATIONS, "calibration": ctx["calibration"],
              "nnunet_plan": CPU_PLAN, "domain_randomisation": f"training CT in synth style 'random' + {DR_AUG}",
              "unseen_renderer": "synth style 'streak' (never trained on)",
              "rows": prior.get("rows", []) if same else [], "load_avg_start": os.getloadavg()}
    backfill_per_case(work, result["rows"])
    run_sections(ctx, result, sections, a.max_rows)
    if a.eval_data is not None:
        eval_data(ctx, result, a.eval_data)
    result["wall_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
    result["load_avg_end"] = os.getloadavg()
    _save(result, a.out)
    print(f"[quality] wrote {a.out / 'quality.json'} in {result['wall_seconds_this_invocation']} s", flush=True)


if __name__ == "__main__":
    main()
