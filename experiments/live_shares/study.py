"""Live token shares against planned ones: GPU imbalance and drops on every shipped trace, the simulated time to
target, and the executor's step time and drops on a skewed training run.

    .venv/bin/python -m experiments.live_shares [--quick] [--max-steps N] [--train-steps N] [--train-repeats N]
        [--no-train] [--out DIR]

1. Replay (symi_sim.simulator.replay.replay: each policy plans on step s - 1, the oracle on step s, and step s's
   loads are routed): every shipped trace on paper-a100-16 (16 GPUs x 4 slots), mixtral-domains also on the
   README's 2 nodes x 4 GPUs x 2 slots; settings "slot" and "gpu" (capacity factor 1.0 in that capacity mode) and
   "dropless" (gpu mode, no capacity); the SYMI policies plan in the capacity mode they are scored in. Policies:
   symi, symi-balanced, symi-balanced:shares=live, the same with repeats=spread (gpu mode: a GPU's repeated slots
   of one expert go to new holdings), eplb, oracle; and "oracle (even shares)", the oracle planned for slot buffers
   (even shares over its replicas) and scored in the setting, the reference the planner table and issue 14 quote
   for gpu-mode drops. Columns: imbalance (max / mean tokens sent per GPU, mean over steps and layers), dropped
   fraction, and for the live rows the share of the gap between symi-balanced and the oracle they close.
2. Simulated time to target (symi_sim.simulator.driver.simulate): synthetic-drift fitted to gpt-small on
   paper-a100-16 with the paper-a100-16-gpt-small calibration, capacity factor 1.0 in slot and gpu modes, static
   and the six policies above.
3. Executor (`symi train`, 4 gloo ranks on CPU): the `tiny` model with 16 experts, 8 slots per rank, top-1,
   aux-loss coefficient 1e-5 (skewed routing), capacity factor 1.0 in gpu mode, symi-balanced planned,
   shares=live and shares=live:repeats=spread (whose split is given every rank's counts, and keeps tokens on their
   rank where the optimum allows) on the same seed and data, --train-repeats runs each
   (alternating); median step time after 5 warm-up steps (median over the runs), dropped fraction, imbalance, and
   the bytes per step of every kind (the counts' exchange and the dense all-reduce are equal: live shares add no
   collective; spread repeats add expert-state traffic).
Writes replay.csv, simulate.csv, train.csv, summary.json and live_shares.png (imbalance and drops per trace).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.harness import (
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
from symi_sim.cluster import Cluster, load_cluster
from symi_sim.models import load_model
from symi_sim.simulator.calibration import load_calibration
from symi_sim.simulator.driver import SimulationConfig, simulate
from symi_sim.simulator.replay import replay
from symi_sim.traces.fit import fit_trace
from symi_sim.traces.format import read_trace

STUDY = "live_shares"
LIVE = "symi-balanced:shares=live"
SPREAD = f"{LIVE}:repeats=spread"
POLICIES = ("symi", "symi-balanced", LIVE, SPREAD, "eplb", "oracle")
EVEN_ORACLE = "oracle (even shares)"
SETTINGS = {"slot": (1.0, "slot"), "gpu": (1.0, "gpu"), "dropless": (None, "gpu")}
TRACES = ("olmoe-domains", "mixtral-domains", "synthetic-drift", "recorded-tiny-e16-top1", "recorded-tiny-e16-top2")
QUICK_TRACES = ("mixtral-domains", "recorded-tiny-e16-top1")
SMALL_MIXTRAL = Cluster(name="2x4x2", num_nodes=2, gpus_per_node=4, slots_per_gpu=2)
TRAIN = {"nproc": 4, "experts": 16, "slots": 8, "aux_loss_coef": 1e-5, "warmup": 5}
QUICK_TRAIN = {"nproc": 2, "experts": 4, "slots": 4, "aux_loss_coef": 1e-5, "warmup": 2}
REPLAY_COLUMNS = ("trace", "cluster", "setting", "policy", "imbalance", "dropped_fraction", "gap_closed")


def replay_rows(traces: tuple[str, ...], max_steps: int | None) -> pd.DataFrame:
    rows = []
    for name in traces:
        trace = read_trace(TRACES_DIR / f"{name}.parquet")
        if max_steps is not None and trace.num_steps > max_steps + 1:
            src = None if trace.src_counts_SLEG is None else trace.src_counts_SLEG[:max_steps + 1]
            trace = dataclasses.replace(trace, counts_SLE=trace.counts_SLE[:max_steps + 1], src_counts_SLEG=src)
        clusters = [load_cluster("paper-a100-16")] + ([SMALL_MIXTRAL] if name == "mixtral-domains" else [])
        for cluster in clusters:
            shape = f"{cluster.num_nodes}x{cluster.gpus_per_node}x{cluster.slots_per_gpu}"
            for setting, (factor, mode) in SETTINGS.items():
                _, summary = replay(trace, cluster, list(POLICIES), capacity_factor=factor, capacity_mode=mode)
                _, even = replay(trace, cluster, ["oracle"], capacity_factor=factor, capacity_mode=mode,
                                 plan_capacity_mode="slot")
                by = pd.concat([summary, even.assign(policy=EVEN_ORACLE)]).set_index("policy")
                setting_rows = {policy: {"trace": name, "cluster": shape, "setting": setting, "policy": policy,
                                         "imbalance": float(by.loc[policy, "imbalance"]),
                                         "dropped_fraction": float(by.loc[policy, "dropped_fraction"])}
                                for policy in (*POLICIES, EVEN_ORACLE)}
                base, oracle = (setting_rows[p]["imbalance"] for p in ("symi-balanced", "oracle"))
                gap = base - oracle
                for live in (LIVE, SPREAD):
                    setting_rows[live]["gap_closed"] = (
                        (base - setting_rows[live]["imbalance"]) / gap if gap > 1e-9 else None)
                rows.extend(setting_rows.values())
            say(f"replayed {name} on {shape}")
    return pd.DataFrame(rows, columns=list(REPLAY_COLUMNS))


def simulate_rows(steps: int) -> pd.DataFrame:
    model, trace = fit_trace(load_model("gpt-small"), read_trace(TRACES_DIR / "synthetic-drift.parquet"))
    frames = []
    for mode in ("slot", "gpu"):
        config = SimulationConfig(trace=trace, cluster=load_cluster("paper-a100-16"), model=model,
                                  policies=("static", *POLICIES), capacity_factor=1.0, capacity_mode=mode,
                                  steps=min(steps, trace.num_steps - 1),
                                  calibration=load_calibration("paper-a100-16-gpt-small"))
        summary = simulate(config, progress=False).summary
        frames.append(summary.assign(capacity_mode=mode)[["capacity_mode", "policy", "mean_time_s", "imbalance",
                                                          "dropped_fraction", "time_to_target_s",
                                                          "speedup_vs_static"]])
        say(f"simulated synthetic-drift, {mode} mode")
    return pd.concat(frames, ignore_index=True)


def train_rows(steps: int, repeats: int, quick: bool, root: Path) -> pd.DataFrame:
    """The three policies `repeats` times, alternating (a drift in the machine's load hits both); per policy the median
    over repeats of each run's median step time, the other columns from the first run (the runs are identical but
    for timing: same seed, data and routing)."""
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch  # torch: imported only where training happens

    spec = QUICK_TRAIN if quick else TRAIN
    policies = tuple(f"{policy}:capacity_mode=gpu" for policy in ("symi-balanced", LIVE, SPREAD))
    runs: dict[str, list[dict[str, Any]]] = {policy: [] for policy in policies}
    for repeat in range(repeats):
        for policy in policies:
            out = root / f"{policy.replace(':', '_').replace('=', '-')}-{repeat}"
            config = TrainConfig(out=str(out), model="tiny", num_experts=spec["experts"],
                                 slots_per_rank=spec["slots"], top_k=1, policy=policy, capacity_factor=1.0,
                                 capacity_mode="gpu", steps=steps, batch_size=4, aux_loss_coef=spec["aux_loss_coef"],
                                 seed=0, log_interval=10**6)
            start = time.perf_counter()
            launch(config, spec["nproc"], log_level=logging.WARNING)
            wall_s = time.perf_counter() - start
            with open(out / "metrics.csv") as f:
                metrics = [{k: float(v or "nan") for k, v in row.items()} for row in csv.DictReader(f)]
            timed = metrics[spec["warmup"]:] or metrics
            row: dict[str, Any] = {
                "policy": policy, "ranks": spec["nproc"], "experts": spec["experts"], "steps": steps,
                "step_ms_median": round(1e3 * statistics.median(m["step_s"] for m in timed), 2),
                "dropped_fraction": round(statistics.fmean(m["dropped_fraction"] for m in metrics), 5),
                "imbalance": round(statistics.fmean(m["imbalance"] for m in metrics), 3),
                "final_loss": round(metrics[-1]["loss"], 4), "wall_s": round(wall_s, 1)}
            row.update({k: round(statistics.fmean(m[k] for m in metrics), 1) for k in metrics[0]
                        if k.startswith("bytes_")})
            runs[policy].append(row)
            say(f"trained {policy} ({repeat + 1}/{repeats}): {row['step_ms_median']} ms/step, dropped "
                f"{100 * row['dropped_fraction']:.2f}%")
    rows = []
    for done in runs.values():
        rows.append({**done[0], "step_ms_median": round(statistics.median(r["step_ms_median"] for r in done), 2),
                     "step_ms_runs": " ".join(str(r["step_ms_median"]) for r in done), "repeats": repeats})
    return pd.DataFrame(rows)


def figure(table: pd.DataFrame) -> Figure:
    """Imbalance (top) and dropped fraction in gpu mode (bottom) per trace and cluster, one bar per policy."""
    gpu = table[table["setting"] == "gpu"]
    cases = list(dict.fromkeys(zip(gpu["trace"], gpu["cluster"], strict=True)))
    fig = Figure(figsize=(max(6.0, 1.6 * len(cases)), 6.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(POLICIES)
    x = np.arange(len(cases))
    for i, policy in enumerate(POLICIES):
        rows = gpu[gpu["policy"] == policy].set_index(["trace", "cluster"]).loc[cases]
        for ax, column in zip(axes, ("imbalance", "dropped_fraction"), strict=True):
            ax.bar(x + (i - (len(POLICIES) - 1) / 2) * width, rows[column], width, label=policy,
                   color=policy_colour(policy))
    axes[0].set_ylabel("GPU imbalance (max / mean)")
    axes[0].set_ylim(bottom=1.0)
    axes[1].set_ylabel("dropped fraction, gpu mode, cf 1.0")
    axes[1].set_xticks(x, [f"{t}\n{c}" for t, c in cases], fontsize=7)
    axes[0].legend(fontsize=7, ncols=len(POLICIES))
    axes[0].set_title("next-step replay, gpu capacity mode at capacity factor 1.0")
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = study_parser(STUDY, __doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 traces, 20 steps, a short 2-rank training")
    parser.add_argument("--max-steps", type=int, default=None, help="replay and simulate at most N steps per trace")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 60; --quick 8)")
    parser.add_argument("--train-repeats", type=int, default=None, help="runs of each policy (default 3; --quick 1)")
    parser.add_argument("--no-train", action="store_true", help="skip the executor runs")
    add_out_option(parser, STUDY)
    args = parser.parse_args(argv)
    max_steps = args.max_steps if args.max_steps is not None else (20 if args.quick else None)
    train_steps = args.train_steps if args.train_steps is not None else (8 if args.quick else 60)
    train_repeats = args.train_repeats if args.train_repeats is not None else (1 if args.quick else 3)
    if (max_steps is not None and max_steps < 1) or train_steps < 1 or train_repeats < 1:
        parser.error("--max-steps, --train-steps and --train-repeats must be positive")
    out = run_path(STUDY, args.out)
    resolved = {"quick": args.quick, "max_steps": max_steps, "train_steps": train_steps,
                "train_repeats": train_repeats, "train": not args.no_train,
                "out": out}
    t0 = time.perf_counter()
    with run_dir(out, study=STUDY, args=resolved, argv=argv) as tmp:
        table = replay_rows(QUICK_TRACES if args.quick else TRACES, max_steps)
        write_table(tmp / "replay.csv", table)
        simulated = simulate_rows(max_steps if max_steps is not None else 1000)
        write_table(tmp / "simulate.csv", simulated)
        trained = pd.DataFrame()
        if not args.no_train:
            trained = train_rows(train_steps, train_repeats, args.quick, tmp / "train")
            write_table(tmp / "train.csv", trained)
        write_png(figure(table), tmp / "live_shares.png")
        live = table[table["policy"].isin([LIVE, SPREAD])]
        summary = {"study": STUDY, "quick": args.quick, "policies": list(POLICIES),
                   "gap_closed_min": float(live["gap_closed"].dropna().min()) if live["gap_closed"].notna().any()
                   else None,
                   "never_worse": bool(_never_worse(table)), "gpu_drops": _gpu_drops(table),
                   "wall_s": round(time.perf_counter() - t0, 1)}
        write_json(tmp / "summary.json", summary)
    say_table(table, REPLAY_COLUMNS[:-1], ".4f")
    say_table(simulated, list(simulated.columns), ".4f")
    if not trained.empty:
        say_table(trained, ["policy", "step_ms_median", "step_ms_runs", "dropped_fraction", "imbalance", "final_loss"],
                  ".4f")
    say(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


def _gpu_drops(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Dropped fraction in gpu mode at factor 1.0 of the live rows and both oracles, per "trace cluster"."""
    gpu = table[(table["setting"] == "gpu") & table["policy"].isin([LIVE, SPREAD, "oracle", EVEN_ORACLE])]
    return {f"{trace} {cluster}": dict(zip(group["policy"], group["dropped_fraction"].astype(float), strict=True))
            for (trace, cluster), group in gpu.groupby(["trace", "cluster"], sort=False)}


def _never_worse(table: pd.DataFrame) -> bool:
    """Live shares' imbalance and drops at most symi-balanced's in every row, and with repeats spread at most live
    shares' own (a hair of float tolerance)."""
    keyed = table.set_index(["trace", "cluster", "setting", "policy"])
    for (trace, cluster, setting), _ in table.groupby(["trace", "cluster", "setting"]):
        row = {p: keyed.loc[(trace, cluster, setting, p)] for p in ("symi-balanced", LIVE, SPREAD)}
        for better, worse in ((LIVE, "symi-balanced"), (SPREAD, LIVE)):
            if (row[better]["imbalance"] > row[worse]["imbalance"] + 1e-9
                    or row[better]["dropped_fraction"] > row[worse]["dropped_fraction"] + 1e-12):
                return False
    return True
