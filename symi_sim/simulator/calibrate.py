"""Fitting a Calibration (calibration.py) to measured times, with scipy.optimize.least_squares.

Legend: L MoE layers, G GPUs (ranks), S slots per GPU, rows = (step, layer) pairs or input rows.

Both entry points return a CalibrationFit: the Calibration, its terms (value, standard error, fitted or FLOP
fallback) and the residual of every input row. Residuals are relative (predicted / measured - 1), so that rows of
different size weigh alike; standard errors come from the Jacobian at the optimum (NaN when there are no more rows
than free terms: such a fit is exact and says nothing about its own uncertainty).

fit_latencies: measured forward latencies of one configuration at several capacity factors (a CSV with columns
  capacity_factor, forward_ms; '#' lines are comments), such as the paper's motivation table. In slot mode every
  slot computes its padded buffer of n = ceil(cf k tokens / R) tokens whatever the placement, so a row is
      forward = L (layer_forward_fixed_s + S gemm(n) + dense + 2 a2a(n))             (`static_forward_s`)
  Such rows determine a constant, a slope in n and, with three or more capacity factors, a bend; so the fit frees
  layer_forward_fixed_s (the constant: it absorbs every per-layer constant, whose terms keep their fallbacks) and
      gemm_form "linear"  expert_gemm_flops (the default)
      gemm_form "power"   expert_saturation_tokens and expert_small_batch_exponent (expert_gemm_flops stays the
                          fallback: no measured point lies above n_sat, where only it would show)
  The GEMM terms absorb all that grows with n: the all-to-all's bandwidth term grows with n as well, and rows of
  one configuration cannot tell the two apart, so a2a_efficiency keeps its fallback.
  Why linear by default: on the paper's three rows the power form fits exactly but is not determined by them:
  moving one latency by 1% moves the fixed part of the forward between 0 and 350 ms (of 455) and p between 0.14
  and 0.52, while the linear form's terms move by 1% and 6% (34.6 ms per layer, 7.1 TFLOP/s; residuals <= 1.7%).
  Use the power form with a sweep of more capacity factors (or batch sizes) than its three terms.
fit_runs: `symi train` run directories (read by run_dirs.read_run: medians over steps after a warm-up), predicted by
  run_predict (the simulator's phase costs on each run's own loads and placements). Stage by stage, each stage's
  terms fitted to its phases' medians over all runs, as many terms as they determine (a term whose column the
  others already explain, e.g. dense compute across runs of one batch size, keeps its fallback); GEMMs linear:
      expert_forward               expert_gemm_flops, expert_fixed_per_gemm_s
      a2a_forward, a2a_backward    a2a_efficiency, a2a_latency_s
      dense_grad, expert_grad, send_out (each the shortest over the ranks: run_predict.MEASURED_AS)
                                   collective_efficiency, collective_latency_s, state_local_s_per_byte,
                                   state_fixed_per_expert_s
      forward                      layer_forward_fixed_s, dense_flops (the rest of the forward at the terms above,
                                   the popularity exchange at the collective terms among it)
      backward                     layer_backward_fixed_s (the backward's compute is 2 x the forward's)
      optimizer                    optimizer_bytes_per_s, optimizer_fixed_per_tensor_s
  Runs written before the executor timed its inner phases fit layer_forward_fixed_s, expert_gemm_flops,
  dense_flops and a2a_efficiency to the forward as a whole, then the backward and the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from symi_sim.checks import check_choice, check_int
from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.simulator.calibration import (
    NUMERIC_FIELDS,
    OPTIMIZER_STATE_LOCATIONS,
    Calibration,
    flop_calibration,
)
from symi_sim.simulator.costs import alltoall_bytes
from symi_sim.simulator.run_dirs import DEFAULT_WARMUP_STEPS, INNER_COLUMNS, RunData, read_run
from symi_sim.simulator.run_predict import predict_run, predicted_phase

GEMM_FORMS = ("linear", "power")
LATENCY_COLUMNS = ("capacity_factor", "forward_ms")
RANK_TOLERANCE = 1e-4      # a free term whose normalised Jacobian column the others explain to this level is dropped
MAX_EXPONENT = 0.999       # p at 1 means no small-batch regime: n_sat would be infinite
UNITS = {"_s_per_byte": "s/byte", "_bytes_per_s": "bytes/s", "_s": "s", "_flops": "FLOP/s", "_tokens": "tokens",
         "_exponent": "1", "_efficiency": "1"}   # the first suffix that matches


@dataclass(frozen=True)
class CalibrationFit:
    calibration: Calibration
    terms: pd.DataFrame       # term, value, unit, std_error, status (fitted / FLOP fallback / measured only)
    residuals: pd.DataFrame   # one row per input row (latencies) or per run and phase (runs)


# ---------------------------------------------------------------------------------------------- solver


@dataclass(frozen=True)
class _Problem:
    x0: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    predict: Callable[[np.ndarray], np.ndarray]   # parameters -> predicted seconds per row
    measured: np.ndarray


def _solve(problem: _Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, covariance of x, Jacobian of the relative residuals) at the least-squares optimum."""
    def residual(x: np.ndarray) -> np.ndarray:
        return problem.predict(x) / problem.measured - 1.0

    x0 = np.clip(problem.x0, problem.lower, problem.upper)
    result = least_squares(residual, x0, bounds=(problem.lower, problem.upper), x_scale="jac", method="trf",
                           xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=20000)
    if not np.all(np.isfinite(result.fun)):
        raise ValueError("the fit did not converge to finite predictions")
    dof = problem.measured.size - result.x.size
    cov = np.full((result.x.size, result.x.size), np.nan)
    if dof > 0:
        cov = 2 * result.cost / dof * np.linalg.pinv(result.jac.T @ result.jac)
    return result.x, cov, result.jac


