"""Drive a policy over a trace, step by step, the way a training run would see it; score the placements.

Legend: S steps, L MoE layers, E logical experts, R physical slots.

At step s a policy knows the popularity of the steps before it: the mean of counts over [s - window, s)
(the oracle, `uses_current_load`, sees step s itself). It is asked for a new plan every `rebalance_every`
steps and keeps its previous placement in between. The simulator and `symi plan` both use `iter_plans`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from symi_sim.checks import check_choice, check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.figures.registry import save_figure
from symi_sim.outputs import atomic_dir, write_json
from symi_sim.placement import Placement
from symi_sim.policies import Policy, get_policy, with_context
from symi_sim.routing import CAPACITY_MODES, check_capacity_factor, route
from symi_sim.traces.format import LoadTrace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStep:
    step: int
    placement: Placement       # the placement that serves `step`
    previous: Placement | None  # the placement that served the step before (None at the first)
    replanned: bool            # plan() was called for this step
    plan_time_s: float         # wall time of that call (0.0 when not replanned)
    moves_L: np.ndarray        # [L] slots whose expert changed since the previous step


def check_replayable(num_steps: int, command: str) -> None:
    """Refuse a trace too short to replay, in the user's terms: a plan needs a step before the one it serves."""
    if num_steps < 2:
        raise ValueError(f"the trace has {num_steps} step{'s' if num_steps != 1 else ''}; {command} needs at least "
                         "2 (one to plan from, one to score)")


def known_load(counts_SLE: np.ndarray, step: int, window: int, current: bool) -> np.ndarray:
    """[L, E] the popularity a policy may use to plan step `step`."""
    if current:
        return counts_SLE[step].astype(np.float64)
    lo = max(0, step - window)
    if lo == step:
        raise ValueError(f"step {step} has no earlier step to plan from")
    return counts_SLE[lo:step].mean(axis=0)


def iter_plans(counts_SLE: np.ndarray, policy: Policy, cluster: Cluster, *, window: int = 1,
               start: int = 1, stop: int | None = None) -> Iterator[PlannedStep]:
    """Placements for steps start..stop-1 (start >= 1: the first step has no history to plan from)."""
    check_positive_int(window, "window")
    num_steps = counts_SLE.shape[0]
    check_replayable(num_steps, "a replay")
    stop = num_steps if stop is None else stop
    if not 1 <= start < stop <= num_steps:
        raise ValueError(f"cannot replay steps {start}..{stop - 1} of a {num_steps}-step trace (need >= 2 steps)")
    previous: Placement | None = None
    for step in range(start, stop):
        replan = previous is None or (step - start) % policy.rebalance_every == 0
        if replan:
            load_LE = known_load(counts_SLE, step, window, policy.uses_current_load)
            t0 = time.perf_counter()
            placement = policy.plan(load_LE, cluster, previous=previous)
            plan_time_s = time.perf_counter() - t0
        else:
            placement, plan_time_s = previous, 0.0
        moves_L = placement.replica_moves(previous) if previous is not None else np.zeros(
            placement.num_layers, dtype=np.int64)
        yield PlannedStep(step, placement, previous, replan, plan_time_s, moves_L)
        previous = placement


def plan_step(trace: LoadTrace, cluster: Cluster, policy: Policy, *, step: int, window: int = 1) -> Placement:
    """The placement `policy` gives for step `step` of `trace`, planned from the `window` steps before it."""
    check_positive_int(window, "window")
    if not policy.uses_current_load:
        check_replayable(trace.num_steps, "a plan")
    if not 0 <= step < trace.num_steps:
        raise ValueError(f"step {step} is outside the trace's steps 0..{trace.num_steps - 1}")
    load_LE = known_load(trace.counts_SLE, step, window, policy.uses_current_load)
    return policy.plan(load_LE, cluster)


