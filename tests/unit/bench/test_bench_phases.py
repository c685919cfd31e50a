"""The benches read the stages' per-rank ``phases`` DEBUG lines into their JSON."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import bench_predict  # noqa: E402
import bench_preprocess  # noqa: E402

from hpc_dfs.parallel.phases import PhaseClock  # noqa: E402


def _clock_json() -> str:
    c = PhaseClock()
    c.mark("start+imports")
    c.mark("fingerprint")
    return c.json()


def test_preprocess_phases_per_rank():
    j = _clock_json()
    err = (f"12:00:00 [rank 1/2] DEBUG hpc_dfs.preprocess: phases rank=1 world=2 fit_rank=1 "
           f"cases=case_00004,case_00009 "
           f"voxels=36962304 {j}\nother line\n"
           f"12:00:00 [rank 0/2] DEBUG hpc_dfs.preprocess: phases rank=0 world=2 fit_rank=1 cases= voxels=0 {j}\n")
    ph = bench_preprocess.phases(err)
    assert list(ph) == ["rank0", "rank1"]
    assert ph["rank1"]["cases"] == ["case_00004", "case_00009"] and ph["rank1"]["voxels"] == 36962304
    assert ph["rank1"]["fits_clinical"] and not ph["rank0"]["fits_clinical"] and ph["rank0"]["cases"] == []
    assert [p["name"] for p in ph["rank0"]["phases"]] == ["start+imports", "fingerprint"]


def test_predict_phases_per_rank():
    err = f"x [rank 0/1] DEBUG hpc_dfs.predict: phases rank=0 world=1 cases=case_00100,case_00101 {_clock_json()}\n"
    ph = bench_predict.phases(err)
    assert ph["rank0"]["cases"] == ["case_00100", "case_00101"] and len(ph["rank0"]["phases"]) == 2
    assert bench_predict.phases("no phases here") == {}


def test_median_speedup_of_the_repeats():
    runs = [{"tool": "hpc-dfs", "np": n, "slice_size": [256, 256], "wall_s": w}
            for n, w in ((1, 10.0), (1, 12.0), (1, 30.0), (2, 6.0), (2, 5.0), (2, 20.0))]
    assert bench_preprocess.median_wall(runs, tool="hpc-dfs", np=1) == 12.0
    assert bench_preprocess.ratios(runs, [256, 256], None)["hpc_speedup_np2_wall_256_median"] == 2.0
