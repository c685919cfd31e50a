"""environment.yml (conda users) stays consistent with pyproject.toml, and the parallel layer works at size 1."""
import re
import tomllib
from pathlib import Path

import yaml

from hpc_dfs import parallel

REPO = Path(__file__).resolve().parents[2]
CONDA_NAMES = {"torch": "pytorch", "xxhash": "python-xxhash"}  # PyPI name -> conda-forge name where they differ


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower()


def test_environment_yml_names_the_same_packages_as_pyproject():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["name"] == "hpc-dfs" and "conda-forge" in env["channels"]
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in pyproject["dependencies"]} | {"torch"}
    missing = {CONDA_NAMES.get(n, n) for n in wanted} - conda
    assert not missing, f"environment.yml lacks {sorted(missing)} that pyproject.toml needs"
    assert {"python", "openmpi", "mpi4py", "pytorch"} <= conda
    assert any(isinstance(d, dict) and "pip" in d for d in env["dependencies"])


def test_dist_single_process_semantics():
    import torch
    parallel.init()
    assert (parallel.rank(), parallel.size(), parallel.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(parallel.allreduce(t, "sum"), t)
    assert parallel.allgather_object({"a": 1}) == [{"a": 1}]
    assert parallel.broadcast_object("x") == "x"
    assert parallel.device().type in ("cpu", "cuda")
    assert parallel.topology()["launcher"] == "none"
