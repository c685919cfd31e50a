"""Case ids are ASCII; near misses are named; disagreeing or mistyped records are errors."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("name, why", [("case_00001 ", "white space"), ("case_0000\u0661", "ASCII"),
                                       ("Case_00001", "'case_' exactly"), ("case_1", "five digits"),
                                       ("case_00001\n", "white space")])
def test_near_miss_case_names_are_named(name, why):
    from hpc_dfs.contracts.kits import CASE_RE, near_miss
    assert not CASE_RE.match(name)
    assert why in near_miss(name)


def test_case_ids_and_other_folders():
    from hpc_dfs.contracts.kits import CASE_RE, near_miss
    assert CASE_RE.match("case_00012").group(1) == "00012"
    assert near_miss("case_00012") is None and near_miss("notes") is None and near_miss("cases") is None


def test_records_duplicate_mistyped_and_empty(tmp_path):
    from hpc_dfs.data.kits_clinical import ClinicalRecordError, load_kits_records, preop_frame, risk_label
    a = {"case_id": "case_00000", "age_at_nephrectomy": 50, "malignant": True}
    b = {"case_id": "case_00001", "age_at_nephrectomy": 60, "malignant": False}
    frame, bad = preop_frame([a, b, dict(b, age_at_nephrectomy=70)], errors="collect")
    assert list(frame.index) == ["case_00000"] and "age_at_nephrectomy (60 vs 70)" in bad["case_00001"]
    frame, bad = preop_frame([a, dict(b, malignant="yes (clear cell)")], errors="collect", target="malignant")
    assert list(frame.index) == ["case_00000"] and "malignant='yes (clear cell)'" in bad["case_00001"]
    with pytest.raises(ClinicalRecordError, match="case_00001"):
        risk_label(dict(b, malignant=2))
    assert risk_label(dict(b, malignant="unknown")) is None and risk_label(dict(b, malignant="yes")) == 1
    (tmp_path / "kits.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no clinical records"):
        load_kits_records(tmp_path / "kits.json")
