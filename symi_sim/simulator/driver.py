"""`symi simulate`: replay a trace through every policy on the simpy model; per-iteration and summary tables.

Legend: S steps, L MoE layers, E logical experts, R physical slots, G GPUs, K backward segments.

For each policy, `replay.iter_plans` gives the placement of every step (planned from the steps before it).
The steps are then processed in chunks: the chunk's placements are stacked into one [steps x L, R] placement
so that routing and every cost formula run once, vectorised, per chunk; the per-step phase durations then go
to engine.Engine, which runs the iteration timeline (overlap, contention) in simpy.

Modelling choices (see costs.py and engine.py for the formulas):
  - capacity_mode "slot" (DeepSpeed, the paper): fixed per-slot buffers of ceil(cf x k x tokens / R) tokens,
    padded. The all-to-all moves whole buffers and the experts compute whole buffers, whatever the load:
    skew costs dropped tokens, not time. "gpu" (ours: variable-size all-to-all, grouped expert kernels): the
    all-to-all moves and the experts compute only the served tokens, and the busiest GPU gates each layer.
  - FasterMoE's shadowed experts are computed where their tokens come from (outside the slots, never dropped);
    their weights are broadcast before the forward and their gradients reduced back after the backward.
  - Dense compute: tokens / G per GPU (data parallel); all non-expert FLOPs (attention, dense and shared MLPs,
    router, LM head) are spread evenly over the MoE layers. Backward = 2 x forward.
  - Optimizer layout by policy (costs.py): FlexMoE-like optimizer-coupled policies "replica", static and
    fastermoe (DeepSpeed-based) "group", every other policy runs on SYMI's system: "sharded". A policy class
    may say otherwise with an `optimizer_layout` attribute.
  - The optimizer step is charged OPTIMIZER_FLOPS_PER_PARAM at the GPU's achieved FLOP rate for the expert
    parameters the busiest GPU updates plus all dense parameters (plain data parallel).
  - Weight send-out after step i goes to step i+1's placement (the last step's to its own).
  - All-to-all sources are spread uniformly over the GPUs; per-source-rank counts in a trace are not used yet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from symi_sim.cluster import Cluster
from symi_sim.failures.model import FailureModel, add_failure_columns
from symi_sim.models import ModelConfig
from symi_sim.outputs import atomic_dir, json_default
from symi_sim.placement import Placement
from symi_sim.policies import Policy, get_policy, with_context
from symi_sim.routing import CAPACITY_MODES, route
from symi_sim.simulator.convergence import ConvergenceModel, paper_model
from symi_sim.simulator.costs import (
    POPULARITY_BYTES_PER_EXPERT,
    allreduce_bytes,
    alltoall_bytes,
    broadcast_bytes,
    expert_state_bytes,
    migration_bytes,
    optimizer_params_per_gpu,
)
from symi_sim.simulator.engine import PHASES, Engine, IterationWork
from symi_sim.simulator.replay import PlannedStep, check_window, iter_plans
from symi_sim.traces.format import LoadTrace

logger = logging.getLogger(__name__)

OPTIMIZER_FLOPS_PER_PARAM = 12     # mixed-precision Adam: moments, bias correction, sqrt, divide, update
MAX_BACKWARD_SEGMENTS = 4          # DDP-like gradient buckets overlapping the backward pass
CHUNK_ELEMENTS = 2_000_000         # steps x layers x slots routed at once (bounds memory on big clusters)
BYTE_KINDS = ("popularity", "a2a", "dense_allreduce", "grad_collect", "weight_sendout", "migration", "shadow",
              "pcie")
_LAYOUT_BY_NAME = {"static": "group", "fastermoe": "group"}


@dataclass(frozen=True)
class SimulationResult:
    iterations: pd.DataFrame   # one row per (policy, step)
    summary: pd.DataFrame      # one row per policy
    config: dict[str, Any]     # everything resolved (what config.json holds)


def optimizer_layout(policy: Policy) -> str:
    """How `policy`'s system keeps expert optimizer state: "sharded" (SYMI), "group" (DeepSpeed), "replica"."""
    explicit = getattr(policy, "optimizer_layout", None)
    if explicit:
        return str(explicit)
    if policy.optimizer_coupled:
        return "replica"
    return _LAYOUT_BY_NAME.get(policy.name, "sharded")


def resolve_policy(spec: str | Policy, model: ModelConfig, capacity_mode: str = "slot") -> tuple[str, Policy]:
    """(label, policy): a name (with an optional period suffix) or a Policy instance, given the context it may take
    as options: the simulated model's d_model / d_ff (d_ff = one routed expert's width) and the capacity mode."""
    if isinstance(spec, Policy):
        policy, label = spec, spec.name
    elif isinstance(spec, str):
        policy, label = get_policy(spec), spec
    else:
        raise ValueError(f"a policy must be a name or a Policy, got {spec!r}")
    return label, with_context(policy, d_model=model.d_model, d_ff=model.expert_d_ff, capacity_mode=capacity_mode)


