"""Sensitivity of time to target and token survival to slots per GPU, top-k, the popularity window and the
capacity factor, for the main policies, in the simulator.

    .venv/bin/python experiments/sensitivity/run.py [--quick] [--steps N] [--out DIR]

Base configuration (the paper's): paper-a100-16 (16 x 1 A100, 4 slots per GPU), gpt-small shapes (12 MoE blocks,
16 experts, top-1, 32,768 tokens per step), capacity factor 1.0, slot capacity mode, window 1. One axis is
varied at a time, the others stay at the base:

  slots      slots per GPU 1, 2, 4, 8 (load_cluster override; 1 slot = 16 slots for 16 experts: no replication)
  top_k      1, 2, 4: gpt-small with the trace's top-k (fit_trace(adopt_trace_shape=True))
  window     1, 2, 4, 8: the popularity window the policies plan from (sum of the last w steps' loads)
  capacity   capacity factor 1, 1.25, 1.5, 2 (slot mode: buffers grow, so a2a and expert compute grow too)

Traces: "synthetic" = symi_sim.trace_synth with traces/synthetic-drift.parquet's parameters (Zipf 1.0, drift 0.2,
1% bursts, seed 1, 1,000 steps, 12 layers, 16 experts; top-1 is that file byte for byte) at top-k 1, 2, 4;
"recorded" = traces/recorded-tiny-e16-top1.parquet (top-k 2: recorded-tiny-e16-top2.parquet; no top-4 recording)
tiled onto the 12 MoE blocks (block b = recorded layer b % 2, as in experiments/paper_comparison) and rescaled to
32,768 tokens per step. Policies: static, symi, symi-balanced, symi-balanced:packing=grouped, eplb.

Not here: the auxiliary-loss coefficient axis. It changes the routing itself, so it needs real training; it lives
in the executor study (symi train, another helper's experiment) and is not duplicated in the simulator.

Writes table.csv (one row per axis, value, trace and policy: every simulator summary column), summary.json and
sensitivity.png (time to target, survival and speed-up vs static against each axis).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from symi_sim.cluster import load_cluster  # noqa: E402
from symi_sim.models import fit_trace, load_model, tile_layers  # noqa: E402
from symi_sim.outputs import atomic_dir  # noqa: E402
from symi_sim.simulate import simulate  # noqa: E402
from symi_sim.trace import LoadTrace, read_trace  # noqa: E402
from symi_sim.trace_synth import synth_trace  # noqa: E402

STUDY = "sensitivity"
CLUSTER = "paper-a100-16"
MODEL = "gpt-small"
POLICIES = ("static", "symi", "symi-balanced", "symi-balanced:packing=grouped", "eplb")
BASE = {"slots": 4, "top_k": 1, "window": 1, "capacity": 1.0}
AXES = {"slots": (1, 2, 4, 8), "top_k": (1, 2, 4), "window": (1, 2, 4, 8), "capacity": (1.0, 1.25, 1.5, 2.0)}
AXIS_LABELS = {"slots": "slots per GPU", "top_k": "top-k", "window": "popularity window (steps)",
               "capacity": "capacity factor"}
SYNTH = {"num_experts": 16, "num_layers": 12, "num_steps": 1000, "skew": 1.0, "drift": 0.2, "seed": 1,
         "burst_prob": 0.01, "tokens_per_step": 32768}
RECORDED = {k: ROOT / "traces" / f"recorded-tiny-e16-top{k}.parquet" for k in (1, 2)}
TRACES = ("synthetic", "recorded")
AUX_LOSS_NOTE = ("the auxiliary-loss coefficient axis changes the routing itself and needs real training: it lives in "
                 "the executor study (symi train), not in this simulator study")
PRINT_COLUMNS = ("axis", "value", "trace", "policy", "mean_time_s", "survival", "time_to_target_s",
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
    model, trace = fit_trace(load_model(MODEL), trace, adopt_trace_shape=True)
    available = trace.num_steps - 1
    n = available if steps is None else min(steps, available)
    cluster = load_cluster(CLUSTER, slots_per_gpu=config["slots"])
    result = simulate(trace=trace, cluster=cluster, model=model, policies=list(POLICIES),
                      capacity_factor=config["capacity"], capacity_mode="slot", window=config["window"], steps=n,
                      progress=False)
    table = result.summary.copy()
    table.insert(0, "trace_steps", n)
    return table


def sensitivity_figure(table: pd.DataFrame) -> Figure:
    axes_names = list(AXES)
    metrics = (("time_to_target_s", "time to target (s)"), ("survival", "tokens surviving (fraction)"),
               ("speedup_vs_static", "speed-up vs static (x)"))
    policies = list(dict.fromkeys(table["policy"]))
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = {p: cmap(i) for i, p in enumerate(policies)}
    styles = {"synthetic": "-", "recorded": "--"}
    fig = Figure(figsize=(16, 10), layout="constrained")
    grid = fig.subplots(len(metrics), len(axes_names), squeeze=False)
    for j, axis in enumerate(axes_names):
        rows = table[table["axis"] == axis]
        for i, (metric, label) in enumerate(metrics):
            ax = grid[i, j]
            for trace in dict.fromkeys(rows["trace"]):
                for policy in policies:
                    p = rows[(rows["trace"] == trace) & (rows["policy"] == policy)].sort_values("value")
                    ax.plot(p["value"], p[metric], ls=styles.get(trace, "-"), marker="o", ms=3,
                            color=colors[policy], label=f"{policy} ({trace})")
            ax.set_xticks(AXES[axis], labels=[f"{v:g}" for v in AXES[axis]])
            ax.set_xlabel(AXIS_LABELS[axis])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"varying {AXIS_LABELS[axis]}", fontsize=10)
    handles, labels = grid[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="policy (trace; dashed = recorded)")
    fig.suptitle(f"Sensitivity at {CLUSTER}, {MODEL} (base: 4 slots, top-1, window 1, capacity factor 1.0, slot mode)")
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: every axis value, 8 steps")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the whole trace; --quick 8)")
    parser.add_argument("--out", default=None, help=f"run directory (default runs/{STUDY}-<timestamp>)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/{STUDY}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    steps = args.steps if args.steps is not None else (8 if args.quick else None)

    t0 = time.perf_counter()
    tables = []
    for axis, values in AXES.items():
        for value in values:
            config = {**BASE, axis: value}
            for trace_name in TRACES:
                table = run_config(trace_name, config, steps)
                if table is None:
                    continue
                table.insert(0, "trace", trace_name)
                table.insert(0, "value", float(value))
                table.insert(0, "axis", axis)
                for key, setting in config.items():
                    table[f"cfg_{key}"] = setting
                tables.append(table)
        print(f"{axis}: done ({time.perf_counter() - t0:.1f} s)", flush=True)
    table = pd.concat(tables, ignore_index=True)
    summary = {"study": STUDY, "quick": args.quick, "cluster": CLUSTER, "model": MODEL, "policies": list(POLICIES),
               "base": BASE, "axes": {k: list(v) for k, v in AXES.items()}, "traces": list(TRACES),
               "synthetic_trace": SYNTH, "recorded_traces": {k: str(v.relative_to(ROOT)) for k, v in RECORDED.items()},
               "not_here": AUX_LOSS_NOTE, "steps": steps, "wall_s": round(time.perf_counter() - t0, 2)}
    with atomic_dir(out) as tmp:
        table.to_csv(tmp / "table.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        sensitivity_figure(table).savefig(tmp / "sensitivity.png", dpi=110)

    pd.set_option("display.width", 200)
    print(table.loc[:, list(PRINT_COLUMNS)].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"note: {AUX_LOSS_NOTE}")
    print(f"wrote {out}; simulation {summary['wall_s']:.1f} s")
    return out


if __name__ == "__main__":
    main()
