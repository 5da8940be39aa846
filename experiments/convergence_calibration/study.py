"""Recalibrate the simulator's convergence model (symi_sim/simulator/convergence.py) from executor training runs.

    .venv/bin/python -m experiments.convergence_calibration --from runs/capacity_factor-<time> [--out DIR]
    .venv/bin/python -m experiments.convergence_calibration [--quick]   # runs the capacity-factor study first

Takes the (tokens surviving, steps to target loss) points of the capacity-factor study (experiments/capacity_factor:
its table.csv): by default the `static` rows, the paper's own design (static placement, the capacity factor varied
to spread survival). Fits both forms of symi_sim.simulator.convergence (power: i_full * s**-a, exponential:
i_full * exp(a (1 - s))) with fit_convergence and compares them with the fits to the paper's motivation table:
parameters, max and RMS relative error on the points, leave-one-out error (fit all but one point, predict it), the
curves normalised by i_full (the shape the simulator uses: iterations(s) / iterations(1)), and how well the fit
predicts the other policies' points (symi, symi-balanced: same model, survival from re-placement instead of a
larger capacity factor). If the points say iterations grow with survival, fit_convergence rejects them; the study
then reports the rejection and the constrained fit (exponent 0) and ships no usable calibration.

Writes into the run directory (atomically): calibration.csv (survival,iterations: what `load_convergence` and
`symi simulate --convergence FILE` read, plus provenance columns), fits.csv, points.csv (every policy's point with
both fits' predictions), summary.json, calibration.png; with no --from, also the capacity-factor run it made
(capacity_factor/).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.capacity_factor import study as capacity_factor
from experiments.harness import (
    add_out_option,
    policy_colour,
    run_dir,
    run_path,
    say,
    study_parser,
    write_json,
    write_png,
    write_rows,
)
from symi_sim.simulator.convergence import (
    FORMS,
    PAPER_ITERATIONS,
    PAPER_SURVIVAL,
    ConvergenceModel,
    fit_convergence,
    load_convergence,
    paper_model,
)

STUDY = "convergence_calibration"
# the capacity-factor study's static-only arm when this study has to run it itself (no --from)
OWN_RUN_ARGS = ["--policies", "static", "--capacity-factors", "1,1.5,2,3,4", "--extra-static-cfs", ""]
OWN_QUICK_ARGS = ["--quick", "--policies", "static", "--capacity-factors", "1,2,4", "--extra-static-cfs", ""]


def read_table(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The capacity-factor study's rows (numbers parsed; '' -> None) and its summary.json."""
    table, summary_path = run_dir / "table.csv", run_dir / "summary.json"
    if not table.is_file() or not summary_path.is_file():
        raise SystemExit(f"error: {run_dir} is not a capacity-factor run directory (needs table.csv, summary.json)")
    rows = []
    with open(table) as f:
        for row in csv.DictReader(f):
            rows.append({k: (v if k == "policy" else None if v == "" else float(v)) for k, v in row.items()})
    return rows, json.loads(summary_path.read_text())


def fit(survival: list[float], iterations: list[float], form: str) -> tuple[ConvergenceModel, str | None]:
    """fit_convergence, or, when it rejects the points (exponent < 0), the constrained least-squares fit
    (exponent 0, i_full the geometric mean) and the rejection message."""
    try:
        return fit_convergence(survival, iterations, form=form), None
    except ValueError as exc:
        i_full = float(np.exp(np.mean(np.log(iterations))))
        return ConvergenceModel(form=form, i_full=i_full, exponent=0.0, survival_points=tuple(survival),
                                iteration_points=tuple(iterations)), str(exc)


def leave_one_out(survival: list[float], iterations: list[float], form: str) -> float | None:
    """Worst |relative error| predicting each point from a fit to the others (None with < 3 points)."""
    if len(survival) < 3:
        return None
    worst = 0.0
    for i in range(len(survival)):
        rest_s = survival[:i] + survival[i + 1:]
        rest_n = iterations[:i] + iterations[i + 1:]
        if len(set(rest_s)) < 2:
            return None
        model, _ = fit(rest_s, rest_n, form)
        worst = max(worst, abs(model.iterations_to_target(survival[i]) / iterations[i] - 1.0))
    return worst


def describe(model: ConvergenceModel, source: str, rejected: str | None, loo: float | None) -> dict[str, Any]:
    lowest = min(model.survival_points)
    return {"source": source, "form": model.form, "points": len(model.survival_points),
            "i_full": round(model.i_full, 2), "exponent": round(model.exponent, 4),
            "max_rel_error": round(model.max_rel_error, 4), "rms_rel_error": round(model.rms_rel_error, 4),
            "loo_max_rel_error": None if loo is None else round(loo, 4),
            # how many times more iterations the lowest-survival calibration point needs than a dropless run
            "slowdown_at_lowest_survival": round(model.iterations_to_target(lowest) / model.i_full, 4),
            "lowest_survival": round(lowest, 4), "rejected": rejected}


