"""`symi calibrate` through click's CliRunner: a calibration file and the printed terms and residuals on success;
one Error line, a non-zero exit and no file (nor a temporary one) on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_calibration import write_synthetic_run

import cli
from cli import symi
from symi_sim.simulator.calibrate import GEMM_FORMS
from symi_sim.simulator.calibration import CALIBRATIONS_DIR, OPTIMIZER_STATE_LOCATIONS, load_calibration
from symi_sim.simulator.run_dirs import DEFAULT_WARMUP_STEPS

PAPER_CSV = CALIBRATIONS_DIR / "paper-motivation-forward.csv"
PAPER_ARGS = ["--latencies", str(PAPER_CSV), "--cluster", "paper-a100-16", "--model", "gpt-small", "--experts", "32"]


def _invoke(*args: object):
    return CliRunner().invoke(symi, ["calibrate", *(str(a) for a in args)])


def test_cli_choices_match_the_library():
    assert set(cli.CALIBRATE_GEMM_FORMS) == set(GEMM_FORMS)
    assert set(cli.CALIBRATE_OPTIMIZER_STATE) == set(OPTIMIZER_STATE_LOCATIONS)
    assert cli.CALIBRATE_WARMUP_STEPS == DEFAULT_WARMUP_STEPS


def test_calibrate_from_latencies_reproduces_the_shipped_file(tmp_path):
    out = tmp_path / "calib.json"
    result = _invoke(*PAPER_ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    assert "layer_forward_fixed_s" in result.output and "FLOP fallback" in result.output
    assert "residual_pct" in result.output and "-1.669" in result.output
    assert f"wrote {out}" in result.output
    fresh, shipped = json.loads(out.read_text()), json.loads((CALIBRATIONS_DIR / "paper-a100-16-gpt-small.json")
                                                            .read_text())
    assert fresh.keys() == shipped.keys()
    for key, value in shipped.items():
        assert fresh[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    assert load_calibration(out).fitted == ("layer_forward_fixed_s", "expert_gemm_flops")


def test_calibrate_power_form(tmp_path):
    out = tmp_path / "power.json"
    result = _invoke(*PAPER_ARGS, "--gemm-form", "power", "--optimizer-state", "gpu", "--out", out)
    assert result.exit_code == 0, result.output
    calibration = load_calibration(out)
    assert calibration.optimizer_state_location == "gpu"
    assert calibration.expert_small_batch_exponent == pytest.approx(0.2227, abs=1e-4)


def test_calibrate_from_run_directories(tmp_path):
    runs = [write_synthetic_run(tmp_path / f"run{i}", d_ff=64 * (i + 1), seed=i) for i in range(2)]
    out = tmp_path / "calib.json"
    result = _invoke(*runs, "--warmup-steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert "run0" in result.output and "backward" in result.output and "send_out_bytes_per_s" in result.output
    calibration = load_calibration(out)
    assert calibration.cluster == "executor" and "layer_forward_fixed_s" in calibration.fitted
    assert "2 symi train run(s)" in calibration.provenance


@pytest.mark.parametrize(("case", "message"), [
    ("neither", "give either --latencies FILE.csv or run directories"),
    ("both", "give either --latencies FILE.csv or run directories"),
    ("no-model", "--latencies needs --cluster and --model"),
    ("nan", "data row 2: forward_ms must be a finite number > 0"),
    ("negative", "data row 3: forward_ms must be a finite number > 0"),
    ("malformed", "not a readable CSV file"),
    ("unknown-column", "unknown ['note']"),
    ("no-metrics", "has no metrics.csv"),
    ("power-runs", "run directories fit the linear GEMM form only"),
    ("model-runs", "--model and --experts go with --latencies"),
    ("toml-out", "must be a .json file"),
    ("bad-cluster", "unknown cluster"),
])
def test_bad_input_leaves_nothing(tmp_path, case, message):
    work = tmp_path / "work"
    work.mkdir()
    run = write_synthetic_run(tmp_path / "run")
    csv = tmp_path / "lat.csv"
    rows = {"nan": "1,455\n2,nan\n4,571\n", "negative": "1,455\n2,500\n4,-571\n", "malformed": '1,"455\n',
            "unknown-column": None}.get(case, "1,455\n2,506\n4,571\n")
    csv.write_text("capacity_factor,forward_ms,note\n1,455,x\n2,500,y\n" if rows is None
                   else f"capacity_factor,forward_ms\n{rows}")
    if case == "no-metrics":
        (run / "metrics.csv").unlink()
    out = work / ("calib.toml" if case == "toml-out" else "calib.json")
    latencies = ["--latencies", csv, "--cluster", "paper-a100-16", "--model", "gpt-small"]
    args = {"neither": [], "both": [*latencies, run], "no-model": ["--latencies", csv, "--cluster", "paper-a100-16"],
            "no-metrics": [run], "power-runs": [run, "--gemm-form", "power"], "model-runs": [run, "--experts", 4],
            "bad-cluster": [*latencies[:2], "--cluster", "nowhere", "--model", "gpt-small"]}.get(case, latencies)
    result = _invoke(*args, "--out", out)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert list(work.iterdir()) == []          # no output, no temporary file
    assert not Path(out).exists()
