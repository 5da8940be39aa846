"""The SYMI paper's motivation table on our executor: capacity factor versus token survival and steps to a target loss.

    .venv/bin/python -m experiments.capacity_factor [--quick] [--out DIR] [--steps N] [--target-loss L]

Real `symi train` runs (CPU, gloo, local ranks), one after another: for every capacity factor in
--capacity-factors and every policy in --policies (static = DeepSpeed's fixed replicas; symi = the paper's
Algorithm 1 re-placed every step; symi-balanced = ours), plus `static` alone at --extra-static-cfs (more survival
points for experiments/convergence_calibration). Default configuration: model `tiny`, 16 experts, top-1, 4 ranks x 8
slots (32 slots: 2 replicas per expert under `static`, as in the paper's motivation run of 32 experts on 16 GPUs),
slot capacity mode, aux-loss coefficient 1e-5 (the paper's: real skew appears), 4 sequences of 64 bytes per rank
per step, the shipped Wikipedia sample, seed 0. Every run sees the same batches.

Per (policy, capacity factor): tokens surviving (1 - the mean over all steps of the dropped fraction of token-to-
expert assignments), steps until the training loss reaches the target loss (and each of EXTRA_TARGETS), mean and
median step time (the first --warmup steps left out), mean GPU imbalance and replica moves per step.

Steps to target: the first step at which a fitted curve loss(t) = a + b * t**-c (least squares on the per-step
losses from step --window on) reaches the target; `*_trailing` columns: the first step at which the trailing mean
over --window steps does. Every run trains on the same batch sequence, so the raw curves share bumps (a run of hard
batches lifts every curve at once): first crossings of the trailing mean then pile up at the same few steps whatever
the survival (in the full run: 244 steps for 9 of 11 runs at loss 2.8), while the fitted curve measures the level
of each run's curve as a whole. --reanalyse DIR recomputes all of it from an earlier run's curves, training nothing.

Writes into the run directory (atomically): table.csv (one row per run), curves.csv (per run and step: loss,
smoothed loss, dropped fraction, step time), summary.json (configuration, target, rows, wall time, machine),
loss_curves.png and survival_steps.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from symi_sim.simulator.curves import smoothed, steps_to

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STUDY = "capacity_factor"
# chosen from the full run's curves (README.md): the smoothed losses of all 11 runs fall through 2.8 between about
# step 250 and 330 of 400, where the curves still fall steeply enough for the step count to be well defined
TARGET_LOSS = 2.8
EXTRA_TARGETS = (2.85, 2.76)
FIT_EXPONENTS = tuple(0.01 * i for i in range(5, 301))  # the grid of c in a + b * t**-c
FULL = {"nproc": 4, "experts": 16, "slots": 8, "steps": 400, "capacity_factors": "1,2,4", "extra_static_cfs": "1.5,3",
        "policies": "static,symi,symi-balanced", "window": 25, "warmup": 5}
QUICK = {"nproc": 2, "experts": 4, "slots": 4, "steps": 30, "capacity_factors": "1,4", "extra_static_cfs": "2",
         "policies": "static,symi-balanced", "window": 5, "warmup": 3}
TABLE_COLUMNS = ("policy", "capacity_factor", "survival", "dropped_fraction", "first_step_survival", "steps_to_target",
                 "steps_to_target_trailing", "final_smoothed_loss", "fit_a", "fit_b", "fit_c", "step_ms_mean",
                 "step_ms_median", "imbalance", "replica_moves_per_step", "wall_s")
CURVE_COLUMNS = ("policy", "capacity_factor", "step", "loss", "smoothed_loss", "fitted_loss", "dropped_fraction",
                 "step_s")
RUN_COLUMNS = ("survival", "dropped_fraction", "first_step_survival", "step_ms_mean", "step_ms_median", "imbalance",
               "replica_moves_per_step", "wall_s")


def parse_floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"capacity factors must be > 0, got {text!r}")
    return values


def fit_loss_curve(losses: list[float], start: int) -> tuple[float, float, float]:
    """Least-squares fit of loss(t) = a + b * t**-c (t = steps trained, 1-based) to the losses from step `start` on:
    linear least squares for (a, b) on a grid of c. Returns (a, b, c)."""
    import numpy as np

    t = np.arange(1, len(losses) + 1, dtype=np.float64)[start:]
    y = np.asarray(losses, dtype=np.float64)[start:]
    best = (math.inf, 0.0, 0.0, 0.0)
    for c in FIT_EXPONENTS:
        design = np.stack([np.ones_like(t), t ** -c], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = float(((design @ np.array([a, b]) - y) ** 2).sum())
        if residual < best[0]:
            best = (residual, float(a), float(b), float(c))
    return best[1], best[2], best[3]


def fitted_curve(params: tuple[float, float, float], steps: int) -> list[float]:
    a, b, c = params
    return [a + b * t ** -c for t in range(1, steps + 1)]


def auto_target(curves: dict[tuple[str, float], list[float]], window: int) -> float:
    """The loosest target every run reaches: the highest of the runs' lowest curve values (from step `window` on)."""
    return max(min(curve[window - 1:]) for curve in curves.values())


