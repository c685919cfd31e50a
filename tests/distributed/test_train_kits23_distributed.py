"""KiTS23 on 2 ranks: 4-class softmax training and nnU-Net's KiTS23 region training (``loss.regions=kits23``) each
reach the 1-process weights and validation metrics under ``mpirun -np 2``, and the cascade (``--stage both``)
trains with regions on 2 ranks.

Data: CT rendered (``hpc-dfs synth --from-labels``) around 4 real KiTS23 label maps with cysts
(``../shared/data/kits23``), cut to the cysts' slices, with their kits23.json records; 32x32 slices, stage-2
windows of 32x32 at 3 mm; the DFS fusion model at base width 4 (the settings of test_train_distributed.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import lock
from tests.conftest import missing_shared
from tests.distributed.test_train_distributed import TINY, max_rel_diff, model_rel_diff, weights
from tests.launch import engine_params, hpc_dfs_cmd, launch
from tests.unit.stages.test_export_nnunet import KITS23_LABELS, kits23_like

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CASES = ("case_00402", "case_00403", "case_00416", "case_00418")
MODES = {"classes": [], "regions": ["--set", "loss.regions=kits23"]}


@pytest.fixture(scope="module")
def kits23_shards(tmp_path_factory) -> Path:
    kits23_json = KITS23_LABELS.parent / "kits23.json"
    if not kits23_json.is_file():
        missing_shared(f"{kits23_json} is absent (see ../shared/data/kits23/SOURCE.md)")
    root = tmp_path_factory.mktemp("kits23_train")
    data = kits23_like(root / "data", CASES, kits_json=kits23_json)
    res = launch(hpc_dfs_cmd("preprocess", "--data", data, "--out", root / "shards", "--slice-size", "32,32",
                             "--n-folds", 4, "--set", "refine.slice_size=32,32", "--set", "refine.spacing=3.0"),
                 launcher="none", timeout=180)
    assert res.returncode == 0, res.output
    return root / "shards"


def _train(shards: Path, out: Path, mode: str, *flags, np: int = 1, launcher: str = "none"):
    cmd = hpc_dfs_cmd("train", "--shards", shards, "--out", out, *TINY, *MODES[mode], *map(str, flags))
    return launch(cmd, np=np, launcher=launcher if np > 1 else "none", timeout=240)


@pytest.mark.parametrize("launcher, mode", engine_params(("mpirun", "classes"), ("mpirun", "regions")))
def test_two_ranks_reach_single_process_weights_on_kits23(kits23_shards, tmp_path, launcher, mode):
    one, two = tmp_path / "np1", tmp_path / "np2"
    res = _train(kits23_shards, one, mode, "--epochs", 1, "--max-steps", 4)
    assert res.returncode == 0, res.output
    res = _train(kits23_shards, two, mode, "--epochs", 1, "--max-steps", 4, np=2, launcher=launcher)
    assert res.returncode == 0, res.output
    assert "global batch 4 = 2 ranks x 2 per rank" in res.output
    a, b = weights(one), weights(two)
    assert a["classes"] == b["classes"] == ["background", "kidney", "tumor", "cyst"]
    if mode == "regions":   # three sigmoid outputs; predict reads the regions from the checkpoint
        assert b["regions"]["classes"] == [[1, 2, 3], [2, 3], [2]] and b["regions"]["labels"] == [1, 3, 2]
        assert b["model_config"]["n_classes"] == 3 and b["model"]["backbone.head.2.weight"].shape[0] == 3
    else:
        assert b["regions"] is None and b["model_config"]["n_classes"] == 4
    rel = model_rel_diff(a["model"], b["model"])
    assert rel < 1e-5, f"np=2 weights differ from np=1 by {rel:.2e} (relative); {lock.note()}"
    worst, where = max_rel_diff(a["model"], b["model"])
    assert worst < 1e-3, f"{where} differs by {worst:.2e}"
    from hpc_dfs import parallel
    from hpc_dfs.models import build_model
    torch.manual_seed(3)   # the not-vacuous check of test_train_distributed.py: training moved the weights
    init = parallel.convert_sync_batchnorm(build_model(**a["model_config"])).state_dict()
    assert model_rel_diff(a["model"], init) > 100 * 1e-5
    for key in ("kidney_dice", "masses_dice", "tumor_dice", "val_loss"):   # KiTS23's three regions, validated
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("launcher", engine_params("mpirun"))
def test_region_cascade_trains_on_two_ranks(kits23_shards, tmp_path, launcher):
    out = tmp_path / "both"
    res = _train(kits23_shards, out, "regions", "--stage", "both", "--epochs", 1, "--steps-per-epoch", 3, np=2,
                 launcher=launcher)
    assert res.returncode == 0, res.output
    for stage in ("locate", "refine"):
        state = torch.load(out / stage / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        assert state["config"]["stage"] == stage and state["step"] == 3 and state["world_size"] == 2
        assert state["regions"]["name"] == "kits23" and state["config"]["loss"]["regions"] == "kits23"
        assert "masses_dice" in state["metrics"]
