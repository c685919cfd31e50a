"""slurm/ on a live one-node SLURM: the whole pipeline, and preemption with requeue and resume.

Tiny synthetic data (4 phantom cases of 32x32 pixels, 4-6 slices), a tiny model (base 4 channels,
depth 2) and 2 ranks on the node's CPUs (``--gpus-per-node=0 --ntasks-per-node=2``), so that the jobs
take seconds of compute; most of the time goes into starting Python, torch and Horovod per step.
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime

import pytest
import torch

from tests.launch import engine_params, hpc_dfs_cmd, launch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

N_CASES = 4
SYNTH = ["--cases", N_CASES, "--size", 32, "--min-slices", 4, "--max-slices", 6, "--seed", 0]
PREPROCESS_ARGS = "--slice-size 32,32 --n-folds 2"
TINY_TRAIN = "--val-batch-size 4 --set model.base_channels=4 --set model.depth=2 --no-augment --threads 1"
CPU_JOB = {"GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2", "CPUS_PER_TASK": "1"}


def _synth(tmp_path):
    data = tmp_path / "data"
    res = launch(hpc_dfs_cmd("synth", "--out", data, *SYNTH), launcher="none", timeout=300)
    assert res.returncode == 0, res.output
    return data


def _when(s: str) -> datetime:
    return datetime.fromisoformat(s)


@pytest.mark.parametrize("engine", engine_params("horovod", "torch"))
def test_pipeline_preprocess_train_predict(slurm, tmp_path, engine):
    """pipeline.sh with ENGINE=horovod (srun --mpi=pmix) or ENGINE=torch (ranks and rendezvous from SLURM)."""
    data = _synth(tmp_path)
    work = tmp_path / "work"
    env = dict(CPU_JOB, DATA=str(data), WORK=str(work), EPOCHS="2", PREPROCESS_ARGS=PREPROCESS_ARGS, ENGINE=engine,
               TRAIN_ARGS=TINY_TRAIN + " --batch-size 2 --steps-per-epoch 2", TIME_PREPROCESS="00:15:00",
               TIME_TRAIN="00:15:00",
               TIME_PREDICT="00:15:00")
    res = slurm.run("slurm/pipeline.sh", env=env)
    jobs = re.search(r"^JOBS (\d+) (\d+) (\d+)$", res.stdout, re.M)
    assert jobs, res.stdout + res.stderr
    pre, train, pred = jobs.groups()
    # chained with afterok (preprocess alone takes far longer than these two queries)
    assert slurm.job_field(train, "Dependency") == f"afterok:{pre}(unfulfilled)"
    assert slurm.job_field(pred, "Dependency") == f"afterok:{train}(unfulfilled)"

    states = slurm.wait([pre, train, pred], timeout=1200, logs=work / "logs")
    assert states == {pre: "COMPLETED", train: "COMPLETED", pred: "COMPLETED"}, slurm.dump_logs(work / "logs")

    # sacct (job completion records): one run per job, each COMPLETED with exit 0, in dependency order
    acct = slurm.sacct([pre, train, pred])
    assert acct == {j: [("COMPLETED", "0:0")] for j in (pre, train, pred)}, acct
    times = {}
    for line in slurm.run("sacct", "-c", "-n", "-P", "-o", "JobID,Start,End", "-j", f"{pre},{train},{pred}"
                          ).stdout.splitlines():
        j, start, end = line.split("|")
        times[j] = (_when(start), _when(end))
    assert times[train][0] >= times[pre][1] and times[pred][0] >= times[train][1], times

    # the artefacts of each stage
    shards = work / "shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["cases"]) == N_CASES and all((shards / s).is_file() for s in manifest["shards"])
    ckpt = torch.load(work / "run" / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and ckpt["config"]["engine"] == engine
    preds = sorted((work / "run" / "predictions").glob("prediction_*.nii.gz"))
    assert len(preds) == N_CASES
    evaluation = json.loads((work / "run" / "predictions" / "eval.json").read_text())
    assert len(evaluation["cases"]) == N_CASES

    # logs: one per job, one per rank and step; config and Horovod topology printed at the start
    logs = work / "logs"
    for name, job in (("preprocess", pre), ("train", train), ("predict", pred)):
        log = (logs / f"hpcdfs-{name}-{job}.out").read_text()
        topology = (f"[hpc-dfs topology] world size 2 (allreduce check 2), launcher srun, engine {engine}, horovod "
                    + ("True mpi True" if engine == "horovod" else "False mpi None"))
        assert topology in log, log
        assert f"[hpc-dfs {name}" in log and "FAILED" not in log
        assert (logs / f"hpcdfs-{name}-{job}-{name}-rank0.log").is_file()
        assert (logs / f"hpcdfs-{name}-{job}-{name}-rank1.log").is_file()
    assert "SHARDS=" in (logs / f"hpcdfs-train-{train}.out").read_text()
    assert (logs / f"hpcdfs-predict-{pred}-evaluate-rank0.log").is_file()


@pytest.mark.horovod
def test_pipeline_cascade_stage_both(slurm, tmp_path):
    """STAGE=both: train.sbatch trains locate then refine; predict.sbatch finds both and runs the cascade."""
    data = _synth(tmp_path)
    work = tmp_path / "work"
    env = dict(CPU_JOB, DATA=str(data), WORK=str(work), EPOCHS="1", STAGE="both",
               PREPROCESS_ARGS=PREPROCESS_ARGS + " --set refine.slice_size=32,32",
               TRAIN_ARGS=TINY_TRAIN + " --batch-size 2 --steps-per-epoch 2", TIME_PREPROCESS="00:15:00",
               TIME_TRAIN="00:15:00", TIME_PREDICT="00:15:00")
    res = slurm.run("slurm/pipeline.sh", env=env)
    jobs = re.search(r"^JOBS (\d+) (\d+) (\d+)$", res.stdout, re.M)
    assert jobs, res.stdout + res.stderr
    pre, train, pred = jobs.groups()
    states = slurm.wait([pre, train, pred], timeout=1200, logs=work / "logs")
    assert states == {pre: "COMPLETED", train: "COMPLETED", pred: "COMPLETED"}, slurm.dump_logs(work / "logs")

    run = work / "run"
    for stage in ("locate", "refine"):
        ckpt = torch.load(run / stage / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        assert ckpt["epoch"] == 1 and ckpt["world_size"] == 2 and ckpt["config"]["stage"] == stage
    assert not (run / "checkpoints").exists()   # nothing single-stage was trained
    summary = json.loads((run / "predictions" / "summary.json").read_text())
    assert [c["stage"] for c in summary["checkpoints"]] == ["locate"]
    assert [c["stage"] for c in summary["refine_checkpoints"]] == ["refine"]
    assert summary["n_ok"] == N_CASES and all("cascade" in c for c in summary["cases"])
    assert len(sorted((run / "predictions").glob("prediction_*.nii.gz"))) == N_CASES
    log = (work / "logs" / f"hpcdfs-predict-{pred}.out").read_text()
    assert f"REFINE_CHECKPOINT={run}/refine/checkpoints/best.pt" in log, log
    assert "STAGE=both" in (work / "logs" / f"hpcdfs-train-{train}.out").read_text()


@pytest.mark.parametrize("engine", engine_params("horovod", "torch"))
def test_preemption_checkpoint_requeue_resume(slurm, tmp_path, engine):
    data = _synth(tmp_path)
    shards = tmp_path / "shards"
    res = launch(hpc_dfs_cmd("preprocess", "--data", data, "--out", shards, *PREPROCESS_ARGS.split()),
                 launcher="none", timeout=300)
    assert res.returncode == 0, res.output
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()   # sbatch --output needs an existing folder
    epochs = 8   # of 5 steps of 2 slices: long enough to be signalled mid-run, after epoch 1
    job = slurm.run("sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                    "--time=00:20:00", f"--output={logs}/%x-%j.out", "slurm/train.sbatch",
                    env={"SHARDS": str(shards), "RUN": str(run), "EPOCHS": str(epochs), "LOG_DIR": str(logs),
                         "ENGINE": engine,
                         "TRAIN_ARGS": TINY_TRAIN + " --batch-size 1 --steps-per-epoch 5"}).stdout.strip()

    # wait until the first epoch is done, then preempt (as SLURM does before the time limit)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        if time.monotonic() > deadline or slurm.job_field(job, "JobState") not in ("PENDING", "RUNNING"):
            slurm.run("scancel", job, check=False)
            pytest.fail(f"training never finished an epoch: {slurm.job_field(job, 'JobState')}\n"
                        f"{slurm.dump_logs(logs)}")
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", job)

    states = slurm.wait([job], timeout=900, logs=logs)
    assert states[job] == "COMPLETED", slurm.dump_logs(logs)
    assert slurm.job_field(job, "Restarts") == "1"
    runs = slurm.sacct([job])[job]
    # the requeued run is logged with the state right after the requeue, the second run COMPLETED
    assert len(runs) == 2 and runs[0][0] != "COMPLETED" and runs[1] == ("COMPLETED", "0:0"), runs

    log = (logs / f"hpcdfs-train-{job}.out").read_text()   # --open-mode=append: both runs
    assert "SIGUSR1 received" in log and "training step finished with status 75" in log, log
    assert f"requeueing job {job}" in log and "restart 1" in log, log
    first = (logs / f"hpcdfs-train-{job}-train-rank0.log").read_text()
    stopped = re.search(r"got SIGUSR1: stopped after step (\d+) \(epoch (\d+) \+ (\d+) steps\), wrote (\S+)last\.pt",
                        first)
    assert stopped, first
    second = (logs / f"hpcdfs-train-{job}-r1-train-rank0.log").read_text()
    resumed = re.search(r"resumed from \S+last\.pt: epoch (\d+), step (\d+)", second)
    assert resumed, second
    assert int(resumed.group(2)) == int(stopped.group(1)), (stopped.group(0), resumed.group(0))
    assert 1 <= int(resumed.group(1)) < epochs

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == epochs and ckpt["world_size"] == 2 and ckpt["config"]["engine"] == engine
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))


def _array_tasks(slurm, array_id: str) -> dict[int, tuple[str, str]]:
    """``{task: (JobState, JobId)}`` of a job array, from ``scontrol show job`` (one line per task)."""
    out = slurm.run("scontrol", "show", "job", "-o", array_id, check=False).stdout
    tasks = {}
    for line in out.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if fields.get("ArrayTaskId", "").isdigit():
            tasks[int(fields["ArrayTaskId"])] = (fields.get("JobState"), fields.get("JobId"))
    return tasks


def test_pipeline_cross_validation_job_array(slurm, tmp_path):
    """CV=2: train is a job array, one task per fold (RUN/fold_k); predict waits for the whole array (afterok), then
    takes the ensemble of the folds and predicts and evaluates the pooled out-of-fold set. The torch engine, one rank
    per task: the point is the array, not the ranks."""
    data = _synth(tmp_path)
    work = tmp_path / "work"
    env = dict(CPU_JOB, TASKS_PER_NODE="1", DATA=str(data), WORK=str(work), EPOCHS="1", CV="2", ENGINE="torch",
               PREPROCESS_ARGS="--slice-size 32,32", PREFLIGHT="0",
               TRAIN_ARGS=TINY_TRAIN + " --batch-size 2 --steps-per-epoch 2", PREDICT_ARGS="--no-overlays",
               TIME_PREPROCESS="00:15:00", TIME_TRAIN="00:15:00", TIME_PREDICT="00:15:00")
    res = slurm.run("slurm/pipeline.sh", env=env)
    jobs = re.search(r"^JOBS (\d+) (\d+) (\d+)$", res.stdout, re.M)
    assert jobs, res.stdout + res.stderr
    pre, train, pred = jobs.groups()
    assert "array of 2 tasks, one per fold" in res.stdout
    assert slurm.job_field(pred, "Dependency").startswith(f"afterok:{train}"), slurm.job_field(pred, "Dependency")
    states = slurm.wait([pre, pred], timeout=900, logs=work / "logs")
    assert states == {pre: "COMPLETED", pred: "COMPLETED"}, slurm.dump_logs(work / "logs")
    tasks = _array_tasks(slurm, train)
    assert sorted(tasks) == [0, 1] and all(s == "COMPLETED" for s, _ in tasks.values()), tasks

    run = work / "run"
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    fold_of = {c["case_id"]: c["fold"] for c in manifest["cases"]}
    assert manifest["n_folds"] == 2
    for k, (_, job) in tasks.items():   # task k trained fold k, in its own job
        ckpt = torch.load(run / f"fold_{k}" / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
        assert ckpt["epoch"] == 1 and ckpt["config"]["schedule"]["val_fold"] == k
        assert f"FOLDS={k}" in (work / "logs" / f"hpcdfs-train-{job}.out").read_text()
    cv = json.loads((run / "cv.json").read_text())
    assert cv["missing_folds"] == [] and [f["fold"] for f in cv["folds"]] == [0, 1]   # rebuilt by the last task
    summary = json.loads((run / "predictions" / "summary.json").read_text())
    assert [c["path"] for c in summary["checkpoints"]] == [str(run / f"fold_{k}/checkpoints/best.pt") for k in (0, 1)]
    oof = json.loads((run / "oof" / "summary.json").read_text())
    assert {c["case_id"]: c["fold"] for c in oof["cases"]} == fold_of
    ev = json.loads((run / "oof" / "eval.json").read_text())
    assert ev["mean"]["n_cases"] == N_CASES and sorted(ev["oof"]["per_fold"]) == ["0", "1"]
