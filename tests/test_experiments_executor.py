"""The executor studies' --quick variants (experiments/capacity_factor, experiments/convergence_calibration) run
end to end on real gloo training, as `python -m experiments.<study>`, and write consistent tables and figures."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from symi_sim.simulator.convergence import load_convergence, paper_model

# runs a study or benchmark (training ranks) as a subprocess: `make test-fast` leaves this module out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CAPACITY_FACTOR = "capacity_factor"
CALIBRATION = "convergence_calibration"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_study(study: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", f"experiments.{study}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_config(out: Path, study: str, *args: str) -> dict:
    """config.json of a run directory: the study, its resolved arguments, the command line that made it."""
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == study and config["args"]["out"] == str(out)
    assert config["argv"] == list(args)
    assert config["command"].startswith(f"python -m experiments.{study} ")
    return config["args"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def smoothed_steps_to(target: float, losses: list[float], window: int) -> int | None:
    for i in range(window - 1, len(losses)):
        if statistics.fmean(losses[i - window + 1:i + 1]) <= target:
            return i + 1
    return None


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cf") / "run"
    stdout = run_study(CAPACITY_FACTOR, "--quick", "--out", str(out))
    assert "tokens surviving" in stdout and f"wrote {out}" in stdout
    args = read_config(out, CAPACITY_FACTOR, "--quick", "--out", str(out))
    assert args["quick"] and args["nproc"] == 2 and args["experts"] == 4 and args["steps"] == 30
    assert args["capacity_factors"] == [1.0, 4.0] and args["policies"] == ["static", "symi-balanced"]
    assert args["target_loss"] == "auto" and args["reanalyse"] is None
    return out


def test_capacity_factor_quick_outputs(capacity_run: Path) -> None:
    summary = json.loads((capacity_run / "summary.json").read_text())
    window, steps, target = summary["config"]["window"], summary["config"]["steps"], summary["target_loss"]
    rows = read_csv(capacity_run / "table.csv")
    runs = {(r["policy"], float(r["capacity_factor"])) for r in rows}
    assert runs == {("static", 1.0), ("static", 2.0), ("static", 4.0), ("symi-balanced", 1.0),
                    ("symi-balanced", 4.0)}
    curves = read_csv(capacity_run / "curves.csv")
    assert len(curves) == len(rows) * steps
    by_run = {key: [c for c in curves if (c["policy"], float(c["capacity_factor"])) == key] for key in runs}
    table = {(r["policy"], float(r["capacity_factor"])): r for r in rows}

    for key, row in table.items():
        run = by_run[key]
        assert [int(c["step"]) for c in run] == list(range(steps))
        dropped = [float(c["dropped_fraction"]) for c in run]
        assert all(0.0 <= d <= 1.0 for d in dropped)
        # survival is 1 - the mean dropped fraction over every step; the first step's is recorded separately
        assert float(row["survival"]) == pytest.approx(1.0 - statistics.fmean(dropped), abs=1e-5)
        assert float(row["first_step_survival"]) == pytest.approx(1.0 - dropped[0], abs=1e-5)
        # steps to target: the trailing-mean crossing recomputed from the raw losses; the fitted crossing from the
        # fitted curve a + b t**-c, whose parameters the table holds; the auto target is one every run reaches
        losses = [float(c["loss"]) for c in run]
        trailing = smoothed_steps_to(target, losses, window)
        assert row["steps_to_target_trailing"] == ("" if trailing is None else str(trailing))
        a, b, c_exp = (float(row[k]) for k in ("fit_a", "fit_b", "fit_c"))
        fitted = [a + b * (step + 1) ** -c_exp for step in range(steps)]
        assert [float(c["fitted_loss"]) for c in run] == pytest.approx(fitted, abs=1e-4)
        crossing = next(i + 1 for i in range(window - 1, steps) if fitted[i] <= target + 1e-9)
        assert int(row["steps_to_target"]) == crossing
        assert window <= int(row["steps_to_target"]) <= steps
        # the fit is a least-squares fit: no worse than the flat line at the mean loss
        tail = losses[window:]
        assert sum((f - y) ** 2 for f, y in zip(fitted[window:], tail, strict=True)) <= sum(
            (y - statistics.fmean(tail)) ** 2 for y in tail)
        assert float(row["final_smoothed_loss"]) == pytest.approx(statistics.fmean(losses[-window:]), abs=1e-4)
        assert float(row["step_ms_mean"]) > 0 and float(row["step_ms_median"]) > 0
    assert float(table[("static", 1.0)]["replica_moves_per_step"]) == 0.0

    # step 0: same initial model, batch and replica counts (2 per expert) under every policy, so the same drops at
    # a capacity factor, and never more drops at a larger one
    for cf in (1.0, 4.0):
        assert table[("static", cf)]["first_step_survival"] == table[("symi-balanced", cf)]["first_step_survival"]
    first = [float(table[("static", cf)]["first_step_survival"]) for cf in (1.0, 2.0, 4.0)]
    assert first == sorted(first)
    # over the run: a larger capacity factor keeps more tokens (45% -> 72% -> 100% here: far apart)
    survival = [float(table[("static", cf)]["survival"]) for cf in (1.0, 2.0, 4.0)]
    assert survival[0] < survival[1] < survival[2] <= 1.0
    # re-placing by popularity keeps more tokens than static placement at capacity factor 1
    assert float(table[("symi-balanced", 1.0)]["survival"]) > float(table[("static", 1.0)]["survival"])

    assert summary["target_rule"].startswith("auto") and len(summary["rows"]) == len(rows)
    for name in ("loss_curves.png", "survival_steps.png"):
        assert_png(capacity_run / name)


def test_capacity_factor_reanalyse_reproduces_the_table(capacity_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    run_study(CAPACITY_FACTOR, "--reanalyse", str(capacity_run), "--target-loss", "auto", "--out", str(out))
    assert read_csv(out / "table.csv") == read_csv(capacity_run / "table.csv")
    # the reanalysis records the earlier run's training configuration as its own
    args = read_config(out, CAPACITY_FACTOR, "--reanalyse", str(capacity_run), "--target-loss", "auto", "--out",
                       str(out))
    assert args["reanalyse"] == str(capacity_run) and args["quick"] and args["steps"] == 30
    # another target: crossings move the right way (a lower loss is reached later, or never)
    lower = tmp_path / "lower"
    target = json.loads((capacity_run / "summary.json").read_text())["target_loss"]
    run_study(CAPACITY_FACTOR, "--reanalyse", str(capacity_run), "--target-loss", str(target - 0.05), "--out",
               str(lower))
    for before, after in zip(read_csv(capacity_run / "table.csv"), read_csv(lower / "table.csv"), strict=True):
        assert after["steps_to_target"] == "" or int(after["steps_to_target"]) >= int(before["steps_to_target"])


def check_calibration(out: Path, capacity_rows: list[dict[str, str]]) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    points = read_csv(out / "calibration.csv")
    assert list(points[0])[:2] == ["survival", "iterations"]
    static = sorted((float(r["survival"]), float(r["steps_to_target"])) for r in capacity_rows
                    if r["policy"] == "static")
    assert sorted((float(p["survival"]), float(p["iterations"])) for p in points) == static
    assert summary["fitted_policies"] == ["static"]

    fits = {(f["source"], f["form"]): f for f in read_csv(out / "fits.csv")}
    assert set(fits) == {(s, f) for s in ("executor", "paper") for f in ("power", "exponential")}
    for form in ("power", "exponential"):
        paper = paper_model(form)
        assert float(fits[("paper", form)]["i_full"]) == pytest.approx(paper.i_full, abs=0.01)
        assert float(fits[("paper", form)]["exponent"]) == pytest.approx(paper.exponent, abs=1e-4)
        ours = fits[("executor", form)]
        # the reported errors are the fitted curve's relative errors on the points
        exponent, i_full = float(ours["exponent"]), float(ours["i_full"])
        shape = (lambda s: -math.log(s)) if form == "power" else (lambda s: 1.0 - s)  # noqa: E731
        errors = [i_full * math.exp(exponent * shape(s)) / n - 1.0 for s, n in static]
        assert float(ours["max_rel_error"]) == pytest.approx(max(abs(e) for e in errors), abs=2e-3)
        assert float(ours["rms_rel_error"]) == pytest.approx(math.sqrt(statistics.fmean(e * e for e in errors)),
                                                             abs=2e-3)
    # the shipped format: load_convergence refits the same curve, or rejects the points as the study says
    if summary["calibration_usable"]:
        model = load_convergence(out / "calibration.csv")
        assert model.exponent == pytest.approx(float(fits[("executor", "power")]["exponent"]), abs=1e-4)
        assert model.i_full == pytest.approx(float(fits[("executor", "power")]["i_full"]), abs=0.01)
    else:
        assert fits[("executor", "power")]["rejected"]
        with pytest.raises(ValueError):
            load_convergence(out / "calibration.csv")
    assert_png(out / "calibration.png")
    return summary


def test_convergence_calibration_from_capacity_run(capacity_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibration"
    stdout = run_study(CALIBRATION, "--from", str(capacity_run), "--out", str(out))
    assert "exponential" in stdout and f"wrote {out}" in stdout
    summary = check_calibration(out, read_csv(capacity_run / "table.csv"))
    # the symi-balanced points are held out and scored against the static fit
    held = [p for p in summary["points"] if not p["used_in_fit"]]
    assert {p["policy"] for p in held} == {"symi-balanced"}
    assert summary["held_out_validation"]["power"]["points"] == len(held) == 2
    assert not (out / "capacity_factor").exists()
    args = read_config(out, CALIBRATION, "--from", str(capacity_run), "--out", str(out))
    assert args["source"] == str(capacity_run) and args["policies"] == "static" and not args["quick"]


def test_convergence_calibration_quick_runs_its_own_study(tmp_path: Path) -> None:
    out = tmp_path / "calibration"
    run_study(CALIBRATION, "--quick", "--out", str(out))
    capacity_rows = read_csv(out / "capacity_factor" / "table.csv")
    assert sorted(float(r["capacity_factor"]) for r in capacity_rows) == [1.0, 2.0, 4.0]
    assert {r["policy"] for r in capacity_rows} == {"static"}
    summary = check_calibration(out, capacity_rows)
    assert summary["held_out_validation"]["power"] is None
    assert read_config(out, CALIBRATION, "--quick", "--out", str(out))["quick"]
    # the capacity-factor run it made for itself has its own config.json, with the arguments it was given
    nested = json.loads((out / "capacity_factor" / "config.json").read_text())
    assert nested["study"] == "capacity_factor" and nested["args"]["policies"] == ["static"]
    assert nested["args"]["capacity_factors"] == [1.0, 2.0, 4.0] and nested["args"]["quick"]
