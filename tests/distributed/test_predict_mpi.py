"""``mpirun -np 2 hpc-dfs predict`` writes the same bytes as one process.

Two real processes under OpenMPI (Horovod's MPI controller) split the synthetic cases by voxel count;
every output file -- label maps, probabilities, raw maps, overlays, risk.csv -- must equal the
single-process run byte for byte (summary.json differs only by timings and ranks). ``mpirun -np 2 hpc-dfs
evaluate`` then splits the cases over the ranks and writes the same JSON, CSV and markdown as one process.
The cascade (``--refine-checkpoint``: stage 1, kidney boxes, stage 2 pasted back) is held to the same.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.launch import hpc_dfs_cmd, launch
from tests.unit.stages.test_predict import make_checkpoint, make_setup

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _outputs(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


def _run_np1_np2(args: list, out1, out2) -> None:
    """``hpc-dfs ARGS --out out1`` in one process, then ``--out out2`` under ``mpirun -np 2``; both must succeed."""
    one = launch(hpc_dfs_cmd(*args, "--out", out1), np=1, launcher="none", timeout=240)
    assert one.returncode == 0, one.output
    two = launch(hpc_dfs_cmd(*args, "--out", out2), np=2, launcher="mpirun", timeout=240)
    assert two.returncode == 0, two.output


def _same_outputs(tmp_path, what: str) -> tuple[dict, dict]:
    """Outputs of the 1-rank (p1) and 2-rank (p2) runs are the same files, byte for byte; both summaries."""
    a, b = _outputs(tmp_path / "p1"), _outputs(tmp_path / "p2")
    assert len([k for k in a if k.startswith("prediction_")]) == 3
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert not different, f"{what} differ between 1 and 2 ranks: {different}"
    s1 = json.loads((tmp_path / "p1" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert s2["world_size"] == 2 and {c["rank"] for c in s2["cases"]} == {0, 1}
    return s1, s2


def test_two_rank_predict_is_byte_identical(tmp_path):
    s = make_setup(tmp_path)
    args = ["predict", "--checkpoint", s["ckpts"][0], "--checkpoint", s["ckpts"][1], "--weights", "0.7,0.3",
            "--input", s["data"], "--batch-size", "4", "--tta", "--save-probabilities", "--save-raw"]
    _run_np1_np2(args, tmp_path / "p1", tmp_path / "p2")
    s1, s2 = _same_outputs(tmp_path, "outputs")
    assert [c["case_id"] for c in s1["cases"]] == [c["case_id"] for c in s2["cases"]]
    assert [c["risk_prob"] for c in s1["cases"]] == [c["risk_prob"] for c in s2["cases"]]

    # evaluate under 2 ranks: the same files as one process
    ev = ["evaluate", "--pred", tmp_path / "p2", "--gt", s["data"]]
    _run_np1_np2(ev, tmp_path / "e1.json", tmp_path / "e2.json")
    for ext in (".json", ".csv", ".md"):
        assert (tmp_path / f"e1{ext}").read_bytes() == (tmp_path / f"e2{ext}").read_bytes(), ext
    assert len(json.loads((tmp_path / "e2.json").read_text())["cases"]) == 3


def _refine_checkpoint(shards, path, seed: int):
    """A stage-2 checkpoint as ``train --stage refine`` writes it: 3 slices as channels, the shards' refine plan."""
    make_checkpoint(shards, path, seed=seed, in_channels=3)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "refine" in state["preprocessing"]
    state["config"] = {"stage": "refine"}
    torch.save(state, path)
    return path


def test_two_rank_cascade_predict_is_byte_identical(tmp_path):
    """Stage 1, the kidney boxes, stage 2 (two weighted replicas) pasted back: 1 rank == 2 ranks, native geometry."""
    s = make_setup(tmp_path)
    ref = [_refine_checkpoint(s["shards"], tmp_path / f"refine{i}.pt", seed=10 + i) for i in range(2)]
    args = ["predict", "--checkpoint", s["ckpts"][0], "--refine-checkpoint", ref[0], "--refine-checkpoint", ref[1],
            "--refine-weights", "0.6,0.4", "--input", s["data"], "--batch-size", "4", "--save-probabilities",
            "--save-raw"]
    _run_np1_np2(args, tmp_path / "p1", tmp_path / "p2")
    s1, s2 = _same_outputs(tmp_path, "cascade outputs")
    assert [c["cascade"] for c in s1["cases"]] == [c["cascade"] for c in s2["cases"]]
    assert any(c["cascade"]["stage"] == "refine" for c in s1["cases"]), "stage 2 never ran: the test is vacuous"
    assert [r["path"] for r in s1["refine_checkpoints"]] == [str(p) for p in ref]
    for c in s1["cases"]:
        src = nib.load(c["image"])
        pred = nib.load(str(tmp_path / "p2" / f"prediction_{c['case_id'][5:]}.nii.gz"))
        assert pred.shape == src.shape and np.array_equal(pred.affine, src.affine), c["case_id"]
