"""The work of every phase of an iteration, for a chunk of C consecutive steps at once (numpy, no simpy).

Legend: C steps of the chunk, L MoE layers, E logical experts, R physical slots, G GPUs, K backward segments,
D distinct placements of the chunk. "row" arrays have one row per (step, layer): C x L rows, step after step.

The chunk's placements are stacked into one [C x L, R] placement so that routing and every cost formula run
once per chunk; each function below turns that into one phase group's durations (seconds) and bytes per step,
and `chunk_work` assembles them into engine.IterationWork and the table columns of the steps.

Modelling choices (the formulas are in costs.py):
  - capacity_mode "slot" (DeepSpeed, the paper): fixed per-slot buffers of ceil(cf x k x tokens / R) tokens,
    padded. The all-to-all moves whole buffers and the experts compute whole buffers, whatever the load:
    skew costs dropped tokens, not time; dropless (capacity factor None) pads every buffer to the busiest slot's
    load, as DeepSpeed does without token dropping. "gpu" (ours: variable-size all-to-all, grouped expert kernels): the
    all-to-all moves and the experts compute only the served tokens, and the busiest GPU gates each layer.
  - FasterMoE's shadowed experts are computed where their tokens come from (outside the slots, never dropped,
    no all-to-all); their weights are broadcast before the forward and their gradients reduced back after the
    backward. A shadowed expert's slots are idle: in slot mode their buffers are neither sent nor computed, so
    a shadowed token is charged once (its shadow compute), not also as padding of its expert's slots.
  - Expert state (costs.expert_state_bytes) by the policy's optimizer layout, plus its local memory work
    (costs.expert_state_local_bytes) at the calibration's rate, with one `optimizer_location`
    ("host" | "gpu") for every layout and SYMI's sender `expert_state_accounting` ("pairs" | "paper").
  - Compute, the all-to-all's efficiency and latency and the optimizer step come from a Calibration
    (calibration.py: measured terms, or the FLOP model as its fallback): expert compute per GPU is the sum of
    its GEMMs (one per busy slot, plus one of shadowed tokens), the slowest GPU gating the layer; each layer
    pays the calibration's fixed forward and backward overhead with its dense compute.
  - Dense compute: tokens / G per GPU (data parallel); all non-expert FLOPs (attention, dense and shared MLPs,
    router, LM head) are spread evenly over the MoE layers. Backward = 2 x forward (plus its fixed overhead).
  - The optimizer step: the optimizer state of the expert parameters the busiest GPU updates plus all dense
    parameters (plain data parallel), at the calibration's optimizer rate (bytes/s).
  - Weight send-out after step i goes to step i+1's placement (the last step's to its own).
  - The backward runs in K = min(L, MAX_BACKWARD_SEGMENTS) segments of consecutive layers, last layers first,
    with one dense-gradient bucket all-reduced per segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.placement import Placement
from symi_sim.routing import Routing, route
from symi_sim.simulator.calibration import Calibration
from symi_sim.simulator.costs import (
    POPULARITY_BYTES_PER_EXPERT,
    LinkBytes,
    allreduce_bytes,
    alltoall_bytes,
    broadcast_bytes,
    expert_state_bytes,
    expert_state_local_bytes,
    experts_handled_per_gpu,
    migration_bytes,
    optimizer_params_per_gpu,
    optimizer_tensors_per_gpu,
)
from symi_sim.simulator.engine import IterationWork
from symi_sim.simulator.replay import PlannedStep
from symi_sim.traces.format import LoadTrace

MAX_BACKWARD_SEGMENTS = 4          # DDP-like gradient buckets overlapping the backward pass
BYTE_KINDS = ("popularity", "a2a", "dense_allreduce", "grad_collect", "weight_sendout", "migration", "shadow",
              "pcie")


def per_step(values_row: np.ndarray, num_steps: int) -> np.ndarray:
    """[C x L] -> [C]: the sum over each step's layers."""
    return values_row.reshape(num_steps, -1).sum(axis=1)


def stack_placements(placements: Sequence[Placement]) -> Placement:
    """One placement whose rows are the given placements' layers, step after step, in their one share mode (live or
    planned: routing applies one to all rows); ValueError for a mix."""
    modes = {p.live_shares for p in placements}
    if len(modes) > 1:
        first_live = next(i for i, p in enumerate(placements) if p.live_shares)
        first_planned = next(i for i, p in enumerate(placements) if not p.live_shares)
        raise ValueError(f"placements to stack mix live shares (placement {first_live}) and planned shares "
                         f"(placement {first_planned}); one policy's placements share one mode")
    shadows = [p.shadow_LE for p in placements]
    shadow = None
    if any(s is not None for s in shadows):
        shadow = np.concatenate([s if s is not None else np.zeros(p.logcnt_LE.shape, dtype=bool)
                                 for s, p in zip(shadows, placements, strict=True)])
    return Placement(np.concatenate([p.phy2log_LR for p in placements]),
                     np.concatenate([p.share_LR for p in placements]), placements[0].num_experts, shadow,
                     live_shares=placements[0].live_shares)


