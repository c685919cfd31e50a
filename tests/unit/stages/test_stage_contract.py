"""The stage contract of the small verbs: a usage problem is one ``hpc-dfs VERB: error:`` line and exit code 2."""
from __future__ import annotations

import pytest

from hpc_dfs.cli import main as cli


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bench_finds_the_repositorys_benchmarks(capsys):
    from hpc_dfs.stages.bench import BENCH_DIR, available
    assert BENCH_DIR.is_dir() and {"preprocess", "reader", "train"} <= set(available())
    assert cli(["bench", "--list"]) == 0
    assert "reader" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench"], "hpc-dfs bench: error: name the benchmarks to run (listed above), or give --all"),
    (["bench", "nosuch"], "hpc-dfs bench: error: unknown benchmark(s) nosuch; available: "),
    (["bench", "--bench-dir", "/nonexistent/bench", "--list"], "hpc-dfs bench: error: --bench-dir /nonexistent/bench: "
                                                                "no such folder"),
    (["models", "--size", "0", "4"], "hpc-dfs models: error: --size must be positive"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert cli(argv) == 2
    assert _one_error_line(capsys).startswith(message)


def test_bench_all_records_each_benchmark_and_the_total(tmp_path):
    """``bench --all`` runs every script but ``quality`` and writes results/bench_all.json (exit 1 when one failed)."""
    import json
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_ok.py").write_text("print('ok')\n")
    (bench / "bench_bad.py").write_text("raise SystemExit(3)\n")
    (bench / "bench_quality.py").write_text("raise SystemExit('quality must not run under --all')\n")
    assert cli(["bench", "--all", "--bench-dir", str(bench)]) == 1
    rec = json.loads((bench / "results" / "bench_all.json").read_text())
    assert sorted((r["benchmark"], r["exit_status"]) for r in rec["runs"]) == [("bad", 3), ("ok", 0)]
    assert rec["total_wall_s"] >= sum(r["wall_s"] for r in rec["runs"]) - 0.2 and rec["machine"]["cpus"] >= 1
