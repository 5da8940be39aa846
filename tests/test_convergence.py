import json
import math
import re

import numpy as np
import pytest

from symi_sim.simulator import convergence
from symi_sim.simulator.convergence import (
    PAPER_ITERATIONS,
    PAPER_SURVIVAL,
    ConvergenceModel,
    fit_convergence,
    iterations_to_target,
    load_convergence,
    paper_model,
)


def _hand_fit(form: str, survival, iterations) -> tuple[float, float]:
    """Closed-form simple linear regression of log(iterations) on x (independent of the module's lstsq)."""
    x = -np.log(survival) if form == "power" else 1.0 - np.asarray(survival)
    y = np.log(iterations)
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    return float(np.exp(y.mean() - slope * x.mean())), float(slope)


@pytest.mark.parametrize("form", ["power", "exponential"])
def test_paper_fit_matches_hand_regression_and_reported_error(form):
    model = paper_model(form)
    i_full, exponent = _hand_fit(form, np.array(PAPER_SURVIVAL), np.array(PAPER_ITERATIONS))
    assert model.i_full == pytest.approx(i_full, rel=1e-12)
    assert model.exponent == pytest.approx(exponent, rel=1e-12)
    pairs = zip(PAPER_SURVIVAL, PAPER_ITERATIONS, strict=True)
    rel_err = np.array([model.iterations_to_target(s) / n - 1 for s, n in pairs])
    assert np.abs(rel_err).max() == pytest.approx(model.max_rel_error, rel=1e-12)
    assert math.sqrt(np.mean(rel_err**2)) == pytest.approx(model.rms_rel_error, rel=1e-12)
    # every point reproduced within the error the model reports
    assert np.all(np.abs(rel_err) <= model.max_rel_error + 1e-15)


def test_paper_power_law_values():
    # hand computation: x = -ln s = (0.80075, 0.42221, 0.28890), y = ln n; slope = Sxy / Sxx
    model = paper_model()
    assert model.form == "power"
    assert model.exponent == pytest.approx(0.48408, abs=5e-5)
    assert model.i_full == pytest.approx(421.50, abs=0.01)
    assert model.iterations_to_target(1.0) == pytest.approx(model.i_full)
    assert model.max_rel_error == pytest.approx(0.01882, abs=5e-5)  # at survival 65.56%
    assert model.rms_rel_error == pytest.approx(0.01389, abs=5e-5)


def test_docstring_numbers_are_the_computed_ones():
    doc = convergence.__doc__
    for form in ("power", "exponential"):
        model = paper_model(form)
        line = re.search(rf"^\s+{form}\s+i_full = ([\d.]+), exponent = ([\d.]+), max \|relative error\| "
                         r"([\d.]+)%, RMS ([\d.]+)%$", doc, re.M)
        assert line, form
        i_full, exponent, max_pct, rms_pct = (float(v) for v in line.groups())
        assert i_full == round(model.i_full, 1)
        assert exponent == round(model.exponent, 4)
        assert max_pct == round(100 * model.max_rel_error, 2)
        assert rms_pct == round(100 * model.rms_rel_error, 2)
    # leave-one-out worst cases quoted in the docstring
    survival, iterations = np.array(PAPER_SURVIVAL), np.array(PAPER_ITERATIONS)
    quoted = dict(re.findall(r"(power|exponential) ([\d.]+)%", doc.split("leave-one-out")[1].split("\n\n")[0]))
    assert set(quoted) == {"power", "exponential"}
    for form, pct in quoted.items():
        worst = 0.0
        for k in range(3):
            keep = np.arange(3) != k
            loo = fit_convergence(survival[keep], iterations[keep], form=form)
            worst = max(worst, abs(loo.iterations_to_target(survival[k]) / iterations[k] - 1))
        assert float(pct) == round(100 * worst, 1)
    assert "618 / 421.5 = 1.47x" in doc and "against 1.58x" in doc
    assert round(618 / paper_model().i_full, 2) == 1.47 and round(618 / paper_model("exponential").i_full, 2) == 1.58


@pytest.mark.parametrize("form,i_full,exponent", [("power", 400.0, 0.5), ("exponential", 300.0, 1.25)])
def test_exact_law_recovered(form, i_full, exponent):
    survival = np.array([0.25, 0.64, 1.0, 0.81])
    true = ConvergenceModel(form, i_full, exponent)
    iterations = true.iterations_to_target(survival)
    if form == "power":
        np.testing.assert_allclose(iterations, [800.0, 500.0, 400.0, 400.0 / 0.9])
    model = fit_convergence(survival, iterations, form=form)
    assert model.i_full == pytest.approx(i_full, rel=1e-12)
    assert model.exponent == pytest.approx(exponent, rel=1e-12)
    assert model.max_rel_error < 1e-12