def train_one(policy: str, capacity_factor: float, args: argparse.Namespace, root: Path) -> list[dict[str, float]]:
    """One `symi train` run; its metrics rows (one per step)."""
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch  # torch: imported only where training happens

    out = root / f"{policy}-cf{capacity_factor:g}"
    config = TrainConfig(out=str(out), model="tiny", num_experts=args.experts, slots_per_rank=args.slots, top_k=1,
                         policy=policy, capacity_factor=capacity_factor, capacity_mode="slot", steps=args.steps,
                         batch_size=4, aux_loss_coef=args.aux_loss_coef, seed=args.seed, log_interval=10**6)
    launch(config, args.nproc, log_level=logging.WARNING)
    with open(out / "metrics.csv") as f:
        return [{k: float(v or "nan") for k, v in row.items()} for row in csv.DictReader(f)]


def summarise(policy: str, capacity_factor: float, rows: list[dict[str, float]], wall_s: float,
              args: argparse.Namespace) -> dict[str, Any]:
    timed = rows[args.warmup:] or rows
    dropped = statistics.fmean(row["dropped_fraction"] for row in rows)
    return {
        "policy": policy,
        "capacity_factor": capacity_factor,
        "survival": round(1.0 - dropped, 5),
        "dropped_fraction": round(dropped, 5),
        "first_step_survival": round(1.0 - rows[0]["dropped_fraction"], 5),
        "step_ms_mean": round(1e3 * statistics.fmean(row["step_s"] for row in timed), 2),
        "step_ms_median": round(1e3 * statistics.median(row["step_s"] for row in timed), 2),
        "imbalance": round(statistics.fmean(row["imbalance"] for row in rows), 3),
        "replica_moves_per_step": round(statistics.fmean(row["replica_moves"] for row in rows), 2),
        "wall_s": round(wall_s, 1),
    }


