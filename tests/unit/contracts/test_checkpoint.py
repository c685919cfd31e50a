"""The one checkpoint schema (hpc_dfs/contracts/checkpoint.py): a bad file gets the same clear error everywhere.

Truncated files, foreign torch files (a dict without our keys, a bare tensor) and non-torch files are
refused by ``checkpoint.load`` with a :class:`CheckpointError` (an ``HpcDfsError``) naming the file and
the problem; ``predict`` and ``report`` show that same message.
"""
from __future__ import annotations

import math

import pytest
import torch

from hpc_dfs.errors import HpcDfsError
from hpc_dfs.contracts import checkpoint as ckpt

torch.set_num_threads(1)


def _full_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None, "scaler": None,
            "epoch": 1, "step": 3, "rng": [ckpt.capture_rng()], "config": {"optim": {"lr": 1e-3}},
            "model_config": {"name": "unet"}, "preprocessing": {"slice_size": [32, 32]},
            "clinical": {"pipeline": None, "feature_names": [], "n_features": 0}, "classes": ["bg", "kidney"],
            "manifest_sha256": "0" * 64, "metrics": {"best_score": -math.inf}, "hpc_dfs_version": "0",
            "world_size": 1}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save(_full_state(), path)
    return path


def test_schema_keys_are_the_typed_dict():
    assert ckpt.REQUIRED_KEYS + ckpt.OPTIONAL_KEYS == tuple(ckpt.Checkpoint.__annotations__)
    assert set(ckpt.INFERENCE_KEYS) <= set(ckpt.REQUIRED_KEYS) and issubclass(ckpt.CheckpointError, HpcDfsError)


def test_good_checkpoint_loads_and_meta_drops_tensors(good):
    assert ckpt.load(good)["step"] == 3
    meta = ckpt.read_meta(good)
    assert "model" not in meta and "optimizer" not in meta and "rng" not in meta
    assert meta["n_parameters"] == 3 * 2 + 2 and meta["classes"] == ["bg", "kidney"]


def test_truncated_file_is_refused(good, tmp_path):
    cut = tmp_path / "cut.pt"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for read in (ckpt.load, ckpt.read_meta):
        with pytest.raises(ckpt.CheckpointError, match=r"cut\.pt cannot be read .*truncated"):
            read(cut)


def test_non_torch_file_is_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(ckpt.CheckpointError, match=r"notes\.pt cannot be read"):
        ckpt.load(text)


def test_foreign_torch_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, foreign)   # someone else's dict
    with pytest.raises(ckpt.CheckpointError, match=r"foreign\.pt lacks keys \['model'"):
        ckpt.load(foreign, require=ckpt.INFERENCE_KEYS)
    with pytest.raises(ckpt.CheckpointError, match=r"foreign\.pt lacks keys"):
        ckpt.read_meta(foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ckpt.CheckpointError, match=r"tensor\.pt holds a Tensor, not a dict"):
        ckpt.load(tensor)


def test_inference_read_needs_only_the_model(tmp_path, good):
    partial = tmp_path / "partial.pt"
    state = ckpt.load(good)
    torch.save({k: state[k] for k in ("model", "model_config", "preprocessing")}, partial)
    assert set(ckpt.load(partial, require=ckpt.INFERENCE_KEYS)) == {"model", "model_config", "preprocessing"}
    with pytest.raises(ckpt.CheckpointError, match="lacks keys .*'optimizer'"):
        ckpt.load(partial)          # but --resume needs everything


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"none\.pt does not exist"):
        ckpt.load(tmp_path / "none.pt")


def test_predict_and_report_show_the_schema_message(tmp_path):
    from hpc_dfs.inference.errors import PredictError
    from hpc_dfs.inference.replicas import load_replica
    from hpc_dfs.report import ReportError, load_checkpoint_meta
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ckpt.CheckpointError) as direct:
        ckpt.load(foreign, require=ckpt.INFERENCE_KEYS)
    with pytest.raises(PredictError) as p:
        load_replica(foreign, 1.0, torch.device("cpu"))
    assert str(p.value) == str(direct.value)
    with pytest.raises(ckpt.CheckpointError) as direct:
        ckpt.read_meta(foreign)
    with pytest.raises(ReportError) as r:
        load_checkpoint_meta(foreign)
    assert str(r.value) == str(direct.value) and "foreign.pt lacks keys ['model']" in str(r.value)


def test_old_flat_config_still_loads_for_predict_and_report(tmp_path):
    """Checkpoints from before the config had sections hold a flat ``config``: they still load (CONTRACTS 3)."""
    old = _full_state()
    old["config"] = {"epochs": 2, "lr": None, "optimizer": "adam", "batch_size": 16}
    path = tmp_path / "old.pt"
    ckpt.save(old, path)
    assert ckpt.load(path)["config"]["lr"] is None
    assert ckpt.load(path, require=ckpt.INFERENCE_KEYS)["model_config"] == {"name": "unet"}
    assert ckpt.read_meta(path)["config"]["epochs"] == 2


def test_flipped_tensor_bytes_are_named(good, tmp_path):
    """Issue 14: torch does not verify the bytes it reads; the stored content digest does."""
    state = ckpt.load(good)
    assert ckpt.DIGEST_KEY not in state           # load returns what was saved, without the digest
    data = bytearray(good.read_bytes())
    raw = state["model"]["weight"].numpy().tobytes()
    at = bytes(data).find(raw)                    # the weight tensor's bytes, stored uncompressed in the zip
    assert at > 0
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    torch.load(flipped, weights_only=True)        # torch alone reads it as other weights
    for read in (ckpt.load, ckpt.read_meta):
        with pytest.raises(ckpt.CheckpointError, match=r"flipped\.pt is corrupt"):
            read(flipped)


def test_checkpoint_without_digest_loads_with_one_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ckpt, "_warned_undigested", False)
    old = tmp_path / "old.pt"
    torch.save(_full_state(), old)                # as written before checkpoints carried a digest
    with caplog.at_level("WARNING", logger="hpc_dfs.checkpoint"):
        assert ckpt.load(old)["step"] == 3
        assert ckpt.load(old)["step"] == 3
    assert sum("no content_sha256" in r.getMessage() for r in caplog.records) == 1


def test_digest_covers_keys_values_and_tensors():
    base = _full_state()
    d = ckpt.content_sha256(base)
    assert d == ckpt.content_sha256(_full_state() | {"model": base["model"], "optimizer": base["optimizer"],
                                                     "rng": base["rng"]})
    for change in ({"step": 4}, {"step": 3.0}, {"classes": ["bg", "kidnee"]},
                   {"model": {k: v + 1e-7 if k == "bias" else v for k, v in base["model"].items()}}):
        assert ckpt.content_sha256(base | change) != d, change
