"""Benchmarks write under runs/<benchmark> unless --out names a folder: a default run never modifies the committed
tables in benchmarks/results that the README cites (issue 12)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
WITH_OUT = ("bench_checkpoint", "bench_dispatch", "bench_exchange", "bench_exec", "bench_plan", "bench_simulate")


def _committed() -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((BENCHMARKS / "results").iterdir())}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=True,
                          timeout=300)


def test_a_default_benchmark_run_writes_under_runs_and_leaves_the_committed_tables(tmp_path: Path) -> None:
    before = _committed()
    _run([str(BENCHMARKS / "bench_plan.py"), "--repeats", "1", "--max-steps", "3"], cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs" / "bench_plan").iterdir()) == [
        "bench_plan.csv", "bench_plan.json", "bench_plan_quality.csv", "bench_plan_sweep.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert _committed() == before
    # --out still names the folder
    _run([str(BENCHMARKS / "bench_plan.py"), "--repeats", "1", "--max-steps", "3", "--out", "elsewhere"],
         cwd=tmp_path)
    assert (tmp_path / "elsewhere" / "bench_plan.json").is_file()


@pytest.mark.parametrize("name", WITH_OUT)
def test_every_benchmark_defaults_to_runs(name: str) -> None:
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert f'add_out_option(parser, "{name}")' in source and f'out_dir(args.out, "{name}")' in source
    assert not re.search(r"default=[^\n]*results", source), f"{name} still defaults to benchmarks/results"


def test_out_dir_resolution() -> None:
    from benchmarks.report import RUNS_DIR, out_dir

    assert RUNS_DIR == Path("runs")
    assert out_dir(None, "bench_plan") == Path("runs") / "bench_plan"
    assert out_dir("x/y", "bench_plan") == Path("x/y")
    moe = (BENCHMARKS / "bench_moe_gpu.py").read_text()
    assert '"bench_moe_gpu" if device.type == "cuda" else "bench_moe_cpu"' in moe and "RESULTS" not in moe
