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
MAX_FILE_LINES = 500
MAX_STAGE_LINES = 300
#: each on-disk contract's file names, written as a literal only in its module ``hpc_dfs/contracts/<name>.py``
CONTRACT_NAMES = {
    "kits": ("imaging.nii.gz", "segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz", "kits.json", "kits23.json"),
    "shards": ("manifest.json", "clinical_pipeline.json"),
    "checkpoint": ("last.pt", "best.pt"),
    "run": ("metrics.jsonl", "run.json", "config.toml", "curves.png", "cv.json", "fold.json"),
    "prediction": ("summary.json", "risk.csv"),
    "evaluation": ("eval.json",),
}
#: name prefixes of per-case files (``prediction_00012.nii.gz``): a literal that is the prefix, or a file name
#: starting with it
CONTRACT_PREFIXES = {"prediction_": ("kits", "prediction"), "probabilities_": ("prediction",),
                     "overlay_": ("prediction",)}


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
def test_only_parallel_imports_horovod_mpi4py_and_torch_distributed(lib):
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


def test_parallel_imports_no_stage_and_nothing_imports_cli():
    bad = [f"{_rel(p)}: {n}" for p, t in _modules() if "/parallel/" in _rel(p)
           for n in _imports(t) if n.startswith("hpc_dfs.") and not n.startswith(("hpc_dfs.parallel", "hpc_dfs.config",
                                                                                   "hpc_dfs.errors"))]
    bad += [f"{_rel(p)}: {n}" for p, t in _modules() if _rel(p) not in ("hpc_dfs/__main__.py", "hpc_dfs/cli.py")
            for n in _imports(t) if n == "hpc_dfs.cli" or n.startswith("hpc_dfs.cli.")]
    assert not bad, bad


def test_contracts_import_only_errors_fsutil_and_log():
    allowed = ("hpc_dfs.contracts", "hpc_dfs.errors", "hpc_dfs.fsutil", "hpc_dfs.log")
    bad = [f"{_rel(p)}: {n}" for p, t in _modules() if "/contracts/" in _rel(p)
           for n in _imports(t) if n.startswith("hpc_dfs.") and not n.startswith(allowed)]
    assert not bad, bad


def test_checkpoints_are_read_only_through_the_schema():
    bad = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and _rel(path) != "hpc_dfs/contracts/checkpoint.py"):
                bad.append(f"{_rel(path)}:{node.lineno}")
    assert not bad, f"torch.load outside hpc_dfs/contracts/checkpoint.py: {bad}"


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
    # the project's own files: what git tracks, and untracked files it does not ignore (a virtualenv under bench/
    # is ignored); outside a git checkout, every .py file below the folders
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *LINTED],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        every = {(ROOT / f).resolve() for f in listed.stdout.splitlines() if f.endswith(".py") and (ROOT / f).exists()}
    else:
        every = {p.resolve() for d in LINTED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert len(every) > 100, f"only {len(every)} .py files found under {LINTED}"
    assert every <= seen, f"ruff does not check: {sorted(str(p.relative_to(ROOT)) for p in every - seen)}"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_file_longer_than_500_lines_and_no_stage_driver_longer_than_300():
    long = [f"{_rel(p)} ({_lines(p)} lines)" for p, _ in _modules() if _lines(p) > MAX_FILE_LINES]
    long += [f"{_rel(p)} ({_lines(p)} lines, a stage driver)" for p, _ in _modules()
             if "/stages/" in _rel(p) and _lines(p) > MAX_STAGE_LINES]
    assert not long, "files too long (libraries go in their own package, stages stay drivers):\n" + "\n".join(long)


def test_no_stage_imports_another_stage():
    bad = []
    for path, tree in _modules():
        if "/stages/" not in _rel(path):
            continue
        me = "hpc_dfs.stages." + path.stem
        bad += [f"{_rel(path)}: {n}" for n in _imports(tree)
                if n.startswith("hpc_dfs.stages.") and n.split(".")[2] != path.stem and not n.startswith(me)]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "hpc_dfs.stages":
                bad += [f"{_rel(path)}: hpc_dfs.stages.{a.name}" for a in node.names if a.name != path.stem]
    assert not bad, f"a stage imports another stage: {bad}"


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _contract_of(value: str) -> tuple[str, ...]:
    """The contract modules allowed to hold ``value``: () when it names no contract file."""
    if any(c.isspace() for c in value):  # prose (a help text, a message) may mention a file by name
        return ()
    for module, names in CONTRACT_NAMES.items():
        if any(n in value for n in names):
            return (module,)
    for prefix, modules in CONTRACT_PREFIXES.items():
        if value == prefix or (value.startswith(prefix) and value.endswith((".nii.gz", ".nii", ".png"))):
            return modules
    return ()


def test_contract_file_names_are_written_only_in_their_contract_module():
    bad = []
    for path, tree in _modules():
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                allowed = _contract_of(node.value)
                if allowed and _rel(path) not in {f"hpc_dfs/contracts/{m}.py" for m in allowed}:
                    bad.append(f"{_rel(path)}:{node.lineno} {node.value!r} (hpc_dfs/contracts/{allowed[0]}.py)")
    assert not bad, "contract file names outside their contract module:\n" + "\n".join(bad)
