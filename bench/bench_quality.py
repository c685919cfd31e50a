"""Segmentation quality on real KiTS19 anatomy: single stage vs cascade, +- domain randomisation, fusion ablation.

    .venv/bin/python bench/bench_quality.py [--quick] [--work DIR] [--eval-data DIR --out OUT]
    hpc-dfs bench quality                 # the same, through the CLI (``make quality``)

CT is rendered by ``hpc-dfs synth --from-labels`` around the real KiTS19 label maps in
``../shared/data/kits19/labels`` (the CT of KiTS19 cannot be had here), for a fixed list of training cases
and a disjoint fixed list of validation cases. Every row is trained within the stated CPU budget on 2 ranks
(``mpirun -np 2``), predicted and scored with ``hpc-dfs evaluate`` (3-D KiTS19 Dice):

- on the validation cases rendered by ``synth``'s default painter ("our renderer"), and
- on the same cases rendered in the held-out ``streak`` style, which no row trains on ("unseen renderer").

Rows: single stage (``--stage locate`` alone) and cascade (``locate`` + ``refine``), each without and with
domain randomisation (training CT rendered in ``synth``'s ``random`` style *and* the SynthSeg-style
augmentation, ``augmentation.domain_random_prob``); for the cascade, the fusion ablation on the same cases and
budget: image-only, FiLM, late, and FiLM trained with the clinical records shuffled across cases (a control
that must not beat FiLM if fusion is real); the FiLM cascade trained for the same number of steps on 4x the
training cases (48: does the data or the budget limit it?); with stage 2's 2.5D context at k = 1 and 5 slices
(the default, 3, is the "cascade, FiLM" row); and with the randomisation as augmentation only, on the
default-style training CT.

``--eval-data DIR --out OUT`` also predicts every case of a KiTS-layout folder (images with labels) with the
cascade row that scored best on the validation renders (mean kidney and tumour Dice over both), writes
``OUT/eval_data/prediction_XXXXX.nii.gz`` and puts
``eval_data: {n_cases, kidney_dice, tumor_dice}`` into ``OUT/quality.json``.

Writes ``bench/results/quality.json`` (or ``OUT/quality.json``). A second run reuses finished steps in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LABELS = REPO.parent / "shared" / "data" / "kits19"

#: fixed, disjoint case lists (KiTS19 training cases with at most 110 slices, so that a CPU run fits)
TRAIN = ["case_00004", "case_00007", "case_00009", "case_00010", "case_00011", "case_00012", "case_00013",
         "case_00015", "case_00017", "case_00020", "case_00021", "case_00023"]
VAL = ["case_00034", "case_00035", "case_00037", "case_00039", "case_00041"]
#: four times the training cases (the first 48 such cases outside VAL; TRAIN are its first 12), trained for the
#: same number of steps as the other rows: does the budget or the data limit the tumour Dice?
TRAIN_X4 = ["case_00004", "case_00007", "case_00009", "case_00010", "case_00011", "case_00012", "case_00013",
            "case_00015", "case_00017", "case_00020", "case_00021", "case_00023", "case_00024", "case_00025",
            "case_00028", "case_00030", "case_00038", "case_00044", "case_00045", "case_00048", "case_00050",
            "case_00051", "case_00054", "case_00055", "case_00056", "case_00057", "case_00058", "case_00061",
            "case_00062", "case_00064", "case_00065", "case_00069", "case_00070", "case_00074", "case_00075",
            "case_00076", "case_00077", "case_00080", "case_00083", "case_00085", "case_00087", "case_00088",
            "case_00089", "case_00090", "case_00092", "case_00094", "case_00097", "case_00099"]
#: steps per epoch of the TRAIN rows (39 locate, 40 refine at 12 cases), given to the TRAIN_X4 row
X4_STEPS = "--steps-per-epoch 40"

#: the CPU budget: what every row is trained with (stated in the JSON and the README table)
BUDGET = {
    "locate": "--epochs 10 --batch-size 8 --lr 0.002",
    "refine": "--epochs 10 --batch-size 8 --lr 0.002",
    "model": "--set model.base_channels=8 --set model.norm=instance --num-workers 0 --seed 0",
    "slice_size": "96,96",
    "preprocess_refine": "--set refine.spacing=1.6 --set refine.slice_size=80,80 --set refine.margin_mm=12",
}
#: the smoke run: its 8 "x4" cases give fewer batches per epoch than the full run's 40 steps
QUICK = {"train": TRAIN[:4], "val": VAL[:2], "train_x4": TRAIN_X4[:8], "epochs": 2, "x4_steps": "--steps-per-epoch 8"}
DR_AUG = "--set augmentation.domain_random_prob=0.5"


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


def render(work: Path, cases: dict) -> dict[str, Path]:
    """The five renders: training (default, random style; 4x the cases) and validation (default, held-out streak)."""
    out = {}
    for name, ids, style in (("train", cases["train"], "default"), ("train_dr", cases["train"], "random"),
                             ("train_x4", cases["train_x4"], "default"),
                             ("val", cases["val"], "default"), ("val_unseen", cases["val"], "streak")):
        d = work / name
        _once(d / "kits.json", ["synth", "--out", str(d), "--from-labels", str(LABELS / "labels"), "--kits-json",
                                str(LABELS / "kits.json"), "--cases", ",".join(ids), "--set", f"style={style}"], 2)
        out[name] = d
    return out


def preprocess(work: Path, data: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for name in ("train", "train_dr", "train_x4"):
        d = work / f"shards_{name}"
        _once(d / "manifest.json", ["preprocess", "--data", str(data[name]), "--out", str(d), "--slice-size",
                                    BUDGET["slice_size"], *BUDGET["preprocess_refine"].split()], 2)
        out[name] = d
    out["train_aug"] = out["train"]   # the same shards; only the augmentation differs
    return out


def _train_seconds(run: Path) -> float:
    """Training wall time of a run: the median epoch (between consecutive epoch ends) times the epochs.

    The median, not the span, so that a run stopped and resumed later (its pause between two epoch ends)
    is not counted as training time.
    """
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        return 0.0
    gaps = sorted(b["time"] - a["time"] for a, b in zip(rows, rows[1:]))
    return gaps[len(gaps) // 2] * len(rows)


def _finished(last: Path, epochs: int) -> bool:
    from hpc_dfs.contracts import checkpoint
    return last.exists() and int(checkpoint.read_meta(last).get("epoch", 0)) >= epochs


def _train(work: Path, shards: Path, name: str, stage: str, extra: str, epochs: int | None) -> tuple[Path, float]:
    """Train one stage into ``work/runs/name`` (resumed when an earlier run was stopped part-way)."""
    run = work / "runs" / name
    args = BUDGET[stage].split() + BUDGET["model"].split() + extra.split()
    if epochs is not None:
        args[args.index("--epochs") + 1] = str(epochs)
    last = run / "checkpoints" / "last.pt"
    if not _finished(last, int(args[args.index("--epochs") + 1])):
        _run(["train", "--shards", str(shards), "--out", str(run), "--stage", stage, *args,
              *(["--resume"] if last.exists() else [])], 2, run / "train.log")
    return run / "checkpoints" / "best.pt", _train_seconds(run)


ROWS = [  # name, stage(s), training data, refine-stage extra settings (the ablation first, then the DR rows)
    ("single stage", "locate", "train", ""),
    ("cascade, FiLM", "cascade", "train", "--set model.fusion=film"),
    ("cascade, image only", "cascade", "train", "--set model.fusion=image"),
    ("cascade, late fusion", "cascade", "train", "--set model.fusion=late"),
    ("cascade, FiLM, clinical shuffled (control)", "cascade", "train", "--set model.fusion=film "
                                                                       "--set data.shuffle_clinical=true"),
    ("single stage, domain randomised", "locate", "train_dr", ""),
    ("cascade, FiLM, domain randomised", "cascade", "train_dr", "--set model.fusion=film"),
    # the same steps over 4x the training cases (both stages): data or budget?
    ("cascade, FiLM, 48 training cases", "cascade", "train_x4", "--set model.fusion=film"),
    # stage 2's 2.5D context k (slices per input; the default is 3): the measurement behind that default
    ("cascade, FiLM, context 1", "cascade", "train", "--set model.fusion=film --set data.context=1"),
    ("cascade, FiLM, context 5", "cascade", "train", "--set model.fusion=film --set data.context=5"),
    # the randomisation as augmentation only, on default-style training CT (half the samples keep their look)
    ("cascade, FiLM, randomised augmentation only", "cascade", "train_aug", "--set model.fusion=film"),
]
#: per training set: what is randomised, and (suffix of its stage-1 run, settings added to both stages)
RANDOMISATION = {"train": "none", "train_x4": "none", "train_dr": "random-style training CT + augmentation",
                 "train_aug": "augmentation only (default-style training CT)"}
DATA_SETTINGS = {"train": ("", ""), "train_dr": ("_dr", DR_AUG), "train_x4": ("_x4", X4_STEPS),
                 "train_aug": ("_aug", DR_AUG)}


def _score(work: Path, tag: str, ckpts: list[str], data: Path) -> dict:
    pred = work / "pred" / tag / data.name
    _once(pred / "summary.json", ["predict", *ckpts, "--input", str(data), "--out", str(pred)], 2)
    ev = pred.parent / f"eval_{data.name}.json"
    _once(ev, ["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(ev), "--no-surface-metrics"])
    m = json.loads(ev.read_text())
    mean = m.get("mean_all") or m["mean"]
    return {"n_cases": len(m["cases"]), "kidney_dice": mean.get("kidney_dice"), "tumor_dice": mean.get("tumor_dice"),
            "tumors_hit": sum(c.get("n_tumors_hit", 0) for c in m["cases"]),
            "tumors_gt": sum(c.get("n_tumors_gt", 0) for c in m["cases"])}


def _selection_score(row: dict) -> float:
    """Mean kidney and tumour Dice over both validation renders: how ``--eval-data`` picks its cascade row."""
    vals = [row[k][m] for k in ("ours", "unseen") for m in ("kidney_dice", "tumor_dice")]
    return sum(v or 0.0 for v in vals) / len(vals)


def _write(result: dict, out_dir: Path) -> None:
    """``quality.json`` atomically (after every row, so an interrupted run leaves the rows it finished)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".tmp-quality.json"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / "quality.json")


