"""2-rank training jobs (mpirun / horovodrun --gloo): the proofs of rank invariance, resume and preemption.

- np=2 reaches the weights of np=1 after k steps (fp32, CPU, deterministic, SyncBatchNorm, with
  augmentation on) within 1e-5 relative (norm of the whole weight vector) with SGD and dropout 0: the
  gradient averaging is the real thing; and within 1e-3 after 8 steps with the defaults (Adam, dropout
  0.2, augmentation), whose dropout masks are drawn from (seed, step, global sample index);
- a run stopped after epoch 1 and resumed ends with the weights of an uninterrupted run (np=1, np=2);
- SIGUSR1 to the job (or SIGTERM to one rank only) writes a checkpoint and exits with 75, and the run
  resumed from that mid-epoch checkpoint again matches the uninterrupted one;
- SIGKILL of one rank makes the job exit non-zero within 60 s, naming the dead rank.

Each proof is also run for the cascade's stage 2 (``--stage refine``: the shards' kidney windows, 2.5D with
3 slices as channels), parametrized as ``stage``.

Tiny shards (4 phantom cases of 32x32 slices, stage-2 windows of 32x32 at 3 mm) are made once per session
with the real ``hpc-dfs synth`` + ``preprocess``; the model is the DFS fusion model at base width 4.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hpc_dfs.errors import EXIT_PREEMPTED
from hpc_dfs.contracts import checkpoint

from tests import lock
from tests.launch import hpc_dfs_cmd, job_env, launch, launcher_prefix, REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

#: small, deterministic settings: 22 training slices, global batch 4 -> 5 steps per epoch
TINY = ["--num-workers", "0", "--set", "model.base_channels=4", "--set", "model.dropout=0.0",
        "--global-batch-size", "4", "--batch-size", "4", "--deterministic", "--seed", "3", "--log-every", "1",
        "--val-batch-size", "8", "--optimizer", "sgd", "--lr", "0.05"]
#: per cascade stage, put before a test's own flags (which win): stage 2 has 44 training windows' slices,
#: cut to the 5 steps per epoch of stage 1 so that both stages share the tests' step arithmetic
STAGE = {"locate": [], "refine": ["--stage", "refine", "--steps-per-epoch", "5"]}


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_shards")
    res = launch(hpc_dfs_cmd("synth", "--out", root / "data", "--cases", 4, "--seed", 0, "--size", 32,
                             "--min-slices", 6, "--max-slices", 8), launcher="none", timeout=180)
    assert res.returncode == 0, res.output
    res = launch(hpc_dfs_cmd("preprocess", "--data", root / "data", "--out", root / "shards", "--slice-size",
                             "32,32", "--n-folds", 4, "--set", "refine.slice_size=32,32", "--set",
                             "refine.spacing=3.0"), launcher="none", timeout=180)
    assert res.returncode == 0, res.output
    return root / "shards"


def train(shards: Path, out: Path, *flags, np: int = 1, launcher: str = "none", timeout: float = 300,
          stage: str = "locate"):
    cmd = hpc_dfs_cmd("train", "--shards", shards, "--out", out, *TINY, *STAGE[stage], *map(str, flags))
    return launch(cmd, np=np, launcher=launcher if np > 1 else "none", timeout=timeout)


def weights(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def model_rel_diff(a: dict, b: dict) -> float:
    """``||a - b|| / ||a||`` over all floating-point weights and buffers of two state dicts, as one vector.

    This is the measure for np=2 vs np=1: per tensor, the BatchNorm biases (norm ~1e-3 after a few
    steps) are gradients of sums over ~10^4 cancelling terms, whose float32 rounding depends on the
    summation order (one process sums 4 samples, two ranks sum 2 + 2 and allreduce), so their
    *own* relative difference reflects float32 cancellation, not the averaging.
    """
    keys = [k for k, t in a.items() if torch.is_floating_point(t)]
    va = torch.cat([a[k].flatten().double() for k in keys])
    vb = torch.cat([b[k].flatten().double() for k in keys])
    return float((va - vb).norm() / va.norm())


def max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest ||a - b|| / ||a|| over the floating-point tensors of two state dicts."""
    worst, where = 0.0, ""
    assert a.keys() == b.keys()
    for k, ta in a.items():
        if not torch.is_floating_point(ta):
            # num_batches_tracked: hpc_dfs.parallel.SyncBatchNorm at size 1 calls F.batch_norm, which does not
            # count batches (reported to the coordinator); it only matters for momentum=None
            assert k.endswith("num_batches_tracked") or torch.equal(ta, b[k]), k
            continue
        rel = float((ta - b[k]).norm() / ta.norm().clamp_min(1e-12))
        if rel > worst:
            worst, where = rel, k
    return worst, where


@pytest.fixture(scope="session")
def single_process_runs(shards, tmp_path_factory):
    """The 1-rank reference run of a stage (made once per session and stage)."""
    runs: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"np1_{stage}") / "run"
            res = train(shards, out, "--epochs", 1, "--max-steps", 4, stage=stage)
            assert res.returncode == 0, res.output
            runs[stage] = out
        return runs[stage]
    return get


