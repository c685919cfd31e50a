"""``hpc-dfs clinical``: outputs, metrics recomputed from the CSV, no leakage, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from hpc_dfs.cli import main as cli
from hpc_dfs.tabular.preprocessor import RiskOrientation, build_preprocessor
from hpc_dfs.tabular.table import load_data
from hpc_dfs.data.uci_ckd import FEATURES, NOMINAL_LEVELS

FAST = ["--epochs", "15", "--patience", "10", "--rf-trees", "20", "--shap-rows", "12", "--shap-samples", "60",
        "--shap-background", "5"]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args) -> int:
    return cli(["clinical", *map(str, args)])


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, uci_ckd_dir):
    out = tmp_path_factory.mktemp("clin")
    rc = _run("--data", uci_ckd_dir / "chronic_kidney_disease_full.arff", "--folds", 2, "--seed", 0, "--out", out,
              *FAST)
    assert rc == 0
    return out


def test_predictions_cover_every_row_for_every_model(fast_run):
    pred = pd.read_csv(fast_run / "predictions.csv")
    assert list(pred.columns) == ["id", "fold", "model", "y_true", "y_prob", "y_pred"]
    for model in ("gru", "logistic_regression", "random_forest"):
        g = pred[pred.model == model]
        assert sorted(g.id) == list(range(400))
        assert g.y_true.sum() == 250
        assert set(g.fold) == {0, 1}
        assert ((g.y_prob >= 0.5).astype(int) == g.y_pred).all()
        assert g.y_prob.between(0, 1).all()
    # every model saw the same folds
    folds = pred.pivot(index="id", columns="model", values="fold")
    assert (folds.nunique(axis=1) == 1).all()


def _recompute(y, p, yhat) -> dict:
    """The metrics straight from sklearn, written independently of hpc_dfs.tabular.scores.summarise."""
    tn, fp, fn, tp = skm.confusion_matrix(y, yhat, labels=[0, 1]).ravel()
    return {"accuracy": skm.accuracy_score(y, yhat), "kappa": skm.cohen_kappa_score(y, yhat),
            "auc": skm.roc_auc_score(y, p), "sensitivity": skm.recall_score(y, yhat),
            "specificity": skm.recall_score(y, yhat, pos_label=0), "f1": skm.f1_score(y, yhat),
            "fpr": fp / (fp + tn), "fnr": fn / (fn + tp)}


def test_metrics_json_equals_sklearn_on_the_csv(fast_run):
    pred = pd.read_csv(fast_run / "predictions.csv")
    report = json.loads((fast_run / "metrics.json").read_text())
    assert report["folds"] == 2 and report["seed"] == 0
    assert report["feature_names"] == list(FEATURES)
    assert report["data"]["n_rows"] == 400 and report["data"]["n_positive"] == 250
    assert report["models"]["gru"]["n_params"] == 3393
    for model, g in pred.groupby("model"):
        got = report["models"][model]
        want = _recompute(g.y_true, g.y_prob, g.y_pred)
        for k, v in want.items():
            assert got["pooled"][k] == pytest.approx(v, abs=1e-12), (model, "pooled", k)
        per_fold = [_recompute(gf.y_true, gf.y_prob, gf.y_pred) for _, gf in g.groupby("fold")]
        for k in want:
            vals = [f[k] for f in per_fold]
            assert got["mean"][k] == pytest.approx(np.mean(vals), abs=1e-12), (model, "mean", k)
            assert got["sd"][k] == pytest.approx(np.std(vals, ddof=1), abs=1e-12), (model, "sd", k)
    assert "| Clinical-GRU |" in (fast_run / "metrics.md").read_text()


def test_pictures_and_shap(fast_run):
    for name in ("confusion_matrices.png", "roc.png", "shap_bar.png", "shap_beeswarm.png"):
        assert (fast_run / name).read_bytes()[:8] == PNG, name
    imp = json.loads((fast_run / "shap_importance.json").read_text())
    ranking = imp["ranking"]
    assert sorted(r["feature"] for r in ranking) == sorted(FEATURES)
    scores = [r["mean_abs_shap"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    values = pd.read_csv(fast_run / "shap_values.csv").set_index("id")
    assert len(values) >= 12 and values.index.is_unique
    assert imp["ranking"][0]["mean_abs_shap"] == pytest.approx(values[list(FEATURES)].abs().mean().max())
    # the per-patient explanation adds up to the GRU's logit (KernelExplainer's efficiency property)
    patient = json.loads((fast_run / "shap_patient.json").read_text())
    assert (fast_run / patient["plot"]).read_bytes()[:8] == PNG
    p = patient["y_prob"]
    assert patient["base_value_logit"] + patient["sum_shap_logit"] == pytest.approx(np.log(p / (1 - p)), abs=1e-3)
    assert len(patient["contributions"]) == 24


def test_no_leakage_poisoned_test_row(tmp_path, uci_ckd_dir):
    """Changing one row must not change any prediction for the other rows of its own test fold.

    If any preprocessing step (imputer, scaler, orientation) or model saw test rows, an extreme
    value in one test row would move the predictions of its fold-mates.
    """
    raw = pd.read_csv(uci_ckd_dir / "kidney_disease.csv", dtype=str, keep_default_na=False)
    poisoned = raw.copy()
    victim = 7
    poisoned.loc[victim, ["age", "bgr", "bu", "sc", "hemo"]] = ["900", "90000", "50000", "700", "0.01"]
    clean_csv, bad_csv = tmp_path / "clean.csv", tmp_path / "poisoned.csv"
    raw.to_csv(clean_csv, index=False)
    poisoned.to_csv(bad_csv, index=False)
    args = ["--folds", 3, "--seed", 1, "--no-shap", "--epochs", 4, "--rf-trees", 5]
    assert _run("--data", clean_csv, "--out", tmp_path / "a", *args) == 0
    assert _run("--data", bad_csv, "--out", tmp_path / "b", *args) == 0
    a = pd.read_csv(tmp_path / "a" / "predictions.csv")
    b = pd.read_csv(tmp_path / "b" / "predictions.csv")
    fold = int(a[a.id == victim].fold.iloc[0])
    mates_a = a[(a.fold == fold) & (a.id != victim)].reset_index(drop=True)
    mates_b = b[(b.fold == fold) & (b.id != victim)].reset_index(drop=True)
    pd.testing.assert_frame_equal(mates_a, mates_b)
    # and the poison did reach the models' training in the other folds (the test is not vacuous)
    others_a = a[(a.fold != fold) & (a.model == "logistic_regression")].y_prob.to_numpy()
    others_b = b[(b.fold != fold) & (b.model == "logistic_regression")].y_prob.to_numpy()
    assert not np.array_equal(others_a, others_b)


def test_preprocessor_is_fitted_on_training_rows_only(uci_ckd_dir):
    data = load_data(uci_ckd_dir / "chronic_kidney_disease_full.arff", folds=5)
    train = np.arange(400) % 5 != 0
    pipe = build_preprocessor(data.X, data.levels).fit(data.X[train], data.y[train])
    encoded = pipe.named_steps["encode"].transform(data.X[train])
    np.testing.assert_allclose(pipe.named_steps["scale"].mean_, encoded.mean(axis=0))
    # binary columns are coded 0 = reference level, 1 = risk level
    htn = list(FEATURES).index("htn")
    assert set(np.unique(encoded[:, htn])) == {0.0, 1.0}
    assert NOMINAL_LEVELS["htn"] == ("no", "yes")


def test_risk_orientation_flips_protective_features():
    X = np.array([[1.0, 5.0], [2.0, 4.0], [3.0, 1.0], [4.0, 0.0]])
    y = np.array([0, 0, 1, 1])
    ro = RiskOrientation().fit(X, y)
    np.testing.assert_array_equal(ro.sign_, [1.0, -1.0])
    np.testing.assert_array_equal(ro.transform(X)[:, 1], -X[:, 1])
    with pytest.raises(ValueError, match="both classes"):
        RiskOrientation().fit(X, np.zeros(4))


def test_kits_json_uses_preoperative_features_only(tmp_path, kits19_dir):
    out = tmp_path / "kits"
    assert _run("--data", kits19_dir / "kits.json", "--target", "malignant", "--folds", 2, "--out", out,
                "--models", "logistic_regression,gru", "--epochs", 5, "--no-shap") == 0
    report = json.loads((out / "metrics.json").read_text())
    from hpc_dfs.data.kits_clinical import TARGET_FIELDS

    features = report["feature_names"]
    assert not any(f.split("_")[0] in ("pathology", "tumor") for f in features)
    assert not set(features) & set(TARGET_FIELDS)
    assert report["data"]["target"] == "malignant"
    pred = pd.read_csv(out / "predictions.csv")
    assert pred.groupby("model").id.nunique().to_dict() == {"gru": report["data"]["n_rows"],
                                                           "logistic_regression": report["data"]["n_rows"]}


def _error(capsys, *args) -> str:
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line
    return err[0]


def test_bad_inputs_give_one_clear_error(tmp_path, capsys, uci_ckd_dir):
    out = tmp_path / "o"
    msg = _error(capsys, "--data", tmp_path / "nope.arff", "--out", out)
    assert "nope.arff" in msg and "no such file" in msg
    (tmp_path / "table.xlsx").write_text("x")
    msg = _error(capsys, "--data", tmp_path / "table.xlsx", "--out", out)
    assert "table.xlsx" in msg and "unknown format" in msg
    raw = pd.read_csv(uci_ckd_dir / "kidney_disease.csv", dtype=str, keep_default_na=False)
    raw.drop(columns="classification").to_csv(tmp_path / "nolabel.csv", index=False)
    msg = _error(capsys, "--data", tmp_path / "nolabel.csv", "--out", out)
    assert "nolabel.csv" in msg and "no target column" in msg
    few = pd.concat([raw[raw.classification.str.strip() == "ckd"], raw[raw.classification == "notckd"].head(3)])
    few.to_csv(tmp_path / "few.csv", index=False)
    msg = _error(capsys, "--data", tmp_path / "few.csv", "--folds", 5, "--out", out)
    assert "few.csv" in msg and "class 'notckd' has only 3 rows, fewer than --folds 5" in msg
    (tmp_path / "kits.json").write_text(json.dumps([{"case_id": f"case_{i:05d}", "age_at_nephrectomy": 50 + i}
                                                    for i in range(6)]))
    msg = _error(capsys, "--data", tmp_path / "kits.json", "--target", "malignant", "--out", out)
    assert "kits.json" in msg and "no target column 'malignant'" in msg
    msg = _error(capsys, "--out", out)
    assert "--data is required" in msg
    msg = _error(capsys, "--data", tmp_path / "few.csv", "--out", out, "--folds", 1)
    assert "folds must be >= 2" in msg


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit):
        cli(["clinical", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--folds", "--seed", "--out", "--target", "--epochs", "--shap-rows"):
        assert flag in text


@pytest.mark.slow
def test_gru_reaches_the_goal_on_uci_ckd_5_fold(tmp_path, uci_ckd_dir):
    """The issue's goal: pooled accuracy >= 0.99 and kappa >= 0.97 with the 3,393-parameter GRU."""
    out = tmp_path / "full"
    assert _run("--data", uci_ckd_dir / "chronic_kidney_disease_full.arff", "--folds", 5, "--seed", 0,
                "--out", out, "--no-shap") == 0
    pooled = json.loads((out / "metrics.json").read_text())["models"]["gru"]["pooled"]
    assert pooled["accuracy"] >= 0.99 and pooled["kappa"] >= 0.97


def test_csv_target_that_is_not_a_column_is_named(tmp_path, capsys, uci_ckd_dir):
    """``--target nope`` on the UCI CSV names the missing target, not a missing 'case_id'."""
    msg = _error(capsys, "--data", uci_ckd_dir / "kidney_disease.csv", "--target", "nope", "--out", tmp_path / "o")
    assert "kidney_disease.csv" in msg and "no target column 'nope'" in msg and "case_id" not in msg