def simulate(*, trace: LoadTrace, cluster: Cluster, model: ModelConfig, policies: Sequence[str | Policy],
             capacity_factor: float = 1.0, capacity_mode: str = "slot", steps: int | None = None, loop: bool = False,
             window: int = 1, progress: bool = True, convergence: ConvergenceModel | None = None,
             failures: FailureModel | None = None) -> SimulationResult:
    """Simulate `policies` over `trace` (already fitted to `model`, see models.fit_trace).

    `convergence` maps token survival to iterations to the target loss (default: convergence.paper_model()).
    Steps 1..steps of the trace are simulated (step 0 only seeds the first plan); `steps` None = all the trace
    has; loop=True cycles a shorter trace up to `steps`. `failures`: add the expected cost of rank failures under
    a checkpoint policy to the summary (failures.FAILURE_COLUMNS).
    """
    _check_inputs(trace, cluster, model, policies, capacity_factor, capacity_mode, window)
    if failures is not None and not isinstance(failures, FailureModel):
        raise ValueError(f"failures must be a failures.FailureModel, got {failures!r}")
    counts_SLE = _step_counts(trace, steps, loop)
    if trace.src_counts_SLEG is not None:
        logger.warning("the trace's per-source-rank counts are not used: all-to-all sources are taken as uniform")
    num_steps = counts_SLE.shape[0] - 1
    resolved = [resolve_policy(spec, model, capacity_mode) for spec in policies]
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
                                     capacity_mode, window, bar)
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
        "policies": [{"label": label, "optimizer_layout": optimizer_layout(policy), **policy.config()}
                     for label, policy in resolved],
        "capacity_factor": capacity_factor,
        "capacity_mode": capacity_mode,
        "steps": num_steps,
        "loop": loop,
        "window": window,
        "convergence": convergence.describe(),
    }
    if failures is not None:
        config["failures"] = failures.describe(cluster)
    return SimulationResult(iterations, summary, config)


def _check_inputs(trace: LoadTrace, cluster: Cluster, model: ModelConfig, policies: Sequence[str | Policy],
                  capacity_factor: float, capacity_mode: str, window: int) -> None:
    if capacity_mode not in CAPACITY_MODES:
        raise ValueError(f"unknown capacity mode {capacity_mode!r}; choices: {', '.join(CAPACITY_MODES)}")
    if (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
            or not 0 < capacity_factor < float("inf")):
        raise ValueError(f"capacity factor must be a finite number > 0, got {capacity_factor!r}")
    check_window(window)
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
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > available and not loop:
        raise ValueError(f"the trace has {trace.num_steps} steps ({available} to simulate), {steps} asked; "
                         "pass --loop to cycle it")
    if trace.num_steps < 2:
        raise ValueError("the trace needs at least 2 steps (the first one only seeds the first plan)")
    return trace.counts_SLE[np.arange(steps + 1) % trace.num_steps]


