"""`symi train` from the command line: bad input is one clear error before any process starts; a run writes its
directory; the CLI and the simulator stay free of torch."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import symi_exec.launch
from cli import symi
from symi_exec.config import TrainConfig, default_of


@pytest.mark.parametrize("args,message", [
    (["--experts", "9", "--slots", "2"], "9 experts need at least 9 slots"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", "oracle"], "current step's loads"),
    (["--policy", "fastermoe"], "shadows hot experts"),
    (["--policy", "flexmoe-5", "-o", "threshold=0.5"], "threshold (max/mean GPU load) must be a finite number >= 1"),
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


@pytest.mark.slow
def test_train_one_rank_writes_the_run_directory(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "1", "--experts", "2", "--slots", "3",
                                       "--steps", "2", "--data", str(data), "--out", str(out), "--record-trace"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.csv", "placements.jsonl", "checkpoint.pt",
                                               "trace.parquet", "COMPLETE"}   # trace_counts.bin went
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["bytes_dispatch"]) == 0 for r in rows)   # one rank sends nothing
    for r in rows:   # the timed parts of the forward and backward lie within them
        parts = {name: float(r[f"time_{name}_s"]) for name in ("expert_forward", "a2a_forward", "a2a_backward",
                                                                "forward", "backward")}
        assert parts["expert_forward"] > 0 and parts["a2a_forward"] > 0 and parts["a2a_backward"] > 0
        assert parts["expert_forward"] + parts["a2a_forward"] < parts["forward"]
        assert parts["a2a_backward"] < parts["backward"]
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["cpu_cores"] >= 1 and resolved["threads_per_rank"] == 1
    assert resolved["slot_compute"] == "padded"   # no grouped GEMM kernel on a CPU: what run_predict must charge


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(symi, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"symi {version('symi')}"
    assert version("symi") == "0.1.0"


def test_cli_and_simulator_do_not_import_torch() -> None:
    code = "import sys, cli, symi_sim, symi_sim.policies, symi_sim.routing; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "False"


def test_executor_does_not_import_simpy() -> None:
    code = "import sys, symi_exec.launch; print('simpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip() == "False"


def test_train_option_defaults_are_train_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each default lives in TrainConfig: `symi train` without options builds TrainConfig's defaults and shows
    them in --help, and every option but the launcher's names a TrainConfig field (so a new one cannot drift)."""
    command = symi.commands["train"]
    field_names = {spec.name for spec in dataclasses.fields(TrainConfig)}
    # besides the launcher's: the model size options, which go to TrainConfig.model_overrides
    assert {param.name for param in command.params} - field_names == {"nproc_per_node", "options", "num_layers",
                                                                       "d_model", "num_heads", "d_ff", "seq_len"}

    launched: list[TrainConfig] = []

    def fake_launch(config: TrainConfig, nproc_per_node: int, **_: object) -> Path:
        launched.append(config)
        raise symi_exec.launch.JobFailed("not launched")

    monkeypatch.setattr(symi_exec.launch, "launch", fake_launch)
    out = str(tmp_path / "run")
    result = CliRunner().invoke(symi, ["train", "--out", out])
    assert result.exit_code == 1 and "not launched" in result.output, result.output
    got, want = dataclasses.asdict(launched[0]), dataclasses.asdict(TrainConfig(out=out))
    assert got.pop("min_lr") == got["lr"] / 10   # the CLI derives it from --lr
    want.pop("min_lr")
    assert got == want

    ctx = command.make_context("train", [])
    for param in command.params:
        if param.name in field_names and param.name != "out" and default_of(param.name) not in (None, False, ()):
            assert f"default: {default_of(param.name)}" in param.get_help_record(ctx)[1], param.name
