"""Bootstrap intervals over cases, detection by tumour size and contrast (hpc_dfs/metrics/intervals.py)."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_dfs.metrics.detection import tumour_contrast, tumour_detection
from hpc_dfs.metrics.intervals import (by_size_class, case_intervals, mean_interval, rate_interval, separable,
                                       size_class)


def test_mean_interval_brackets_the_mean_and_narrows_with_more_cases():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.7, 0.1, 5), rng.normal(0.7, 0.1, 200)
    a, b = mean_interval(few), mean_interval(many)
    for x, v in ((a, few), (b, many)):
        assert x["ci95"][0] <= x["mean"] <= x["ci95"][1] and x["n"] == len(v)
        assert x["mean"] == pytest.approx(float(np.mean(v)))
    assert b["ci95"][1] - b["ci95"][0] < a["ci95"][1] - a["ci95"][0]
    # about 95 % coverage: the normal-theory interval of 200 draws and the bootstrap's agree to ~10 %
    se = float(np.std(many, ddof=1) / np.sqrt(len(many)))
    assert (b["ci95"][1] - b["ci95"][0]) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_mean_interval_leaves_out_none_and_nan_and_is_deterministic():
    assert mean_interval([None, float("nan")]) is None
    x = mean_interval([0.5, None, 1.0, float("nan")])
    assert x["n"] == 2 and x["mean"] == 0.75 and x == mean_interval([0.5, 1.0])
    assert mean_interval([0.3]) == {"mean": 0.3, "ci95": [0.3, 0.3], "n": 1}


def test_rate_interval_pools_tumours_and_resamples_cases():
    x = rate_interval([1, 0, 2, 0], [1, 1, 2, 0])
    assert (x["hits"], x["total"], x["n"]) == (3, 4, 3) and x["mean"] == 0.75
    assert 0.0 <= x["ci95"][0] <= 0.75 <= x["ci95"][1] <= 1.0
    assert rate_interval([0, 0], [0, 0]) is None
    assert rate_interval([1, 1], [1, 1])["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="more hits than trials"):
        rate_interval([2], [1])
    with pytest.raises(ValueError, match="2 hit counts for 1 totals"):
        rate_interval([0, 1], [1])


def test_size_classes_and_their_rates():
    assert [size_class(v) for v in (0.5, 9.99, 10.0, 49.9, 50.0, 400.0)] == \
        ["<10 ml", "<10 ml", "10-50 ml", "10-50 ml", ">50 ml", ">50 ml"]
    cases = [{"tumors": [{"ml": 5.0, "status": "missed"}, {"ml": 60.0, "status": "hit"}]},
             {"tumors": [{"ml": 20.0, "status": "hit"}, {"ml": 3.0, "status": "hit"}]}, {"tumors": []}]
    out = by_size_class(cases)
    assert (out["<10 ml"]["hits"], out["<10 ml"]["total"]) == (1, 2)
    assert (out["10-50 ml"]["hits"], out["10-50 ml"]["total"], out[">50 ml"]["total"]) == (1, 1, 1)


def test_separable_only_when_intervals_do_not_overlap():
    assert separable({"ci95": [0.1, 0.2]}, {"ci95": [0.3, 0.4]})
    assert not separable({"ci95": [0.1, 0.35]}, {"ci95": [0.3, 0.4]})
    assert not separable(None, {"ci95": [0.3, 0.4]})


def test_tumour_contrast_in_kidney_sds_and_the_faint_flag():
    gt = np.zeros((4, 20, 20), np.int16)
    gt[:, 2:18, 2:10] = 1
    gt[:, 5:8, 4:7] = 2                      # a faint tumour inside the left kidney
    gt[:, 2:18, 12:18] = 1
    gt[:, 10:14, 13:17] = 2                  # a bright one in the right
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 10.0, gt.shape).astype(np.float32)
    image[:, 5:8, 4:7] += 5.0               # +0.5 kidney SD
    image[:, 10:14, 13:17] += 40.0          # +4 kidney SD
    from scipy import ndimage
    lab, n = ndimage.label(gt == 2)
    c = tumour_contrast(image, gt, lab, n)
    assert len(c) == 2 and c[0] == pytest.approx(0.5, abs=0.2) and c[1] == pytest.approx(4.0, abs=0.3)
    pred = np.where(gt == 2, 0, gt).astype(np.int16)
    pred[:, 10:14, 13:17] = 2
    det = tumour_detection(pred, gt, np.eye(4), 0.001, image=image)
    flags = sorted((t["faint"], t["status"]) for t in det["tumors"])
    assert flags == [(False, "hit"), (True, "missed")]
    iv = case_intervals([{"case_id": "case_00001", "kidney_dice": 0.9, "tumor_dice": 0.5, **det}])
    assert iv["detection_by_contrast"]["faint"]["hits"] == 0 and iv["detection_by_contrast"]["clear"]["hits"] == 1
    assert iv["tumor_detection_rate"]["total"] == 2 and iv["kidney_dice"]["mean"] == 0.9
    assert "contrast_sd" not in tumour_detection(pred, gt, np.eye(4), 0.001)["tumors"][0]


def test_paired_difference_calls_what_overlapping_intervals_cannot():
    """Two systems with a large shared case-to-case spread and a small steady gap: each interval overlaps the
    other, the paired difference's interval excludes 0."""
    from hpc_dfs.metrics.intervals import paired_difference
    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 0.9, 20)
    a = {f"case_{i:05d}": float(v + 0.03 + rng.normal(0, 0.005)) for i, v in enumerate(base)}
    b = {f"case_{i:05d}": float(v) for i, v in enumerate(base)}
    assert not separable(mean_interval(a.values()), mean_interval(b.values()))
    d = paired_difference(a, b)
    assert d["n"] == 20 and abs(d["mean"] - 0.03) < 0.005 and d["ci95"][0] > 0
    b["case_00000"], b["extra"] = None, 0.5          # a case one side lacks or cannot score is left out
    assert paired_difference(a, b)["n"] == 19
    assert paired_difference({"x": 1.0}, {"y": 1.0}) is None
