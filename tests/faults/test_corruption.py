"""Silent corruption: 4 flipped bytes inside a shard chunk, a checkpoint and a prediction. Each must be detected
by its reader and reported in one line naming the file (and the case), never read as valid data."""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.faults import harness as H
from tests.faults.conftest import PREDICT_FLAGS

CASE = "case_00001"


def flip(path: Path, offset: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def _record(kind: str, problems: list[str]) -> None:
    H.record("corruption", kind=kind, named=not problems)
    assert not problems, f"{kind}: " + "\n".join(problems)


def _flip_image_chunk(shard: Path, case_id: str, chunk: int = 1) -> None:
    import h5py
    with h5py.File(shard, "r") as f:
        info = f[case_id]["image"].id.get_chunk_info(chunk)
    flip(shard, info.byte_offset + info.size // 2)


def test_hole4_flipped_shard_chunk_is_named_before_training(world, tmp_path):
    shards = world.copy(world.shards, tmp_path / "shards")
    _flip_image_chunk(shards / f"shard-{CASE}.h5", CASE)
    problems = []
    if H.shards_read_as_valid(shards):
        problems.append("the deep check of the reader accepts the flipped chunk")
    res = H.cli("train", "--shards", shards, "--out", tmp_path / "run", "--epochs", 1, *H.TRAIN_TINY)
    problems += H.clear_error(res, "train", f"shard-{CASE}", CASE)
    if "epoch 1/" in res.output:
        problems.append("training started before the corrupt shard was found")
    _record("shard chunk (train)", problems)


def test_flipped_checkpoint_is_named(world, tmp_path):
    ckpt = tmp_path / "last.pt"
    shutil.copyfile(world.checkpoint, ckpt)
    flip(ckpt, ckpt.stat().st_size // 2)
    problems = []
    if H.load_checkpoint(ckpt) is not None:
        problems.append("hpc_dfs.contracts.checkpoint.load accepts a checkpoint with 4 flipped bytes")
    res = H.cli("predict", "--checkpoint", ckpt, "--input", world.data, "--out", tmp_path / "pred", *PREDICT_FLAGS)
    problems += H.clear_error(res, "predict", "last.pt")
    if H.prediction_files(tmp_path / "pred"):
        problems.append("predict wrote predictions from a corrupt checkpoint")
    _record("checkpoint (predict)", problems)


def test_flipped_prediction_is_named(world, tmp_path):
    pred = world.copy(world.pred, tmp_path / "pred")
    p = pred / f"prediction_{CASE[-5:]}.nii.gz"
    flip(p, p.stat().st_size // 2)
    res = H.cli("evaluate", "--pred", pred, "--gt", world.data, "--out", tmp_path / "eval.json",
                "--no-surface-metrics")
    problems = H.clear_error(res, "evaluate", p.name, CASE)
    _record("prediction (evaluate)", problems)