@dataclass(frozen=True)
class PlacementRuns:
    """The chunk's placements with runs of equal ones (every step of static, the steps between two rebalances)
    kept once, so that what depends only on the placement is costed once per run."""

    distinct: list[Placement]
    index_C: np.ndarray        # which distinct placement serves each step
    phy2log_row_R: np.ndarray  # [D x L, R] the distinct placements stacked

    @classmethod
    def of(cls, placements: Sequence[Placement]) -> PlacementRuns:
        distinct = [placements[0]]
        index_C = np.zeros(len(placements), dtype=np.int64)
        for i, placement in enumerate(placements[1:], start=1):
            if placement is not distinct[-1] and not np.array_equal(placement.phy2log_LR, distinct[-1].phy2log_LR):
                distinct.append(placement)
            index_C[i] = len(distinct) - 1
        return cls(distinct, index_C, np.concatenate([p.phy2log_LR for p in distinct]))

    def per_step(self, values_row: np.ndarray) -> np.ndarray:
        """[D x L] -> [C]: the sum over the layers of the placement serving each step."""
        return values_row.reshape(len(self.distinct), -1).sum(axis=1)[self.index_C]


def route_chunk(plans: Sequence[PlannedStep], *, counts_SLE: np.ndarray, trace: LoadTrace, cluster: Cluster,
                capacity_factor: float | None, capacity_mode: str) -> tuple[Placement, Routing]:
    """The chunk's stacked placement and its routing of the steps' loads (rows = C x L)."""
    num_steps = len(plans)
    stacked = stack_placements([p.placement for p in plans])
    assignments_row = np.tile(trace.num_assignments_L(0), num_steps)
    load_row_E = counts_SLE[[p.step for p in plans]].reshape(num_steps * trace.num_layers, -1)
    routing = route(load_row_E, stacked, slots_per_gpu=cluster.slots_per_gpu, capacity_factor=capacity_factor,
                    capacity_mode=capacity_mode, num_assignments_L=assignments_row)
    return stacked, routing