def _full_rank(jac: np.ndarray) -> bool:
    norms = np.linalg.norm(jac, axis=0)
    if (norms == 0).any():
        return False
    singular = np.linalg.svd(jac / norms, compute_uv=False)
    return bool(singular[-1] > RANK_TOLERANCE * singular[0])


def _field_errors(to_fields: Callable[[np.ndarray], dict[str, float]], x: np.ndarray,
                  cov: np.ndarray) -> dict[str, float]:
    """Standard errors of the fields by the delta method (central differences of parameters -> fields)."""
    base = to_fields(x)
    if not np.all(np.isfinite(cov)):
        return dict.fromkeys(base, math.nan)
    jac = np.zeros((len(base), x.size))
    for j in range(x.size):
        step = 1e-6 * max(abs(x[j]), 1e-9)
        hi, lo = x.copy(), x.copy()
        hi[j] += step
        lo[j] -= step
        jac[:, j] = (np.array(list(to_fields(hi).values())) - np.array(list(to_fields(lo).values()))) / (2 * step)
    variance = np.einsum("ij,jk,ik->i", jac, cov, jac)
    return {name: float(math.sqrt(max(v, 0.0))) for name, v in zip(base, variance, strict=True)}


def _terms_table(calibration: Calibration, errors: dict[str, float]) -> pd.DataFrame:
    rows = []
    for name in NUMERIC_FIELDS:
        unit = next((u for suffix, u in UNITS.items() if name.endswith(suffix)), "")
        fitted = name in calibration.fitted
        rows.append({"term": name, "value": getattr(calibration, name), "unit": unit,
                     "std_error": errors.get(name, math.nan) if fitted else math.nan,
                     "status": "fitted" if fitted else "FLOP fallback"})
    rows.append({"term": "optimizer_state_location", "value": calibration.optimizer_state_location, "unit": "",
                 "std_error": math.nan, "status": "chosen"})
    return pd.DataFrame(rows)


def _residual_columns(measured_s: np.ndarray, predicted_s: np.ndarray) -> dict[str, np.ndarray]:
    return {"measured_ms": 1e3 * measured_s, "predicted_ms": 1e3 * predicted_s,
            "residual_ms": 1e3 * (predicted_s - measured_s), "residual_pct": 100 * (predicted_s / measured_s - 1)}


def _fallback_note(calibration: Calibration) -> str:
    unfitted = [name for name in NUMERIC_FIELDS if name not in calibration.fitted]
    return f"fitted: {', '.join(calibration.fitted)}; FLOP fallback (not determined by these inputs): " \
           f"{', '.join(unfitted)}"


