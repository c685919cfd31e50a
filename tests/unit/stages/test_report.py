"""``hpc-dfs report``: a real (tiny) train -> predict -> evaluate chain, reported as one HTML file."""
from __future__ import annotations

import base64
import json
import re

import pytest

from hpc_dfs.cli import main as cli
from hpc_dfs.visualize import plot_png
from tests.unit.stages.test_predict import make_setup

pytestmark = pytest.mark.slow  # a real synth -> preprocess -> train -> predict -> evaluate chain (~10 s)

SECTIONS = ("Run", "Data", "Training curves", "Validation metrics", "Evaluation", "Best and worst cases",
            "Prediction", "Clinical model")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    s = make_setup(root)
    run = root / "run"
    assert cli(["train", "--shards", str(s["shards"]), "--out", str(run), "--epochs", "2", "--global-batch-size", "4",
                "--steps-per-epoch", "1", "--num-workers", "0", "--val-fold", "0", "--set", "model.base_channels=4",
                "--set", "model.depth=2"]) == 0
    assert cli(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input", str(s["data"]),
                "--out", str(run / "pred"), "--save-raw", "--no-overlays"]) == 0
    assert cli(["evaluate", "--pred", str(run / "pred"), "--gt", str(s["data"]), "--out", str(run / "eval.json")]) == 0
    # the files `hpc-dfs clinical` writes (CONTRACTS: CLIN/metrics.json, CLIN/*.png), in a minimal form
    clin = root / "clin"
    clin.mkdir()
    (clin / "metrics.json").write_text(json.dumps({
        "data": {"file": "chronic_kidney_disease_full.arff", "n_rows": 400}, "folds": 5, "seed": 0,
        "models": {m: {"label": label, "folds": [{"fold": 0, "accuracy": acc}], "mean": {"accuracy": acc, "kappa": k},
                       "sd": {"accuracy": 0.01, "kappa": 0.02}, "pooled": {"accuracy": acc + 0.0025, "kappa": k}}
                   for m, label, acc, k in (("gru", "Clinical-GRU", 0.97, 0.94),
                                            ("rf", "random forest", 0.99, 0.98))}}))
    (clin / "shap_summary.png").write_bytes(plot_png(lambda ax: ax.barh(["hemo", "sc", "dm"], [0.3, 0.2, 0.1])))
    return {"setup": s, "run": run, "clin": clin}


def _section(html: str, title: str) -> str:
    parts = re.split(r"<h2>", html)
    return next(p for p in parts if p.startswith(title + "</h2>"))


def test_report_has_every_section(chain, tmp_path):
    out = tmp_path / "r.html"
    assert cli(["report", str(chain["run"]), "--clinical", str(chain["clin"]), "--shards",
                str(chain["setup"]["shards"]), "--out", str(out)]) == 0
    html = out.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html, title
    assert "missing" not in _section(html, "Run") and "dfs_fusion" in _section(html, "Run")
    assert "case_00001" in _section(html, "Evaluation") and "Effect of post-processing" in _section(html, "Evaluation")
    assert "cases per fold" in _section(html, "Data") and "slice_size" in _section(html, "Data")
    clin = _section(html, "Clinical model")
    assert "Clinical-GRU" in clin and "random forest" in clin and "0.9725 (0.970 ± 0.010)" in clin
    assert "best: case_" in html and "worst: case_" in html
    # every picture is embedded (curves, best and worst overlays, SHAP) and decodes as a PNG
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 4
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "src=\"http" not in html and "<script" not in html  # self-contained