def test_monotonic_and_array_shapes():
    model = paper_model()
    survival = np.linspace(0.05, 1.0, 50)
    iterations = model.iterations_to_target(survival)
    assert isinstance(iterations, np.ndarray) and iterations.shape == (50,)
    assert np.all(np.diff(iterations) < 0)  # less survival -> more iterations
    assert iterations[-1] == pytest.approx(model.i_full)
    grid = model.iterations_to_target(survival.reshape(5, 10))
    assert grid.shape == (5, 10)
    scalar = iterations_to_target(0.5)
    assert isinstance(scalar, float)
    assert scalar == pytest.approx(model.i_full * 0.5 ** -model.exponent)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), np.array([0.5, 1.5])])
def test_survival_out_of_range(bad):
    with pytest.raises(ValueError, match="survival"):
        paper_model().iterations_to_target(bad)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        fit_convergence([0.5], [100])
    with pytest.raises(ValueError, match="survival"):
        fit_convergence([0.5, 0.0], [100, 200])
    with pytest.raises(ValueError, match="iterations"):
        fit_convergence([0.5, 0.6], [100, -1])
    with pytest.raises(ValueError, match="iterations"):
        fit_convergence([0.5, 0.6], [100, float("nan")])
    with pytest.raises(ValueError, match="distinct"):
        fit_convergence([0.5, 0.5], [100, 110])
    with pytest.raises(ValueError, match="grow with survival"):
        fit_convergence([0.5, 0.9], [100, 200])
    with pytest.raises(ValueError, match="form"):
        fit_convergence([0.5, 0.9], [200, 100], form="cubic")
    with pytest.raises(ValueError, match="equal length"):
        fit_convergence([0.5, 0.9], [200, 100, 50])
    with pytest.raises(ValueError, match="exponent"):
        ConvergenceModel("power", 400.0, -0.1)
    with pytest.raises(ValueError, match="i_full"):
        ConvergenceModel("power", 0.0, 0.5)


def test_hand_built_model_has_no_error():
    model = ConvergenceModel("power", 400.0, 0.5)
    assert math.isnan(model.max_rel_error) and math.isnan(model.rms_rel_error)
    assert model == ConvergenceModel("power", 400.0, 0.5)  # the NaN errors do not break equality


def test_load_calibration_csv_and_json(tmp_path):
    survival, iterations = [0.25, 0.64, 1.0], [800, 500, 400]
    pairs = list(zip(survival, iterations, strict=True))
    csv_path = tmp_path / "cal.csv"
    csv_path.write_text("survival, iterations\n" + "".join(f"{s},{n}\n" for s, n in pairs))
    records_path = tmp_path / "records.json"
    records_path.write_text(json.dumps([{"survival": s, "iterations": n} for s, n in pairs]))
    columns_path = tmp_path / "columns.json"
    columns_path.write_text(json.dumps({"survival": survival, "iterations": iterations}))
    for path in (csv_path, records_path, columns_path):
        model = load_convergence(path)
        assert model.i_full == pytest.approx(400.0, rel=1e-12)
        assert model.exponent == pytest.approx(0.5, rel=1e-12)
        assert model.survival_points == (0.25, 0.64, 1.0)
    assert load_convergence(csv_path, form="exponential").form == "exponential"


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("one.csv", "survival,iterations\n0.5,100\n", "at least 2"),
        ("header.csv", "s,n\n0.5,100\n0.6,90\n", "survival,iterations"),
        ("pct.csv", "survival,iterations\n44.9,618\n65.56,527\n", r"line 2: survival .*percentage"),
        ("neg.csv", "survival,iterations\n0.5,100\n0.6,0\n", r"line 3: iterations must be positive"),
        ("nan.csv", "survival,iterations\n0.5,100\nnan,90\n", r"line 3: survival is NaN"),
        ("text.csv", "survival,iterations\n0.5,abc\n0.6,90\n", "must be a number"),
        ("empty.json", "[]", "at least 2"),
        ("broken.json", "{", "not valid JSON"),
        ("shape.json", '{"points": 3}', "expected a list"),
        ("record.json", '[{"survival": 0.5}, {"survival": 0.6, "iterations": 9}]', "point 0"),
        ("lengths.json", '{"survival": [0.5, 0.6], "iterations": [9]}', "equal length"),
        ("zero.json", '{"survival": [0.5, 0], "iterations": [9, 10]}', "point 1: survival"),
        ("points.txt", "survival,iterations\n0.5,100\n0.6,90\n", ".csv or .json"),
    ],
)
def test_load_calibration_bad_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_convergence(path)
    assert str(path) in str(info.value)


def test_load_calibration_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_convergence(tmp_path / "absent.csv")
