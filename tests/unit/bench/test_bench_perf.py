"""The performance benchmarks' own logic: the scaling model and its preset, nnU-Net's dataset layout, ratios."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))

import bench_predict  # noqa: E402
import bench_preprocess  # noqa: E402
import scaling_model as sm  # noqa: E402


def test_ring_formula_and_latency_bound_at_512():
    s = 4.93e6
    want = 2 * 511 / 512 * s / (100e9 / 8 * 0.8) + 2 * 511 * 5e-6
    assert sm.ring_allreduce_s(512, s, 100.0) == pytest.approx(want)
    assert sm.ring_allreduce_s(1, s, 100.0) == 0.0
    # a small model's flat ring at 512 GPUs is latency-bound; tree and hierarchical cut the latency term
    assert 2 * 511 * 5e-6 > 2 * s / (100e9 / 8 * 0.8)
    assert sm.tree_allreduce_s(512, s, 100.0) < sm.ring_allreduce_s(512, s, 100.0) / 3
    assert sm.hierarchical_allreduce_s(512, s, 100.0) < sm.ring_allreduce_s(512, s, 100.0) / 3


def test_fusion_calls_and_cycle_wait():
    small = sm.step_comm_s("ring", 16, 1e6, 100.0)
    assert small == pytest.approx(sm.ring_allreduce_s(16, 1e6, 100.0) + sm.CYCLE_S / 2)
    big = 3 * sm.FUSION_BYTES
    per_call = sm.ring_allreduce_s(16, big / 3, 100.0)
    assert sm.step_comm_s("ring", 16, big, 100.0) == pytest.approx(3 * per_call + sm.CYCLE_S / 2)
    # inside one node the ring runs over NVLink
    assert sm.step_comm_s("ring", 8, 1e6, 100.0) < sm.step_comm_s("ring", 16, 1e6, 100.0)


def test_efficiency_levers_move_the_right_way():
    t_c, p = 3.4e-3, 1_232_813
    base = sm.config_row("dfs", t_c, p, 512, 100.0, "ring")
    assert base["efficiency_no_overlap"] < 0.5
    more = sm.config_row("dfs", t_c, p, 512, 100.0, "ring", k=4)
    fp16 = sm.config_row("dfs", t_c, p, 512, 100.0, "ring", fp16=True)
    hier = sm.config_row("dfs", t_c, p, 512, 100.0, "hierarchical")
    for r in (more, fp16, hier):
        assert r["efficiency_no_overlap"] > base["efficiency_no_overlap"]
    assert fp16["grad_bytes"] * 2 == base["grad_bytes"]
    assert base["efficiency_full_overlap"] >= base["efficiency_no_overlap"]


def test_search_finds_90_percent_and_the_preset_matches_it():
    res = sm.build(None, gpu_json=REPO / "nonexistent.json")
    assert res["assumptions"]["compute_source"].startswith("ESTIMATE")
    found = res["dfs_512gpu_90pct"]["100"]
    assert found is not None and found["efficiency_no_overlap"] >= 0.9 and found["gpus"] == 512
    preset = (REPO / "slurm" / "presets" / "dfs-512gpu.env").read_text()
    assert "HOROVOD_HIERARCHICAL_ALLREDUCE=1" in preset
    assert f"--batch-size {found['batch_per_gpu']}" in preset
    assert f"--backward-passes-per-step {found['backward_passes_per_step']}" in preset
    row = sm.config_row("dfs", res["cases"]["dfs_fusion (base 32)"]["t_compute_s"],
                        res["cases"]["dfs_fusion (base 32)"]["params"], 512, 100.0, "hierarchical", 1, False, 4)
    assert row["efficiency_no_overlap"] >= 0.9


def test_measured_gpu_step_ignores_dry_runs(tmp_path):
    g = tmp_path / "gpu.json"
    rows = [{"model": "dfs_fusion", "size": 256, "batch": 16, "precision": "bf16", "steps_per_s": 50.0}]
    g.write_text(json.dumps({"dry_run": True, "steps": rows}))
    assert sm.measured_gpu_step(g) is None
    g.write_text(json.dumps({"dry_run": False, "device": "cuda:0", "steps": rows}))
    t, src = sm.measured_gpu_step(g)
    assert t == pytest.approx(0.02) and "dfs_fusion" in src


def test_nnunet_dataset_layout(tmp_path):
    data = tmp_path / "data"
    for c in ("case_00004", "case_00007"):
        (data / c).mkdir(parents=True)
        (data / c / "imaging.nii.gz").write_bytes(b"img")
        (data / c / "segmentation.nii.gz").write_bytes(b"seg")
    (data / "case_00009").mkdir()          # no labels: not a training case
    ds = bench_preprocess.nnunet_dataset(data, tmp_path / "raw")
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "CT"}
    assert (ds / "imagesTr" / "case_00004_0000.nii.gz").is_symlink()
    assert (ds / "imagesTr" / "case_00004_0000.nii.gz").read_bytes() == b"img"
    assert (ds / "labelsTr" / "case_00007.nii.gz").read_bytes() == b"seg"
    assert not (ds / "imagesTr" / "case_00009_0000.nii.gz").exists()


def test_preprocess_ratios_use_the_best_of_each():
    runs = [{"tool": "nnunet", "np": 1, "wall_s": 100.0}, {"tool": "nnunet", "np": 2, "wall_s": 60.0},
            {"tool": "hpc-dfs", "np": 1, "slice_size": [256, 256], "wall_s": 40.0, "stage_s": 30.0},
            {"tool": "hpc-dfs", "np": 1, "slice_size": [256, 256], "wall_s": 30.0, "stage_s": 20.0},
            {"tool": "hpc-dfs", "np": 2, "slice_size": [256, 256], "wall_s": 20.0, "stage_s": 10.0},
            {"tool": "hpc-dfs", "np": 1, "slice_size": [512, 512], "in_plane_spacing": "0.75", "wall_s": 45.0}]
    r = bench_preprocess.ratios(runs, [512, 512], "0.75")
    assert r["hpc_np1_over_nnunet_np1_wall_256"] == 0.3
    assert r["hpc_np1_over_nnunet_np1_wall_nnres"] == 0.45
    assert r["hpc_speedup_np2_wall_256"] == 1.5 and r["hpc_speedup_np2_stage_256"] == 2.0
    assert r["nnunet_speedup_np2_wall"] == pytest.approx(1.667, abs=1e-3)
    assert r["hpc_speedup_np2_wall_nnres"] is None
    # without a peer there is no nnU-Net resolution: those ratios are absent, not the 256 ones again
    r = bench_preprocess.ratios(runs[2:5], [256, 256], None)
    assert r["hpc_speedup_np2_wall_nnres"] is None and r["hpc_speedup_np2_wall_256"] == 1.5


def test_predict_digests_skip_logs_and_see_changes(tmp_path):
    (tmp_path / "case_00100.nii.gz").write_bytes(b"a")
    (tmp_path / "predict.log").write_text("t=1")
    (tmp_path / "summary.json").write_text("{}")
    d1 = bench_predict.digests(tmp_path)
    assert list(d1) == ["case_00100.nii.gz"]
    (tmp_path / "predict.log").write_text("t=2")
    assert bench_predict.digests(tmp_path) == d1
    (tmp_path / "case_00100.nii.gz").write_bytes(b"b")
    assert bench_predict.digests(tmp_path) != d1