# --------------------------------------------------------------------------- np=2 == np=1
@pytest.mark.parametrize("launcher, stage", [("mpirun", "locate"), ("horovodrun", "locate"), ("mpirun", "refine")])
def test_two_ranks_reach_single_process_weights(shards, single_process_runs, tmp_path, launcher, stage):
    out = tmp_path / "np2"
    res = train(shards, out, "--epochs", 1, "--max-steps", 4, np=2, launcher=launcher, stage=stage)
    assert res.returncode == 0, res.output
    assert "global batch 4 = 2 ranks x 2 per rank" in res.output
    one, two = weights(single_process_runs(stage)), weights(out)
    assert one["step"] == two["step"] == 4 and two["world_size"] == 2
    assert one["config"]["stage"] == two["config"]["stage"] == stage
    assert one["model_config"]["in_channels"] == two["model_config"]["in_channels"] == (3 if stage == "refine" else 1)
    rel = model_rel_diff(one["model"], two["model"])
    assert rel < 1e-5, f"np=2 weights differ from np=1 by {rel:.2e} (relative); {lock.note()}"
    worst, where = max_rel_diff(one["model"], two["model"])   # per tensor: float32 noise, loosely bounded
    assert worst < 1e-3, f"{where} differs by {worst:.2e}"

    # the comparison is not vacuous: training moved the weights far more than the tolerance
    from hpc_dfs import parallel
    from hpc_dfs.models import build_model
    torch.manual_seed(3)
    init = parallel.convert_sync_batchnorm(build_model(**one["model_config"])).state_dict()
    moved = model_rel_diff(one["model"], init)
    assert moved > 100 * 1e-5, f"weights barely moved ({moved:.2e}): the equivalence check would be vacuous"
    # and the validation metrics, computed from cases split over ranks, agree too
    for key in ("kidney_dice", "tumor_dice", "val_loss"):
        assert one["metrics"][key] == pytest.approx(two["metrics"][key], rel=1e-4, abs=1e-6), key


#: the defaults on top of TINY: Adam at its default rate, dropout 0.2 (later flags and --set win)
DEFAULTS = ["--optimizer", "adam", "--lr", "0.001", "--set", "model.dropout=0.2"]


def test_two_ranks_reach_single_process_weights_with_the_defaults(shards, tmp_path):
    """Adam + dropout + augmentation: np=2 within 1e-3 of np=1 after 8 steps (README, `train --help`)."""
    runs = {}
    for np_ in (1, 2):
        runs[np_] = tmp_path / f"np{np_}"
        res = train(shards, runs[np_], *DEFAULTS, "--epochs", 2, "--max-steps", 8, np=np_, launcher="mpirun")
        assert res.returncode == 0, res.output
    one, two = weights(runs[1]), weights(runs[2])
    assert one["step"] == two["step"] == 8 and two["world_size"] == 2
    assert one["model_config"]["dropout"] == 0.2 and one["config"]["optim"]["optimizer"] == "adam"
    rel = model_rel_diff(one["model"], two["model"])
    assert rel < 1e-3, f"np=2 weights differ from np=1 by {rel:.2e} (relative) with the defaults; {lock.note()}"
    torch.manual_seed(3)
    from hpc_dfs import parallel
    from hpc_dfs.models import build_model
    init = parallel.convert_sync_batchnorm(build_model(**one["model_config"])).state_dict()
    assert model_rel_diff(one["model"], init) > 10 * 1e-3, "weights barely moved: the check would be vacuous"


# --------------------------------------------------------------------------- resume == uninterrupted
@pytest.mark.parametrize("np_, optimizer, stage", [(1, "adam", "locate"), (2, "sgd", "locate"), (2, "sgd", "refine")])
def test_resume_equals_uninterrupted(shards, tmp_path, np_, optimizer, stage):
    common = ["--epochs", 2, "--steps-per-epoch", 3, "--optimizer", optimizer]
    full = tmp_path / "full"
    res = train(shards, full, *common, np=np_, launcher="mpirun", stage=stage)
    assert res.returncode == 0, res.output

    part = tmp_path / "part"
    res = train(shards, part, *common, "--max-steps", 3, np=np_, launcher="mpirun", stage=stage)  # after epoch 1
    assert res.returncode == 0, res.output
    assert weights(part)["epoch"] == 1
    res = train(shards, part, *common, "--resume", np=np_, launcher="mpirun", stage=stage)
    assert res.returncode == 0, res.output
    assert "resumed from" in res.output

    a, b = weights(full), weights(part)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    rel, where = max_rel_diff(a["model"], b["model"])
    assert rel < 1e-6, f"resumed run differs by {rel:.2e} (relative) in {where}"
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, lines  # the resumed run continues the metrics log, it does not duplicate it