# ---------------------------------------------------------------------------------------------- latencies


@dataclass(frozen=True)
class _ForwardParts:
    """What a static slot-mode forward is made of, per capacity factor [rows]."""

    tokens_per_slot: np.ndarray
    dense_flops_layer: float      # dense FLOPs of one GPU in one layer
    link_s: np.ndarray            # one all-to-all's busiest link at full bandwidth
    cluster: Cluster
    model: ModelConfig


def _forward_parts(*, cluster: Cluster, model: ModelConfig, capacity_factors: np.ndarray) -> _ForwardParts:
    cluster.check_experts(model.num_experts)
    assignments = model.top_k * model.tokens_per_step
    tokens = np.ceil(np.asarray(capacity_factors, dtype=np.float64) * assignments / cluster.num_slots)
    recv_row_G = np.repeat((tokens * cluster.slots_per_gpu)[:, None], cluster.num_gpus, axis=1)
    link_s = alltoall_bytes(recv_row_G, cluster, model.d_model * model.activation_bytes).network_time_L(
        cluster.with_(link_latency_s=0.0))
    dense = model.tokens_per_step / cluster.num_gpus * model.dense_flops_per_token / model.num_moe_layers
    return _ForwardParts(tokens, dense, link_s, cluster, model)


def _forward_from_gemm(parts: _ForwardParts, calibration: Calibration, layer_fixed_s: float,
                       gemm_s: np.ndarray) -> np.ndarray:
    """Forward seconds with `gemm_s` [rows] the time of one slot's GEMM."""
    cluster = parts.cluster
    dense_s = calibration.dense_time_s(flops=parts.dense_flops_layer)
    a2a_s = calibration.a2a_time_s(busiest_link_s=parts.link_s, num_messages=cluster.num_gpus - 1)
    return parts.model.num_moe_layers * (layer_fixed_s + cluster.slots_per_gpu * gemm_s + dense_s + 2 * a2a_s)


def static_forward_s(*, calibration: Calibration, cluster: Cluster, model: ModelConfig,
                     capacity_factors: Sequence[float] | np.ndarray) -> np.ndarray:
    """Seconds of one forward pass (all-to-alls, expert and dense compute, per-layer fixed costs) of a static
    placement in slot mode at each capacity factor: what the simulator gives once wired to `calibration`."""
    parts = _forward_parts(cluster=cluster, model=model, capacity_factors=np.asarray(capacity_factors))
    gemm_s = calibration.gemm_time_s(parts.tokens_per_slot, flops_per_assignment=model.expert_flops_per_assignment)
    return _forward_from_gemm(parts, calibration, calibration.layer_forward_fixed_s, gemm_s)


def read_latencies(path: str | Path) -> pd.DataFrame:
    """The CSV's rows (capacity_factor, forward_ms: finite, > 0); ValueError naming the file, row and column."""
    path = Path(path)
    where = f"latency file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist")
    try:
        frame = pd.read_csv(path, comment="#", skipinitialspace=True)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"{where} is not a readable CSV file: {str(exc).strip().splitlines()[-1]}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    unknown = [c for c in frame.columns if c not in LATENCY_COLUMNS]
    missing = [c for c in LATENCY_COLUMNS if c not in frame.columns]
    if unknown or missing:
        raise ValueError(f"{where}: columns must be {list(LATENCY_COLUMNS)}; missing {missing}, unknown {unknown}")
    if frame.empty:
        raise ValueError(f"{where}: no data rows")
    for column in LATENCY_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}, data row {row + 1}: {column} must be a finite number > 0, got "
                             f"{_shown(frame[column].iloc[row])!r}")
        frame[column] = values
    return frame.reset_index(drop=True)


