"""Shipped traces by name: `--trace synthetic-drift` from any directory, `symi trace list` one line each, the names
are package data (and an installed copy, built with pip from this tree, finds them from another directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import read_trace
from symi_sim.traces.resolve import SHIPPED_DIR, load_trace, shipped_traces
from tests.cli_checks import one_error_line

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["mixtral-domains", "olmoe-domains", "recorded-tiny-e16-top1", "recorded-tiny-e16-top2", "synthetic-drift"]


def test_every_shipped_trace_is_package_data_with_the_repository_file():
    assert sorted(shipped_traces()) == NAMES
    assert sorted(p.stem for p in (ROOT / "traces").glob("*.parquet")) == NAMES
    for name, path in shipped_traces().items():
        # in a checkout the package's copy is the traces/ file itself, so the two never drift apart
        assert path.resolve() == (ROOT / "traces" / f"{name}.parquet").resolve()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/traces/*.parquet" in package_data["symi_sim"]
    assert SHIPPED_DIR == ROOT / "symi_sim" / "data" / "traces"


def test_trace_list_prints_one_line_per_trace():
    result = CliRunner().invoke(symi, ["trace", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    drift = read_trace(ROOT / "traces" / "synthetic-drift.parquet")
    assert lines[-1].split(None, 1)[1] == (f"{drift.num_steps} steps x {drift.num_layers} layers x {drift.num_experts} "
                                          f"experts, top-{drift.top_k}, 32,768 tokens/step, {drift.model}")


def test_a_name_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trace = load_trace("recorded-tiny-e16-top2")
    assert np.array_equal(trace.counts_SLE, read_trace(ROOT / "traces" / "recorded-tiny-e16-top2.parquet").counts_SLE)
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["simulate", "--trace", "synthetic-drift", "--cluster", "cpu-4", "--steps", "3",
                                       "--policies", "static,symi", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "summary.csv").is_file()
    info = CliRunner().invoke(symi, ["trace", "info", "mixtral-domains"])
    assert info.exit_code == 0 and "5 steps x 3 layers x 8 experts" in info.output, info.output


def test_a_file_of_the_same_name_wins_over_the_shipped_trace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic-drift").mkdir()   # a directory here named like a shipped trace: the user means it
    error = one_error_line(tmp_path, "plan", "--trace", "synthetic-drift", "--cluster", "cpu-4", "--step", "1",
                           "--out", tmp_path / "p.json")
    assert "is a directory of no known records" in error


def test_an_unknown_name_lists_the_shipped_ones(tmp_path):
    error = one_error_line(tmp_path, "simulate", "--trace", "synthetic-drfit", "--cluster", "cpu-4",
                           "--out", tmp_path / "run")
    assert "'synthetic-drfit' does not exist and is not a shipped trace" in error
    assert "synthetic-drift" in error and "symi trace list" in error


@pytest.mark.slow
def test_pip_installed_copy_finds_its_traces_from_another_directory(tmp_path):
    # pip builds from a copy of the tree (it writes build/ and *.egg-info next to the sources), offline: no index,
    # no build isolation (setuptools from this environment), no dependencies (they are this environment's)
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", ".pytest_cache", ".ruff_cache", ".hypothesis", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)   # nothing of the tree is left to find
    installed = target / "symi_sim" / "data" / "traces"
    assert sorted(p.stem for p in installed.glob("*.parquet")) == NAMES
    assert not any(p.is_symlink() for p in installed.iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    symi_script = [sys.executable, str(target / "bin" / "symi")]
    listed = subprocess.run([*symi_script, "trace", "list"], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == NAMES
    where = subprocess.run([sys.executable, "-c", "import symi_sim.traces.resolve as r; print(r.SHIPPED_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()) == installed
    ran = subprocess.run([*symi_script, "simulate", "--trace", "synthetic-drift", "--cluster", "cpu-4", "--steps", "3",
                          "--policies", "static", "--out", "run"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert (elsewhere / "run" / "summary.csv").is_file()
