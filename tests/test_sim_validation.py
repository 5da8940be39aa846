"""experiments/sim_validation --quick end to end on real gloo training (4 tiny runs), and its grid's promises."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.sim_validation.grid import CALIBRATION, HELD_OUT, grid
from experiments.sim_validation.study import COMPARED, ordered_pairs
from symi_sim.simulator.calibration import load_calibration

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.sim_validation", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_grid_holds_out_what_the_calibration_lacks():
    specs = grid()
    assert len(specs) >= 16 and len({s.name for s in specs}) == len(specs)
    halves = {half: [s for s in specs if s.half == half] for half in (CALIBRATION, HELD_OUT)}
    assert len(halves[HELD_OUT]) >= len(specs) / 2
    for field in ("ranks", "experts", "slots", "policy"):
        seen = {getattr(s, field) for s in halves[CALIBRATION]}
        assert {getattr(s, field) for s in halves[HELD_OUT]} - seen, field   # something the fit never saw
    covered = {(s.ranks, s.experts, s.slots, s.policy, s.capacity_factor, s.router_skew) for s in specs}
    for values, index in (({2, 4}, 0), ({8, 16}, 1), ({2, 4}, 2), ({1.0, 2.0}, 4), ({0.0, 0.5}, 5)):
        assert {c[index] for c in covered} == values
    assert {c[3] for c in covered} == {"static", "symi", "symi-balanced", "flexmoe-10"}
    assert all(s.experts <= s.ranks * s.slots for s in specs)


def test_ordered_pairs_counts_only_clear_differences():
    table = pd.DataFrame({"group": ["a", "a", "a", "b", "b"], "half": [HELD_OUT] * 5,
                          "policy": ["static", "symi", "flexmoe-10", "static", "symi"],
                          "step_measured_ms": [100.0, 104.0, 130.0, 50.0, 60.0],
                          "step_predicted_ms": [90.0, 80.0, 150.0, 70.0, 65.0]})
    pairs = ordered_pairs(table)
    # a: static-symi within 5% (not a pair); static-flexmoe and symi-flexmoe in order; b: static < symi measured,
    # predicted the other way
    assert sorted(zip(pairs["faster_measured"], pairs["slower_measured"], pairs["same_order"], strict=True)) == [
        ("static", "flexmoe-10", True), ("static", "symi", False), ("symi", "flexmoe-10", True)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("simval")
    out, train_dir = base / "run", base / "train"
    result = run_study("--quick", "--train-dir", str(train_dir), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, train_dir, result.stdout


@pytest.mark.slow
def test_quick_outputs(quick_run):
    out, train_dir, stdout = quick_run
    assert stdout.count("trained ") == 4 and f"wrote {out}" in stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "calibration.json", "fit_terms.csv",
                                               "fit_residuals.csv", "runs.csv", "table.csv", "pairs.csv",
                                               "summary.json", "predicted_vs_measured.png"}
    assert (out / "predicted_vs_measured.png").read_bytes()[:8] == PNG_MAGIC
    calibration = load_calibration(out / "calibration.json")
    assert calibration.model == "executor-tiny" and calibration.layer_forward_fixed_s > 0
    runs = pd.read_csv(out / "runs.csv")
    table = pd.read_csv(out / "table.csv")
    assert len(runs) == len(table) == 4 and set(table["half"]) == {CALIBRATION, HELD_OUT}
    for _, row in runs.iterrows():   # measured: the run's own median over its steps after the warm-up (2)
        metrics = pd.read_csv(train_dir / row["config"] / f"seed{row['seed']}" / "metrics.csv").iloc[2:]
        assert row["measured_step_ms"] == pytest.approx(1e3 * metrics["step_s"].median(), rel=1e-9)
        assert row["measured_expert_forward_ms"] == pytest.approx(1e3 * metrics["time_expert_forward_s"].median(),
                                                                  rel=1e-9)
        assert np.isfinite(row[[c for c in runs.columns if c.startswith("predicted_")]].to_numpy(float)).all()
    for name, phases in COMPARED.items():
        measured = sum(table[f"measured_{p}_ms"] for p in phases)
        np.testing.assert_allclose(table[f"{name}_measured_ms"], measured)
        np.testing.assert_allclose(table[f"{name}_error"], table[f"{name}_predicted_ms"] / measured - 1)
    summary = json.loads((out / "summary.json").read_text())
    held = table[table["half"] == HELD_OUT]
    assert summary[HELD_OUT]["step"] == pytest.approx(float(np.median(np.abs(held["step_error"]))))
    assert set(summary["targets"]) == {"step", "expert_compute", "all_to_all", "expert_state", "order"}
    assert summary["all_targets_met"] == all(t["met"] for t in summary["targets"].values())
    with open(out / "fit_residuals.csv") as f:
        assert len(list(csv.DictReader(f))) > 0


@pytest.mark.slow
def test_trainings_are_reused_and_other_settings_refused(quick_run, tmp_path):
    _, train_dir, _ = quick_run
    again = run_study("--quick", "--train-dir", str(train_dir), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert "trained " not in again.stdout   # every run reused
    assert pd.read_csv(tmp_path / "again" / "runs.csv").equals(pd.read_csv(quick_run[0] / "runs.csv"))
    other = run_study("--quick", "--steps", "7", "--train-dir", str(train_dir), "--out", str(tmp_path / "other"))
    assert other.returncode != 0 and "holds runs of other settings" in other.stderr
    assert not (tmp_path / "other").exists()