def test_resume_refuses_changed_shards(shards, tmp_path):
    out = tmp_path / "run"
    res = train(shards, out, "--epochs", 1, "--max-steps", 1)
    assert res.returncode == 0, res.output
    state = weights(out)
    state["manifest_sha256"] = "0" * 64  # as if trained on other shards
    checkpoint.save(state, out / "checkpoints" / "last.pt")  # through the schema, so its content digest matches
    res = train(shards, out, "--epochs", 2, "--resume", np=2, launcher="mpirun")
    assert res.returncode == 2, res.output
    assert "manifest sha256" in res.output and "epoch 1/" not in res.output


# --------------------------------------------------------------------------- bad configuration
def test_bad_config_fails_before_work(shards, tmp_path):
    res = train(shards, tmp_path / "a", "--global-batch-size", 5, np=2, launcher="mpirun")
    assert res.returncode != 0
    assert "cannot be split evenly over 2 ranks" in res.output and "epoch 1/" not in res.output
    res = train(tmp_path / "nope", tmp_path / "b", np=2, launcher="mpirun")
    assert res.returncode != 0 and "does not exist" in res.output
    assert not (tmp_path / "b" / "checkpoints").exists()


# --------------------------------------------------------------------------- preemption and rank death
def _start(shards: Path, out: Path, *flags, np: int = 2, stage: str = "locate") -> subprocess.Popen:
    cmd = launcher_prefix("mpirun", np) + hpc_dfs_cmd("train", "--shards", shards, "--out", out, *TINY,
                                                      *STAGE[stage], *map(str, flags))
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=job_env(), cwd=REPO, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early ({proc.returncode}):\n{proc.communicate()[0]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{path} did not appear in {timeout}s:\n{proc.communicate()[0]}")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"job still running {timeout}s after the signal (hang):\n{out}") from None
    return proc.returncode, out, time.time() - t0


def _rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    import psutil
    ranks = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "OMPI_COMM_WORLD_RANK" in env and "python" in child.name():
            ranks[int(env["OMPI_COMM_WORLD_RANK"])] = child.pid
    return ranks


@pytest.mark.parametrize("target, stage", [("job", "locate"), ("one-rank", "locate"), ("job", "refine")])
def test_preemption_writes_checkpoint_and_resumes(shards, tmp_path, target, stage):
    """SIGUSR1 to mpirun (forwarded to every rank), or SIGTERM to rank 1 only: both ranks agree to stop."""
    out = tmp_path / "run"
    proc = _start(shards, out, "--epochs", 40, stage=stage)
    _wait_for(out / "checkpoints" / "epoch_0001.pt", proc)
    if target == "job":
        os.kill(proc.pid, signal.SIGUSR1)
    else:
        os.kill(_rank_pids(proc)[1], signal.SIGTERM)
    code, log, _ = _finish(proc, 120)
    assert code == EXIT_PREEMPTED, log
    assert "exiting with 75" in log and ("SIGUSR1" in log if target == "job" else "another rank" in log or
                                         "SIGTERM" in log)
    state = weights(out)
    assert 5 <= state["step"] < 200 and state["epoch"] == state["step"] // 5
    assert state["config"]["stage"] == stage
    # resuming finishes the run from the mid-epoch checkpoint
    res = train(shards, out, "--epochs", 40, "--resume", "--max-steps", state["step"] + 2, np=2,
                launcher="mpirun", stage=stage)
    assert res.returncode == 0, res.output
    assert weights(out)["step"] == state["step"] + 2


@pytest.mark.parametrize("stage", ["locate", "refine"])
def test_preempted_mid_epoch_resume_equals_uninterrupted(shards, tmp_path, stage):
    """A checkpoint taken mid-epoch on a signal resumes to the same weights as a run never stopped."""
    full = tmp_path / "full"
    res = train(shards, full, "--epochs", 4, np=2, launcher="mpirun", stage=stage)
    assert res.returncode == 0, res.output
    part = tmp_path / "part"
    proc = _start(shards, part, "--epochs", 4, stage=stage)
    _wait_for(part / "checkpoints" / "epoch_0001.pt", proc)
    os.kill(proc.pid, signal.SIGUSR1)
    code, log, _ = _finish(proc, 120)
    assert code != 0, "the run finished before the signal arrived: give the partial run more epochs on this machine"
    assert code == EXIT_PREEMPTED, log
    res = train(shards, part, "--epochs", 4, "--resume", np=2, launcher="mpirun", stage=stage)
    assert res.returncode == 0, res.output
    rel, where = max_rel_diff(weights(full)["model"], weights(part)["model"])
    assert rel < 1e-6, f"{rel:.2e} in {where}"


@pytest.mark.parametrize("stage", ["locate", "refine"])
def test_no_hang_when_a_rank_dies(shards, tmp_path, stage):
    out = tmp_path / "run"
    proc = _start(shards, out, "--epochs", 200, stage=stage)
    _wait_for(out / "checkpoints" / "epoch_0001.pt", proc)
    pids = _rank_pids(proc)
    os.kill(pids[1], signal.SIGKILL)
    code, log, took = _finish(proc, 60)
    assert code != 0, log
    assert took < 60
    assert "signal 9" in log or "Killed" in log, log[-3000:]