def _simulate_policy(label: str, policy: Policy, counts_SLE: np.ndarray, trace: LoadTrace, cluster: Cluster,
                     model: ModelConfig, capacity_factor: float, capacity_mode: str, window: int,
                     bar: Any) -> pd.DataFrame:
    plans = list(iter_plans(counts_SLE, policy, cluster, window=window, start=1))
    num_layers = trace.num_layers
    chunk = max(1, CHUNK_ELEMENTS // (num_layers * cluster.num_slots))
    layout = optimizer_layout(policy)
    columns: list[dict[str, np.ndarray]] = []
    works: list[IterationWork] = []
    for lo in range(0, len(plans), chunk):
        hi = min(lo + chunk, len(plans))
        next_placement = plans[hi].placement if hi < len(plans) else plans[-1].placement
        work, cols = _chunk_work(plans[lo:hi], next_placement, counts_SLE, trace, cluster, model, policy, layout,
                                 capacity_factor, capacity_mode)
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


def _stack(placements: Sequence[Placement]) -> Placement:
    """One placement whose rows are the given placements' layers, step after step."""
    shadows = [p.shadow_LE for p in placements]
    shadow = None
    if any(s is not None for s in shadows):
        shadow = np.concatenate([s if s is not None else np.zeros(p.logcnt_LE.shape, dtype=bool)
                                 for s, p in zip(shadows, placements, strict=True)])
    return Placement(np.concatenate([p.phy2log_LR for p in placements]),
                     np.concatenate([p.share_LR for p in placements]), placements[0].num_experts, shadow)


def _distinct_runs(placements: Sequence[Placement]) -> tuple[list[Placement], np.ndarray]:
    """The placements that differ from the one before them, and [S] which of those serves each step."""
    distinct = [placements[0]]
    index_S = np.zeros(len(placements), dtype=np.int64)
    for i, placement in enumerate(placements[1:], start=1):
        if placement is not distinct[-1] and not np.array_equal(placement.phy2log_LR, distinct[-1].phy2log_LR):
            distinct.append(placement)
        index_S[i] = len(distinct) - 1
    return distinct, index_S


def _chunk_work(plans: Sequence[PlannedStep], next_placement: Placement, counts_SLE: np.ndarray, trace: LoadTrace,
                cluster: Cluster, model: ModelConfig, policy: Policy, layout: str, capacity_factor: float,
                capacity_mode: str) -> tuple[IterationWork, dict[str, np.ndarray]]:
    """Phase durations and table columns of a chunk of C consecutive steps (rows = C x L)."""
    num_steps, num_layers = len(plans), trace.num_layers
    num_gpus, slots_per_gpu = cluster.num_gpus, cluster.slots_per_gpu
    flops = cluster.achieved_flops
    steps = [p.step for p in plans]
    stacked = _stack([p.placement for p in plans])
    assignments_row = np.tile(trace.num_assignments_L(0), num_steps)
    load_row_E = counts_SLE[steps].reshape(num_steps * num_layers, -1)
    routing = route(load_row_E, stacked, slots_per_gpu=slots_per_gpu, capacity_factor=capacity_factor,
                    capacity_mode=capacity_mode, num_assignments_L=assignments_row)

    def per_step(row_values: np.ndarray) -> np.ndarray:
        return row_values.reshape(num_steps, num_layers).sum(axis=1)

    # all-to-all and expert compute: padded buffers (slot) or served tokens (gpu)
    if capacity_mode == "slot":
        capacity_row = np.ceil(capacity_factor * assignments_row / cluster.num_slots)
        slot_tokens_row_G = np.broadcast_to((capacity_row * slots_per_gpu)[:, None], routing.shadow_LG.shape)
    else:
        slot_tokens_row_G = routing.gpu_served_LG - routing.shadow_LG
    a2a = alltoall_bytes(slot_tokens_row_G, cluster, model.d_model * model.activation_bytes)
    a2a_row_s = a2a.time_L(cluster)
    expert_row_s = (slot_tokens_row_G + routing.shadow_LG).max(axis=1) * model.expert_flops_per_assignment / flops
    dense_layer_s = model.tokens_per_step / num_gpus * model.dense_flops_per_token / num_layers / flops

    zeros_S = np.zeros(num_steps)
    popularity_s, popularity_bytes = zeros_S, zeros_S
    if policy.needs_popularity:
        pop = allreduce_bytes(np.full(num_layers, float(trace.num_experts * POPULARITY_BYTES_PER_EXPERT)), cluster)
        popularity_s = np.full(num_steps, pop.time_L(cluster).sum())
        popularity_bytes = np.full(num_steps, pop.network_L.sum())

    shadow_s, shadow_bytes = zeros_S, zeros_S
    if stacked.shadow_LE is not None:
        shadow = broadcast_bytes(stacked.shadow_LE.sum(axis=1) * float(model.expert_weight_bytes), cluster)
        shadow_s = per_step(shadow.time_L(cluster))
        shadow_bytes = 2 * per_step(shadow.network_L)

    # expert state: collection on this step's placement, send-out to the next one's. Runs of equal placements
    # (every step of static, the steps between two rebalances) are costed once.
    distinct, index_S = _distinct_runs([p.placement for p in plans])
    distinct_phy2log = np.concatenate([p.phy2log_LR for p in distinct])

    def per_placement(row_values: np.ndarray) -> np.ndarray:
        return row_values.reshape(len(distinct), num_layers).sum(axis=1)[index_S]

    grads = expert_state_bytes(distinct_phy2log, cluster, trace.num_experts, layout, model.expert_grad_bytes)
    collect_net_s = per_placement(grads.network_time_L(cluster))
    collect_pcie_s = per_placement(grads.pcie_time_L(cluster))
    collect_bytes, collect_pcie_bytes = per_placement(grads.network_L), per_placement(grads.pcie_L)
    if layout == "replica":
        sendout_net_s = sendout_pcie_s = sendout_bytes = sendout_pcie_bytes = zeros_S
    else:
        if np.array_equal(next_placement.phy2log_LR, distinct[-1].phy2log_LR):
            tail = expert_state_bytes(distinct[-1].phy2log_LR, cluster, trace.num_experts, layout,
                                      model.expert_weight_bytes)
        else:
            tail = expert_state_bytes(next_placement.phy2log_LR, cluster, trace.num_experts, layout,
                                      model.expert_weight_bytes)
        # step i sends out to step i+1's placement: the collection rows shifted by one step (bytes scale with X)
        ratio = model.expert_weight_bytes / model.expert_grad_bytes

        def shifted(values_S: np.ndarray, tail_value: float) -> np.ndarray:
            return np.append(values_S[1:] * ratio, tail_value)

        sendout_net_s = shifted(collect_net_s, tail.network_time_L(cluster).sum())
        sendout_pcie_s = shifted(collect_pcie_s, tail.pcie_time_L(cluster).sum())
        sendout_bytes = shifted(collect_bytes, tail.network_L.sum())
        sendout_pcie_bytes = shifted(collect_pcie_bytes, tail.pcie_L.sum())

    migration_s, migration_total = zeros_S.copy(), zeros_S.copy()
    if policy.optimizer_coupled:
        replica_bytes = float(model.expert_weight_bytes + model.expert_optimizer_bytes)
        for i, planned in enumerate(plans):
            if planned.previous is not None and planned.moves_L.any():
                moved = migration_bytes(planned.placement.phy2log_LR, planned.previous.phy2log_LR, cluster,
                                        trace.num_experts, replica_bytes)
                migration_s[i] = moved.time_L(cluster).sum()
                migration_total[i] = moved.network_L.sum()

    expert_params_S = per_placement(optimizer_params_per_gpu(distinct_phy2log, cluster, trace.num_experts, layout,
                                                             model.expert_params))
    optimizer_s = (expert_params_S + model.dense_params) * OPTIMIZER_FLOPS_PER_PARAM / flops

    # backward in K segments of consecutive layers, last layers first; one dense-gradient bucket per segment
    num_segments = min(num_layers, MAX_BACKWARD_SEGMENTS)
    bounds = np.linspace(num_layers, 0, num_segments + 1).round().astype(int)
    a2a_SL = a2a_row_s.reshape(num_steps, num_layers)
    expert_SL = expert_row_s.reshape(num_steps, num_layers)
    segments = [slice(lo, hi) for hi, lo in zip(bounds[:-1], bounds[1:], strict=True)]
    dense_grad_bytes = float(model.dense_params * model.grad_bytes)
    bucket_K = np.array([(s.stop - s.start) / num_layers * dense_grad_bytes for s in segments])
    allreduce = allreduce_bytes(bucket_K, cluster)
    layers_K = np.array([s.stop - s.start for s in segments], dtype=float)

    work = IterationWork(
        popularity_s=popularity_s,
        migration_s=migration_s,
        shadow_broadcast_s=shadow_s,
        a2a_forward_s=2 * a2a_SL.sum(axis=1),
        expert_forward_s=expert_SL.sum(axis=1),
        dense_forward_s=np.full(num_steps, dense_layer_s * num_layers),
        a2a_backward_SK=np.stack([2 * a2a_SL[:, s].sum(axis=1) for s in segments], axis=1),
        expert_backward_SK=np.stack([2 * expert_SL[:, s].sum(axis=1) for s in segments], axis=1),
        dense_backward_SK=np.tile(2 * dense_layer_s * layers_K, (num_steps, 1)),
        allreduce_SK=np.tile(allreduce.time_L(cluster), (num_steps, 1)),
        shadow_reduce_s=shadow_s,
        grad_collect_net_s=collect_net_s,
        grad_collect_pcie_s=collect_pcie_s,
        optimizer_s=optimizer_s,
        sendout_pcie_s=sendout_pcie_s,
        sendout_net_s=sendout_net_s,
    )
    dropped_S = per_step(routing.dropped_LE.sum(axis=1))
    assignments_S = per_step(routing.num_assignments_L)
    cols = {
        **{f"bytes_{kind}": values for kind, values in (
            ("popularity", popularity_bytes),
            ("a2a", 4 * per_step(a2a.network_L)),
            ("dense_allreduce", np.full(num_steps, allreduce.network_L.sum())),
            ("grad_collect", collect_bytes),
            ("weight_sendout", sendout_bytes),
            ("migration", migration_total),
            ("shadow", shadow_bytes),
            ("pcie", collect_pcie_bytes + sendout_pcie_bytes),
        )},
        "imbalance": routing.imbalance_L.reshape(num_steps, num_layers).mean(axis=1),
        "dropped_tokens": dropped_S,
        "assignments": assignments_S,
        "dropped_fraction": dropped_S / np.maximum(assignments_S, 1),
        "replica_moves": np.array([int(p.moves_L.sum()) for p in plans]),
    }
    return work, cols


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
    from symi_sim.figures.plots import comparison_figure

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        result.iterations.to_parquet(tmp / "iterations.parquet", index=False)
        result.summary.to_csv(tmp / "summary.csv", index=False)
        (tmp / "config.json").write_text(json.dumps(result.config, indent=1, default=json_default) + "\n")
        comparison_figure(result.summary, tmp / "comparison.png")
    return out_dir