def rows(work: Path, data: dict, shards: dict, epochs: int | None, result: dict, out_dir: Path,
         max_rows: int | None = None) -> list[dict]:
    """Train and score every row (stage-1 models are shared by the rows that use them), saving as it goes."""
    out = result.setdefault("rows", [])
    chosen = ROWS[:max_rows] if max_rows else ROWS
    result["rows_not_run"] = [r[0] for r in ROWS[len(chosen):]]
    for name, kind, key, extra in chosen:
        suffix, aug = DATA_SETTINGS[key]
        dr = key in ("train_dr", "train_aug")
        locate, t1 = _train(work, shards[key], f"locate{suffix}", "locate", aug, epochs)
        ckpts, t2 = ["--checkpoint", str(locate)], 0.0
        if kind == "cascade":
            tag = name.replace(", ", "_").replace(" ", "-").replace("(", "").replace(")", "")
            refine, t2 = _train(work, shards[key], f"refine_{tag}", "refine", f"{aug} {extra}", epochs)
            ckpts += ["--refine-checkpoint", str(refine)]
        tag = name.replace(", ", "_").replace(" ", "-").replace("(", "").replace(")", "")
        row = {"row": name, "stages": kind, "domain_randomised": dr, "randomisation": RANDOMISATION[key],
               "n_train_cases": len(result["cases"][key]),
               "settings": " ".join(x for x in (extra or "--set model.fusion=film", aug) if x),
               "train_seconds": round(t1 + t2, 1), "checkpoints": ckpts[1::2],
               "ours": _score(work, tag, ckpts, data["val"]), "unseen": _score(work, tag, ckpts, data["val_unseen"])}
        print(f"[quality] {name}: ours {row['ours']}, unseen {row['unseen']}", flush=True)
        out.append(row)
        _write(result, out_dir)
    return out


