"""``train --folds``: the folds asked for, the fold folders and their records, resuming, and the run contract's reading
of them (``fold_checkpoints``, ``cv_summary``), on a real tiny run (6 phantom cases in 3 folds, one process)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hpc_dfs import parallel
from hpc_dfs.cli import main as cli
from hpc_dfs.config import ConfigError
from hpc_dfs.contracts import checkpoint as ckpt, run as run_contract, shards as shards_contract
from hpc_dfs.training.folds import parse_folds

TRAIN = ["--epochs", "1", "--steps-per-epoch", "2", "--num-workers", "0", "--set", "model.base_channels=4",
         "--global-batch-size", "4", "--batch-size", "4", "--val-batch-size", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    assert cli(["synth", "--out", str(root / "data"), "--cases", "6", "--seed", "0", "--size", "32",
                "--min-slices", "6", "--max-slices", "8"]) == 0
    parallel.init()
    assert cli(["preprocess", "--data", str(root / "data"), "--out", str(root / "shards"), "--slice-size", "32,32",
                "--n-folds", "3", "--set", "refine.enabled=false"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def run(shards) -> Path:
    """Folds 0 and 2 of 3 (fold 1 left out on purpose)."""
    out = shards.parent / "run"
    assert cli(["train", "--shards", str(shards), "--out", str(out), "--folds", "2,0", *TRAIN]) == 0
    return out


def test_parse_folds():
    assert parse_folds("all", 3) == [0, 1, 2]
    assert parse_folds(" ALL ", 2) == [0, 1]
    assert parse_folds("2,0", 3) == [0, 2]
    for bad, msg in (("0,3", "the shards have 3 folds (0..2); no fold 3"), ("a", "give 'all' or fold numbers"),
                     ("-1", "give 'all' or fold numbers"), ("1,1", "names a fold twice"), ("", "give 'all'")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            parse_folds(bad, 3)


def test_each_fold_holds_out_its_own_manifest_fold(run, shards):
    manifest = shards_contract.read_manifest(shards)
    assert sorted(run_contract.fold_dirs(run)) == [0, 2]
    for k in (0, 2):
        fold_run = run_contract.fold_dir(run, k)
        info = run_contract.read_fold_info(fold_run)
        assert info["fold"] == k and info["n_folds"] == 3 and info["finished"] and info["stage"] == "locate"
        assert info["val_cases"] == sorted(c["case_id"] for c in manifest["cases"] if c["fold"] == k)
        meta = ckpt.read_meta(ckpt.last_path(fold_run))
        assert meta["config"]["schedule"]["val_fold"] == k and meta["epoch"] == 1
        assert (fold_run / run_contract.METRICS_NAME).is_file()


def test_cv_summary_names_the_missing_fold(run):
    summary = run_contract.read_cv_summary(run)
    assert summary == run_contract.cv_summary(run)
    assert [f["fold"] for f in summary["folds"]] == [0, 2] and summary["missing_folds"] == [1]
    best = [f["stages"]["locate"]["best"]["kidney_dice"] for f in summary["folds"]]
    assert summary["mean"]["locate"]["kidney_dice"] == pytest.approx(sum(best) / 2)
    with pytest.raises(run_contract.RunFolderError, match=r"fold\(s\) 1 missing \(train them: `hpc-dfs train "
                                                          r"--folds 1`\)"):
        run_contract.fold_checkpoints(run)


def test_a_second_run_without_resume_is_refused_and_the_fold_stays_finished(run, shards, caplog):
    rc = cli(["train", "--shards", str(shards), "--out", str(run), "--folds", "0", *TRAIN])
    assert rc == 2
    assert "fold_0/checkpoints/last.pt exists: pass --resume" in caplog.text
    assert run_contract.read_fold_info(run_contract.fold_dir(run, 0))["finished"]


def test_resume_skips_finished_folds_and_trains_the_missing_one(run, shards, tmp_path, caplog):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = ckpt.read_meta(ckpt.last_path(run_contract.fold_dir(copy, 0)))["step"]
    assert cli(["train", "--shards", str(shards), "--out", str(copy), "--folds", "all", "--auto-resume", *TRAIN]) == 0
    assert "fold 0: " in caplog.text and "already finished its 1 epochs; skipped" in caplog.text
    assert ckpt.read_meta(ckpt.last_path(run_contract.fold_dir(copy, 0)))["step"] == before
    folds = run_contract.fold_checkpoints(copy)
    assert [f["fold"] for f in folds] == [0, 1, 2]
    assert all(f["locate"] == ckpt.best_path(run_contract.fold_dir(copy, f["fold"])) and f["refine"] is None
               for f in folds)
    assert run_contract.read_cv_summary(copy)["missing_folds"] == []


def test_an_unfinished_fold_is_named(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info_path = run_contract.fold_dir(copy, 2) / run_contract.FOLD_INFO_NAME
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "finished": False, "manifest_sha256": "another"}))
    ckpt.best_path(run_contract.fold_dir(copy, 0)).unlink()
    with pytest.raises(run_contract.RunFolderError) as e:
        run_contract.fold_checkpoints(copy)
    msg = str(e.value)
    assert ("fold_0 is not finished (no fold_0/checkpoints/best.pt; resume it: `hpc-dfs train --folds 0 --resume`)"
            in msg)
    assert "fold_2 is not finished (still training" in msg and "fold(s) 1 missing" in msg
    assert "the folds were trained on different shards" in msg


def test_folds_need_a_manifest_with_several_folds(tmp_path, caplog):
    data = tmp_path / "data"
    assert cli(["synth", "--out", str(data), "--cases", "2", "--seed", "1", "--size", "32", "--min-slices", "6",
                "--max-slices", "6"]) == 0
    assert cli(["preprocess", "--data", str(data), "--out", str(tmp_path / "s"), "--slice-size", "32,32",
                "--n-folds", "1", "--set", "refine.enabled=false"]) == 0
    assert cli(["train", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--folds", "all",
                *TRAIN]) == 2
    assert "has n_folds = 1: cross-validation needs at least 2 folds" in caplog.text
    assert not (tmp_path / "r").exists()