def alltoall_and_experts(routing: Routing, stacked: Placement, *, num_steps: int, cluster: Cluster,
                         model: ModelConfig, calibration: Calibration, capacity_factor: float | None,
                         capacity_mode: str, padded: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All-to-all and expert compute of the routed rows of `stacked`: (a2a_CL seconds of one all-to-all, expert_CL
    seconds of the forward expert compute, a2a_bytes_C over the four all-to-alls of a step). `padded` (default:
    slot mode) moves and computes whole slot buffers; else only the served tokens (what `symi train` does)."""
    num_rows, num_gpus, slots_per_gpu = routing.served_LR.shape[0], cluster.num_gpus, cluster.slots_per_gpu
    # the tokens of every slot's GEMM: padded buffers of the slots in use (slot) or served tokens (gpu); shadowed
    # tokens stay where they are and are computed as one more GEMM per GPU
    if capacity_mode == "slot" if padded is None else padded:
        if capacity_factor is None:
            capacity_row = routing.assigned_LR.max(axis=1).astype(np.float64)
        else:
            capacity_row = np.ceil(capacity_factor * routing.num_assignments_L / cluster.num_slots)
        busy_row_R = np.ones(routing.served_LR.shape)
        if stacked.shadow_LE is not None:
            busy_row_R -= np.take_along_axis(stacked.shadow_LE, stacked.phy2log_LR, axis=1)
        slot_tokens_row_GS = capacity_row[:, None, None] * busy_row_R.reshape(num_rows, num_gpus, slots_per_gpu)
    else:
        slot_tokens_row_GS = routing.served_LR.reshape(num_rows, num_gpus, slots_per_gpu).astype(np.float64)
    a2a = alltoall_bytes(slot_tokens_row_GS.sum(axis=2), cluster, model.d_model * model.activation_bytes)
    a2a_row_s = calibration.a2a_time_s(busiest_link_s=a2a.busiest_link_s(cluster), num_messages=a2a.messages)
    gemm_tokens_row_GS = np.concatenate([slot_tokens_row_GS, routing.shadow_LG[:, :, None]], axis=2)
    expert_row_s = calibration.expert_time_s(tokens_row_GS=gemm_tokens_row_GS,
                                             flops_per_assignment=model.expert_flops_per_assignment)
    return (a2a_row_s.reshape(num_steps, -1), expert_row_s.reshape(num_steps, -1),
            4 * per_step(a2a.network_L, num_steps))


def dense_layer_s(*, cluster: Cluster, model: ModelConfig, calibration: Calibration) -> float:
    """Forward dense compute of one MoE layer's share of the model (tokens / G per GPU), fixed overhead apart."""
    flops = model.tokens_per_step / cluster.num_gpus * model.dense_flops_per_token / model.num_moe_layers
    return float(calibration.dense_time_s(flops=flops))


def popularity(*, num_steps: int, num_experts: int, num_layers: int, cluster: Cluster, calibration: Calibration,
               needed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The popularity all-reduce of every layer's expert counts: (seconds [C], bytes [C]); zeros if not needed."""
    if not needed:
        zeros_C = np.zeros(num_steps)
        return zeros_C, zeros_C
    pop = allreduce_bytes(np.full(num_layers, float(num_experts * POPULARITY_BYTES_PER_EXPERT)), cluster)
    return np.full(num_steps, calibration.transfer_time_s(pop, cluster).sum()), np.full(num_steps, pop.network_L.sum())


def shadow_broadcast(stacked: Placement, *, num_steps: int, cluster: Cluster, model: ModelConfig,
                     calibration: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """FasterMoE's shadow-weight broadcast (and, as long, the gradient reduction back): (seconds of one [C],
    bytes of both [C]); zeros without shadows."""
    if stacked.shadow_LE is None:
        zeros_C = np.zeros(num_steps)
        return zeros_C, zeros_C
    shadow = broadcast_bytes(stacked.shadow_LE.sum(axis=1) * float(model.expert_weight_bytes), cluster)
    return per_step(calibration.transfer_time_s(shadow, cluster), num_steps), 2 * per_step(shadow.network_L, num_steps)


@dataclass(frozen=True)
class ExpertState:
    """Gradient collection to the optimizer shards and weight send-out from them: seconds and bytes per step [C]."""

    collect_net_s: np.ndarray
    collect_pcie_s: np.ndarray
    collect_bytes: np.ndarray
    collect_pcie_bytes: np.ndarray
    sendout_net_s: np.ndarray
    sendout_pcie_s: np.ndarray
    sendout_bytes: np.ndarray
    sendout_pcie_bytes: np.ndarray
    collect_local_s: np.ndarray    # the busiest GPU's local memory work (costs.expert_state_local_bytes)
    sendout_local_s: np.ndarray


def expert_state(runs: PlacementRuns, next_placement: Placement, *, cluster: Cluster, model: ModelConfig,
                 calibration: Calibration, num_experts: int, layout: str, location: str,
                 accounting: str) -> ExpertState:
    """Collection on each step's placement, send-out to the next step's (`next_placement` after the chunk); the
    replica layout's weights come back to the replicas that computed them (its moves are migrations)."""
    options = {"location": location, "accounting": accounting}
    grads = expert_state_bytes(runs.phy2log_row_R, cluster, num_experts, layout, model.expert_grad_bytes, **options)
    # each phase also pays a fixed cost per expert whose state the busiest GPU handles (the replica layout's
    # send-out handles none: its weights stay where they were updated), and its local memory work
    per_expert_s = calibration.state_fixed_per_expert_s
    fixed_C = per_expert_s * runs.per_step(experts_handled_per_gpu(runs.phy2log_row_R, cluster, num_experts, layout))
    per_byte = calibration.state_local_s_per_byte
    local = {"collect_local_s": per_byte * runs.per_step(expert_state_local_bytes(
                 runs.phy2log_row_R, cluster, model.expert_grad_bytes)),
             "sendout_local_s": per_byte * runs.per_step(expert_state_local_bytes(
                 runs.phy2log_row_R, cluster, model.expert_weight_bytes, phase="sendout"))}
    collect_net_C, *collect_rest = _state_columns(runs, grads, cluster, calibration)
    collect = (collect_net_C + fixed_C, *collect_rest)
    if layout == "replica":
        weights = expert_state_bytes(runs.phy2log_row_R, cluster, num_experts, layout, model.expert_weight_bytes,
                                     phase="sendout", **options)
        return ExpertState(*collect, *_state_columns(runs, weights, cluster, calibration), **local)
    # the send-out is the collection in reverse: the same transfers with X the weights' bytes
    weights = grads.scaled(model.expert_weight_bytes / model.expert_grad_bytes)
    tail = expert_state_bytes(next_placement.phy2log_LR, cluster, num_experts, layout, model.expert_weight_bytes,
                              phase="sendout", **options)
    tail_fixed = per_expert_s * experts_handled_per_gpu(next_placement.phy2log_LR, cluster, num_experts, layout).sum()
    tail_values = (calibration.transfer_network_s(tail, cluster).sum() + tail_fixed, tail.pcie_time_L(cluster).sum(),
                   tail.network_L.sum(), tail.pcie_L.sum())
    # step i sends out to step i+1's placement: the rows of the step after, the tail's after the chunk's last
    sendout_net_C, *sendout_rest = _state_columns(runs, weights, cluster, calibration)
    sendout = [np.append(values_C[1:], tail_value)
               for values_C, tail_value in zip((sendout_net_C + fixed_C, *sendout_rest), tail_values, strict=True)]
    return ExpertState(*collect, *sendout, **local)


def _state_columns(runs: PlacementRuns, moved: LinkBytes, cluster: Cluster,
                   calibration: Calibration) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(network seconds, PCIe seconds, network bytes, PCIe bytes) per step [C] of one expert-state phase."""
    return (runs.per_step(calibration.transfer_network_s(moved, cluster)), runs.per_step(moved.pcie_time_L(cluster)),
            runs.per_step(moved.network_L), runs.per_step(moved.pcie_L))


def migration(plans: Sequence[PlannedStep], *, cluster: Cluster, model: ModelConfig, calibration: Calibration,
              num_experts: int, coupled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Replicas moved with their optimizer state (optimizer-coupled policies): (seconds [C], bytes [C])."""
    migration_s, migration_total = np.zeros(len(plans)), np.zeros(len(plans))
    if coupled:
        replica_bytes = float(model.expert_weight_bytes + model.expert_optimizer_bytes)
        for i, planned in enumerate(plans):
            if planned.previous is not None and planned.moves_L.any():
                moved = migration_bytes(planned.placement.phy2log_LR, planned.previous.phy2log_LR, cluster,
                                        num_experts, replica_bytes)
                migration_s[i] = calibration.transfer_time_s(moved, cluster).sum()
                migration_total[i] = moved.network_L.sum()
    return migration_s, migration_total


def optimizer(runs: PlacementRuns, *, cluster: Cluster, model: ModelConfig, calibration: Calibration,
              num_experts: int, layout: str) -> np.ndarray:
    """[C] seconds of the optimizer step: the busiest GPU's expert parameters plus every dense one."""
    expert_params_C = runs.per_step(optimizer_params_per_gpu(runs.phy2log_row_R, cluster, num_experts, layout,
                                                             model.expert_params))
    tensors_C = runs.per_step(optimizer_tensors_per_gpu(runs.phy2log_row_R, cluster, num_experts, layout))
    return calibration.optimizer_time_s(state_bytes=(expert_params_C + model.dense_params) * model.optimizer_bytes,
                                        num_tensors=tensors_C)


def backward_segments(a2a_CL: np.ndarray, expert_CL: np.ndarray, *, layer_s: float, fixed_s: float,
                      cluster: Cluster, model: ModelConfig, calibration: Calibration
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """The backward in K segments of consecutive layers, last layers first, one dense-gradient bucket each:
    (a2a_CK, expert_CK, dense_CK, allreduce_CK seconds, all-reduce bytes of a step); every layer's dense backward is
    2 x its forward `layer_s` plus its fixed backward overhead `fixed_s`."""
    num_steps, num_layers = a2a_CL.shape
    num_segments = min(num_layers, MAX_BACKWARD_SEGMENTS)
    bounds = np.linspace(num_layers, 0, num_segments + 1).round().astype(int)
    segments = [slice(lo, hi) for hi, lo in zip(bounds[:-1], bounds[1:], strict=True)]
    dense_grad_bytes = float(model.dense_params * model.grad_bytes)
    bucket_K = np.array([(s.stop - s.start) / num_layers * dense_grad_bytes for s in segments])
    allreduce = allreduce_bytes(bucket_K, cluster)
    layers_K = np.array([s.stop - s.start for s in segments], dtype=float)
    return (np.stack([2 * a2a_CL[:, s].sum(axis=1) for s in segments], axis=1),
            np.stack([2 * expert_CL[:, s].sum(axis=1) for s in segments], axis=1),
            np.tile((2 * layer_s + fixed_s) * layers_K, (num_steps, 1)),
            np.tile(calibration.transfer_time_s(allreduce, cluster), (num_steps, 1)),
            allreduce.network_L.sum())


def chunk_work(plans: Sequence[PlannedStep], next_placement: Placement, *, counts_SLE: np.ndarray,
               trace: LoadTrace, cluster: Cluster, model: ModelConfig, calibration: Calibration,
               needs_popularity: bool, optimizer_coupled: bool, layout: str, capacity_factor: float | None,
               capacity_mode: str, expert_state_accounting: str = "pairs"
               ) -> tuple[IterationWork, dict[str, np.ndarray]]:
    """Phase durations and table columns of the chunk's C steps (`next_placement` serves the step after it); the
    optimizer state lives where `calibration` says (optimizer_state_location), for every layout alike."""
    num_steps, num_layers, num_experts = len(plans), trace.num_layers, trace.num_experts
    stacked, routing = route_chunk(plans, counts_SLE=counts_SLE, trace=trace, cluster=cluster,
                                   capacity_factor=capacity_factor, capacity_mode=capacity_mode)
    a2a_CL, expert_CL, a2a_bytes_C = alltoall_and_experts(
        routing, stacked, num_steps=num_steps, cluster=cluster, model=model, calibration=calibration,
        capacity_factor=capacity_factor, capacity_mode=capacity_mode)
    layer_s = dense_layer_s(cluster=cluster, model=model, calibration=calibration)
    popularity_s, popularity_bytes = popularity(num_steps=num_steps, num_experts=num_experts, num_layers=num_layers,
                                                cluster=cluster, calibration=calibration, needed=needs_popularity)
    shadow_s, shadow_bytes = shadow_broadcast(stacked, num_steps=num_steps, cluster=cluster, model=model,
                                              calibration=calibration)
    runs = PlacementRuns.of([p.placement for p in plans])
    state = expert_state(runs, next_placement, cluster=cluster, model=model, calibration=calibration,
                         num_experts=num_experts, layout=layout,
                         location=calibration.optimizer_state_location, accounting=expert_state_accounting)
    migration_s, migration_total = migration(plans, cluster=cluster, model=model, calibration=calibration,
                                             num_experts=num_experts, coupled=optimizer_coupled)
    a2a_CK, expert_CK, dense_CK, allreduce_CK, allreduce_bytes_step = backward_segments(
        a2a_CL, expert_CL, layer_s=layer_s, fixed_s=calibration.layer_backward_fixed_s, cluster=cluster, model=model,
        calibration=calibration)

    work = IterationWork(
        popularity_s=popularity_s,
        migration_s=migration_s,
        shadow_broadcast_s=shadow_s,
        a2a_forward_s=2 * a2a_CL.sum(axis=1),
        expert_forward_s=expert_CL.sum(axis=1),
        dense_forward_s=np.full(num_steps, (layer_s + calibration.layer_forward_fixed_s) * num_layers),
        a2a_backward_SK=a2a_CK,
        expert_backward_SK=expert_CK,
        dense_backward_SK=dense_CK,
        allreduce_SK=allreduce_CK,
        shadow_reduce_s=shadow_s,
        grad_collect_net_s=state.collect_net_s + state.collect_local_s,
        grad_collect_pcie_s=state.collect_pcie_s,
        optimizer_s=optimizer(runs, cluster=cluster, model=model, calibration=calibration, num_experts=num_experts,
                              layout=layout),
        sendout_pcie_s=state.sendout_pcie_s,
        sendout_net_s=state.sendout_net_s + state.sendout_local_s,
    )
    bytes_C = {
        "popularity": popularity_bytes,
        "a2a": a2a_bytes_C,
        "dense_allreduce": np.full(num_steps, allreduce_bytes_step),
        "grad_collect": state.collect_bytes,
        "weight_sendout": state.sendout_bytes,
        "migration": migration_total,
        "shadow": shadow_bytes,
        "pcie": state.collect_pcie_bytes + state.sendout_pcie_bytes,
    }
    dropped_C = per_step(routing.dropped_LE.sum(axis=1), num_steps)
    assignments_C = per_step(routing.num_assignments_L, num_steps)
    columns = {
        **{f"bytes_{kind}": bytes_C[kind] for kind in BYTE_KINDS},
        "imbalance": routing.imbalance_L.reshape(num_steps, num_layers).mean(axis=1),
        "dropped_tokens": dropped_C,
        "assignments": assignments_C,
        "dropped_fraction": dropped_C / np.maximum(assignments_C, 1),
        "replica_moves": np.array([int(p.moves_L.sum()) for p in plans]),
    }
    return work, columns
