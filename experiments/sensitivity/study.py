"""Sensitivity of time to target and token survival to slots per GPU, top-k, the popularity window, the
capacity factor and the auxiliary-loss coefficient, for the main policies.

    .venv/bin/python -m experiments.sensitivity [--quick] [--steps N] [--aux-steps N] [--no-aux] [--out DIR]

Base configuration (the paper's): paper-a100-16 (16 x 1 A100, 4 slots per GPU), gpt-small shapes (12 MoE blocks,
16 experts, top-1, 32,768 tokens per step), capacity factor 1.0, slot capacity mode, window 1. One axis is
varied at a time, the others stay at the base:

  slots      slots per GPU 1, 2, 4, 8 (load_cluster override; 1 slot = 16 slots for 16 experts: no replication)
  top_k      1, 2, 4: gpt-small with the trace's top-k (fit_trace(adopt_trace_shape=True))
  window     1, 2, 4, 8: the popularity window the policies plan from (sum of the last w steps' loads)
  capacity   capacity factor 1, 1.25, 1.5, 2 (slot mode: buffers grow, so a2a and expert compute grow too)
  aux_loss_coef  1e-5, 1e-3, 1e-2, 1e-1 (--quick: 1e-5, 1e-1): the one axis that needs real training
             (aux_loss.py): per coefficient the executor's `tiny` model (16 experts, top-1, 4 gloo ranks on CPU,
             dropless, policy static) trains --aux-steps steps (default 300, --quick 20) with its routing recorded;
             each recording is then simulated at the base exactly as the recorded trace above (tiled onto the
             12 MoE blocks, rescaled to 32,768 tokens per step). Its rows have trace "recorded" (that run's
             recording, kept under aux_loss/ in the run directory) and trace_skew = busiest / mean expert.

Traces: "synthetic" = symi_sim.traces.synth with traces/synthetic-drift.parquet's parameters (Zipf 1.0, drift 0.2,
1% bursts, seed 1, 1,000 steps, 12 layers, 16 experts; top-1 is that file byte for byte) at top-k 1, 2, 4;
"recorded" = traces/recorded-tiny-e16-top1.parquet (top-k 2: recorded-tiny-e16-top2.parquet; no top-4 recording)
tiled onto the 12 MoE blocks (block b = recorded layer b % 2, as in experiments/paper_comparison) and rescaled to
32,768 tokens per step. Policies: static, symi, symi-balanced, symi-balanced:packing=grouped, eplb.

Writes table.csv (one row per axis, value, trace and policy: every simulator summary column, plus trace_skew),
summary.json, sensitivity.png (time to target, survival and speed-up vs static against each axis) and
aux_loss/aux-<coefficient>/ (trace.parquet and metrics.csv of each training run).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from experiments.harness import (
    REPO_ROOT,
    TRACES_DIR,
    add_out_option,
    policy_colour,
    run_dir,
    run_path,
    say,
    say_table,
    study_parser,
    write_json,
    write_png,
    write_table,
)
from experiments.sensitivity import aux_loss
from symi_sim.cluster import load_cluster
from symi_sim.models import load_model
from symi_sim.simulator.driver import SimulationConfig, simulate
from symi_sim.traces.fit import fit_trace, tile_layers
from symi_sim.traces.format import LoadTrace, read_trace
from symi_sim.traces.synth import synth_trace

STUDY = "sensitivity"
CLUSTER = "paper-a100-16"
MODEL = "gpt-small"
POLICIES = ("static", "symi", "symi-balanced", "symi-balanced:packing=grouped", "eplb")
BASE = {"slots": 4, "top_k": 1, "window": 1, "capacity": 1.0}
AXES = {"slots": (1, 2, 4, 8), "top_k": (1, 2, 4), "window": (1, 2, 4, 8), "capacity": (1.0, 1.25, 1.5, 2.0)}
AXIS_LABELS = {"slots": "slots per GPU", "top_k": "top-k", "window": "popularity window (steps)",
               "capacity": "capacity factor", aux_loss.AXIS: aux_loss.LABEL}
SYNTH = {"num_experts": 16, "num_layers": 12, "num_steps": 1000, "skew": 1.0, "drift": 0.2, "seed": 1,
         "burst_prob": 0.01, "tokens_per_step": 32768}
RECORDED = {k: TRACES_DIR / f"recorded-tiny-e16-top{k}.parquet" for k in (1, 2)}
TRACES = ("synthetic", "recorded")
PRINT_COLUMNS = ("axis", "value", "trace", "trace_skew", "policy", "mean_time_s", "survival", "time_to_target_s",
                 "speedup_vs_static")


_TRACE_CACHE: dict[tuple[str, int], LoadTrace] = {}


def get_trace(name: str, top_k: int) -> LoadTrace | None:
    """The trace of `name` at `top_k`, or None when there is none (recorded top-4)."""
    key = (name, top_k)
    if key not in _TRACE_CACHE:
        if name == "synthetic":
            _TRACE_CACHE[key] = synth_trace(top_k=top_k, **SYNTH)
        elif name == "recorded":
            if top_k not in RECORDED:
                return None
            _TRACE_CACHE[key] = tile_layers(read_trace(RECORDED[top_k]), load_model(MODEL).num_moe_layers)
        else:
            raise ValueError(f"unknown trace {name!r}")
    return _TRACE_CACHE[key]


def run_config(trace_name: str, config: dict, steps: int | None) -> pd.DataFrame | None:
    trace = get_trace(trace_name, config["top_k"])
    if trace is None:
        return None
    return simulate_config(trace, config, steps)


def simulate_config(trace: LoadTrace, config: dict, steps: int | None) -> pd.DataFrame:
    """The simulator summary of `trace` (MoE layers already matching gpt-small's, or adopted) under `config`."""
    skew = aux_loss.trace_skew(trace)
    model, trace = fit_trace(load_model(MODEL), trace, adopt_trace_shape=True)
    available = trace.num_steps - 1
    n = available if steps is None else min(steps, available)
    cluster = load_cluster(CLUSTER, slots_per_gpu=config["slots"])
    result = simulate(SimulationConfig(trace=trace, cluster=cluster, model=model, policies=POLICIES,
                                       capacity_factor=config["capacity"], capacity_mode="slot",
                                       window=config["window"], steps=n), progress=False)
    table = result.summary.copy()
    table.insert(0, "trace_steps", n)
    table.insert(0, "trace_skew", skew)
    return table


def label_rows(table: pd.DataFrame, axis: str, value: float, trace_name: str, config: dict) -> pd.DataFrame:
    table.insert(0, "trace", trace_name)
    table.insert(0, "value", float(value))
    table.insert(0, "axis", axis)
    for key, setting in config.items():
        table[f"cfg_{key}"] = setting
    return table


def aux_loss_axis(coefs: tuple[float, ...], train_steps: int, steps: int | None, out: Path
                  ) -> tuple[list[pd.DataFrame], dict]:
    """Train and record at every aux-loss coefficient (into out/aux_loss/), then simulate each recording at the
    base configuration the way the shipped recorded trace is simulated: its 2 layers tiled onto gpt-small's 12 MoE
    blocks (as experiments/paper_comparison does), rescaled to 32,768 tokens per step."""
    t0 = time.perf_counter()
    runs = aux_loss.record_all(coefs, train_steps, out / "aux_loss")
    train_wall_s = time.perf_counter() - t0
    tables, facts = [], []
    for run in runs:
        recorded = read_trace(run["dir"] / "trace.parquet")
        table = simulate_config(tile_layers(recorded, load_model(MODEL).num_moe_layers), BASE, steps)
        table = label_rows(table, aux_loss.AXIS, run["coef"], "recorded", BASE)
        table["cfg_aux_loss_coef"] = run["coef"]
        table["trace_path"] = str((run["dir"] / "trace.parquet").relative_to(out))
        tables.append(table)
        by = table.set_index("policy")
        facts.append({"coef": run["coef"], "skew": run["skew"], "per_layer_skew": run["per_layer_skew"],
                      "train_steps": run["steps"], "train_wall_s": run["train_wall_s"],
                      "trace_path": table["trace_path"].iloc[0],
                      "static_survival": round(float(by.loc["static", "survival"]), 4),
                      "survival": {p: round(float(by.loc[p, "survival"]), 4) for p in POLICIES},
                      "time_to_target_s": {p: round(float(by.loc[p, "time_to_target_s"]), 3) for p in POLICIES},
                      "speedup_vs_static": {p: round(float(by.loc[p, "speedup_vs_static"]), 4) for p in POLICIES}})
    say(f"{aux_loss.AXIS}: done ({train_wall_s:.0f} s training, {time.perf_counter() - t0 - train_wall_s:.1f} s "
        "simulating)")
    info = {"coefs": list(coefs), "train_steps": train_steps, "nproc": aux_loss.NPROC, "train": aux_loss.TRAIN,
            "skew": "busiest / mean expert load, median over steps, mean over the recorded layers",
            "runs": facts, "train_wall_s": round(train_wall_s, 1),
            "simulate_wall_s": round(time.perf_counter() - t0 - train_wall_s, 2)}
    return tables, info


def sensitivity_figure(table: pd.DataFrame) -> Figure:
    axes_names = [axis for axis in (*AXES, aux_loss.AXIS) if (table["axis"] == axis).any()]
    metrics = (("time_to_target_s", "time to target (s)"), ("survival", "tokens surviving (fraction)"),
               ("speedup_vs_static", "speed-up vs static (x)"))
    policies = list(dict.fromkeys(table["policy"]))
    styles = {"synthetic": "-", "recorded": "--"}
    widths = [1.3 if axis == aux_loss.AXIS else 1.0 for axis in axes_names]
    fig = Figure(figsize=(4 * sum(widths), 10), layout="constrained")
    grid = fig.subplots(len(metrics), len(axes_names), squeeze=False, gridspec_kw={"width_ratios": widths})
    for j, axis in enumerate(axes_names):
        rows = table[table["axis"] == axis]
        values = sorted(rows["value"].unique())
        if axis == aux_loss.AXIS:  # log axis; each tick also names its recording's skew
            skew = rows.groupby("value")["trace_skew"].first()
            ticks = [f"{v:g}\n({skew[v]:.1f}x)" for v in values]
        else:
            ticks = [f"{v:g}" for v in values]
        for i, (metric, label) in enumerate(metrics):
            ax = grid[i, j]
            for trace in dict.fromkeys(rows["trace"]):
                for policy in policies:
                    p = rows[(rows["trace"] == trace) & (rows["policy"] == policy)].sort_values("value")
                    ax.plot(p["value"], p[metric], ls=styles.get(trace, "-"), marker="o", ms=3,
                            color=policy_colour(policy), label=f"{policy} ({trace})")
            if axis == aux_loss.AXIS:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(values, labels=ticks)
            ax.set_xlabel(AXIS_LABELS[axis])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if i == 0:
                title = (f"varying {AXIS_LABELS[axis]}" if axis != aux_loss.AXIS
                         else "varying aux-loss coefficient\n(recorded at each coefficient)")
                ax.set_title(title, fontsize=10)
    handles, labels = grid[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="policy (trace; dashed = recorded)")
    fig.suptitle(f"Sensitivity at {CLUSTER}, {MODEL} (base: 4 slots, top-1, window 1, capacity factor 1.0, slot mode; "
                 "skew = busiest / mean expert load)")
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every simulator axis value, 8 steps; aux-loss axis at 2 coefficients, "
                             f"{aux_loss.QUICK_STEPS} training steps")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the whole trace; --quick 8)")
    parser.add_argument("--aux-steps", type=int, default=None,
                        help=f"training steps per aux-loss coefficient (default {aux_loss.STEPS}; --quick "
                             f"{aux_loss.QUICK_STEPS})")
    parser.add_argument("--no-aux", action="store_true", help="leave out the aux-loss axis (no training)")
    add_out_option(parser, STUDY)
    args = parser.parse_args(argv)
    out = run_path(STUDY, args.out)
    steps = args.steps if args.steps is not None else (8 if args.quick else None)
    aux_steps = args.aux_steps or (aux_loss.QUICK_STEPS if args.quick else aux_loss.STEPS)
    coefs = aux_loss.QUICK_COEFS if args.quick else aux_loss.COEFS
    resolved = {"quick": args.quick, "steps": steps, "aux_steps": None if args.no_aux else aux_steps,
                "aux_coefs": [] if args.no_aux else list(coefs), "no_aux": args.no_aux, "out": out}

    t0 = time.perf_counter()
    with run_dir(out, study=STUDY, args=resolved, argv=argv) as tmp:
        tables = []
        for axis, values in AXES.items():
            for value in values:
                config = {**BASE, axis: value}
                for trace_name in TRACES:
                    table = run_config(trace_name, config, steps)
                    if table is not None:
                        tables.append(label_rows(table, axis, value, trace_name, config))
            say(f"{axis}: done ({time.perf_counter() - t0:.1f} s)")
        aux_info = None
        if not args.no_aux:
            aux_tables, aux_info = aux_loss_axis(coefs, aux_steps, steps, tmp)
            tables += aux_tables
        table = pd.concat(tables, ignore_index=True)
        wall_s = time.perf_counter() - t0
        summary = {"study": STUDY, "quick": args.quick, "cluster": CLUSTER, "model": MODEL, "policies": list(POLICIES),
                   "base": BASE, "axes": {k: list(v) for k, v in AXES.items()}, "traces": list(TRACES),
                   "synthetic_trace": SYNTH,
                   "recorded_traces": {k: str(v.relative_to(REPO_ROOT)) for k, v in RECORDED.items()},
                   "aux_loss": aux_info, "steps": steps, "wall_s": round(wall_s, 2),
                   "simulate_wall_s": round(wall_s - (aux_info["train_wall_s"] if aux_info else 0.0), 2)}
        write_table(tmp / "table.csv", table)
        write_json(tmp / "summary.json", summary)
        write_png(sensitivity_figure(table), tmp / "sensitivity.png")

    say_table(table, PRINT_COLUMNS, ".4g")
    if aux_info is not None:
        for run in aux_info["runs"]:
            speedups = ", ".join(f"{p} {v:.2f}x" for p, v in run["speedup_vs_static"].items() if p != "static")
            say(f"aux-loss {run['coef']:g}: skew {run['skew']:.2f}, static survives "
                f"{100 * run['static_survival']:.1f}%; {speedups}")
    say(f"wrote {out}; {summary['wall_s']:.1f} s ({summary['simulate_wall_s']:.1f} s simulating)")
    return out
