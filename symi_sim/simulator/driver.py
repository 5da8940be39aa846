"""`symi simulate`: replay a trace through every policy on the simpy model; per-iteration and summary tables.

Legend: S steps, L MoE layers, E logical experts, R physical slots, G GPUs, K backward segments.

For each policy, `replay.iter_plans` gives the placement of every step (planned from the steps before it).
The steps are then processed in chunks: phases.chunk_work costs every phase of a chunk's steps at once,
vectorised (the modelling choices are listed there); the per-step phase durations then go to engine.Engine,
which runs the iteration timeline (overlap, contention) in simpy.

Modelling choices made here (the per-phase ones are in phases.py, the formulas in costs.py and engine.py):
  - Optimizer layout by policy (Policy.optimizer_layout, costs.py): FlexMoE "replica", static and fastermoe
    (DeepSpeed-based) "group", every other policy runs on SYMI's system: "sharded".
  What to simulate is a SimulationConfig (sim_config.py: validated and resolved once; config.json is its to_dict()).
  - `calibration` (calibration.py): the measured compute, all-to-all and optimizer terms; without one, the FLOP
    model (peak FLOP/s x compute_efficiency), whose absolute times are not measured; config.json says which.
  - `optimizer_location` (default: the calibration's, "host" for the FLOP model): where every layout keeps the
    experts' optimizer state, one choice for all of them. "host" is the paper's setting: SYMI's shards live in
    host memory, and the paper's cost analysis charges DeepSpeed the same PCIe term, so charging FlexMoE's
    replicas too (X per replica held, each way) is what compares the three systems on equal terms; "gpu": no
    layout pays PCIe.
  - `expert_state_accounting` (default "pairs"): SYMI's gradient collection and weight send-out sent once per
    distinct (expert, GPU) pair, as an implementation does, or "paper": per slot, the paper's formula
    ((s N - s)/N X over the network + E/N X over PCIe per rank).
  - Policies get the simulated run's facts they take as options (sim_config.resolve_policy): the model's d_model,
    expert d_ff and byte sizes per weight / activation / optimizer value, the capacity mode and factor, so that
    a policy's cost estimates use the sizes the simulator charges.
  - All-to-all sources are spread uniformly over the GPUs; per-source-rank counts in a trace are not used yet.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from symi_sim.failures.model import add_failure_columns
from symi_sim.figures.registry import save_figure
from symi_sim.outputs import atomic_dir, write_json
from symi_sim.policies import Policy
from symi_sim.simulator.convergence import ConvergenceModel, paper_model
from symi_sim.simulator.engine import PHASES, Engine, IterationWork
from symi_sim.simulator.phases import BYTE_KINDS, chunk_work
from symi_sim.simulator.replay import iter_plans
from symi_sim.simulator.sim_config import SimulationConfig, resolve_policy

__all__ = ["SimulationConfig", "SimulationResult", "resolve_policy", "simulate", "summarize", "write_run"]

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2_000_000         # steps x layers x slots routed at once (bounds memory on big clusters)


@dataclass(frozen=True)
class SimulationResult:
    iterations: pd.DataFrame   # one row per (policy, step)
    summary: pd.DataFrame      # one row per policy
    config: dict[str, Any]     # everything resolved (what config.json holds)


def simulate(config: SimulationConfig | None = None, *, progress: bool = True, **fields: Any) -> SimulationResult:
    """Simulate `config` (or a SimulationConfig of `fields`: trace, cluster, model, policies, ...; see sim_config.py).

    Steps 1..config.steps of the trace are simulated (step 0 only seeds the first plan). The result's config is
    config.to_dict(): what config.json holds.
    """
    if config is None:
        config = SimulationConfig(**fields)
    elif fields:
        raise ValueError(f"give a SimulationConfig or its fields, not both (got {sorted(fields)})")
    trace, cluster, model = config.trace, config.cluster, config.model
    counts_SLE = trace.counts_SLE[np.arange(config.steps + 1) % trace.num_steps]
    if trace.src_counts_SLEG is not None:
        logger.warning("the trace's per-source-rank counts are not used: all-to-all sources are taken as uniform")
    resolved = config.resolved_policies()

    from tqdm import tqdm

    bar = tqdm(total=config.steps * len(resolved), desc="simulate", unit="step",
               disable=not progress or not sys.stderr.isatty())
    frames = []
    try:
        for label, policy in resolved:
            logger.info("simulating %s over %d steps", label, config.steps)
            frames.append(_simulate_policy(label, policy, counts_SLE, config, bar))
    finally:
        bar.close()
    iterations = pd.concat(frames, ignore_index=True)
    summary = summarize(iterations, config.convergence)
    if config.failures is not None:
        summary = add_failure_columns(summary, model=model, cluster=cluster, counts_SLE=counts_SLE[1:],
                                      failures=config.failures)
    return SimulationResult(iterations, summary, config.to_dict())


def _simulate_policy(label: str, policy: Policy, counts_SLE: np.ndarray, config: SimulationConfig,
                     bar: Any) -> pd.DataFrame:
    cluster = config.cluster
    plans = list(iter_plans(counts_SLE, policy, cluster, window=config.window, start=1))
    chunk = max(1, CHUNK_ELEMENTS // (config.trace.num_layers * cluster.num_slots))
    columns: list[dict[str, np.ndarray]] = []
    works: list[IterationWork] = []
    for lo in range(0, len(plans), chunk):
        hi = min(lo + chunk, len(plans))
        next_placement = plans[hi].placement if hi < len(plans) else plans[-1].placement
        work, cols = chunk_work(plans[lo:hi], next_placement, counts_SLE=counts_SLE, trace=config.trace,
                                cluster=cluster, model=config.model, calibration=config.calibration,
                                needs_popularity=policy.needs_popularity, optimizer_coupled=policy.optimizer_coupled,
                                layout=policy.optimizer_layout, capacity_factor=config.capacity_factor,
                                capacity_mode=config.capacity_mode,
                                expert_state_accounting=config.expert_state_accounting)
        works.append(work)
        columns.append(cols)
        bar.update(hi - lo)
    work = IterationWork(**{f.name: np.concatenate([getattr(w, f.name) for w in works])
                            for f in dataclasses.fields(IterationWork)})
    timeline = Engine().run_iterations(work)
    frame = pd.DataFrame({"policy": label, "step": [p.step for p in plans], **timeline})
    for name in columns[0]:
        frame[name] = np.concatenate([c[name] for c in columns])
    return frame


def summarize(iterations: pd.DataFrame, convergence: ConvergenceModel | None = None) -> pd.DataFrame:
    """One row per policy: means per iteration, survival, and time to target through `convergence`
    (default: convergence.paper_model())."""
    convergence = convergence or paper_model()
    rows = []
    for name, group in iterations.groupby("policy", sort=False):
        dropped_fraction = float(group["dropped_tokens"].sum() / max(group["assignments"].sum(), 1))
        survival = 1.0 - dropped_fraction
        mean_time_s = float(group["time_s"].mean())
        row: dict[str, Any] = {
            "policy": name,
            "steps": len(group),
            "mean_time_s": mean_time_s,
            "p99_time_s": float(np.percentile(group["time_s"], 99)),
            "dropped_fraction": dropped_fraction,
            "survival": survival,
            "imbalance": float(group["imbalance"].mean()),
        }
        row.update({f"phase_{phase}_s": float(group[f"phase_{phase}_s"].mean()) for phase in PHASES})
        row.update({f"bytes_{kind}": float(group[f"bytes_{kind}"].mean()) for kind in BYTE_KINDS})
        row["replica_moves"] = float(group["replica_moves"].mean())
        iterations_to_target = float(convergence.iterations_to_target(survival)) if survival > 0 else float("inf")
        row["iterations_to_target"] = iterations_to_target
        row["time_to_target_s"] = iterations_to_target * mean_time_s
        rows.append(row)
    summary = pd.DataFrame(rows)
    if "static" in set(summary["policy"]):
        static_s = float(summary.loc[summary["policy"] == "static", "time_to_target_s"].iloc[0])
        summary["speedup_vs_static"] = static_s / summary["time_to_target_s"]
    else:
        summary["speedup_vs_static"] = np.nan
    return summary


def write_run(result: SimulationResult, out_dir: str | Path, *, replace: bool = False) -> Path:
    """iterations.parquet, summary.csv, config.json and comparison.png, all at once into `out_dir` (`replace`: an
    existing directory there is replaced, see outputs.atomic_dir)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replace=replace) as tmp:
        result.iterations.to_parquet(tmp / "iterations.parquet", index=False)
        result.summary.to_csv(tmp / "summary.csv", index=False)
        write_json(tmp / "config.json", result.config)
        save_figure("comparison", result.summary, tmp / "comparison.png")
    return out_dir