def print_table(rows: list[dict[str, Any]], target: float) -> None:
    header = ("policy", "cf", "tokens surviving", "steps to target (fit)", "(trailing mean)", "final loss",
              "step ms (mean)", "imbalance")
    cells = [(r["policy"], f"{r['capacity_factor']:g}", f"{100 * r['survival']:.2f}%",
              *("-" if r[c] is None else str(r[c]) for c in ("steps_to_target", "steps_to_target_trailing")),
              f"{r['final_smoothed_loss']:.3f}", f"{r['step_ms_mean']:.1f}", f"{r['imbalance']:.2f}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    say(f"target loss {target:.4f}")
    say("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for c in cells:
        say("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def write_figures(out: Path, rows: list[dict[str, Any]], curves: dict[tuple[str, float], list[float]],
                  fitted: dict[tuple[str, float], list[float]], main_cfs: list[float], policies: list[str],
                  target: float, args: argparse.Namespace) -> None:
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    all_cfs = sorted({r["capacity_factor"] for r in rows})

    panels = [(f"capacity factor {cf:g}", [(p, cf) for p in policies]) for cf in main_cfs]
    panels.append(("static at every capacity factor", [("static", cf) for cf in all_cfs]))
    fig = Figure(figsize=(4.0 * len(panels), 4.0), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    cf_colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(all_cfs)))
    for index, (ax, (title, keys)) in enumerate(zip(axes, panels, strict=True)):
        for key in keys:
            if key not in curves:
                continue
            curve = curves[key]
            last = index == len(panels) - 1
            color = cf_colors[all_cfs.index(key[1])] if last else policy_colour(key[0])
            label = f"cf {key[1]:g}" if last else key[0]
            steps = np.arange(1, len(curve) + 1)
            ax.plot(steps[args.window - 1:], curve[args.window - 1:], color=color, linewidth=1.0, alpha=0.6,
                    label=label)
            ax.plot(steps[args.window - 1:], fitted[key][args.window - 1:], color=color, linewidth=1.2,
                    linestyle=":")
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (nats/byte)")
    fig.suptitle(f"Loss curves (solid: trailing mean of {args.window} steps; dotted: fitted a + b t^-c): "
                 f"{args.experts} experts, top-1, {args.nproc} ranks x {args.slots} slots, aux-loss coefficient "
                 f"{args.aux_loss_coef:g}")
    write_png(fig, out / "loss_curves.png")

    write_png(survival_steps_figure(rows, policies, target), out / "survival_steps.png")


def steps_axis_limits(steps: list[int | None]) -> tuple[float, float]:
    """y-limits of the steps-to-target panel: around the reached values (250 against 274 must show), with room
    above for the bar labels; from 0 when nothing was reached or the values span most of their range anyway."""
    reached = [s for s in steps if s is not None]
    if not reached:
        return 0.0, 1.0
    lo, hi = min(reached), max(reached)
    pad = max(2.0, 0.25 * (hi - lo))
    floor = max(0.0, lo - pad)
    if floor < 0.5 * hi:  # a span that large shows on an axis from 0
        floor = 0.0
    return floor, hi + 1.6 * pad + 0.15 * (hi - floor)


def survival_steps_figure(rows: list[dict[str, Any]], policies: list[str], target: float) -> Figure:
    """Tokens surviving and steps to the target loss per capacity factor and policy (bars grouped by capacity
    factor); the steps panel's axis is cut to the values (said in its label) so that close values stay apart."""
    import numpy as np
    from matplotlib.figure import Figure

    all_cfs = sorted({r["capacity_factor"] for r in rows})
    fig = Figure(figsize=(11.0, 4.2), dpi=110, layout="constrained")
    ax_surv, ax_steps = fig.subplots(1, 2)
    width = 0.8 / len(policies)
    x_C = np.arange(len(all_cfs))
    by_key = {(r["policy"], r["capacity_factor"]): r for r in rows}
    floor, top = steps_axis_limits([r["steps_to_target"] for r in rows])
    for i, policy in enumerate(policies):
        xs, survival, steps = [], [], []
        for c, cf in enumerate(all_cfs):
            row = by_key.get((policy, cf))
            if row is None:
                continue
            xs.append(x_C[c] + (i - (len(policies) - 1) / 2) * width)
            survival.append(100 * row["survival"])
            steps.append(row["steps_to_target"])
        bars = ax_surv.bar(xs, survival, width, color=policy_colour(policy), label=policy)
        ax_surv.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        # bars rise from the axis floor, so that a cut axis draws them as bars and not as bars hidden below it
        heights = [s - floor if s is not None else 0.0 for s in steps]
        bars = ax_steps.bar(xs, heights, width, bottom=floor, color=policy_colour(policy), label=policy)
        ax_steps.bar_label(bars, labels=[str(s) if s is not None else "not reached" for s in steps], fontsize=7,
                           padding=1, rotation=90)
    for ax in (ax_surv, ax_steps):
        ax.set_xticks(x_C, labels=[f"{cf:g}" for cf in all_cfs])
        ax.set_xlabel("capacity factor")
        ax.legend(fontsize=7, loc="upper center", ncol=len(policies))
    ax_surv.margins(y=0.3)
    ax_steps.set_ylim(floor, top)
    ax_surv.set_ylabel("tokens surviving (% of token-expert assignments)")
    ax_surv.set_title("Token survival", fontsize=10)
    cut = f", axis from {floor:g}" if floor > 0 else ""
    ax_steps.set_ylabel(f"steps to fitted loss {target:.3f} (steps{cut})")
    ax_steps.set_title("Steps to the target loss", fontsize=10)
    fig.suptitle("Capacity factor: tokens surviving and steps to target (executor, CPU)")
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="Smoke variant: 2 ranks, 4 experts, 30 steps, static and symi-balanced at cf 1 and 4 "
                             "(+ static at 2), auto target.")
    add_out_option(parser, STUDY)
    parser.add_argument("--nproc", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--slots", type=int, help="Expert slots per rank.")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--capacity-factors", type=parse_floats)
    parser.add_argument("--extra-static-cfs", type=parse_floats, help="Capacity factors run with `static` only.")
    parser.add_argument("--policies", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--window", type=int, help="Trailing window of the smoothed loss (steps).")
    parser.add_argument("--warmup", type=int, help="Steps per run left out of the step time.")
    parser.add_argument("--aux-loss-coef", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reanalyse", type=Path, default=None,
                        help="Train nothing: analyse the training results of an earlier run directory again "
                             "(e.g. with another --target-loss) into --out.")
    parser.add_argument("--target-loss", default=None,
                        help=f"A loss, or 'auto' (the highest of the runs' lowest fitted losses). Default "
                             f"{TARGET_LOSS} ({'auto'} with --quick).")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, parse_floats(value) if key.endswith("cfs") or key == "capacity_factors"
                    else value.split(",") if key == "policies" else value)
    if args.target_loss is None:
        args.target_loss = "auto" if args.quick else str(TARGET_LOSS)
    if "static" not in args.policies and args.extra_static_cfs:
        parser.error("--extra-static-cfs needs `static` in --policies")
    out = run_path(STUDY, args.out)

    start_s = time.perf_counter()
    # a reanalysis takes the earlier run's training configuration into args: read it before config.json records args
    previous = load_previous(args.reanalyse, args) if args.reanalyse is not None else None
    with run_dir(out, study=STUDY, args={**vars(args), "out": out}, argv=argv) as tmp_out:
        if previous is not None:
            rows, per_step, training_wall_s = previous
        else:
            rows, per_step = train_all(args)
            training_wall_s = time.perf_counter() - start_s
        analyse_and_write(tmp_out, rows, per_step, args, training_wall_s)
    say(f"wrote {out}")
    return out


def train_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[tuple[str, float], list[dict]]]:
    """Every training run of the study, one after another: summary rows and per-step metrics."""
    runs = [(p, cf) for cf in args.capacity_factors for p in args.policies]
    runs += [("static", cf) for cf in args.extra_static_cfs if cf not in args.capacity_factors]
    rows, per_step = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (policy, cf) in enumerate(runs):
            run_start = time.perf_counter()
            per_step[(policy, cf)] = train_one(policy, cf, args, Path(tmp))
            wall_s = time.perf_counter() - run_start
            rows.append(summarise(policy, cf, per_step[(policy, cf)], wall_s, args))
            say(f"[{index + 1}/{len(runs)}] {policy} cf {cf:g}: survival {100 * rows[-1]['survival']:.1f}% "
                f"({wall_s:.0f} s)")
    return rows, per_step


