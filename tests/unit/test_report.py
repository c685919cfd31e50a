"""``hpc-dfs report``: a real (tiny) train -> predict -> evaluate chain, reported as one HTML file."""
from __future__ import annotations

import base64
import json
import re

import pytest

from hpc_dfs.cli import main as cli
from hpc_dfs.visualize import plot_png
from tests.unit.test_predict import make_setup

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
                   for m, label, acc, k in (("gru", "Clinical-GRU", 0.97, 0.94), ("rf", "random forest", 0.99, 0.98))}}))
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