def fit_latencies(*, latencies_path: str | Path, cluster: Cluster, model: ModelConfig, gemm_form: str = "linear",
                  optimizer_state_location: str = "host") -> CalibrationFit:
    """Fit the per-layer fixed forward cost and the expert GEMM curve to measured static forward latencies."""
    check_choice(gemm_form, "GEMM form", GEMM_FORMS)
    check_choice(optimizer_state_location, "optimizer state location", OPTIMIZER_STATE_LOCATIONS)
    frame = read_latencies(latencies_path)
    where = f"latency file {str(latencies_path)!r}"
    capacity_factors = frame["capacity_factor"].to_numpy()
    measured_s = frame["forward_ms"].to_numpy() / 1e3
    num_free = 3 if gemm_form == "power" else 2
    num_distinct = np.unique(capacity_factors).size
    if num_distinct < num_free:
        raise ValueError(f"{where}: {num_distinct} distinct capacity factor(s) cannot determine the {num_free} "
                         f"terms of the {gemm_form} GEMM form (give more, or --gemm-form linear)")
    base = flop_calibration(cluster=cluster, model=model).with_(optimizer_state_location=optimizer_state_location)
    parts = _forward_parts(cluster=cluster, model=model, capacity_factors=capacity_factors)
    flops, rate = model.expert_flops_per_assignment, base.expert_gemm_flops
    tokens = parts.tokens_per_slot
    n_ref = float(np.exp(np.log(tokens).mean()))   # the data's geometric middle: keeps t_ref and p uncorrelated
    num_layers, slots = model.num_moe_layers, cluster.slots_per_gpu
    # a start: half of what the fallback does not explain is fixed, half is GEMM
    unexplained = np.median(measured_s - _forward_from_gemm(parts, base, 0.0, np.zeros_like(tokens))) / num_layers
    unexplained = max(unexplained, 1e-9)

    if gemm_form == "power":
        # parameters: fixed s, log t_ref (one GEMM of n_ref tokens in the small-batch regime), exponent p
        def gemm(x: np.ndarray) -> np.ndarray:
            return np.maximum(tokens * flops / rate, np.exp(x[1]) * (tokens / n_ref) ** x[2])

        def to_fields(x: np.ndarray) -> dict[str, float]:
            log_n_sat = math.log(n_ref) + (x[1] + math.log(rate / (flops * n_ref))) / (1 - x[2])
            return {"layer_forward_fixed_s": x[0], "expert_saturation_tokens": math.exp(min(log_n_sat, 700.0)),
                    "expert_small_batch_exponent": x[2]}

        problem = _Problem(np.array([unexplained / 2, math.log(unexplained / 2 / slots), 0.5]),
                           np.array([0.0, -np.inf, 0.0]), np.array([np.inf, np.inf, MAX_EXPONENT]),
                           lambda x: _forward_from_gemm(parts, base, x[0], gemm(x)), measured_s)
    else:
        # parameters: fixed s, fallback rate / rate (linear in time)
        def to_fields(x: np.ndarray) -> dict[str, float]:
            return {"layer_forward_fixed_s": x[0], "expert_gemm_flops": rate / x[1]}

        problem = _Problem(np.array([unexplained / 2, 1.0]), np.array([0.0, 1e-12]), np.array([np.inf, np.inf]),
                           lambda x: _forward_from_gemm(parts, base, x[0], tokens * flops * x[1] / rate), measured_s)
    x, cov, _ = _solve(problem)
    if gemm_form == "power" and x[2] >= MAX_EXPONENT * (1 - 1e-6):
        raise ValueError(f"{where}: the latencies show no small-batch regime (they grow linearly with the tokens "
                         f"per slot); fit them with --gemm-form linear")
    fields = to_fields(x)
    if not all(math.isfinite(v) and v < 1e300 for v in fields.values()):
        raise ValueError(f"{where}: the {gemm_form} fit diverged ({fields}); try --gemm-form linear")
    calibration = base.with_(**fields, fitted=tuple(fields), source=f"fit of {latencies_path}")
    predicted_s = static_forward_s(calibration=calibration, cluster=cluster, model=model,
                                   capacity_factors=capacity_factors)
    worst = float(np.max(np.abs(predicted_s / measured_s - 1)))
    exact = " (as many rows as terms: an exact fit, without an error estimate)" if len(measured_s) == x.size else ""
    provenance = (f"symi calibrate --latencies {Path(latencies_path).name}: {len(measured_s)} measured static "
                  f"forward latencies of {model.name} ({model.num_experts} experts) on {cluster.name}, capacity "
                  f"factors {sorted(set(capacity_factors.tolist()))}, slot mode; {gemm_form} GEMM form; max "
                  f"|residual| {100 * worst:.2f}%{exact}; {_fallback_note(calibration)}")
    calibration = calibration.with_(provenance=provenance)
    residuals = pd.DataFrame({"capacity_factor": capacity_factors, "tokens_per_slot": tokens,
                              **_residual_columns(measured_s, predicted_s)})
    return CalibrationFit(calibration, _terms_table(calibration, _field_errors(to_fields, x, cov)), residuals)