def write_figure(path: Path, ours: dict[str, ConvergenceModel], paper: dict[str, ConvergenceModel],
                 points: list[dict[str, Any]], target: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.3), dpi=110, layout="constrained")
    ax_abs, ax_norm = fig.subplots(1, 2)
    policies = list(dict.fromkeys(p["policy"] for p in points))
    s_min = min(0.2, *(p["survival"] for p in points), *PAPER_SURVIVAL)
    grid = np.linspace(s_min, 1.0, 200)
    styles = {"power": "-", "exponential": "--"}

    for form, model in ours.items():
        ax_abs.plot(grid, model.iterations_to_target(grid), styles[form], color="black", linewidth=1.2,
                    label=f"fit, {form} (max err {100 * model.max_rel_error:.1f}%)")
    for policy in policies:
        mine = [p for p in points if p["policy"] == policy]
        used = [p for p in mine if p["used_in_fit"]]
        other = [p for p in mine if not p["used_in_fit"]]
        if used:
            ax_abs.scatter([p["survival"] for p in used], [p["iterations"] for p in used], color=policy_colour(policy),
                           zorder=3, label=f"{policy} (fitted)")
        if other:
            ax_abs.scatter([p["survival"] for p in other], [p["iterations"] for p in other], facecolors="none",
                           edgecolors=policy_colour(policy), zorder=3, label=f"{policy} (not fitted)")
        for p in mine:
            ax_abs.annotate(f"cf {p['capacity_factor']:g}", (p["survival"], p["iterations"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    ax_abs.set_xlabel("tokens surviving (fraction of token-expert assignments)")
    ax_abs.set_ylabel(f"steps to target loss {target:.3f} (steps)")
    ax_abs.set_title("Executor runs and the fits to them", fontsize=10)
    ax_abs.legend(fontsize=7)
    ax_abs.grid(alpha=0.3)

    for source, models, color in (("paper", paper, "tab:red"), ("executor", ours, "black")):
        for form, model in models.items():
            ax_norm.plot(grid, model.iterations_to_target(grid) / model.i_full, styles[form], color=color,
                         linewidth=1.2, label=f"{source}, {form} (exponent {model.exponent:.3g})")
    ax_norm.scatter(PAPER_SURVIVAL, np.asarray(PAPER_ITERATIONS) / paper["power"].i_full, color="tab:red", zorder=3,
                    label="paper's table / its power i_full")
    fitted = [p for p in points if p["used_in_fit"]]
    ax_norm.scatter([p["survival"] for p in fitted], [p["iterations"] / ours["power"].i_full for p in fitted],
                    color="black", zorder=3, label="our fitted points / our power i_full")
    ax_norm.axvspan(max(max(PAPER_SURVIVAL), max(p["survival"] for p in fitted)), 1.0, color="gray", alpha=0.12,
                    label="extrapolation (no point)")
    ax_norm.set_xlabel("tokens surviving (fraction of token-expert assignments)")
    ax_norm.set_ylabel("iterations to target / iterations at survival 1 (ratio)")
    ax_norm.set_title("Shape: slowdown from dropped tokens, paper vs executor", fontsize=10)
    ax_norm.legend(fontsize=7)
    ax_norm.grid(alpha=0.3)
    fig.suptitle("Convergence model: iterations to target loss against token survival")
    write_png(fig, path)


def main(argv: list[str] | None = None) -> Path:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="A capacity-factor run directory (python -m experiments.capacity_factor --out).")
    parser.add_argument("--quick", action="store_true",
                        help="Without --from: run the capacity-factor study's quick variant (static, cf 1, 2, 4).")
    parser.add_argument("--policies", default="static",
                        help="Comma-separated policies whose points are fitted, or 'all' (default: static).")
    add_out_option(parser, STUDY)
    args = parser.parse_args(argv)
    out = run_path(STUDY, args.out)
    start_s = time.perf_counter()

    with run_dir(out, study=STUDY, args={**vars(args), "out": out}, argv=argv) as tmp_out:
        source = args.source
        if source is None:
            source = tmp_out / "capacity_factor"
            capacity_factor.main([*(OWN_QUICK_ARGS if args.quick else OWN_RUN_ARGS), "--out", str(source)])
        rows, cf_summary = read_table(source)
        target = float(cf_summary["target_loss"])
        wanted = None if args.policies == "all" else set(args.policies.split(","))

        points = []
        for row in rows:
            if row["steps_to_target"] is None:
                say(f"note: {row['policy']} at cf {row['capacity_factor']:g} never reached loss {target:g}; "
                    "left out")
                continue
            points.append({"policy": row["policy"], "capacity_factor": row["capacity_factor"],
                           "survival": row["survival"], "iterations": row["steps_to_target"],
                           "used_in_fit": wanted is None or row["policy"] in wanted})
        fitted = [p for p in points if p["used_in_fit"]]
        survival = [p["survival"] for p in fitted]
        iterations = [p["iterations"] for p in fitted]
        if len(set(survival)) < 2:
            raise SystemExit(f"error: {len(fitted)} usable point(s) with fewer than 2 distinct survival values; "
                             "nothing to fit")

        ours, paper, fits = {}, {}, []
        for form in FORMS:
            model, rejected = fit(survival, iterations, form)
            ours[form] = model
            fits.append(describe(model, "executor", rejected, leave_one_out(survival, iterations, form)))
            paper[form] = paper_model(form)
            fits.append(describe(paper[form], "paper", None,
                                 leave_one_out(list(PAPER_SURVIVAL), list(PAPER_ITERATIONS), form)))
        for p in points:
            for form, model in ours.items():
                predicted = model.iterations_to_target(p["survival"])
                p[f"predicted_{form}"] = round(predicted, 1)
                p[f"rel_error_{form}"] = round(predicted / p["iterations"] - 1.0, 4)
        held_out = [p for p in points if not p["used_in_fit"]]
        validation = {form: (None if not held_out else
                             {"points": len(held_out),
                              "max_rel_error": round(max(abs(p[f"rel_error_{form}"]) for p in held_out), 4),
                              "rms_rel_error": round(math.sqrt(sum(p[f"rel_error_{form}"] ** 2 for p in held_out)
                                                               / len(held_out)), 4)})
                      for form in FORMS}
        spearman = None
        if len(points) >= 3:  # does more survival mean fewer steps, over every run? (rank correlation)
            import pandas as pd

            frame = pd.DataFrame(points)
            spearman = frame["survival"].rank().corr(frame["iterations"].rank())
            spearman = None if math.isnan(spearman) else round(float(spearman), 3)

        write_rows(tmp_out / "calibration.csv", ["survival", "iterations", "policy", "capacity_factor"], fitted)
        usable = all(fit_row["rejected"] is None for fit_row in fits if fit_row["source"] == "executor")
        if usable:  # what `symi simulate --convergence` will do with the file: the same fit
            reloaded = load_convergence(tmp_out / "calibration.csv")
            assert math.isclose(reloaded.exponent, ours["power"].exponent, rel_tol=1e-9, abs_tol=1e-12)
        for name, table in (("fits.csv", fits), ("points.csv", points)):
            write_rows(tmp_out / name, list(dict.fromkeys(c for r in table for c in r)), table)
        summary = {"study": STUDY, "source": str(args.source) if args.source else "capacity_factor (this run)",
                   "target_loss": target, "fitted_policies": sorted({p["policy"] for p in fitted}),
                   "calibration_usable": usable, "fits": fits, "held_out_validation": validation,
                   "spearman_survival_vs_steps_all_points": spearman, "points": points,
                   "capacity_factor_config": cf_summary.get("config"),
                   "wall_s": round(time.perf_counter() - start_s, 1)}
        write_json(tmp_out / "summary.json", summary)
        write_figure(tmp_out / "calibration.png", ours, paper, points, target)

    say(f"points (target loss {target:.4f}; fitted: {', '.join(summary['fitted_policies'])}):")
    say(f"{'policy':>14} {'cf':>4} {'survival':>9} {'steps':>6} {'power':>7} {'err':>7} {'exp':>7} {'err':>7}")
    for p in points:
        say(f"{p['policy']:>14} {p['capacity_factor']:>4g} {100 * p['survival']:>8.2f}% {p['iterations']:>6g} "
            f"{p['predicted_power']:>7.1f} {100 * p['rel_error_power']:>+6.1f}% "
            f"{p['predicted_exponential']:>7.1f} {100 * p['rel_error_exponential']:>+6.1f}%"
            f"{'' if p['used_in_fit'] else '  (held out)'}")
    say(f"{'source':>9} {'form':>12} {'i_full':>8} {'exponent':>9} {'max err':>8} {'RMS err':>8} {'LOO max':>8} "
        f"{'slowdown':>9}")
    for r in fits:
        loo = "-" if r["loo_max_rel_error"] is None else f"{100 * r['loo_max_rel_error']:.1f}%"
        say(f"{r['source']:>9} {r['form']:>12} {r['i_full']:>8.1f} {r['exponent']:>9.4f} "
            f"{100 * r['max_rel_error']:>7.2f}% {100 * r['rms_rel_error']:>7.2f}% {loo:>8} "
            f"{r['slowdown_at_lowest_survival']:>8.3f}x" + (f"  REJECTED: {r['rejected']}" if r["rejected"] else ""))
    for form, v in validation.items():
        if v:
            say(f"held-out points ({v['points']}), {form} fit: max error {100 * v['max_rel_error']:.1f}%, "
                f"RMS {100 * v['rms_rel_error']:.1f}%")
    say(f"rank correlation of survival and steps over all points: {spearman}")
    say(f"wrote {out}" + ("" if usable else " (the points were rejected: calibration.csv is not a usable model)"))
    return out

