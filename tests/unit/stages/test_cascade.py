"""The cascade's data and commands: the shards' refine group, 2.5D ``SliceDataset``, ``train --stage``, cascade predict.

Shards are made once with the real ``hpc-dfs synth`` + ``preprocess`` (5 phantom cases at 32x32, stage-2
windows of 32x32 at 3 mm; the last case's kidneys are erased, so it has no stage-2 window). The checkpoints
come from a real ``hpc-dfs train --stage both`` (2 steps per stage). What 2 ranks add is proven in
tests/distributed/test_train_distributed.py and tests/distributed/test_predict_mpi.py.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from hpc_dfs import parallel
from hpc_dfs.cli import main as cli
from hpc_dfs.data.reader import ShardError, ShardSet, SliceDataset
from hpc_dfs.data.roi import context_indices
from hpc_dfs.contracts import checkpoint as ckpt

#: stage-2 windows small enough for a unit test (the smoke run's settings)
REFINE = ["--set", "refine.slice_size=32,32", "--set", "refine.spacing=3.0"]
N_CASES = 5
EMPTY = f"case_{N_CASES - 1:05d}"   # its kidneys are erased: no stage-2 window
TRAIN = ["--num-workers", "0", "--set", "model.base_channels=4", "--global-batch-size", "4", "--batch-size", "4",
         "--deterministic", "--seed", "3", "--val-batch-size", "8", "--log-every", "1"]


def _erase_kidneys(case_dir: Path) -> None:
    seg = nib.load(str(case_dir / "segmentation.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine), str(case_dir / "segmentation.nii.gz"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refine_data")
    assert cli(["synth", "--out", str(root / "data"), "--cases", str(N_CASES), "--seed", "0", "--size", "32",
                "--min-slices", "6", "--max-slices", "8"]) == 0
    _erase_kidneys(root / "data" / EMPTY)
    parallel.init()
    return root / "data"


@pytest.fixture(scope="module")
def shards(data) -> Path:
    out = data.parent / "shards"
    assert cli(["preprocess", "--data", str(data), "--out", str(out), "--slice-size", "32,32",
                "--n-folds", str(N_CASES), *REFINE]) == 0
    return out


@pytest.fixture(scope="module")
def run(shards) -> Path:
    """``train --stage both``: 1 epoch of 2 steps per stage, validated."""
    out = shards.parent / "run"
    assert cli(["train", "--shards", str(shards), "--out", str(out), "--stage", "both", "--epochs", "1",
                "--steps-per-epoch", "2", *TRAIN]) == 0
    return out


def _refine_arrays(shards: Path, cid: str) -> dict:
    with h5py.File(shards / f"shard-{cid}.h5", "r") as f:
        return {k: v[()] for k, v in f[cid]["refine"].items()}


# ----------------------------------------------------------------------------- the refine group
def test_refine_group_is_written_with_the_manifest(shards):
    s = ShardSet(shards).validate(deep=True)
    plan = s.preprocessing["refine"]
    assert plan["slice_size"] == [32, 32] and plan["target_spacing"] == [None, 3.0, 3.0]
    for cid in s.case_ids:
        c = s.cases[cid]
        r = _refine_arrays(shards, cid)
        n = r["image"].shape[0]
        assert r["image"].shape == r["label"].shape == (n, 32, 32) and r["image"].dtype == np.float32
        assert c["n_refine_slices"] == n == len(r["stack"]) == len(r["classes_present"])
        assert c["n_refine_windows"] == len(np.unique(r["stack"]))
        assert c["refine_slices_with"]["kidney"] == int(r["classes_present"][:, 1].sum())
        if cid != EMPTY:
            assert n > 0 and c["n_refine_windows"] >= 1 and r["classes_present"][:, 1].any()
            # the windows are contiguous runs of slices, numbered 0..k-1 in order
            assert np.array_equal(np.unique(r["stack"]), np.arange(c["n_refine_windows"]))
            assert np.all(np.diff(r["stack"]) >= 0)


def _flip_refine(path: Path, cid: str, chunk: int, at: int = 100) -> None:
    """Flip one byte inside chunk ``chunk`` of ``cid/refine/image``, as disk corruption would."""
    with h5py.File(path, "r") as f:
        off = f[cid]["refine"]["image"].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(off + at)
        b = fh.read(1)
        fh.seek(off + at)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_deep_validation_names_a_flipped_byte_in_a_refine_slice(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    cid = "case_00001"
    ShardSet(copy).validate(deep=False)
    _flip_refine(copy / f"shard-{cid}.h5", cid, chunk=2)
    ShardSet(copy).validate(deep=False)      # the cheap check does not read the slices
    with pytest.raises(ShardError) as e:
        ShardSet(copy).validate(deep=True)
    msg = str(e.value)
    assert f"shard-{cid}.h5" in msg and "refine" in msg and "\n" not in msg, msg
    # the main group is untouched: stage 1 reads fine; the refine slice read names shard, case and slice
    SliceDataset(copy, [cid])[2]
    ds = SliceDataset(copy, [cid], group="refine", context=1)
    with pytest.raises(ShardError, match=rf"shard-{cid}\.h5.*refine.*slice 2"):
        ds[2]


def test_a_case_without_kidney_has_an_empty_refine_group(shards):
    c = ShardSet(shards).cases[EMPTY]
    assert c["n_refine_slices"] == 0 and c["n_refine_windows"] == 0 and c["n_slices"] > 0
    r = _refine_arrays(shards, EMPTY)
    assert r["image"].shape == (0, 32, 32) and r["stack"].shape == (0,)
    ShardSet(shards).validate(deep=True, case_ids=[EMPTY])
    ds = SliceDataset(shards, [EMPTY], group="refine", context=3)
    assert len(ds) == 0 and ds.slices_with(1).size == 0
    both = SliceDataset(shards, ["case_00000", EMPTY, "case_00001"], group="refine", context=3)
    n0, n1 = (ShardSet(shards).cases[c]["n_refine_slices"] for c in ("case_00000", "case_00001"))
    assert len(both) == n0 + n1 and both[n0]["case_id"] == "case_00001" and both[n0]["slice"] == 0


@pytest.mark.parametrize("fold_of", [EMPTY, "case_00000"])
def test_refine_trains_and_validates_with_the_empty_case(shards, tmp_path, fold_of):
    """The kidney-less case as the validation case (nothing to validate) or among the training cases."""
    fold = ShardSet(shards).cases[fold_of]["fold"]
    out = tmp_path / "run"
    assert cli(["train", "--shards", str(shards), "--out", str(out), "--stage", "refine", "--val-fold", str(fold),
                "--epochs", "1", "--steps-per-epoch", "2", *TRAIN]) == 0
    state = ckpt.load(out / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["config"]["stage"] == "refine"
    assert state["model_config"]["in_channels"] == 3
    m = state["metrics"]
    if fold_of == EMPTY:   # no stage-2 window to validate: said, not a crash or a NaN
        assert m["n_val_cases"] == 0 and m["val_loss"] is None and m["kidney_dice"] is None, m
    else:
        assert m["n_val_cases"] == 1 and all(np.isfinite(m[k]) for k in ("val_loss", "kidney_dice")), m


# ----------------------------------------------------------------------------- 2.5D context
def test_context_indices_stay_inside_each_window():
    stack = np.array([0, 0, 0, 1, 1, 2, 2])
    assert context_indices(7, 3, stack).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 4],
                                                     [5, 5, 6], [5, 6, 6]]
    assert context_indices(7, 5, stack)[3].tolist() == [3, 3, 3, 4, 4]
    assert context_indices(4, 3, np.zeros(4)).tolist() == context_indices(4, 3).tolist() == [
        [0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert context_indices(5, 1, stack[:5]).tolist() == [[0], [1], [2], [3], [4]]
    assert context_indices(0, 3, np.zeros(0)).shape == (0, 3)
    assert context_indices(1, 3, np.zeros(1)).tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="odd"):
        context_indices(5, 2)
    with pytest.raises(ValueError, match="odd"):
        context_indices(5, 0)


def test_refine_items_have_k_neighbours_that_never_cross_a_window(shards):
    ids = ["case_00000", "case_00001"]
    ds = SliceDataset(shards, ids, group="refine", context=3)
    i = 0
    crossings = 0
    for cid in ids:
        r = _refine_arrays(shards, cid)
        stack = r["stack"]
        for s in range(len(stack)):
            item = ds[i]
            assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
            assert item["case_id"] == cid and item["slice"] == s
            assert np.array_equal(item["label"].numpy(), r["label"][s])
            lo = int(np.flatnonzero(stack == stack[s])[0])
            hi = int(np.flatnonzero(stack == stack[s])[-1])
            for ch, j in enumerate((s - 1, s, s + 1)):
                want = r["image"][min(max(j, lo), hi)]   # clamped to the slice's own window
                assert np.array_equal(item["image"][ch].numpy(), want), (cid, s, ch)
            crossings += int(s + 1 < len(stack) and stack[s + 1] != stack[s])
            i += 1
    assert i == len(ds)
    assert crossings >= 1, "no window boundary inside a case: the check would be vacuous"


def test_context_1_is_exactly_the_main_behaviour(shards):
    plain = SliceDataset(shards, ["case_00002", "case_00003"])
    main = SliceDataset(shards, ["case_00002", "case_00003"], group="main", context=1)
    assert len(plain) == len(main) and np.array_equal(plain.classes_present, main.classes_present)
    for i in range(len(plain)):
        a, b = plain[i], main[i]
        assert a.keys() == b.keys() and a["image"].shape == (1, 32, 32)
        for k in a:
            assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), (i, k)
    ref = SliceDataset(shards, ["case_00002"], group="refine", context=1)
    r = _refine_arrays(shards, "case_00002")
    assert len(ref) == len(r["image"])
    assert all(np.array_equal(ref[s]["image"].numpy(), r["image"][s][None]) for s in range(len(ref)))
    ctx = SliceDataset(shards, ["case_00002"], group="main", context=3)
    assert ctx[0]["image"].shape == (3, 32, 32) and torch.equal(ctx[0]["image"][1:2], plain[0]["image"])
    with pytest.raises(ValueError, match="odd"):
        SliceDataset(shards, group="refine", context=2)


# ----------------------------------------------------------------------------- train --stage
def _one_line_errors(text: str, needle: str) -> list[str]:
    return [ln for ln in text.splitlines() if needle in ln]


def test_stage_refine_without_refine_windows_is_one_config_error(data, tmp_path, capsys, caplog):
    shards = tmp_path / "shards"
    assert cli(["preprocess", "--data", str(data), "--out", str(shards), "--slice-size", "32,32",
                "--n-folds", "2", "--set", "refine.enabled=false"]) == 0
    assert "refine" not in ShardSet(shards).preprocessing
    with h5py.File(shards / "shard-case_00000.h5", "r") as f:
        assert "refine" not in f["case_00000"]
    with pytest.raises(ShardError, match="refine.enabled=true"):
        SliceDataset(shards, group="refine", context=3)
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = cli(["train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--stage", "refine",
                  "--epochs", "1", *TRAIN])
    assert rc == 2
    err = capsys.readouterr()
    text = caplog.text + err.out + err.err
    assert "--stage refine" in text and "refine.enabled=true" in text
    said = [r.getMessage() for r in caplog.records if "refine.enabled=true" in r.getMessage()]
    assert len(said) == 1, said   # one clear error, not one per layer
    assert not (tmp_path / "run" / "checkpoints").exists()
    # stage 1 on the same shards is fine
    assert cli(["train", "--shards", str(shards), "--out", str(tmp_path / "loc"), "--stage", "locate",
                "--epochs", "1", "--steps-per-epoch", "1", *TRAIN]) == 0


def test_even_context_is_refused(shards, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        rc = cli(["train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--stage", "refine",
                  "--set", "data.context=2", *TRAIN])
    assert rc == 2
    assert "data.context must be odd" in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stage_both_trains_two_stages_and_resume_skips_them(run, shards, caplog):
    loc, ref = (ckpt.load(run / s / "checkpoints" / "last.pt") for s in ("locate", "refine"))
    assert loc["config"]["stage"] == "locate" and ref["config"]["stage"] == "refine"
    assert loc["model_config"]["in_channels"] == 1 and ref["model_config"]["in_channels"] == 3
    assert loc["epoch"] == ref["epoch"] == 1 and loc["step"] == ref["step"] == 2
    before = {s: (run / s / "checkpoints" / "last.pt").read_bytes() for s in ("locate", "refine")}
    metrics = {s: (run / s / "metrics.jsonl").read_text() for s in ("locate", "refine")}
    for flag in ("--resume", "--auto-resume"):   # --auto-resume finds RUN/locate's last.pt
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert cli(["train", "--shards", str(shards), "--out", str(run), "--stage", "both", "--epochs", "1",
                        "--steps-per-epoch", "2", flag, *TRAIN]) == 0
        skipped = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
        assert len(skipped) == 2 and "stage locate" in skipped[0] and "stage refine" in skipped[1], skipped
        assert "epoch 1/" not in caplog.text
        for s in ("locate", "refine"):
            assert (run / s / "checkpoints" / "last.pt").read_bytes() == before[s], s
            assert (run / s / "metrics.jsonl").read_text() == metrics[s], s


# ----------------------------------------------------------------------------- cascade predict
def _biased(src: Path, dst: Path, logits: list[float]) -> Path:
    """A copy of a checkpoint whose output layer says ``logits`` everywhere (all background, all kidney)."""
    from hpc_dfs.contracts import checkpoint  # through the schema: a hand-edited file would fail its digest
    state = checkpoint.load(src)
    head = [k for k in state["model"] if k.endswith("head.2.bias")]
    assert len(head) == 1, head
    state["model"][head[0]] = torch.tensor(logits, dtype=torch.float32)
    w = head[0][:-len("bias")] + "weight"
    state["model"][w] = torch.zeros_like(state["model"][w])
    checkpoint.save(state, dst)
    return dst


def _predict(*args) -> int:
    return cli(["predict", *map(str, args), "--batch-size", "4"])


def test_a_stage_one_checkpoint_as_refine_checkpoint_is_a_clear_error(run, data, tmp_path, capsys):
    loc = run / "locate" / "checkpoints" / "last.pt"
    rc = _predict("--checkpoint", loc, "--refine-checkpoint", loc, "--input", data, "--out", tmp_path / "p")
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = _one_line_errors(err, "error:")
    assert len(lines) == 1 and str(loc) in lines[0] and "--stage locate, not --stage refine" in lines[0], err
    assert not list(tmp_path.rglob("prediction_*"))


def test_cascade_keeps_shape_and_affine_and_falls_back_without_kidney(run, data, tmp_path, caplog):
    refine_ck = run / "refine" / "checkpoints" / "last.pt"
    loc = run / "locate" / "checkpoints" / "last.pt"
    everywhere = _biased(loc, tmp_path / "kidney.pt", [-50.0, 50.0, -50.0])
    nowhere = _biased(loc, tmp_path / "background.pt", [50.0, -50.0, -50.0])
    ids = ["case_00000", "case_00001"]
    inp = tmp_path / "in"
    for cid in ids:
        shutil.copytree(data / cid, inp / cid)
    shutil.copy(data / "kits.json", inp / "kits.json")

    assert _predict("--checkpoint", everywhere, "--refine-checkpoint", refine_ck, "--input", inp, "--out",
                    tmp_path / "cascade") == 0
    summary = json.loads((tmp_path / "cascade" / "summary.json").read_text())
    for row in summary["cases"]:
        assert row["cascade"]["stage"] == "refine" and len(row["cascade"]["boxes"]) >= 1, row
        src = nib.load(str(inp / row["case_id"] / "imaging.nii.gz"))
        pred = nib.load(str(tmp_path / "cascade" / f"prediction_{row['case_id'][5:]}.nii.gz"))
        assert pred.shape == src.shape and np.array_equal(pred.affine, src.affine)
        # stage 2 decided inside the box: not stage 1's "kidney everywhere"
        assert not np.all(np.asanyarray(pred.dataobj) == 1)

    with caplog.at_level(logging.INFO):
        assert _predict("--checkpoint", nowhere, "--refine-checkpoint", refine_ck, "--input", inp, "--out",
                        tmp_path / "fallback") == 0
    assert _predict("--checkpoint", nowhere, "--input", inp, "--out", tmp_path / "stage1") == 0
    summary = json.loads((tmp_path / "fallback" / "summary.json").read_text())
    for row in summary["cases"]:
        assert row["cascade"] == {"boxes": [], "stage": "locate (no kidney found by stage 1)"}, row
        assert f"{row['case_id']}: stage 1 found no kidney" in caplog.text
        name = f"prediction_{row['case_id'][5:]}.nii.gz"
        a = np.asanyarray(nib.load(str(tmp_path / "fallback" / name)).dataobj)
        b = np.asanyarray(nib.load(str(tmp_path / "stage1" / name)).dataobj)
        assert np.array_equal(a, b) and not a.any()   # stage 1's labels (all background) are kept
