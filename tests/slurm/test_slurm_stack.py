"""The SLURM + MPI + Horovod stack under a live one-node cluster, and the scripts' failure line.

* an sbatch job runs ``srun --mpi=pmix -n 2`` of a Horovod allreduce through :mod:`hpc_dfs.parallel`: both
  ranks see size 2, launcher srun, and the right sum;
* the scripts' plugin fallback (slurm/common.sh ``hd_preflight``) moves on when a plugin cannot start
  Horovod: Debian's Open MPI has no PMI-2 support, so with ``SRUN_MPI="pmi2 pmix"`` the pmi2 try
  really fails and the job goes on with pmix, printing the Horovod topology;
* ``train.sbatch`` without shards fails at once with one ``FAILED`` line and the job is FAILED.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.launch import engine_params

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ALLREDUCE_PY = textwrap.dedent("""
    import sys, torch
    from hpc_dfs import parallel, fsutil
    parallel.init()
    total = parallel.allreduce(torch.tensor([float(parallel.rank() + 1)]), op="sum", name="check").item()
    info = dict(parallel.topology(), total=total, device=str(parallel.device()))
    fsutil.write_json(sys.argv[1] + f"/rank{parallel.rank()}.json", info)
""")


@pytest.mark.parametrize("engine, mpi", engine_params(("horovod", "pmix"), ("torch", "none")))
def test_srun_pmix_horovod_allreduce(slurm, tmp_path, engine, mpi):
    """A 2-rank allreduce through srun: Horovod over PMIx, or the torch engine from SLURM's variables alone."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "check.py").write_text(ALLREDUCE_PY)
    script = tmp_path / "job.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/%x-%j.out
        set -e
        export HPC_DFS_ENGINE={engine}
        srun --mpi={mpi} --kill-on-bad-exit=1 python {tmp_path}/check.py {out}
        """))
    job = slurm.run("sbatch", "--parsable", "--job-name", f"stack-{mpi}", script).stdout.strip().split(";")[0]
    states = slurm.wait([job], timeout=300, logs=tmp_path)
    assert states[job] == "COMPLETED", slurm.dump_logs(tmp_path)
    assert slurm.sacct([job])[job] == [("COMPLETED", "0:0")]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["size"] == 2 and info["local_size"] == 2
        assert info["launcher"] == "srun" and info["engine"] == engine
        assert (info["horovod"] and info["mpi"]) if engine == "horovod" else info["torch_distributed"] == "gloo"
        assert info["total"] == 3.0          # 1 + 2 summed over the two ranks
        assert info["device"] == "cpu"
    assert {i["local_rank"] for i in ranks} == {0, 1}


@pytest.mark.horovod
def test_mpi_plugin_fallback_and_topology(slurm, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/%x-%j.out
        set -u
        HD_STAGE=check
        source slurm/common.sh
        hd_require_slurm
        hd_activate
        hd_logs
        hd_preflight
        echo "chosen plugin: $HD_MPI"
        """))
    job = slurm.run("sbatch", "--parsable", "--job-name", "fallback", script,
                    env={"SRUN_MPI": "pmi2 pmix", "LOG_DIR": str(tmp_path / "logs")}).stdout.strip()
    states = slurm.wait([job], timeout=300, logs=tmp_path)
    log = (tmp_path / f"fallback-{job}.out").read_text()
    assert states[job] == "COMPLETED", slurm.dump_logs(tmp_path)
    assert "srun --mpi=pmi2 could not start a Horovod job" in log
    assert "chosen plugin: pmix" in log
    topo = [line for line in log.splitlines() if line.startswith("[hpc-dfs topology]")]
    assert topo[0].startswith("[hpc-dfs topology] world size 2 (allreduce check 2), launcher srun"), log
    assert any("rank 0/2 local 0/2" in t for t in topo) and any("rank 1/2 local 1/2" in t for t in topo), log


def test_train_sbatch_fails_with_one_clear_line(slurm, tmp_path):
    logs = tmp_path / "logs"
    job = slurm.run("sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1",
                    f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch",
                    env={"SHARDS": str(tmp_path / "missing"), "RUN": str(tmp_path / "run"),
                         "LOG_DIR": str(logs)}).stdout.strip()
    states = slurm.wait([job], timeout=120, logs=tmp_path)
    assert states[job] == "FAILED"
    assert slurm.sacct([job])[job] == [("FAILED", "2:0")]
    log = (tmp_path / f"hpcdfs-train-{job}.out").read_text()
    failed = [line for line in log.splitlines() if "FAILED" in line]
    assert failed == [f"[hpc-dfs train] FAILED (exit 2): no {tmp_path}/missing/manifest.json: run preprocess.sbatch "
                      f"first (or set SHARDS)"], log
