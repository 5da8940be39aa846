"""`symi simulate`: replay a trace through every policy on the simpy model; per-iteration and summary tables.

Legend: S steps, L MoE layers, E logical experts, R physical slots, G GPUs, K backward segments.

For each policy, `replay.iter_plans` gives the placement of every step (planned from the steps before it).
The steps are then processed in chunks: phases.chunk_work costs every phase of a chunk's steps at once,
vectorised (the modelling choices are listed there); the per-step phase durations then go to engine.Engine,
which runs the iteration timeline (overlap, contention) in simpy.

Modelling choices made here (the per-phase ones are in phases.py, the formulas in costs.py and engine.py):
  - Optimizer layout by policy (Policy.optimizer_layout, costs.py): FlexMoE "replica", static and fastermoe
    (DeepSpeed-based) "group", every other policy runs on SYMI's system: "sharded".
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
  - Policies get the simulated run's facts they take as options (`resolve_policy`): the model's d_model,
    expert d_ff and byte sizes per weight / activation / optimizer value, the capacity mode and factor, so that
    a policy's cost estimates use the sizes the simulator charges.
  - All-to-all sources are spread uniformly over the GPUs; per-source-rank counts in a trace are not used yet.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from symi_sim.checks import check_choice, check_number, check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.failures.model import FailureModel, add_failure_columns
from symi_sim.figures.registry import save_figure
from symi_sim.models import ModelConfig
from symi_sim.outputs import atomic_dir, write_json
from symi_sim.policies import Policy, get_policy, with_context
from symi_sim.routing import CAPACITY_MODES
from symi_sim.simulator.calibration import Calibration, flop_calibration
from symi_sim.simulator.convergence import ConvergenceModel, paper_model
from symi_sim.simulator.costs import EXPERT_STATE_ACCOUNTINGS, OPTIMIZER_LOCATIONS
from symi_sim.simulator.engine import PHASES, Engine, IterationWork
from symi_sim.simulator.phases import BYTE_KINDS, chunk_work
from symi_sim.simulator.replay import iter_plans
from symi_sim.traces.format import LoadTrace

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2_000_000         # steps x layers x slots routed at once (bounds memory on big clusters)


@dataclass(frozen=True)
class SimulationResult:
    iterations: pd.DataFrame   # one row per (policy, step)
    summary: pd.DataFrame      # one row per policy
    config: dict[str, Any]     # everything resolved (what config.json holds)


def resolve_policy(spec: str | Policy, model: ModelConfig, capacity_mode: str = "slot",
                   capacity_factor: float = 1.0) -> tuple[str, Policy]:
    """(label, policy): a name (with an optional period suffix) or a Policy instance, given the context it may take
    as options: the simulated model's d_model / d_ff (d_ff = one routed expert's width), its bytes per weight,
    activation and optimizer value, and the capacity mode and factor."""
    if isinstance(spec, Policy):
        policy, label = spec, spec.name
    elif isinstance(spec, str):
        policy, label = get_policy(spec), spec
    else:
        raise ValueError(f"a policy must be a name or a Policy, got {spec!r}")
    return label, with_context(policy, d_model=model.d_model, d_ff=model.expert_d_ff,
                               weight_bytes=model.weight_bytes, activation_bytes=model.activation_bytes,
                               optimizer_bytes=model.optimizer_bytes, capacity_mode=capacity_mode,
                               capacity_factor=capacity_factor)


def simulate(*, trace: LoadTrace, cluster: Cluster, model: ModelConfig, policies: Sequence[str | Policy],
             capacity_factor: float = 1.0, capacity_mode: str = "slot", steps: int | None = None, loop: bool = False,
             window: int = 1, progress: bool = True, convergence: ConvergenceModel | None = None,
             failures: FailureModel | None = None, calibration: Calibration | None = None,
             optimizer_location: str | None = None, expert_state_accounting: str = "pairs") -> SimulationResult:
    """Simulate `policies` over `trace` (already fitted to `model`, see traces.fit.fit_trace).

    `calibration` (default: calibration.flop_calibration of the cluster and model), `optimizer_location`
    ("host" | "gpu"; None: the calibration's) and `expert_state_accounting` ("pairs" | "paper"): see the module
    docstring.
    `convergence` maps token survival to iterations to the target loss (default: convergence.paper_model()).
    Steps 1..steps of the trace are simulated (step 0 only seeds the first plan); `steps` None = all the trace
    has; loop=True cycles a shorter trace up to `steps`. `failures`: add the expected cost of rank failures under
    a checkpoint policy to the summary (failures.FAILURE_COLUMNS).
    """
    _check_inputs(trace, cluster, model, policies, capacity_factor, capacity_mode, window)
    calibration = _resolve_calibration(calibration, cluster, model, optimizer_location)
    check_choice(expert_state_accounting, "expert-state accounting", EXPERT_STATE_ACCOUNTINGS)
    if failures is not None and not isinstance(failures, FailureModel):
        raise ValueError(f"failures must be a failures.FailureModel, got {failures!r}")
    counts_SLE = _step_counts(trace, steps, loop)
    if trace.src_counts_SLEG is not None:
        logger.warning("the trace's per-source-rank counts are not used: all-to-all sources are taken as uniform")
    num_steps = counts_SLE.shape[0] - 1
    resolved = [resolve_policy(spec, model, capacity_mode, capacity_factor) for spec in policies]
    labels = [label for label, _ in resolved]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policies are listed more than once: {labels}")

    from tqdm import tqdm

    bar = tqdm(total=num_steps * len(resolved), desc="simulate", unit="step",
               disable=not progress or not sys.stderr.isatty())
    frames = []
    try:
        for label, policy in resolved:
            logger.info("simulating %s over %d steps", label, num_steps)
            frame = _simulate_policy(label, policy, counts_SLE, trace, cluster, model, capacity_factor,
                                     capacity_mode, window, bar, calibration=calibration,
                                     expert_state_accounting=expert_state_accounting)
            frames.append(frame)
    finally:
        bar.close()
    iterations = pd.concat(frames, ignore_index=True)
    convergence = convergence or paper_model()
    summary = summarize(iterations, convergence)
    if failures is not None:
        summary = add_failure_columns(summary, model=model, cluster=cluster, counts_SLE=counts_SLE[1:],
                                      failures=failures)
    config = {
        "trace": {"num_steps": trace.num_steps, "num_layers": trace.num_layers, "num_experts": trace.num_experts,
                  "top_k": int(trace.top_k), "tokens_per_step": trace.tokens_per_step, "model": trace.model,
                  "source": trace.source, "provenance": trace.provenance},
        "cluster": cluster.to_dict(),
        "model": model.to_dict(),
        "policies": [{"label": label, "optimizer_layout": policy.optimizer_layout, **policy.config()}
                     for label, policy in resolved],
        "capacity_factor": capacity_factor,
        "capacity_mode": capacity_mode,
        "calibration": {"source": calibration.source, **calibration.to_dict()},
        "optimizer_location": calibration.optimizer_state_location,
        "expert_state_accounting": expert_state_accounting,
        "steps": num_steps,
        "loop": loop,
        "window": window,
        "convergence": convergence.describe(),
    }
    if failures is not None:
        config["failures"] = failures.describe(cluster)
    return SimulationResult(iterations, summary, config)


def _resolve_calibration(calibration: Calibration | None, cluster: Cluster, model: ModelConfig,
                         optimizer_location: str | None) -> Calibration:
    """The calibration to simulate with: the FLOP model's when none is given; an explicit optimizer location
    overrides the calibration's (one location for every policy either way)."""
    if calibration is None:
        calibration = flop_calibration(cluster=cluster, model=model)
    elif not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must be a calibration.Calibration, got {calibration!r}")
    elif (calibration.cluster, calibration.model) != (cluster.name, model.name):
        logger.warning("calibration %s was measured on cluster %r, model %r; simulating cluster %r, model %r",
                       calibration.source, calibration.cluster, calibration.model, cluster.name, model.name)
    if optimizer_location is not None:
        check_choice(optimizer_location, "optimizer location", OPTIMIZER_LOCATIONS)
        calibration = calibration.with_(optimizer_state_location=optimizer_location)
    return calibration


def _check_inputs(trace: LoadTrace, cluster: Cluster, model: ModelConfig, policies: Sequence[str | Policy],
                  capacity_factor: float, capacity_mode: str, window: int) -> None:
    check_choice(capacity_mode, "capacity mode", CAPACITY_MODES)
    check_number(capacity_factor, "capacity factor", low=0, low_open=True)
    check_positive_int(window, "window")
    if not policies:
        raise ValueError("no policy to simulate")
    cluster.check_experts(trace.num_experts)
    if (model.num_experts, model.num_moe_layers, model.top_k) != (trace.num_experts, trace.num_layers, trace.top_k):
        raise ValueError(
            f"model {model.name!r} ({model.num_experts} experts, {model.num_moe_layers} MoE layers, top-{model.top_k})"
            f" does not match the trace ({trace.num_experts} experts, {trace.num_layers} layers, top-{trace.top_k}); "
            "fit them with models.fit_trace"
        )
    if trace.tokens_per_step != model.tokens_per_step:
        raise ValueError(
            f"trace has {trace.tokens_per_step} tokens per step, model {model.name!r} {model.tokens_per_step}; "
            "rescale with models.fit_trace"
        )


def _step_counts(trace: LoadTrace, steps: int | None, loop: bool) -> np.ndarray:
    """[steps + 1, L, E] the counts to replay (row 0 seeds the first plan)."""
    available = trace.num_steps - 1
    if steps is None:
        steps = available
    check_positive_int(steps, "steps")
    if steps > available and not loop:
        raise ValueError(f"the trace has {trace.num_steps} steps ({available} to simulate), {steps} asked; "
                         "pass --loop to cycle it")
    if trace.num_steps < 2:
        raise ValueError("the trace needs at least 2 steps (the first one only seeds the first plan)")
    return trace.counts_SLE[np.arange(steps + 1) % trace.num_steps]


def _simulate_policy(label: str, policy: Policy, counts_SLE: np.ndarray, trace: LoadTrace, cluster: Cluster,
                     model: ModelConfig, capacity_factor: float, capacity_mode: str, window: int,
                     bar: Any, *, calibration: Calibration, expert_state_accounting: str) -> pd.DataFrame:
    plans = list(iter_plans(counts_SLE, policy, cluster, window=window, start=1))
    num_layers = trace.num_layers
    chunk = max(1, CHUNK_ELEMENTS // (num_layers * cluster.num_slots))
    layout = policy.optimizer_layout
    columns: list[dict[str, np.ndarray]] = []
    works: list[IterationWork] = []
    for lo in range(0, len(plans), chunk):
        hi = min(lo + chunk, len(plans))
        next_placement = plans[hi].placement if hi < len(plans) else plans[-1].placement
        work, cols = chunk_work(plans[lo:hi], next_placement, counts_SLE=counts_SLE, trace=trace, cluster=cluster,
                                model=model, calibration=calibration, needs_popularity=policy.needs_popularity,
                                optimizer_coupled=policy.optimizer_coupled, layout=layout,
                                capacity_factor=capacity_factor, capacity_mode=capacity_mode,
                                expert_state_accounting=expert_state_accounting)
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


def write_run(result: SimulationResult, out_dir: str | Path) -> Path:
    """iterations.parquet, summary.csv, config.json and comparison.png, all at once into `out_dir`."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        result.iterations.to_parquet(tmp / "iterations.parquet", index=False)
        result.summary.to_csv(tmp / "summary.csv", index=False)
        write_json(tmp / "config.json", result.config)
        save_figure("comparison", result.summary, tmp / "comparison.png")
    return out_dir