def replay(trace: LoadTrace, cluster: Cluster, policies: Sequence[str], *, capacity_factor: float | None = 1.0,
           capacity_mode: str = "slot", window: int = 1,
           plan_capacity_mode: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Plan every step from the ones before it and score it on its own loads.

    The policies plan for the capacity mode they are scored in, unless plan_capacity_mode names another (e.g. plans
    made for slot buffers, with even shares, scored under per-GPU budgets).
    Returns (steps, summary): one row per (policy, step) and one row per policy with mean GPU imbalance
    (max/mean tokens per GPU, averaged over layers and steps), dropped fraction at the capacity factor,
    plan time median/p99 (ms, over the steps that replanned) and replica moves per step, beside the trace's experts
    and the cluster's slots (num_experts, num_slots: the replay figure notes when no slot is left to replicate).
    """
    cluster.check_experts(trace.num_experts)
    check_replayable(trace.num_steps, "plan --replay")
    check_capacity_factor(capacity_factor)
    plan_mode = capacity_mode if plan_capacity_mode is None else check_choice(plan_capacity_mode,
                                                                              "plan capacity mode", CAPACITY_MODES)
    resolved = [with_context(get_policy(name), capacity_mode=plan_mode, capacity_factor=capacity_factor)
                for name in policies]
    rows = []
    for name, policy in zip(policies, resolved, strict=True):
        log.info("replaying %s over %d steps", name, trace.num_steps - 1)
        for planned in iter_plans(trace.counts_SLE, policy, cluster, window=window):
            routing = route(trace.counts_SLE[planned.step], planned.placement, slots_per_gpu=cluster.slots_per_gpu,
                            capacity_factor=capacity_factor, capacity_mode=capacity_mode,
                            num_assignments_L=trace.num_assignments_L(planned.step))
            rows.append({
                "policy": name,
                "step": planned.step,
                "imbalance": float(routing.imbalance_L.mean()),
                "max_imbalance": float(routing.imbalance_L.max()),
                "dropped_tokens": int(routing.dropped_LE.sum()),
                "assignments": int(routing.num_assignments_L.sum()),
                "dropped_fraction": routing.dropped_fraction,
                "replanned": planned.replanned,
                "plan_time_s": planned.plan_time_s,
                "replica_moves": int(planned.moves_L.sum()),
            })
    steps = pd.DataFrame(rows)
    return steps, summarize_replay(steps).assign(num_experts=trace.num_experts, num_slots=cluster.num_slots)


def summarize_replay(steps: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, group in steps.groupby("policy", sort=False):
        plan_ms = group.loc[group["replanned"], "plan_time_s"].to_numpy() * 1e3
        rows.append({
            "policy": name,
            "steps": len(group),
            "imbalance": group["imbalance"].mean(),
            "max_imbalance": group["max_imbalance"].max(),
            "dropped_fraction": group["dropped_tokens"].sum() / max(group["assignments"].sum(), 1),
            "plan_ms_median": float(np.median(plan_ms)) if plan_ms.size else 0.0,
            "plan_ms_p99": float(np.percentile(plan_ms, 99)) if plan_ms.size else 0.0,
            "moves_per_step": group["replica_moves"].mean(),
        })
    return pd.DataFrame(rows)


def write_replay(out_dir: str, steps: pd.DataFrame, summary: pd.DataFrame, config: dict, *,
                 replace: bool = False) -> None:
    """Run directory of a replay: config.json, steps.csv, summary.csv, summary.json, replay.png (all or nothing);
    `replace`: an existing directory there is replaced (outputs.atomic_dir)."""
    with atomic_dir(out_dir, replace=replace) as tmp:
        write_json(tmp / "config.json", config)
        steps.to_csv(tmp / "steps.csv", index=False)
        summary.to_csv(tmp / "summary.csv", index=False)
        (tmp / "summary.json").write_text(summary.to_json(orient="records", indent=1) + "\n")
        save_figure("replay", summary, tmp / "replay.png")
