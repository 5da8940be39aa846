"""What-if scale-out from 16 to 2,048 GPUs: where each policy's iteration time goes, and time to target per policy.

    .venv/bin/python -m experiments.scale_out [--quick] [--small-steps N] [--large-steps N] [--skip N] [--out DIR]

Scale points (clusters from presets with load_cluster overrides; weak scaling: the global batch grows with the
GPUs, so every GPU sees the same number of tokens per step at every scale):

  family                 cluster                                  GPUs              model / trace
  gpt-small/A100x1       paper-a100-16 (1 A100 per node, 4 slots)  16, 64            gpt-small (16 experts, top-1),
  gpt-small/H100x8       h100-8x8 (8 H100 per node, 5 slots)       16, 64            4 sequences of 512 per GPU;
                                                                                     traces/synthetic-drift.parquet
  deepseek-v3/H100x8     h100-8x8                                  64, 256, 1024,    deepseek-v3 (58 MoE layers, 256
                                                                   2048              experts, top-8), 7.5 sequences
                                                                                     of 4096 per GPU (DeepSeek-V3's
                                                                                     62.9M tokens at 2,048 GPUs); a
                                                                                     synthetic 58 x 256 top-8 trace
                                                                                     (Zipf 1.0, drift 0.2, seed 1)

deepseek-v3 needs at least 256 slots per layer, so its smallest point is 64 GPUs (320 slots). Both families
simulate steps skip+1 .. skip+N of their trace (default skip 100: past the synthetic traces' early irregular
phase, which decays over the first ~100 steps); N = --small-steps for gpt-small, --large-steps for deepseek-v3.
Capacity factor 1.0, slot capacity mode (the paper's).

Writes into the run directory: table.csv (one row per scale point and policy, every simulator summary column),
summary.json (configuration, per-point wall time), phases.png (stacked per-phase time per iteration, one panel
per scale point) and time_to_target.png (time to target and speed-up vs static per policy against GPUs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from experiments.harness import (
    LOG_SCALE,
    TRACES_DIR,
    add_out_option,
    best_first,
    phase_colours,
    policy_styles,
    run_dir,
    run_path,
    say,
    say_table,
    short_label,
    study_parser,
    write_json,
    write_png,
    write_table,
)
from symi_sim.cluster import Cluster, load_cluster
from symi_sim.models import ModelConfig, load_model
from symi_sim.simulator.driver import SimulationConfig, simulate
from symi_sim.traces.fit import fit_trace
from symi_sim.traces.format import LoadTrace, read_trace
from symi_sim.traces.synth import synth_trace

STUDY = "scale_out"
POLICIES = ("static", "flexmoe-10", "flexmoe-10:rule=cost_benefit", "fastermoe", "eplb", "symi", "symi-balanced",
            "symi-balanced:packing=grouped", "oracle:packing=grouped")
CAPACITY_FACTOR = 1.0
GPT_SEQUENCES_PER_GPU = 4           # the paper's global batch 64 on 16 GPUs
DSV3_SEQUENCES_PER_GPU_X2 = 15      # 7.5 sequences of 4096 per GPU: DeepSeek-V3's 15,360 sequences on 2,048 GPUs
SYNTHETIC = TRACES_DIR / "synthetic-drift.parquet"
PRINT_COLUMNS = ("point", "policy", "mean_time_s", "survival", "phase_expert_forward_s", "phase_a2a_forward_s",
                 "phase_grad_collect_s", "phase_weight_sendout_s", "time_to_target_s", "speedup_vs_static")


@dataclass(frozen=True)
class Point:
    family: str
    preset: str
    num_nodes: int
    model: str

    @property
    def cluster(self) -> Cluster:
        return load_cluster(self.preset, num_nodes=self.num_nodes)

    @property
    def num_gpus(self) -> int:
        return self.cluster.num_gpus

    @property
    def label(self) -> str:
        c = self.cluster
        return f"{self.model} {c.num_nodes}x{c.gpus_per_node} {'A100' if 'a100' in self.preset else 'H100'}"


POINTS = (
    Point("gpt-small/A100x1", "paper-a100-16", 16, "gpt-small"),
    Point("gpt-small/A100x1", "paper-a100-16", 64, "gpt-small"),
    Point("gpt-small/H100x8", "h100-8x8", 2, "gpt-small"),
    Point("gpt-small/H100x8", "h100-8x8", 8, "gpt-small"),
    Point("deepseek-v3/H100x8", "h100-8x8", 8, "deepseek-v3"),
    Point("deepseek-v3/H100x8", "h100-8x8", 32, "deepseek-v3"),
    Point("deepseek-v3/H100x8", "h100-8x8", 128, "deepseek-v3"),
    Point("deepseek-v3/H100x8", "h100-8x8", 256, "deepseek-v3"),
)
QUICK_POINTS = (POINTS[0], POINTS[2], POINTS[4])


def point_model(point: Point) -> ModelConfig:
    gpus = point.num_gpus
    if point.model == "gpt-small":
        return load_model("gpt-small", global_batch=GPT_SEQUENCES_PER_GPU * gpus)
    if point.model == "deepseek-v3":
        if (DSV3_SEQUENCES_PER_GPU_X2 * gpus) % 2:
            raise ValueError(f"deepseek-v3 point needs an even number of GPUs, got {gpus}")
        return load_model("deepseek-v3", global_batch=DSV3_SEQUENCES_PER_GPU_X2 * gpus // 2)
    raise ValueError(f"unknown model {point.model!r}")


def skipped(trace: LoadTrace, skip: int) -> LoadTrace:
    """`trace` from step `skip` on (that step only seeds the first plan)."""
    if skip == 0:
        return trace
    return LoadTrace(counts_SLE=trace.counts_SLE[skip:], top_k=trace.top_k, tokens_per_step=trace.tokens_per_step,
                     model=trace.model, source=trace.source, provenance=f"{trace.provenance} [from step {skip}]",
                     meta=dict(trace.meta))


def point_trace(point: Point, model: ModelConfig, steps: int, skip: int) -> tuple[ModelConfig, LoadTrace]:
    if point.model == "gpt-small":
        trace = read_trace(SYNTHETIC)
        if skip + steps + 1 > trace.num_steps:
            raise ValueError(f"synthetic-drift has {trace.num_steps} steps; skip {skip} + {steps} steps do not fit")
    else:
        trace = synth_trace(num_experts=model.num_experts, num_layers=model.num_moe_layers,
                            num_steps=skip + steps + 1, skew=1.0, drift=0.2, seed=1, top_k=model.top_k,
                            tokens_per_step=model.tokens_per_step)
    return fit_trace(model, skipped(trace, skip))


def run_point(point: Point, steps: int, skip: int) -> tuple[pd.DataFrame, dict]:
    model = point_model(point)
    model, trace = point_trace(point, model, steps, skip)
    cluster = point.cluster
    t0 = time.perf_counter()
    result = simulate(SimulationConfig(trace=trace, cluster=cluster, model=model, policies=POLICIES,
                                       capacity_factor=CAPACITY_FACTOR, capacity_mode="slot", steps=steps),
                      progress=False)
    wall_s = time.perf_counter() - t0
    table = result.summary.copy()
    meta = {"point": point.label, "family": point.family, "num_gpus": cluster.num_gpus,
            "num_nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node,
            "slots_per_gpu": cluster.slots_per_gpu, "model": point.model, "num_experts": model.num_experts,
            "moe_layers": model.num_moe_layers, "top_k": model.top_k, "tokens_per_step": model.tokens_per_step}
    for i, (key, value) in enumerate(meta.items()):
        table.insert(i, key, value)
    info = {**meta, "steps": steps, "skip": skip, "trace": trace.provenance, "wall_s": round(wall_s, 2)}
    return table, info


# ---------------------------------------------------------------- figures


def phases_figure(table: pd.DataFrame) -> Figure:
    points = list(dict.fromkeys(table["point"]))
    phases = [c for c in table.columns if c.startswith("phase_") and c.endswith("_s") and table[c].max() > 0]
    colours = phase_colours(phases)
    cols = min(4, len(points))
    rows_n = int(np.ceil(len(points) / cols))
    fig = Figure(figsize=(4.2 * cols + 1.8, 3.9 * rows_n), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False)).ravel()
    for ax, point in zip(axes, points, strict=False):
        rows = table[table["point"] == point]
        rows = rows.iloc[best_first(rows["mean_time_s"].to_numpy(dtype=float), rows["policy"].tolist())]
        x = np.arange(len(rows))
        bottom = np.zeros(len(rows))
        for column in phases:
            values = rows[column].to_numpy(dtype=float)
            ax.bar(x, values, bottom=bottom, color=colours[column], label=column[6:-2].replace("_", " "))
            bottom += values
        ax.set_xticks(x, labels=[short_label(p) for p in rows["policy"]], rotation=50, ha="right",
                      rotation_mode="anchor", fontsize=6)
        ax.set_title(f"{point} ({int(rows['num_gpus'].iloc[0])} GPUs)", fontsize=9)
        ax.set_ylabel("time per iteration (s)")
        ax.set_xlabel("policy (fastest iteration first)", fontsize=8)
    for ax in axes[len(points):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="phase (critical path)")
    fig.suptitle("Where each policy's iteration time goes, per scale point (capacity factor 1.0, slot mode)")
    return fig


_PLAIN = FuncFormatter(lambda value, _pos: f"{value:,.0f}" if value >= 100 else f"{value:g}")


def time_to_target_figure(table: pd.DataFrame) -> Figure:
    families = list(dict.fromkeys(table["family"]))
    policies = list(dict.fromkeys(table["policy"]))
    styles = policy_styles(policies)
    fig = Figure(figsize=(4.6 * len(families) + 2.2, 7.5), layout="constrained")
    axes = fig.subplots(2, len(families), squeeze=False)
    for j, family in enumerate(families):
        rows = table[table["family"] == family]
        ax_t, ax_s = axes[0, j], axes[1, j]
        for policy in policies:
            p = rows[rows["policy"] == policy].sort_values("num_gpus")
            style = {**styles[policy], "ms": 4, "label": short_label(policy)}
            ax_t.plot(p["num_gpus"], p["time_to_target_s"], **style)
            ax_s.plot(p["num_gpus"], p["speedup_vs_static"], **style)
        for ax in (ax_t, ax_s):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(rows["num_gpus"].unique()), labels=[str(g) for g in sorted(rows["num_gpus"].unique())])
            ax.set_xlabel("GPUs" + LOG_SCALE)
            ax.grid(alpha=0.3)
        ax_t.set_yscale("log")
        # plain numbers on the log axis (its default labels are 2 x 10^4 style)
        ax_t.yaxis.set_major_formatter(_PLAIN)
        ax_t.yaxis.set_minor_formatter(_PLAIN)
        ax_t.set_ylabel("simulated time to target loss (s)" + LOG_SCALE)
        ax_t.set_title(f"{family}: time to target", fontsize=9)
        ax_s.axhline(1.0, color="black", lw=0.6)
        ax_s.set_ylabel("speed-up vs static (x)")
        ax_s.set_title(f"{family}: speed-up vs static", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="policy")
    fig.suptitle("Time to target per policy against cluster size (weak scaling: tokens per GPU fixed)")
    return fig


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 points (16 A100, 16 H100, 64 H100 deepseek-v3), 4 steps")
    parser.add_argument("--small-steps", type=int, default=None, help="gpt-small steps (default 200; --quick 4)")
    parser.add_argument("--large-steps", type=int, default=None, help="deepseek-v3 steps (default 50; --quick 4)")
    parser.add_argument("--skip", type=int, default=100, help="trace steps skipped before the first simulated one")
    add_out_option(parser, STUDY)
    args = parser.parse_args(argv)
    out = run_path(STUDY, args.out)
    small = args.small_steps or (4 if args.quick else 200)
    large = args.large_steps or (4 if args.quick else 50)
    points = QUICK_POINTS if args.quick else POINTS

    t0 = time.perf_counter()
    tables, infos = [], []
    for point in points:
        steps = small if point.model == "gpt-small" else large
        table, info = run_point(point, steps, args.skip)
        tables.append(table)
        infos.append(info)
        say(f"{info['point']}: {info['num_gpus']} GPUs, {steps} steps, {info['wall_s']:.1f} s")
    table = pd.concat(tables, ignore_index=True)
    weak = {"gpt-small_sequences_per_gpu": GPT_SEQUENCES_PER_GPU,
            "deepseek-v3_sequences_per_gpu": DSV3_SEQUENCES_PER_GPU_X2 / 2}
    summary = {"study": STUDY, "quick": args.quick, "policies": list(POLICIES), "capacity_factor": CAPACITY_FACTOR,
               "capacity_mode": "slot", "weak_scaling": weak, "points": infos,
               "wall_s": round(time.perf_counter() - t0, 2)}
    resolved = {"quick": args.quick, "small_steps": small, "large_steps": large, "skip": args.skip,
                "points": [p.label for p in points], "out": out}
    with run_dir(out, study=STUDY, args=resolved, argv=argv) as tmp:
        write_table(tmp / "table.csv", table)
        write_json(tmp / "summary.json", summary)
        write_png(phases_figure(table), tmp / "phases.png")
        write_png(time_to_target_figure(table), tmp / "time_to_target.png")

    say_table(table, PRINT_COLUMNS, ".4g")
    say(f"wrote {out}; simulation {summary['wall_s']:.1f} s")
    return out
