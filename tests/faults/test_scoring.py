"""What evaluate scores: no stale prediction of another run (hole 2), no silent mean over fewer cases (hole 6)."""
from __future__ import annotations

import json

import pytest

from tests.faults import harness as H
from tests.faults.conftest import PREDICT_FLAGS
from tests.faults.test_bad_inputs import BAD, truncate

STALE = f"prediction_{BAD[-5:]}.nii.gz"


def test_hole2_stale_prediction_is_not_scored(world, tmp_path):
    """Predict with one checkpoint, then with another into the same --out while case 00001 now fails: the old
    prediction_00001 must not be scored as if it came from the second run."""
    other = world.run_epochs(2) / "checkpoints" / "last.pt"
    data, pred = world.copy(world.data, tmp_path / "data"), tmp_path / "pred"
    H.require_ok(H.cli("predict", "--checkpoint", other, "--input", data, "--out", pred, *PREDICT_FLAGS),
                 "first predict")
    truncate(data / BAD / "imaging.nii.gz")
    res = H.cli("predict", "--checkpoint", world.checkpoint, "--input", data, "--out", pred, *PREDICT_FLAGS)
    assert res.returncode != 0, "the second predict hid the failed case"
    (data / BAD / "imaging.nii.gz").unlink()  # the ground truth of the case is still there
    ev = H.cli("evaluate", "--pred", pred, "--gt", data, "--out", tmp_path / "eval.json", "--no-surface-metrics")
    if (pred / STALE).exists():
        problems = H.clear_error(ev, "evaluate", STALE, BAD, "checkpoint", "provenance")
        assert not problems, (f"{STALE} from another checkpoint was kept and evaluate scored it (rc {ev.returncode}):"
                              + "\n".join(problems))


def test_hole6_missing_prediction_counts_as_zero_or_fails(world, tmp_path):
    """A missing prediction is Dice 0 in the mean (KiTS), with the n of the mean visible, or a clear error."""
    pred = world.copy(world.pred, tmp_path / "pred")
    (pred / STALE).unlink()
    out = tmp_path / "eval.json"
    res = H.cli("evaluate", "--pred", pred, "--gt", world.data, "--out", out, "--no-surface-metrics")
    if res.returncode != 0:
        problems = H.clear_error(res, "evaluate", BAD, STALE)
        assert not problems, "\n".join(problems)
        return
    ev = json.loads(out.read_text())
    others = [c for c in ev["cases"] if c["case_id"] != BAD]
    assert len(others) == 3, ev["cases"]
    # evaluate keeps "mean" over the evaluated predictions (n=3, as its unit tests assert) and puts the KiTS mean,
    # a missing case scored as an all-background prediction, in "mean_all" (n=4, n_missing=1)
    mean = ev["mean_all"]
    for key in ("kidney_dice", "tumor_dice"):
        want = sum(c[key] for c in others) / 4
        assert mean[key] == pytest.approx(want, abs=1e-9), \
            f"mean_all {key} {mean[key]} is not over all 4 cases with {BAD} as 0 (expected {want})"
    assert BAD in out.read_text() and BAD in res.stderr, f"the missing case {BAD} is not named"
    counts = [v for v in {**ev, **mean}.values() if isinstance(v, int) and not isinstance(v, bool)]
    assert 4 in counts, f"the n of the mean (4 cases) is not visible in eval.json's mean_all or top level: {counts}"
    assert mean.get("n_missing") == 1 and ev["mean"]["n_cases"] == 3, (mean.get("n_missing"), ev["mean"])
