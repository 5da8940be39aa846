"""Iterations to reach a target loss as a function of token survival (calibrated on the paper's table).

Token survival s is the fraction of routed token-to-expert assignments that are not dropped at the capacity
limit (1 - dropped_fraction). Dropping tokens slows convergence; the simulator turns time per iteration into
time to target loss through this model: time_to_target_s = mean_time_s * iterations_to_target(survival).

Calibration data: the only published points are SYMI's motivation table (GPT-Small, 32 experts, 16 GPUs,
static placement, capacity factors 1 / 2 / 4): survival 44.90% -> 618 iterations, 65.56% -> 527,
74.91% -> 478 (PAPER_SURVIVAL, PAPER_ITERATIONS below).

Forms (both fitted by linear least squares on log(iterations), i.e. on relative error):
  power        iterations = i_full * s ** (-exponent)
  exponential  iterations = i_full * exp(exponent * (1 - s))
Both equal i_full at s = 1 and are non-increasing in s for exponent >= 0 (a fit with exponent < 0, i.e.
more dropping converging faster, is rejected as bad calibration data).

Fit on the paper's three points (these numbers are computed by fit_convergence and stored on the model as
max_rel_error / rms_rel_error / i_full / exponent; tests/test_convergence.py checks that they match):
  power        i_full = 421.5, exponent = 0.4841, max |relative error| 1.88%, RMS 1.39%
  exponential  i_full = 390.0, exponent = 0.8419, max |relative error| 1.11%, RMS 0.81%
  leave-one-out (fit two points, predict the third), worst case: power 12.5%, exponential 5.8%, both on
  the 44.90% point.

We keep the power law as the default (`paper_model()`), although the exponential fits these three points a
little better, because:
  - three points and two parameters leave one degree of freedom: 1.4% versus 0.8% RMS is well inside what
    single-seed "iterations to target" counts can resolve, so the fit quality does not decide;
  - the limits: the power law diverges as s -> 0 (no surviving tokens, the experts never learn), the
    exponential claims a finite 905 iterations with every expert token dropped;
  - it is the conservative choice for comparisons: it credits a dropless policy with the smaller gain
    (618 / 421.5 = 1.47x fewer iterations than static at capacity factor 1, against 1.58x for the
    exponential), so speed-ups from reducing drops are not overstated. Choose the exponential with
    `fit_convergence(..., form="exponential")` to see the other bound.

i_full, the iterations at s = 1.0 (no token dropped), is an EXTRAPOLATION: the highest measured survival is
74.91%. The forms disagree there by 8% (421.5 versus 390.0). Policies that drop almost nothing (symi-balanced
with gpu capacity, survival ~98%) sit in that extrapolated range; read their time-to-target as an estimate.

Recalibrate with load_convergence(path): a CSV with header `survival,iterations`, or JSON, either a list of
{"survival": s, "iterations": n} objects or {"survival": [...], "iterations": [...]}. Survival is a fraction
in (0, 1], not a percentage.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_choice, check_number, is_number

FORMS = ("power", "exponential")

PAPER_SURVIVAL = (0.4490, 0.6556, 0.7491)
PAPER_ITERATIONS = (618.0, 527.0, 478.0)


def _shape_term(form: str, survival: np.ndarray) -> np.ndarray:
    """x such that log(iterations) = log(i_full) + exponent * x."""
    if form == "power":
        return -np.log(survival)
    return 1.0 - survival


@dataclass(frozen=True)
class ConvergenceModel:
    """iterations = i_full * s**(-exponent) (power) or i_full * exp(exponent * (1 - s)) (exponential).

    survival_points / iteration_points: the calibration data the model was fitted on (empty for a model
    built by hand). max_rel_error / rms_rel_error: |model / data - 1| on those points, computed here, NaN
    without points.
    """

    form: str
    i_full: float
    exponent: float
    survival_points: tuple[float, ...] = ()
    iteration_points: tuple[float, ...] = ()
    max_rel_error: float = dataclasses.field(init=False, compare=False)
    rms_rel_error: float = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        check_choice(self.form, "convergence form", FORMS)
        check_number(self.i_full, "i_full", low=0, low_open=True)
        # < 0 would mean that dropping more tokens converges faster
        check_number(self.exponent, "exponent", low=0)
        if len(self.survival_points) != len(self.iteration_points):
            raise ValueError(
                f"{len(self.survival_points)} survival points but {len(self.iteration_points)} iteration points"
            )
        if self.survival_points:
            survival_P = _check_survival(np.asarray(self.survival_points, dtype=np.float64))
            iterations_P = np.asarray(self.iteration_points, dtype=np.float64)
            rel_error_P = self._iterations(survival_P) / iterations_P - 1.0
            max_err, rms_err = float(np.abs(rel_error_P).max()), float(np.sqrt(np.mean(rel_error_P**2)))
        else:
            max_err = rms_err = float("nan")
        object.__setattr__(self, "max_rel_error", max_err)
        object.__setattr__(self, "rms_rel_error", rms_err)

    def _iterations(self, survival: np.ndarray) -> np.ndarray:
        return self.i_full * np.exp(self.exponent * _shape_term(self.form, survival))

    def describe(self) -> dict[str, object]:
        """The fitted curve as plain values (what a run's config.json records)."""
        return {"form": self.form, "i_full": self.i_full, "exponent": self.exponent,
                "survival_points": list(self.survival_points), "iteration_points": list(self.iteration_points),
                "max_rel_error": self.max_rel_error, "rms_rel_error": self.rms_rel_error}

    def iterations_to_target(self, survival: float | np.ndarray) -> float | np.ndarray:
        """Iterations to the target loss at token survival `survival` in (0, 1]; float in, float out,
        array in, array (same shape) out."""
        survival_arr = _check_survival(np.asarray(survival, dtype=np.float64))
        iterations = self._iterations(survival_arr)
        return float(iterations) if iterations.ndim == 0 else iterations


def _check_survival(survival: np.ndarray) -> np.ndarray:
    bad = ~((survival > 0) & (survival <= 1))  # NaN fails both comparisons, so it is caught here too
    if bad.any():
        raise ValueError(
            f"survival must be a fraction in (0, 1] (the share of tokens not dropped), got {survival[bad].flat[0]!r}"
        )
    return survival


def fit_convergence(survival: Sequence[float] | np.ndarray, iterations: Sequence[float] | np.ndarray,
                    form: str = "power") -> ConvergenceModel:
    """Least-squares fit of `form` to P points: survival [P] in (0, 1], iterations [P] > 0, P >= 2 with at
    least two distinct survival values. Fitted in log space, so it minimises relative rather than absolute
    error."""
    check_choice(form, "convergence form", FORMS)
    survival_P = np.asarray(survival, dtype=np.float64)
    iterations_P = np.asarray(iterations, dtype=np.float64)
    if survival_P.ndim != 1 or survival_P.shape != iterations_P.shape:
        raise ValueError(
            f"survival and iterations must be 1-D of equal length, got shapes {survival_P.shape} and "
            f"{iterations_P.shape}"
        )
    if survival_P.size < 2:
        raise ValueError(f"need at least 2 calibration points to fit a convergence model, got {survival_P.size}")
    _check_survival(survival_P)
    bad = ~(np.isfinite(iterations_P) & (iterations_P > 0))
    if bad.any():
        raise ValueError(f"iterations must be positive and finite, got {iterations_P[bad][0]!r}")
    if np.unique(survival_P).size < 2:
        raise ValueError(f"need at least 2 distinct survival values to fit a slope, got only {float(survival_P[0])!r}")

    design_P2 = np.stack([np.ones_like(survival_P), _shape_term(form, survival_P)], axis=1)
    (log_i_full, exponent), *_ = np.linalg.lstsq(design_P2, np.log(iterations_P), rcond=None)
    if exponent < 0:
        raise ValueError(
            f"calibration points say iterations grow with survival (fitted exponent {exponent:.4g} < 0); "
            "check that survival is the fraction of tokens NOT dropped"
        )
    return ConvergenceModel(
        form=form,
        i_full=float(np.exp(log_i_full)),
        exponent=float(exponent),
        survival_points=tuple(float(v) for v in survival_P),
        iteration_points=tuple(float(v) for v in iterations_P),
    )


@functools.lru_cache(maxsize=len(FORMS))
def paper_model(form: str = "power") -> ConvergenceModel:
    """The model fitted to the paper's motivation table (see the module docstring)."""
    return fit_convergence(PAPER_SURVIVAL, PAPER_ITERATIONS, form=form)


def iterations_to_target(survival: float | np.ndarray, model: ConvergenceModel | None = None) -> float | np.ndarray:
    """`model.iterations_to_target(survival)`, with the paper's power law when no model is given."""
    return (model or paper_model()).iterations_to_target(survival)


def _point_value(value: Any, what: str, where: str) -> float:
    """A calibration point's survival or iterations (a JSON number or a CSV field's text) as a float."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    # NaN and infinities are numbers here: the checks below name them
    if not (is_number(number) or isinstance(number, float)):
        raise ValueError(f"{where}: {what} must be a number, got {value!r}")
    number = float(number)
    if math.isnan(number):
        raise ValueError(f"{where}: {what} is NaN")
    if what == "survival" and not 0 < number <= 1:
        raise ValueError(f"{where}: survival must be a fraction in (0, 1] (not a percentage), got {value!r}")
    if what == "iterations" and not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: iterations must be positive and finite, got {value!r}")
    return number


def _read_csv_points(path: Path) -> list[tuple[float, float]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [name.strip() for name in (reader.fieldnames or [])]
        if "survival" not in fields or "iterations" not in fields:
            raise ValueError(f"{path}: CSV header must have columns survival,iterations, got {fields}")
        points = []
        for row in reader:
            row = {(key or "").strip(): value for key, value in row.items()}
            where = f"{path} line {reader.line_num}"
            points.append((_point_value(row["survival"], "survival", where),
                           _point_value(row["iterations"], "iterations", where)))
    return points


def _read_json_points(path: Path) -> list[tuple[float, float]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and "survival" in data and "iterations" in data:
        survival, iterations = data["survival"], data["iterations"]
        if not isinstance(survival, list) or not isinstance(iterations, list) or len(survival) != len(iterations):
            raise ValueError(f"{path}: 'survival' and 'iterations' must be lists of equal length")
        records = [{"survival": s, "iterations": n} for s, n in zip(survival, iterations, strict=True)]
    elif isinstance(data, list):
        records = data
    else:
        raise ValueError(
            f"{path}: expected a list of {{\"survival\", \"iterations\"}} objects or an object with "
            "'survival' and 'iterations' lists"
        )
    points = []
    for index, record in enumerate(records):
        where = f"{path} point {index}"
        if not isinstance(record, dict) or "survival" not in record or "iterations" not in record:
            raise ValueError(f"{where}: expected an object with 'survival' and 'iterations', got {record!r}")
        points.append((_point_value(record["survival"], "survival", where),
                       _point_value(record["iterations"], "iterations", where)))
    return points


def load_convergence(path: str | Path, form: str = "power") -> ConvergenceModel:
    """Fit `form` to the (survival, iterations) points of a .csv or .json file (format in the module
    docstring). ValueError naming the file and the point for anything malformed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"{path}: calibration file must be .csv or .json, got {suffix or 'no suffix'!r}")
    if not path.is_file():
        raise ValueError(f"{path}: calibration file not found")
    try:
        points = _read_csv_points(path) if suffix == ".csv" else _read_json_points(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:  # unreadable bytes, a field over csv's size limit
        raise ValueError(f"{path}: cannot be read: {exc}") from None
    if len(points) < 2:
        raise ValueError(f"{path}: need at least 2 calibration points, got {len(points)}")
    survival_P, iterations_P = zip(*points, strict=True)
    try:
        return fit_convergence(survival_P, iterations_P, form=form)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
