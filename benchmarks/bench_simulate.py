"""Simulator benchmark: wall time per policy at the paper's scale and at 2,048 GPUs, and the simulated comparison.

    .venv/bin/python benchmarks/bench_simulate.py [--paper-steps 1000] [--large-steps 50] [--out DIR]

  paper  paper-a100-16 (16 GPUs x 4 slots), gpt-small, traces/synthetic-drift.parquet (16 experts, 12 layers,
         top-1), the first --paper-steps steps (step 0 only seeds the first plan), capacity factor 1.0, slot
         capacity (the paper's); target: the ten default policies in <= 20 s on a 2-core machine.
  large  h100-2048 (256 nodes x 8 H100, 5 slots), deepseek-v3 (58 MoE layers, 256 experts, top-8), a seeded
         synthetic trace made here (Zipf 1.0, drift 0.2, at the model's 62.9M tokens per step), --large-steps
         steps; target: <= 60 s per policy.
Prints one table per scale (wall seconds per policy + the summary numbers) and writes bench_simulate_paper.csv,
bench_simulate_large.csv and bench_simulate.json to --out (default runs/bench_simulate; the committed tables: --out
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
from report import add_out_option, out_dir

from cli import DEFAULT_SIMULATE_POLICIES  # the same list `symi simulate` compares by default
from symi_sim.cluster import load_cluster
from symi_sim.models import load_model
from symi_sim.simulator.driver import SimulationConfig, simulate
from symi_sim.traces.fit import fit_trace
from symi_sim.traces.format import read_trace
from symi_sim.traces.synth import synth_trace

POLICIES = tuple(DEFAULT_SIMULATE_POLICIES.split(","))

ROOT = Path(__file__).resolve().parent.parent
TABLE_COLUMNS = ("policy", "wall_s", "mean_time_s", "survival", "imbalance", "phase_grad_collect_s",
                 "phase_migration_s", "iterations_to_target", "time_to_target_s", "speedup_vs_static")


def run_scale(trace, cluster, model, policies, steps: int) -> pd.DataFrame:
    rows = []
    for name in policies:
        t0 = time.perf_counter()
        result = simulate(SimulationConfig(trace=trace, cluster=cluster, model=model, policies=[name], steps=steps),
                          progress=False)
        wall_s = time.perf_counter() - t0
        rows.append({"wall_s": wall_s, **result.summary.iloc[0].to_dict()})
    table = pd.DataFrame(rows)
    static = table.loc[table["policy"] == "static", "time_to_target_s"]
    if len(static):
        table["speedup_vs_static"] = float(static.iloc[0]) / table["time_to_target_s"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-steps", type=int, default=1000)
    parser.add_argument("--large-steps", type=int, default=50)
    parser.add_argument("--policies", default=",".join(POLICIES))
    add_out_option(parser, "bench_simulate")
    args = parser.parse_args()
    args.out = out_dir(args.out, "bench_simulate")
    policies = [p for p in args.policies.split(",") if p]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, trace = fit_trace(load_model("gpt-small"), read_trace(ROOT / "traces" / "synthetic-drift.parquet"))
    paper_steps = min(args.paper_steps, trace.num_steps) - 1
    paper = run_scale(trace, load_cluster("paper-a100-16"), model, policies, paper_steps)

    big_model = load_model("deepseek-v3")
    big_trace = synth_trace(num_experts=256, num_layers=58, num_steps=args.large_steps + 1, skew=1.0, drift=0.2,
                            seed=1, top_k=8, tokens_per_step=big_model.tokens_per_step)
    big_model, big_trace = fit_trace(big_model, big_trace)
    large = run_scale(big_trace, load_cluster("h100-2048"), big_model, policies, args.large_steps)

    pd.set_option("display.width", 200)
    fmt = {"float_format": lambda x: f"{x:.4g}", "index": False}
    print(f"paper: paper-a100-16, gpt-small, synthetic-drift, {paper_steps} steps, capacity factor 1.0 (slot); "
          f"total {paper['wall_s'].sum():.1f} s (target <= 20 s)")
    print(paper.loc[:, list(TABLE_COLUMNS)].to_string(**fmt))
    print(f"\nlarge: h100-2048, deepseek-v3, synthetic 58 x 256 top-8, {args.large_steps} steps; "
          f"slowest policy {large['wall_s'].max():.1f} s (target <= 60 s per policy)")
    print(large.loc[:, list(TABLE_COLUMNS)].to_string(**fmt))

    paper.to_csv(out / "bench_simulate_paper.csv", index=False)
    large.to_csv(out / "bench_simulate_large.csv", index=False)
    meta = {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "paper": {"steps": paper_steps, "total_wall_s": float(paper["wall_s"].sum()), "target_s": 20},
        "large": {"steps": args.large_steps, "max_wall_s": float(large["wall_s"].max()), "target_s": 60,
                  "trace": big_trace.provenance},
    }
    (out / "bench_simulate.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"\nwrote {out}/bench_simulate_paper.csv, bench_simulate_large.csv, bench_simulate.json")


if __name__ == "__main__":
    main()