# ---------------------------------------------------------------------------------------------- runs


# stage -> (the phases whose measured medians it fits, its terms in order of freeing); a term is a parameter as
# "seconds" (x = value), "rate" (x = fallback / value: time is linear in x) or "efficiency" (x = 1 / value >= 1).
# Runs that time the inner phases (expert compute, all-to-alls, dense all-reduce) fit each term to its own phase;
# older runs fit every forward term to the forward as a whole.
_Stage = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
_INNER_STAGES: tuple[_Stage, ...] = (
    (("expert_forward",), (("expert_gemm_flops", "rate"), ("expert_fixed_per_gemm_s", "seconds"))),
    (("a2a_forward", "a2a_backward"), (("a2a_efficiency", "efficiency"), ("a2a_latency_s", "seconds"))),
    (("dense_grad_least", "expert_grad_least", "send_out_least"), (("collective_efficiency", "efficiency"),
                                                 ("collective_latency_s", "seconds"),
                                                 ("state_local_s_per_byte", "seconds"),
                                                 ("state_fixed_per_expert_s", "seconds"))),
    (("forward",), (("layer_forward_fixed_s", "seconds"), ("dense_flops", "rate"))),
    (("backward",), (("layer_backward_fixed_s", "seconds"),)),
    (("optimizer",), (("optimizer_bytes_per_s", "rate"), ("optimizer_fixed_per_tensor_s", "seconds"))),
)
_WHOLE_STAGES: tuple[_Stage, ...] = (
    (("forward",), (("layer_forward_fixed_s", "seconds"), ("expert_gemm_flops", "rate"), ("dense_flops", "rate"),
                    ("a2a_efficiency", "efficiency"))),
    (("backward",), (("layer_backward_fixed_s", "seconds"),)),
    (("optimizer",), (("optimizer_bytes_per_s", "rate"),)),
)


def _stage(runs: Sequence[RunData], base: Calibration, phases: Sequence[str],
           terms: Sequence[tuple[str, str]]) -> tuple[Calibration, dict[str, float]]:
    """Fit one stage's terms to its phases' medians over all runs (as many terms as the rows determine, in order);
    returns the calibration and the terms' standard errors."""
    rows = [(run, phase) for phase in phases for run in runs if run.measured[phase] > 0]
    if not rows:
        return base, {}
    measured = np.array([run.measured[phase] for run, phase in rows])
    fallback = {name: getattr(base, name) for name, _ in terms}

    def to_fields(x: np.ndarray, free: Sequence[tuple[str, str]]) -> dict[str, float]:
        out = {}
        for (name, kind), value in zip(free, x, strict=True):
            out[name] = value if kind == "seconds" else fallback[name] / value if kind == "rate" else 1 / value
        return out

    free = list(terms[:len(rows)])
    while free:
        lower = np.array([1.0 if kind == "efficiency" else 0.0 if kind == "seconds" else 1e-12 for _, kind in free])
        start = np.array([0.0 if kind == "seconds" else 1.0 for _, kind in free])

        def predict(x: np.ndarray, free: Sequence[tuple[str, str]] = tuple(free)) -> np.ndarray:
            calibration = base.with_(**to_fields(x, free))
            predicted = {run.path: predict_run(run=run, calibration=calibration) for run in runs}
            return np.array([predicted[run.path][predicted_phase(phase)] for run, phase in rows])

        x, cov, jac = _solve(_Problem(start, lower, np.full(len(free), np.inf), predict, measured))
        if len(free) == 1 or _full_rank(jac):
            fields = to_fields(x, free)
            errors = _field_errors(lambda x, free=tuple(free): to_fields(x, free), x, cov)
            return base.with_(**fields, fitted=(*base.fitted, *fields)), errors
        free.pop()
    return base, {}


