"""The house rules (README "Architecture", hpc_dfs/CONTRACTS.md), checked on the source, so a change that breaks one
fails here."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "hpc_dfs"
LINTED = ("hpc_dfs", "tests", "bench", "preprocess")
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _rel(path: Path) -> str:
    return path.relative_to(PKG.parent).as_posix()


def test_no_function_longer_than_one_screen():
    long = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over %d lines:\n%s" % (MAX_FUNCTION_LINES, "\n".join(long))


@pytest.mark.parametrize("lib", ["horovod", "mpi4py", "torch.distributed"])
def test_only_dist_imports_horovod_and_mpi4py(lib):
    bad = [_rel(p) for p, t in _modules()
           if "/parallel/" not in _rel(p) and any(n == lib or n.startswith(lib + ".") for n in _imports(t))]
    assert not bad, f"{lib} imported outside hpc_dfs/parallel: {bad}"


def test_only_dist_uses_torch_distributed_as_an_attribute():
    """``import torch`` then ``torch.distributed.all_reduce(...)`` is a use of the process groups too."""
    bad = [f"{_rel(p)}:{n.lineno}" for p, t in _modules() if "/parallel/" not in _rel(p) for n in ast.walk(t)
           if isinstance(n, ast.Attribute) and n.attr == "distributed" and isinstance(n.value, ast.Name)
           and n.value.id == "torch"]
    assert not bad, f"torch.distributed used outside hpc_dfs/parallel: {bad}"


def test_models_know_nothing_of_ranks_or_files():
    bad = [f"{_rel(p)}: {n}" for p, t in _modules() if "/models/" in _rel(p)
           for n in _imports(t) if n.startswith("hpc_dfs.") and not n.startswith("hpc_dfs.models")]
    assert not bad, bad


def test_dist_imports_no_stage_and_nothing_imports_cli():
    bad = [f"{_rel(p)}: {n}" for p, t in _modules() if "/parallel/" in _rel(p)
           for n in _imports(t) if n.startswith("hpc_dfs.") and not n.startswith(("hpc_dfs.parallel", "hpc_dfs.config",
                                                                                   "hpc_dfs.errors"))]
    bad += [f"{_rel(p)}: {n}" for p, t in _modules() if _rel(p) not in ("hpc_dfs/__main__.py", "hpc_dfs/cli.py")
            for n in _imports(t) if n == "hpc_dfs.cli" or n.startswith("hpc_dfs.cli.")]
    assert not bad, bad


def test_checkpoints_are_read_only_through_the_schema():
    bad = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and _rel(path) != "hpc_dfs/training/checkpoint.py"):
                bad.append(f"{_rel(path)}:{node.lineno}")
    assert not bad, f"torch.load outside hpc_dfs/training/checkpoint.py: {bad}"


def test_every_error_derives_from_the_one_base():
    from hpc_dfs.errors import HpcDfsError
    import importlib
    bad = []
    for path, tree in _modules():
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                mod = importlib.import_module(_rel(path)[:-3].replace("/", ".").removesuffix(".__init__"))
                if not issubclass(getattr(mod, node.name), HpcDfsError):
                    bad.append(f"{_rel(path)}:{node.lineno} {node.name}")
    assert not bad, f"error classes not derived from hpc_dfs.errors.HpcDfsError: {bad}"


def test_ruff_sees_every_python_file():
    """A folder that ruff excludes by default (``dist``, ``build``, ...) would hide its files from ``make lint``."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", *LINTED], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seen = {Path(line.strip()).resolve() for line in out.stdout.splitlines() if line.strip().endswith(".py")}
    every = {p.resolve() for d in LINTED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert every <= seen, f"ruff does not check: {sorted(str(p.relative_to(ROOT)) for p in every - seen)}"
