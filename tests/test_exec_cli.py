"""`symi train` from the command line: bad input is one clear error before any process starts; a run writes its
directory; the CLI and the simulator stay free of torch."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import symi


@pytest.mark.parametrize("args,message", [
    (["--experts", "9", "--slots", "2"], "9 experts need at least 9 slots"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", "oracle"], "current step's loads"),
    (["--policy", "flexmoe-5", "-o", "threshold=0.5"], "threshold (max/mean GPU load) must be a number >= 1"),
    (["--policy", "flexmoe", "-o", "nope=1"], "unknown option(s) ['nope'] for policy 'flexmoe'"),
    (["--capacity-factor", "abc"], "capacity factor must be a number"),
    (["--capacity-factor", "-1"], "capacity factor must be a finite number > 0"),
    (["--top-k", "5", "--experts", "4"], "top_k 5 exceeds"),
    (["--data", "/no/such/file.txt"], "does not exist"),
])
def test_bad_train_options_fail_cleanly(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(symi, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_existing_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    result = CliRunner().invoke(symi, ["train", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "already exists" in result.output


def test_train_one_rank_writes_the_run_directory(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "1", "--experts", "2", "--slots", "3",
                                       "--steps", "2", "--data", str(data), "--out", str(out), "--record-trace"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.csv", "placements.jsonl", "checkpoint.pt",
                                               "trace.parquet"}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["bytes_dispatch"]) == 0 for r in rows)   # one rank sends nothing


def test_cli_and_simulator_do_not_import_torch() -> None:
    code = "import sys, cli, symi_sim, symi_sim.policies, symi_sim.routing; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "False"


def test_executor_does_not_import_simpy() -> None:
    code = "import sys, symi_exec.trainer; print('simpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "False"