def fit_runs(*, run_dirs: Sequence[str | Path], warmup_steps: int = DEFAULT_WARMUP_STEPS,
             cluster: Cluster | None = None, optimizer_state_location: str = "host") -> CalibrationFit:
    """Fit the terms that `symi train` runs' per-phase times determine (see the module docstring)."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    check_int(warmup_steps, "warm-up steps", minimum=0)
    check_choice(optimizer_state_location, "optimizer state location", OPTIMIZER_STATE_LOCATIONS)
    runs = [read_run(path, warmup_steps=warmup_steps, cluster=cluster) for path in run_dirs]
    first = runs[0]
    calibration = flop_calibration(cluster=first.cluster, model=first.model).with_(
        optimizer_state_location=optimizer_state_location, source=f"fit of {len(runs)} run(s)")
    errors: dict[str, float] = {}
    inner = all(np.isfinite(run.measured[phase]) for run in runs for phase in INNER_COLUMNS)
    stages = _INNER_STAGES if inner else _WHOLE_STAGES
    for phases, terms in stages:
        calibration, stage_errors = _stage(runs, calibration, phases, terms)
        errors.update(stage_errors)
    fitted_phases = [phase for phases, _ in stages for phase in phases]
    rows, worst = [], 0.0
    for run in runs:
        predicted = predict_run(run=run, calibration=calibration)
        for phase in fitted_phases:
            predicted_s, measured_s = predicted[predicted_phase(phase)], run.measured[phase]
            if not measured_s > 0:
                continue   # a phase that took no time in this run (e.g. no send-out) has no relative residual
            worst = max(worst, abs(predicted_s / measured_s - 1))
            rows.append({"run": run.path.name, "phase": phase,
                         **{k: float(v) for k, v in _residual_columns(np.array(measured_s),
                                                                     np.array(predicted_s)).items()}})
    exact = "exact (trace.parquet)" if all(run.exact_tokens for run in runs) else \
        "estimated from placements.jsonl drops where a run has no trace.parquet"
    provenance = (f"symi calibrate from {len(runs)} symi train run(s) ({', '.join(run.path.name for run in runs)}; "
                  f"{first.model.name} on {first.cluster.name}): medians over steps after {warmup_steps} warm-up "
                  f"steps; tokens per slot {exact}; linear GEMM form; max |residual| {100 * worst:.2f}%; "
                  f"{_fallback_note(calibration)}")
    calibration = calibration.with_(provenance=provenance)
    terms = _terms_table(calibration, errors)
    measured_only = []
    for label, phase in (("expert_grad_bytes_per_s", "expert_grad"), ("send_out_bytes_per_s", "send_out")):
        rates = [run.phase_bytes[phase] / run.measured[phase] for run in runs if run.measured[phase] > 0]
        measured_only.append({"term": label, "value": float(np.median(rates)) if rates else math.nan,
                              "unit": "bytes/s", "std_error": math.nan, "status": "measured only (not a term)"})
    terms = pd.concat([terms, pd.DataFrame(measured_only)], ignore_index=True)
    return CalibrationFit(calibration, terms, pd.DataFrame(rows))


def format_fit(fit: CalibrationFit) -> str:
    """The terms and the residual table as text (what `symi calibrate` prints)."""
    terms = fit.terms.copy()
    terms["value"] = [f"{v:.6g}" if isinstance(v, float) else str(v) for v in terms["value"]]
    terms["std_error"] = [f"{v:.3g}" if np.isfinite(v) else "-" for v in terms["std_error"]]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        return (f"calibration of {fit.calibration.model} on {fit.calibration.cluster}\n"
                f"{terms.to_string(index=False)}\n\nresiduals\n"
                f"{fit.residuals.to_string(index=False, float_format=lambda v: f'{v:.3f}')}")


def _shown(value: object) -> object:
    """A cell as the user wrote it (numpy scalars as plain Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value