def load_previous(earlier: Path, args: argparse.Namespace
                  ) -> tuple[list[dict[str, Any]], dict[tuple[str, float], list[dict]], float]:
    """The training results of an earlier run directory (table.csv, curves.csv, summary.json), to analyse again."""
    summary = json.loads((earlier / "summary.json").read_text())
    with open(earlier / "table.csv") as f:
        rows = [{"policy": r["policy"], "capacity_factor": float(r["capacity_factor"]),
                 **{c: float(r[c]) for c in RUN_COLUMNS}} for r in csv.DictReader(f)]
    per_step: dict[tuple[str, float], list[dict]] = {}
    with open(earlier / "curves.csv") as f:
        for r in csv.DictReader(f):
            per_step.setdefault((r["policy"], float(r["capacity_factor"])), []).append(
                {"step": int(r["step"]), "loss": float(r["loss"]), "dropped_fraction": float(r["dropped_fraction"]),
                 "step_s": float(r["step_s"])})
    for key, value in summary["config"].items():  # the training configuration is the earlier run's
        if key not in ("target_loss", "reanalyse"):
            setattr(args, key, value)
    return rows, per_step, float(summary.get("training_wall_s", summary["wall_s"]))


def analyse_and_write(out: Path, rows: list[dict[str, Any]], per_step: dict[tuple[str, float], list[dict]],
                      args: argparse.Namespace, training_wall_s: float) -> None:
    """Steps to target from the loss curves; table.csv, curves.csv, summary.json and the figures into `out`."""
    losses = {key: [r["loss"] for r in values] for key, values in per_step.items()}
    trailing = {key: smoothed(values, args.window) for key, values in losses.items()}
    params = {key: fit_loss_curve(values, args.window) for key, values in losses.items()}
    fitted = {key: fitted_curve(params[key], len(losses[key])) for key in losses}
    target = auto_target(fitted, args.window) if args.target_loss == "auto" else float(args.target_loss)
    extra_targets = [] if args.quick else [t for t in EXTRA_TARGETS if t != target]
    for row in rows:
        key = (row["policy"], row["capacity_factor"])
        row["steps_to_target"] = steps_to(target, fitted[key], args.window)
        row["steps_to_target_trailing"] = steps_to(target, trailing[key], args.window)
        row["final_smoothed_loss"] = round(trailing[key][-1], 4)
        row["fit_a"], row["fit_b"], row["fit_c"] = (round(v, 6) for v in params[key])
        for t in extra_targets:
            row[f"steps_to_{t:g}"] = steps_to(t, fitted[key], args.window)
            row[f"steps_to_{t:g}_trailing"] = steps_to(t, trailing[key], args.window)
    rows.sort(key=lambda r: (args.policies.index(r["policy"]), r["capacity_factor"]))

    print_table(rows, target)
    say(f"training wall time {training_wall_s:.0f} s for {len(rows)} runs")
    columns = [*TABLE_COLUMNS, *(f"steps_to_{t:g}{kind}" for t in extra_targets for kind in ("", "_trailing"))]
    write_rows(out / "table.csv", columns, rows)
    write_rows(out / "curves.csv", CURVE_COLUMNS,
               ([policy, cf, int(row["step"]), row["loss"], round(smooth, 6), round(fit, 6), row["dropped_fraction"],
                 row["step_s"]]
                for (policy, cf), values in per_step.items()
                for row, smooth, fit in zip(values, trailing[(policy, cf)], fitted[(policy, cf)], strict=True)))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    summary = {"study": STUDY, "target_loss": target,
               "target_rule": ("auto: highest of the runs' lowest fitted losses" if args.target_loss == "auto"
                               else "fixed"),
               "steps_to_target": "first step at which the fitted curve a + b * t**-c (least squares on the losses "
                                  "from step `window` on) reaches the target; *_trailing: first step at which the "
                                  "trailing mean over `window` steps does",
               "extra_targets": extra_targets, "config": config,
               "fixed": {"model": "tiny", "top_k": 1, "capacity_mode": "slot", "batch_size_per_rank": 4,
                         "data": "symi_exec/data/wikipedia_texts.txt"},
               "rows": rows, "training_wall_s": round(training_wall_s, 1),
               "wall_s": round(training_wall_s, 1),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version()}}
    write_json(out / "summary.json", summary)
    write_figures(out, rows, trailing, fitted, args.capacity_factors, args.policies, target, args)

