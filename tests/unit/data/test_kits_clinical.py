"""Clinical records: only pre-operative inputs, real-file quirks, the JSON pipeline reproduces sklearn."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from hpc_dfs.data.kits_clinical import (CATEGORICAL, PREOP_COLUMNS, TARGET_FIELDS, ClinicalPipeline,
                                        ClinicalRecordError, load_kits_records, preop_features, preop_frame,
                                        risk_labels)


@pytest.fixture(scope="module")
def kits19_records(kits19_dir):
    return load_kits_records(kits19_dir / "kits.json")


def test_only_preoperative_fields_are_inputs(kits19_records):
    frame = preop_frame(kits19_records)
    assert frame.shape == (210, len(PREOP_COLUMNS))
    assert frame.index.name == "case_id" and frame.index[2] == "case_00002"
    for target in TARGET_FIELDS:
        assert not any(c == target or c.startswith(target + ".") for c in frame.columns), target
    # changing every post-operative / pathology field leaves the features unchanged
    pipe = ClinicalPipeline().fit(frame)
    mutated = copy.deepcopy(kits19_records)
    for r in mutated:
        for t in TARGET_FIELDS:
            r[t] = "changed"
    assert np.array_equal(pipe.transform(preop_frame(mutated)), pipe.transform(frame))


def test_real_file_quirks_are_values_not_errors(kits19_records):
    frame = preop_frame(kits19_records)
    raw = {r["case_id"]: r for r in kits19_records}
    ge90 = [c for c, r in raw.items() if r["last_preop_egfr"]["value"] == ">=90"]
    assert ge90 and (frame.loc[ge90, "last_preop_egfr"] == 90.0).all()
    na = [c for c, r in raw.items() if r["age_when_quit_smoking"] == "not_applicable"]
    assert frame.loc[na, "age_when_quit_smoking"].isna().all()
    as_str = [c for c, r in raw.items() if isinstance(r["pack_years"], str)]
    assert as_str and frame.loc[as_str, "pack_years"].notna().all()  # "50" is read as 50
    assert frame.loc["case_00002", "comorbidities.copd"] == 1.0


def test_kits23_schema(kits19_dir):
    recs = load_kits_records(kits19_dir.parent / "kits23" / "kits23.json")
    frame = preop_frame(recs)
    assert len(frame) == 489 and frame["body_mass_index"].notna().mean() > 0.9  # 'bmi' alias
    y = risk_labels(recs)
    assert y.isna().sum() > 0 and set(y.dropna().unique()) == {0.0, 1.0}


@pytest.mark.parametrize("field, value, msg", [
    ("age_at_nephrectomy", "abc", "age_at_nephrectomy='abc'"),
    ("age_at_nephrectomy", 400, "age_at_nephrectomy=400 (outside the plausible range"),
    ("gender", 5, "gender=5"),
    ("body_mass_index", True, "body_mass_index=True"),
])
def test_malformed_values_name_case_and_field(field, value, msg):
    rec = {"case_id": "case_00042", "age_at_nephrectomy": 60, "gender": "male", "body_mass_index": 25.0,
           field: value}
    with pytest.raises(ClinicalRecordError,
                       match=r"\[case_00042\] malformed clinical value " + msg.replace("(", r"\(")):
        preop_features(rec)
    frame, bad = preop_frame([rec, {"case_id": "case_00043", "age_at_nephrectomy": 50}], errors="collect")
    assert list(frame.index) == ["case_00043"] and "case_00042" in bad


def test_pipeline_json_roundtrip_equals_sklearn(kits19_records, tmp_path):
    frame = preop_frame(kits19_records)
    train, test = frame.iloc[:150], frame.iloc[150:]
    pipe = ClinicalPipeline().fit(train)
    ours = pipe.transform(test)
    np.testing.assert_allclose(ours, pipe.sklearn_transform(test), rtol=0, atol=1e-6)
    path = tmp_path / "clinical_pipeline.json"
    path.write_text(json.dumps(pipe.to_json()))
    again = ClinicalPipeline.from_json(path)
    assert np.array_equal(again.transform(test), ours)  # bit-identical, no pickle
    assert again.feature_names() == pipe.feature_names() and ours.shape[1] == pipe.n_features
    # fitted on the training cases only: standardised training ages have mean 0, test ages do not
    j = pipe.feature_names().index("age_at_nephrectomy")
    assert abs(pipe.transform(train)[:, j].mean()) < 1e-5
    assert pipe.to_json()["n_fit"] == 150


def test_unknown_category_and_all_missing_column():
    recs = [{"case_id": f"case_{i:05d}", "age_at_nephrectomy": 40 + i, "gender": "male" if i % 2 else "female"}
            for i in range(6)]
    pipe = ClinicalPipeline().fit(preop_frame(recs))
    new = preop_frame([{"case_id": "case_00099", "age_at_nephrectomy": 50, "gender": "transgender_male_to_female"}])
    x = pipe.transform(new)
    names = pipe.feature_names()
    assert x[0, names.index("gender=male")] == 0 and x[0, names.index("gender=female")] == 0
    assert np.isfinite(x).all() and x.shape[1] == pipe.n_features


def test_csv_source_matches_json(tmp_path, kits19_records):
    rows = []
    for r in kits19_records[:5]:
        row = {"case_id": r["case_id"], "age_at_nephrectomy": r["age_at_nephrectomy"], "gender": r["gender"],
               "body_mass_index": r["body_mass_index"], "last_preop_egfr": r["last_preop_egfr"]["value"],
               "radiographic_size": r["radiographic_size"], "malignant": r["malignant"]}
        row.update({f"comorbidities.{k}": v for k, v in r["comorbidities"].items()})
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "clinical.csv", index=False)
    from_csv = preop_frame(load_kits_records(tmp_path / "clinical.csv"))
    from_json = preop_frame(kits19_records[:5])
    cols = ["age_at_nephrectomy", "body_mass_index", "last_preop_egfr", "radiographic_size", "comorbidities.copd"]
    pd.testing.assert_frame_equal(from_csv[cols], from_json[cols])
    assert (from_csv["gender"] == from_json["gender"]).all()
    assert risk_labels(load_kits_records(tmp_path / "clinical.csv")).tolist() == \
        [float(r["malignant"]) for r in kits19_records[:5]]


def test_risk_labels(kits19_records):
    y = risk_labels(kits19_records)
    assert y.index.name == "case_id" and y.dtype == float
    assert int(y.sum()) == 192 and (y == 0).sum() == 18
    assert set(CATEGORICAL) <= set(preop_frame(kits19_records[:3]).columns)