def markdown(result: dict) -> str:
    """The README table of a ``quality.json`` (so the table and the JSON cannot disagree)."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| row | training cases | ours: kidney Dice | ours: tumour Dice | ours: tumours hit | "
             "unseen renderer: kidney | unseen: tumour | unseen: tumours hit | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, u = r["ours"], r["unseen"]
        lines.append(f"| {r['row']} | {r.get('n_train_cases', len(result['train_cases']))} | "
                     f"{f(o['kidney_dice'])} | {f(o['tumor_dice'])} | "
                     f"{o['tumors_hit']}/{o['tumors_gt']} | {f(u['kidney_dice'])} | {f(u['tumor_dice'])} | "
                     f"{u['tumors_hit']}/{u['tumors_gt']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK['train'])} training cases, "
                                                         f"{QUICK['epochs']} epochs: a smoke run, not a result")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work_quality", help="working folder (reused)")
    ap.add_argument("--eval-data", type=Path, default=None, help="also predict and score this KiTS-layout folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where quality.json goes")
    ap.add_argument("--table", action="store_true", help="print the markdown table of OUT/quality.json and exit")
    ap.add_argument("--max-rows", type=int, default=None, metavar="K",
                    help="run only the first K rows (the ablation comes first; the domain-randomised rows last)")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads((a.out / "quality.json").read_text())))
        return
    if not (LABELS / "labels").is_dir():
        raise SystemExit(f"[quality] needs the real KiTS19 label maps in {LABELS / 'labels'}")
    cases = ({"train": QUICK["train"], "val": QUICK["val"], "train_x4": QUICK["train_x4"]} if a.quick
             else {"train": TRAIN, "val": VAL, "train_x4": TRAIN_X4})
    cases["train_dr"] = cases["train_aug"] = cases["train"]
    work = a.work / ("quick" if a.quick else "full")
    t0 = time.perf_counter()
    data = render(work, cases)
    shards = preprocess(work, data)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, no GPU",
              "quick": a.quick, "train_cases": cases["train"], "val_cases": cases["val"],
              "x4_settings": QUICK["x4_steps"] if a.quick else X4_STEPS, "budget": BUDGET, "cases": cases,
              "domain_randomisation": f"training CT in synth style 'random' + {DR_AUG}",
              "unseen_renderer": "synth style 'streak' (never trained on)", "complete": False, "rows": []}
    if a.quick:
        DATA_SETTINGS["train_x4"] = ("_x4", QUICK["x4_steps"])
    rows(work, data, shards, QUICK["epochs"] if a.quick else None, result, a.out, a.max_rows)
    if a.eval_data is not None:
        best = max((r for r in result["rows"] if r["stages"] == "cascade"), key=_selection_score)
        result["eval_data_row"] = best["row"]
        result["eval_data_selection"] = ("the cascade row with the highest mean of kidney and tumour Dice over both "
                                         "validation renders (ours and unseen)")
        ckpts = ["--checkpoint", best["checkpoints"][0], "--refine-checkpoint", best["checkpoints"][1]]
        pred = a.out / "eval_data"
        _run(["predict", *ckpts, "--input", str(a.eval_data), "--out", str(pred)], 2)
        _run(["evaluate", "--pred", str(pred), "--gt", str(a.eval_data), "--out", str(a.out / "eval_data.json"),
              "--no-surface-metrics"])
        m = json.loads((a.out / "eval_data.json").read_text())
        mean = m.get("mean_all") or m["mean"]
        result["eval_data"] = {"n_cases": len(m["cases"]), "kidney_dice": mean.get("kidney_dice"),
                               "tumor_dice": mean.get("tumor_dice"), "path": str(a.eval_data)}
    result["wall_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)  # finished steps are reused
    result["complete"] = not result["rows_not_run"]
    _write(result, a.out)
    print(f"[quality] wrote {a.out / 'quality.json'} in {result['wall_seconds_this_invocation']} s", flush=True)


if __name__ == "__main__":
    main()
