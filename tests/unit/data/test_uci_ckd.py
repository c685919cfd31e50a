"""The tolerant UCI CKD loader on the real files and on a small ARFF with every known quirk."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from hpc_dfs.data.uci_ckd import FEATURES, NOMINAL_LEVELS, UCICKDError, load_uci_ckd, parse_arff

REAL = ("chronic_kidney_disease.arff", "chronic_kidney_disease_full.arff", "kidney_disease.csv")

# the original double-comma row of both ARFFs (CSV id 369): htn=no, <stray empty field>, dm=no, ...
DOUBLE_COMMA_ID = 369


@pytest.mark.parametrize("name", REAL)
def test_real_files_give_400_rows_250_150(uci_ckd_dir, name):
    frame = load_uci_ckd(uci_ckd_dir / name)
    assert len(frame) == 400
    assert list(frame.columns) == list(FEATURES) + ["ckd"]
    assert frame["ckd"].value_counts().to_dict() == {1: 250, 0: 150}
    assert list(frame.index) == list(range(400))
    # wbcc/rbcc (ARFF) and wc/rc (CSV) both end up as the canonical wc/rc floats
    assert frame["wc"].dtype == float and frame["rc"].dtype == float
    assert frame["wc"].notna().sum() > 250
    # stray tabs/spaces are gone: every nominal value is one of the declared levels
    for col, levels in NOMINAL_LEVELS.items():
        assert set(frame[col].dropna()) <= set(levels), col
    # the SOURCE.md count of missing cells
    assert 1009 <= int(frame[list(FEATURES)].isna().sum().sum()) <= 1012


@pytest.mark.parametrize("name", REAL[:2])
def test_double_comma_row_is_parsed_right(uci_ckd_dir, name):
    row = load_uci_ckd(uci_ckd_dir / name).loc[DOUBLE_COMMA_ID]
    assert row["rc"] == 4.8 and row["wc"] == 10300.0
    assert (row["htn"], row["dm"], row["cad"], row["appet"], row["pe"], row["ane"]) == \
        ("no", "no", "no", "good", "no", "no")
    assert row["ckd"] == 0


def test_arff_and_csv_agree_and_repairs_are_reported(uci_ckd_dir):
    full = load_uci_ckd(uci_ckd_dir / "chronic_kidney_disease_full.arff")
    small = load_uci_ckd(uci_ckd_dir / "chronic_kidney_disease.arff")
    csv = load_uci_ckd(uci_ckd_dir / "kidney_disease.csv")
    pd.testing.assert_frame_equal(full, csv)
    pd.testing.assert_frame_equal(small, csv)
    # two trailing commas + the double comma in _full; only the double comma in the other ARFF
    assert full.attrs["repaired_rows"] == [215, 218, 515]
    assert small.attrs["repaired_rows"] == [399]
    assert csv.attrs["repaired_rows"] == []


def test_scipy_arff_reader_fails_on_the_real_file(uci_ckd_dir):
    """Why the loader is hand-written: scipy rejects the stray spaces (SOURCE.md)."""
    from scipy.io import arff

    with pytest.raises(ValueError):
        arff.loadarff(str(uci_ckd_dir / "chronic_kidney_disease_full.arff"))


def _row(**over) -> list[str]:
    base = {"age": "48", "bp": "80", "sg": "1.020", "al": "1", "su": "0", "rbc": "normal", "pc": "normal",
            "pcc": "notpresent", "ba": "notpresent", "bgr": "121", "bu": "36", "sc": "1.2", "sod": "?",
            "pot": "?", "hemo": "15.4", "pcv": "44", "wc": "7800", "rc": "5.2", "htn": "yes", "dm": "yes",
            "cad": "no", "appet": "good", "pe": "no", "ane": "no", "ckd": "ckd"}
    base.update(over)
    return [base[c] for c in list(FEATURES) + ["ckd"]]


def _write_arff(path, rows: list[str]) -> None:
    header = ["% a comment", "@relation 'tiny ckd'", ""]
    for c in FEATURES:
        name = {"wc": "wbcc", "rc": "rbcc"}.get(c, c)
        kind = "{" + ",".join(NOMINAL_LEVELS[c]) + "}" if c in NOMINAL_LEVELS else "numeric"
        header.append(f"@attribute '{name}' {kind}  ")
    header += ["@attribute 'class' {ckd,notckd}", "", "@data"]
    path.write_bytes(("\r\n".join(header + rows) + "\r\n").encode())


def test_synthetic_arff_with_every_quirk(tmp_path):
    rows = [
        ",".join(_row()),
        ",".join(_row(rbc="\t?", wc="\t6200", htn=" yes", ckd="ckd\t")),            # stray tabs/spaces
        ",".join(_row(dm="no", ckd="notckd")).replace(",no,no,good", ",no,,no,good", 1),  # double comma
        ",".join(_row(ckd="ckd")) + ",",                                            # trailing comma
        "% a comment between rows",
        ",".join(_row(age="'61'", pe="yes", ckd="notckd")),                         # quoted value
    ]
    path = tmp_path / "tiny.arff"
    _write_arff(path, rows)
    frame = load_uci_ckd(path)
    assert len(frame) == 5
    assert frame["ckd"].tolist() == [1, 1, 0, 1, 0]
    assert math.isnan(frame.loc[1, "rbc"]) and frame.loc[1, "wc"] == 6200.0 and frame.loc[1, "htn"] == "yes"
    assert (frame.loc[2, "htn"], frame.loc[2, "dm"], frame.loc[2, "cad"]) == ("yes", "no", "no")
    assert frame.loc[4, "age"] == 61.0 and frame.loc[4, "pe"] == "yes"
    assert math.isnan(frame.loc[0, "sod"])
    assert frame.attrs["repaired_rows"] == [33, 34]  # the header is 30 lines; data rows 3 and 4
    raw = parse_arff(path)
    assert "wbcc" in raw.columns and "rbcc" in raw.columns


@pytest.mark.parametrize("bad_row, message", [
    (lambda: ",".join(_row()[:-2]), "expected 25 comma-separated values, found 23"),
    (lambda: ",".join(_row(htn="maybe")), "column 'htn' has 'maybe'"),
    (lambda: ",".join(_row(sg="1.030")), "column 'sg' has 1.03"),
    (lambda: ",".join(_row(bu="high")), "column 'bu': 'high' is not a number"),
    (lambda: ",".join(_row(ckd="?")), "class is None"),
    (lambda: ",".join(_row(age="50,7")), "expected 25 comma-separated values, found 26"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, bad_row, message):
    path = tmp_path / "bad.arff"
    _write_arff(path, [",".join(_row()), bad_row()])
    with pytest.raises(UCICKDError) as err:
        load_uci_ckd(path)
    assert f"{path}:32: " in str(err.value)  # file and line of the bad row
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UCICKDError, match="no such file"):
        load_uci_ckd(tmp_path / "absent.arff")
    (tmp_path / "x.txt").write_text("a,b\n")
    with pytest.raises(UCICKDError, match="unknown format '.txt'"):
        load_uci_ckd(tmp_path / "x.txt")
    (tmp_path / "nolabel.csv").write_text(",".join(FEATURES) + "\n" + ",".join(_row()[:-1]) + "\n")
    with pytest.raises(UCICKDError, match="no target column"):
        load_uci_ckd(tmp_path / "nolabel.csv")
    (tmp_path / "empty.arff").write_text("% nothing\n")
    with pytest.raises(UCICKDError, match="no @attribute"):
        load_uci_ckd(tmp_path / "empty.arff")
