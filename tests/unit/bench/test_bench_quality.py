"""``bench quality``: hpc-dfs beside the real nnU-Net v2 at equal budgets, with intervals; its report and plot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))
import bench_quality  # noqa: E402
import quality_report  # noqa: E402


def _fig(mean, lo, hi, **kw):
    return {"mean": mean, "ci95": [lo, hi], "n": 20, **kw}


def _result():
    def row(system, b, kid, tum, unseen=True):
        r = {"section": "curve", "system": system, "row": system, "budget_x": b, "budget_s": 60.0 * b,
             "train_s": 60.0 * b + 3, "n_val_cases": 20, "kidney_dice": kid, "tumor_dice": tum,
             "tumor_detection_rate": _fig(0.5, 0.3, 0.7, hits=10, total=20),
             "detection_by_size": {"<10 ml": _fig(0.2, 0.0, 0.5, hits=1, total=5), "10-50 ml": None,
                                   ">50 ml": _fig(1.0, 1.0, 1.0, hits=3, total=3)}}
        r["unseen"] = {"kidney_dice": kid, "tumor_dice": tum} if unseen else None
        return r
    return {"machine": "test", "quick": False, "base_s": 60.0, "budgets": [1, 3], "unseen_budgets": [1, 3],
            "nnunet_plan": {"batch_size": 2},
            "rows": [row("hpc-dfs", 1, _fig(0.9, 0.85, 0.95), _fig(0.2, 0.1, 0.3)),
                     row("nnunet", 1, _fig(0.5, 0.4, 0.6), _fig(0.25, 0.1, 0.4)),
                     row("hpc-dfs", 3, _fig(0.6, 0.5, 0.7), _fig(0.3, 0.2, 0.4), unseen=False),
                     row("nnunet", 3, _fig(0.9, 0.8, 0.95), _fig(0.3, 0.2, 0.4), unseen=False)]}


def test_verdict_without_per_case_figures_is_called_only_where_the_intervals_separate():
    def v(a, b):
        return quality_report.verdict({"tumor_dice": a}, {"tumor_dice": b}, "tumor_dice")
    assert v(_fig(0.9, 0.85, 0.95), _fig(0.5, 0.4, 0.6)) == "ahead"
    assert v(_fig(0.5, 0.4, 0.6), _fig(0.9, 0.85, 0.95)) == "behind"
    assert v(_fig(0.2, 0.1, 0.3), _fig(0.25, 0.1, 0.4)) == "not separable"
    assert v(None, _fig(0.2, 0.1, 0.3)) == "-"


def test_verdict_with_per_case_figures_is_the_paired_difference():
    """Overlapping intervals, yet one row is ahead on every case: the paired interval calls it; a tie is not."""
    base = [0.2, 0.5, 0.9, 0.3, 0.7, 0.4, 0.8, 0.6]
    cases = [f"case_{i:05d}" for i in range(len(base))]

    def block(vals):
        return {"kidney_dice": _fig(sum(vals) / len(vals), min(vals), max(vals)),
                "per_case": {"kidney_dice": dict(zip(cases, vals))}}
    lo, hi = block(base), block([v + 0.02 for v in base])
    assert quality_report.verdict(hi, lo, "kidney_dice") == "ahead"
    assert quality_report.verdict(lo, hi, "kidney_dice") == "behind"
    mixed = block([v + (0.05 if i % 2 else -0.05) for i, v in enumerate(base)])
    assert quality_report.verdict(mixed, lo, "kidney_dice") == "not separable"
    assert quality_report._diff(hi, lo, "kidney_dice").startswith("+0.020 [+0.02, +0.02] ahead")


def test_report_tables_and_learning_curve_come_from_the_json(tmp_path):
    res = _result()
    md = quality_report.markdown(res)
    lines = md.splitlines()
    one = next(line for line in lines if line.startswith("| 1x (60 s) | hpc-dfs"))
    assert "0.900 [0.85, 0.95]" in one and "ahead / not separable; ahead / not separable" in one
    three = next(line for line in lines if line.startswith("| 3x (180 s) | hpc-dfs"))
    assert "behind / not separable; - / -" in three
    assert "| detected, <10 ml | detected, 10-50 ml | detected, >50 ml |" in md and "1/5 = 0.20 [0.00, 0.50]" in md
    quality_report.write(res, tmp_path)
    png = tmp_path / "quality_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = (tmp_path / "quality.md").read_text()
    assert "![learning curve](quality_curve.png)" in report and one in report
    assert not list(tmp_path.glob(".tmp-*"))


def test_budget_plan_fills_the_budget_with_the_recipe_epochs_and_validations():
    cal = {"step_s": 0.5, "val_s": 2.0, "max_steps": 40}
    steps, epochs = bench_quality.budget_plan(30.0, cal)
    planned = epochs * steps * cal["step_s"] + bench_quality.VALIDATIONS * cal["val_s"]
    assert (steps, epochs) == (5, 10) and planned <= 30.0 < planned + bench_quality.EPOCHS * cal["step_s"]
    assert bench_quality.budget_plan(1.0, cal) == (1, 10)            # never below one step per epoch
    # a long budget: epochs of one pass over the training slices (40 batches), as many as fit
    steps, epochs = bench_quality.budget_plan(1004.0, cal)
    assert steps == 40 and epochs == 50


def test_train_seconds_is_the_epoch_span_plus_one_median_epoch(tmp_path):
    rows = [{"epoch": i, "time": 100.0 + t} for i, t in enumerate([0, 10, 21, 30])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_quality.train_seconds(tmp_path) == pytest.approx(30 + 10)


@pytest.mark.slow
def test_quick_runs_end_to_end_with_the_nnunet_row(tmp_path, kits19_dir):
    """``hpc-dfs bench quality --quick``: both systems trained, predicted and scored with intervals."""
    out, work, hidden = tmp_path / "out", tmp_path / "work", tmp_path / "hidden"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # a case the benchmark never sees, in the held-out renderer's style: --eval-data scores it with both systems
    res = subprocess.run([sys.executable, "-m", "hpc_dfs", "synth", "--out", str(hidden), "--from-labels",
                          str(kits19_dir / "labels"), "--kits-json", str(kits19_dir / "kits.json"), "--cases",
                          "case_00122", "--set", "style=streak"], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "hpc_dfs", "bench", "quality", "--quick", "--work", str(work),
                          "--out", str(out), "--eval-data", str(hidden)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    q = json.loads((out / "quality.json").read_text())
    assert q["quick"] is True and {r["system"] for r in q["rows"]} == {"hpc-dfs", "nnunet"}
    for r in q["rows"]:
        assert r["budget_x"] == 1 and r["n_val_cases"] == 2 and r["train_s"] > 0
        for key in ("kidney_dice", "tumor_dice"):
            lo, hi = r[key]["ci95"]
            assert 0.0 <= lo <= r[key]["mean"] <= hi <= 1.0
            assert r["unseen"][key]["n"] == 2
        assert len(r["per_case"]["kidney_dice"]) == 2 and len(r["unseen"]["per_case"]["tumor_dice"]) == 2
        assert set(r["detection_by_size"]) == {"<10 ml", "10-50 ml", ">50 ml"}
    peer = next(r for r in q["rows"] if r["system"] == "nnunet")
    # the real nnU-Net trainer ran under the budget it was given (its own record; timings are the benchmark's job)
    assert peer["nnunet"]["budget_s"] == q["base_s"] and peer["nnunet"]["iterations"] >= 1
    preds = sorted(p.name for p in (work / "quick" / "pred" / "nnunet_x1" / "val").glob("case_*.nii.gz"))
    assert preds == ["case_00110.nii.gz", "case_00113.nii.gz"]
    split = json.loads((work / "quick" / "nnunet" / "nnUNet_preprocessed" / "Dataset501_HpcDfsQuality" /
                        "splits_final.json").read_text())
    manifest = json.loads((work / "quick" / "shards_train" / "manifest.json").read_text())
    assert sorted(split[0]["val"]) == sorted(c["case_id"] for c in manifest["cases"] if c["fold"] == 0)
    assert (out / "quality_curve.png").exists() and "| 1x (10 s) | hpc-dfs" in (out / "quality.md").read_text()
    ev = q["eval_data"]
    assert ev["path"] == str(hidden) and ev["hpc-dfs"]["n_val_cases"] == 1 and ev["nnunet"]["n_val_cases"] == 1
    assert (out / "eval_data" / "prediction_00122.nii.gz").exists()
    assert (out / "eval_data_nnunet" / "case_00122.nii.gz").exists()


def test_rows_of_an_earlier_run_get_their_per_case_figures_from_the_eval_files(tmp_path):
    ev = {"cases": [{"case_id": "case_00001", "kidney_dice": 0.9, "tumor_dice": 0.1},
                    {"case_id": "case_00002", "kidney_dice": 0.8, "tumor_dice": None}], "intervals": {}}
    rows = [{"system": "hpc-dfs", "row": "cascade, late fusion", "budget_x": 3, "unseen": None},
            {"system": "nnunet", "row": "nnU-Net v2 2d (CPU-fitted plan)", "budget_x": 9, "unseen": {}}]
    for tag, key in (("cascade_late-fusion_x3", "val"), ("nnunet_x9", "val"), ("nnunet_x9", "val_unseen")):
        (tmp_path / "pred" / tag).mkdir(parents=True, exist_ok=True)
        (tmp_path / "pred" / tag / f"eval_{key}.json").write_text(json.dumps(ev))
    bench_quality.backfill_per_case(tmp_path, rows)
    assert rows[0]["per_case"] == {"kidney_dice": {"case_00001": 0.9, "case_00002": 0.8},
                                   "tumor_dice": {"case_00001": 0.1, "case_00002": None}}
    assert rows[0]["unseen"] is None and rows[1]["unseen"]["per_case"] == rows[1]["per_case"]


def test_mixed_renders_hold_every_training_case_in_both_looks(tmp_path):
    """``train_mix`` links the default and the randomised render of each case, the latter under id + 90000."""
    for name in ("train", "train_dr"):   # renders as synth leaves them (their kits.json marks them finished)
        for cid in ("case_00004", "case_00007"):
            (tmp_path / name / cid).mkdir(parents=True)
            (tmp_path / name / cid / "imaging.nii.gz").write_text(name)
        (tmp_path / name / "kits.json").write_text(json.dumps([{"case_id": "case_00004", "age_at_nephrectomy": 60},
                                                               {"case_id": "case_00007", "age_at_nephrectomy": 50}]))
    data = bench_quality.Data(tmp_path, {"train": ["case_00004", "case_00007"]})
    mix = data.render("train_mix")
    recs = json.loads((mix / "kits.json").read_text())
    assert [r["case_id"] for r in recs] == ["case_00004", "case_00007", "case_90004", "case_90007"]
    assert recs[3]["age_at_nephrectomy"] == 50
    assert (mix / "case_00007" / "imaging.nii.gz").read_text() == "train"
    assert (mix / "case_90007" / "imaging.nii.gz").read_text() == "train_dr"
    assert data.render("train_mix") == mix and not list(tmp_path.glob(".tmp-*"))


def test_robustness_rows_are_set_beside_the_cascade_and_nnunet_on_the_unseen_renderer():
    res = _result()
    cases = [f"case_{i:05d}" for i in range(4)]

    def blk(vals):
        return {"kidney_dice": _fig(sum(vals) / 4, min(vals), max(vals)), "tumor_dice": _fig(0.1, 0.0, 0.2),
                "per_case": {"kidney_dice": dict(zip(cases, vals))}}
    res["rows"][0]["unseen"], res["rows"][1]["unseen"] = blk([0.5, 0.6, 0.7, 0.4]), blk([0.6, 0.7, 0.8, 0.5])
    res["rows"].append({"section": "robustness", "system": "hpc-dfs", "row": "mixed", "budget_x": 1, "train_s": 60.0,
                        **blk([0.7, 0.8, 0.9, 0.6]), "unseen": blk([0.7, 0.8, 0.9, 0.6])})
    md = quality_report.markdown(res)
    line = next(x for x in md.splitlines() if x.startswith("| mixed | 1x"))
    assert "+0.200 [+0.20, +0.20] ahead" in line and "+0.100 [+0.10, +0.10] ahead" in line