def test_missing_sources_are_named(chain, tmp_path):
    """A run with only training outputs: evaluation, prediction and clinical say what is missing and how to get it."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run, ignore=shutil.ignore_patterns("pred", "eval.*", "curves.png"))
    assert cli(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "hpc-dfs evaluate --pred PRED" in _section(html, "Evaluation")
    assert "hpc-dfs clinical" in _section(html, "Clinical model")
    assert "rendered from metrics.jsonl" in _section(html, "Training curves")  # curves.png removed: re-rendered
    assert cli(["report", str(tmp_path / "nope")]) == 2


def test_report_states_epochs_trained_case_counts_and_detection(chain, tmp_path):
    """The epoch count comes from metrics.jsonl / last.pt (never best.pt), with the best epoch; case counts show."""
    import shutil
    import torch
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    n_epochs = sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip())
    # make best.pt an older epoch than the last one, as after a late dip: the report must not call it "trained"
    older = torch.load(run / "checkpoints" / "epoch_0001.pt", map_location="cpu", weights_only=True)
    torch.save(older, run / "checkpoints" / "best.pt")
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    last["metrics"]["best_epoch"] = 1
    torch.save(last, run / "checkpoints" / "last.pt")
    out = tmp_path / "r.html"
    assert cli(["report", str(run), "--shards", str(chain["setup"]["shards"]), "--out", str(out)]) == 0
    html = out.read_text()
    assert n_epochs == 2
    h1 = re.search(r"<h1>(.*?)</h1>", html).group(1)
    assert "2 epochs" in h1 and "run report: run" not in html
    run_sec = _section(html, "Run")
    assert "<td>epochs trained</td><td>2 of 2 configured</td>" in run_sec
    assert "<td>best epoch (best.pt)</td><td>1 (by validation mean Dice)</td>" in run_sec
    assert "effective peak learning rate" in run_sec and "nesterov" not in run_sec.lower()  # Adam: no Nesterov
    warnings = re.search(r"<div class='warnings' id='warnings'>(.*?)</div>", html, re.S).group(1)
    assert "best epoch 1 differs from the last epoch trained (2)" in warnings
    assert "validation metrics are over" in warnings
    assert "train / validation cases" in _section(html, "Data")
    ev = _section(html, "Evaluation")
    assert "tumour detection" in ev and "ranked by <b>tumour Dice</b>" in ev and "(n=" in ev


def test_warnings_name_missed_tumours_chance_auc_and_tolerances():
    import hpc_dfs.report as rp
    evaluation = {
        "cases": [{"case_id": "case_00103", "tumor_dice": 0.0, "kidney_dice": 0.9, "spacing_mm": [3.9, 3.1, 3.1],
                   "tumors": [{"ml": 9.4, "side": "left", "status": "wrong kidney"}]},
                  {"case_id": "case_00101", "tumor_dice": 0.5, "kidney_dice": 0.9, "spacing_mm": [3.9, 3.1, 3.1],
                   "tumors": [{"ml": 17.5, "side": "right", "status": "missed"},
                              {"ml": 3.0, "side": "left", "status": "hit"}]}],
        "missing_cases": [{"case_id": "case_00104", "status": "missing prediction", "tumor_dice": 0.0,
                           "tumors": [{"ml": 2.0, "side": "right", "status": "missed"}]}],
        "mean": {"n_cases": 2, "tumor_dice": 0.25},
        "mean_all": {"n_cases": 3, "n_missing": 1, "tumor_dice": 0.1667},
        "missing_predictions": ["case_00104"], "errors": [], "tolerances_mm": {"kidney": 2.178, "tumor": 1.536}}
    lines = rp.detection_warnings(evaluation) + rp.evaluation_warnings(evaluation)
    text = "\n".join(lines)
    assert "case_00103: tumour of 9.4 ml (left kidney) not found; the predicted tumour lies in the other kidney" in text
    assert "case_00101: tumour of 17.5 ml (right kidney) missed" in text and "3.0 ml" not in text
    assert "case_00104: tumour of 2.0 ml (right kidney) missed (no prediction)" in text
    assert "mean tumour Dice 0.167 is below 0.2 (n=3)" in text
    assert "below the voxel size (3.10-3.90 mm)" in text and "1 ground-truth case(s) without a prediction" in text
    # the ranked table: worst first by tumour Dice, then kidney Dice (the missing prediction has none: first)
    assert [c["case_id"] for c in rp.ranked_cases(evaluation)] == ["case_00104", "case_00103", "case_00101"]
    ok = {"cases": [{"case_id": "c", "tumor_dice": 0.9, "spacing_mm": [1.0, 0.8, 0.8],
                     "tumors": [{"ml": 1.0, "side": "left", "status": "hit"}]}],
          "mean": {"n_cases": 1, "tumor_dice": 0.9}, "tolerances_mm": {"kidney": 2.178, "tumor": 1.536}}
    assert rp.detection_warnings(ok) + rp.evaluation_warnings(ok) == []
    old = {"pred_dir": "p", "cases": [{"case_id": "c", "tumor_dice": 0.9}], "mean": {"n_cases": 1, "tumor_dice": 0.9}}
    assert "no tumour-detection columns" in rp.detection_warnings(old)[0]  # an older eval.json: not "none missed"
    # AUC intervals: n=16 around 0.5 contains chance; a clean separation on 200 cases does not
    lo, hi = rp.auc_ci_hanley(0.56, 11, 5)
    assert lo < 0.5 < hi
    assert rp.auc_ci_hanley(0.95, 100, 100)[0] > 0.5
    import numpy as np
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 8)
    stats = rp.clinical_stats({"gru": (y, rng.random(16))}, {"gru": "Clinical-GRU"})
    w = rp.clinical_warnings(stats, "malignant")
    assert stats["gru"]["chance"] and any("SHAP" in x and "no better than chance" in x for x in w)
    good = rp.clinical_stats({"gru": (y, y + 0.1 * rng.random(16))}, {"gru": "Clinical-GRU"})
    assert not good["gru"]["chance"] and rp.clinical_warnings(good, "malignant") == []


def test_overlay_cuts_through_the_ground_truth_tumour_and_shows_errors():
    import numpy as np

    from hpc_dfs.visualize import ERROR_COLOURS, case_figure, case_focus, error_map
    gt = np.zeros((10, 30, 30), np.uint8)
    gt[2:8, 5:15, 3:12] = 1
    gt[2:8, 5:15, 18:27] = 1
    gt[5:7, 6:9, 20:23] = 2          # the tumour, in the second kidney
    pred = gt.copy()
    pred[gt == 2] = 1                # missed ...
    pred[3:5, 10:13, 5:8] = 2        # ... and a false one in the other kidney
    focus, what = case_focus(gt, pred)
    assert what == "ground-truth tumour" and focus == (6, 7, 21)
    err = error_map(pred, gt)
    assert set(np.unique(err[gt == 2])) == {3} and set(np.unique(err[3:5, 10:13, 5:8])) == {4}
    assert len(ERROR_COLOURS) == 4
    fig = case_figure(np.zeros(gt.shape, np.float32), pred, np.diag([-1.0, -1.0, 3.0, 1.0])[[2, 1, 0, 3]], gt=gt,
                      title="case_x")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 9 and {"A", "P", "R", "L", "S", "I"} <= set(texts)
    assert any("axial errors" in t and "mm" in t and "slice" in t for t in titles)
    assert "through the ground-truth tumour centroid" in fig._suptitle.get_text()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "tumour missed (FN)" in legend and "tumour false positive (FP)" in legend


def test_cascade_folder_reports_both_stages(chain, tmp_path):
    """A ``train --stage both`` folder (RUN/locate + RUN/refine) is one report: both stages' curves and metrics."""
    s, run = chain["setup"], tmp_path / "cascade"
    assert cli(["train", "--shards", str(s["shards"]), "--out", str(run), "--stage", "both", "--epochs", "1",
                "--global-batch-size", "4", "--steps-per-epoch", "1", "--num-workers", "0", "--val-fold", "0",
                "--set", "model.base_channels=4", "--set", "model.depth=2"]) == 0
    assert cli(["predict", "--checkpoint", str(run / "locate" / "checkpoints" / "best.pt"), "--refine-checkpoint",
                str(run / "refine" / "checkpoints" / "best.pt"), "--input", str(s["data"]), "--out",
                str(run / "pred"), "--no-overlays"]) == 0
    assert cli(["evaluate", "--pred", str(run / "pred"), "--gt", str(s["data"]), "--out", str(run / "eval.json")]) == 0
    assert cli(["report", str(run), "--shards", str(s["shards"])]) == 0   # defaults: RUN/pred, RUN/eval.json
    html = (run / "report.html").read_text()
    h1 = re.search(r"<h1>(.*?)</h1>", html).group(1)
    assert "cascade, stage 1 (locate) 1 + stage 2 (refine) 1 epochs" in h1, h1
    for title in ("Stage 1 (locate: whole slices): training curves", "Stage 1 (locate): validation metrics",
                  "Stage 2 (refine: kidney windows): training curves", "Stage 2 (refine): validation metrics",
                  "Run", "Evaluation", "Prediction"):
        assert f"<h2>{title}</h2>" in html, title
    assert "missing" not in _section(html, "Run") and "missing" not in _section(html, "Evaluation")
    assert "rendered from metrics.jsonl" in _section(html, "Stage 1 (locate: whole slices): training curves")
    warnings = re.search(r"<div class='warnings' id='warnings'>(.*?)</div>", html, re.S).group(1)
    assert "stage 1 (locate): validation metrics are over" in warnings
    # a plain run folder is still reported as one stage
    assert cli(["report", str(run / "refine"), "--out", str(tmp_path / "r.html")]) == 0
    assert "<h2>Training curves</h2>" in (tmp_path / "r.html").read_text()
