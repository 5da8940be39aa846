"""`symi simulate` through click's CliRunner: a run directory on success, one Error line and nothing on failure."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import LoadTrace, write_trace


@pytest.fixture()
def trace_path(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.multinomial(64, [0.4, 0.3, 0.2, 0.1], size=(6, 2))
    path = tmp_path / "t.parquet"
    write_trace(LoadTrace(counts, top_k=1, tokens_per_step=64), path)
    return path


def _invoke(*args: str):
    return CliRunner().invoke(symi, ["simulate", *args])


def test_simulate_writes_a_run(tmp_path, trace_path):
    out = tmp_path / "run"
    result = _invoke("--trace", str(trace_path), "--cluster", "cpu-4", "--slots", "2", "--model", "gpt-small",
                     "--fit-model-to-trace", "--policies", "static,symi,flexmoe-2", "--steps", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "time_to_target_s" in result.output and "flexmoe-2" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "config.json", "iterations.parquet",
                                                     "summary.csv"]
    config = json.loads((out / "config.json").read_text())
    assert config["trace_path"] == str(trace_path)
    assert config["cluster"]["slots_per_gpu"] == 2
    assert (config["model"]["num_experts"], config["model"]["num_moe_layers"]) == (4, 2)
    assert config["trace"]["tokens_per_step"] == 32768  # rescaled to gpt-small's batch
    assert config["steps"] == 4


@pytest.mark.parametrize(("extra", "message"), [
    (["--policies", "static,bogus"], "unknown policy 'bogus'"),
    (["--cluster", "CLUSTER_FILE", "--slots", "1", "--policies", "static"], "impossible cluster"),
    (["--policies", "static", "--steps", "50"], "pass --loop"),
    (["--model", "gpt-huge"], "unknown model"),
])
def test_bad_inputs_leave_nothing(tmp_path, trace_path, extra, message):
    out = tmp_path / "run"
    cluster_file = tmp_path / "two-gpus.json"
    cluster_file.write_text(json.dumps({"base": "cpu-4", "gpus_per_node": 2}))  # 2 GPUs x 1 slot < 4 experts
    extra = [str(cluster_file) if arg == "CLUSTER_FILE" else arg for arg in extra]
    args = ["--trace", str(trace_path), "--cluster", "cpu-4", "--fit-model-to-trace", "--out", str(out)]
    result = _invoke(*args, *extra)
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet", "two-gpus.json"]


def test_model_mismatch_needs_the_flag(tmp_path, trace_path):
    result = _invoke("--trace", str(trace_path), "--cluster", "cpu-4", "--out", str(tmp_path / "run"))
    assert result.exit_code != 0 and "--fit-model-to-trace" in result.output
    assert not (tmp_path / "run").exists()


def test_bad_trace_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    result = _invoke("--trace", str(bad), "--out", str(tmp_path / "run"))
    assert result.exit_code != 0 and "Error:" in result.output
    assert not (tmp_path / "run").exists()


def test_convergence_calibration_file_sets_iterations_to_target(tmp_path, trace_path):
    # an exact power law i = 100 * s**-1 (i_full 100, exponent 1): iterations_to_target = 100 / survival
    calibration = tmp_path / "cal.csv"
    calibration.write_text("survival,iterations\n0.5,200\n0.8,125\n1.0,100\n")
    out = tmp_path / "run"
    result = _invoke("--trace", str(trace_path), "--cluster", "cpu-4", "--slots", "2", "--fit-model-to-trace",
                     "--policies", "static,symi", "--steps", "3", "--convergence", str(calibration), "--out", str(out))
    assert result.exit_code == 0, result.output
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    np.testing.assert_allclose(summary["iterations_to_target"], 100.0 / summary["survival"], rtol=1e-9)
    np.testing.assert_allclose(summary["time_to_target_s"], summary["iterations_to_target"] * summary["mean_time_s"],
                               rtol=1e-9)
    config = json.loads((out / "config.json").read_text())
    assert config["convergence"]["exponent"] == pytest.approx(1.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("survival,iterations\n1.5,10\n0.5,20\n")
    result = _invoke("--trace", str(trace_path), "--cluster", "cpu-4", "--slots", "2", "--fit-model-to-trace",
                     "--policies", "static", "--steps", "3", "--convergence", str(bad), "--out", str(tmp_path / "r2"))
    assert result.exit_code != 0 and "Error:" in result.output and "survival" in result.output
    assert not (tmp_path / "r2").exists()
