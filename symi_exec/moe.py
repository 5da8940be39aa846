"""The replica-aware expert-parallel MoE layer: router, popularity exchange, dispatch to replicas, slot compute,
combine, all differentiable.

Legend: N local tokens, K top-k, A local assignments (N*K; assignment a = token a // K, choice a % K),
D d_model, F d_ff, P parameters of one expert (flat), E experts, G ranks, S slots per rank, R slots (G*S),
M rows in a communication buffer.

Which replica serves which token (identical on every rank, computed from the all-gathered counts):
  1. All assignments of expert e are put in one global order: by source rank, then by local assignment index.
  2. The expert's replicas, in ascending slot order, take consecutive runs of that order whose lengths are
     `symi_sim.routing.split_tokens` of the GLOBAL counts (so per-slot counts are exactly the simulator's).
  3. Capacity: of the run a slot is sent, it serves the first `served` tokens, `served` being
     `symi_sim.routing.route(...).served_LR` (slot or gpu mode); the rest is dropped. A dropped assignment's
     expert output is zero, so the token only keeps its residual (and its other top-k choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from symi_exec.comm import Comm, all_to_all
from symi_exec.model import ModelConfig, expert_mlp, load_balance_loss, route_topk
from symi_sim.placement import Placement
from symi_sim.routing import Routing, route


@dataclass(frozen=True)
class DispatchPlan:
    """One layer's token movement, the same on every rank."""

    routing: Routing              # the simulator's routing of the global counts (1 layer)
    phy2log_R: np.ndarray         # expert held by slot p
    slot_order_R: np.ndarray      # slots sorted by (expert, slot id): their runs tile the global key space
    expert_base_E: np.ndarray     # global key where expert e's assignments start (experts in id order)
    offset_GE: np.ndarray         # where rank g's assignments of e start within expert e's order
    slot_begin_R: np.ndarray      # global key where slot p's run starts
    served_R: np.ndarray          # tokens slot p computes
    send_GR: np.ndarray           # tokens rank g sends to slot p (after dropping)


def plan_dispatch(count_GE: np.ndarray, placement: Placement, *, slots_per_rank: int,
                  capacity_factor: float | None, capacity_mode: str = "slot") -> DispatchPlan:
    """The dispatch of one MoE layer from every rank's router counts count_GE [G, E] and a 1-layer placement."""
    if placement.shadow_LE is not None:
        raise ValueError("the executor does not run shadowed (FasterMoE) experts yet")
    count_GE = np.asarray(count_GE, dtype=np.int64)
    global_E = count_GE.sum(axis=0)
    routing = route(global_E[None, :], placement, slots_per_gpu=slots_per_rank, capacity_factor=capacity_factor,
                    capacity_mode=capacity_mode, num_assignments_L=np.array([global_E.sum()]))
    assigned_R = routing.assigned_LR[0]
    served_R = routing.served_LR[0]
    phy2log_R = placement.phy2log_LR[0]
    num_slots = phy2log_R.size
    expert_base_E = np.cumsum(global_E) - global_E
    offset_GE = np.cumsum(count_GE, axis=0) - count_GE
    # Slots sorted by (expert, slot id) tile the global key space with their assigned runs.
    order = np.lexsort((np.arange(num_slots), phy2log_R))
    slot_begin_R = np.empty(num_slots, dtype=np.int64)
    slot_begin_R[order] = np.cumsum(assigned_R[order]) - assigned_R[order]
    assert np.array_equal(np.bincount(phy2log_R, weights=assigned_R, minlength=global_E.size), global_E)
    src_begin_GR = (expert_base_E + offset_GE)[:, phy2log_R]
    src_end_GR = src_begin_GR + count_GE[:, phy2log_R]
    lo_GR = np.maximum(src_begin_GR, slot_begin_R[None, :])
    hi_GR = np.minimum(src_end_GR, (slot_begin_R + served_R)[None, :])
    send_GR = np.maximum(hi_GR - lo_GR, 0)
    return DispatchPlan(routing, phy2log_R, order, expert_base_E, offset_GE, slot_begin_R, served_R, send_GR)


def assignment_slots(expert_A: torch.Tensor, plan: DispatchPlan, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each local assignment under `plan`, and whether it is served (False: dropped). Both [A]."""
    device = expert_A.device
    num_experts = plan.expert_base_E.size
    order_A = torch.argsort(expert_A, stable=True)
    expert_sorted_A = expert_A[order_A]
    count_E = torch.bincount(expert_A, minlength=num_experts)
    local_start_E = torch.cumsum(count_E, 0) - count_E
    within_A = torch.arange(expert_A.numel(), device=device) - local_start_E[expert_sorted_A]
    base_E = torch.as_tensor(plan.expert_base_E + plan.offset_GE[rank], device=device)
    key_sorted_A = base_E[expert_sorted_A] + within_A
    # the last slot (in key order) starting at or before a key holds it; empty runs are skipped that way
    begin_sorted = torch.as_tensor(plan.slot_begin_R[plan.slot_order_R], device=device)
    slot_sorted_A = torch.as_tensor(plan.slot_order_R, device=device)[
        torch.searchsorted(begin_sorted, key_sorted_A, right=True) - 1]
    slot_begin = torch.as_tensor(plan.slot_begin_R, device=device)
    served = torch.as_tensor(plan.served_R, device=device)
    kept_sorted_A = key_sorted_A < slot_begin[slot_sorted_A] + served[slot_sorted_A]
    slot_A = torch.empty_like(slot_sorted_A)
    slot_A[order_A] = slot_sorted_A
    kept_A = torch.empty_like(kept_sorted_A)
    kept_A[order_A] = kept_sorted_A
    return slot_A, kept_A


class ReplicatedMoE(nn.Module):
    """Expert-parallel MoE layer: this rank's S slots hold the weights of the experts the placement gives them.

    The training loop sets `placement` (1 layer) before forward and fills `slot_weights_SP` with the matching experts'
    weights (optim.ShardedExpertOptimizer.send_out). After forward the layer exposes this step's counts.
    """

    def __init__(self, router: nn.Linear, config: ModelConfig, *, slots_per_rank: int, comm: Comm,
                 capacity_factor: float | None, capacity_mode: str = "slot") -> None:
        super().__init__()
        self.router = router
        self.top_k = config.top_k
        self.router_skew = config.router_skew
        self.num_experts = config.num_experts
        self.d_model, self.d_ff = config.d_model, config.d_ff
        self.slots_per_rank = slots_per_rank
        self.comm = comm
        self.capacity_factor = capacity_factor
        self.capacity_mode = capacity_mode
        weight = router.weight
        self.slot_weights_SP = nn.Parameter(
            torch.zeros(slots_per_rank, config.expert_numel, dtype=weight.dtype, device=weight.device))
        self.placement: Placement | None = None
        # set by forward
        self.aux_loss: torch.Tensor | None = None
        self.count_GE: np.ndarray | None = None
        self.plan: DispatchPlan | None = None
        self.dropped_E: np.ndarray | None = None   # this rank's dropped assignments per expert

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        assert self.placement is not None, "set the layer's placement before forward"
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        comm, num_slots_local = self.comm, self.slots_per_rank
        routed = route_topk(x_ND, self.router, self.top_k, self.router_skew)

        # popularity exchange: every rank learns every rank's counts (the all-reduce's sum and the offsets)
        count_GE = _all_gather_counts(routed.count_E, comm)
        self.count_GE = count_GE
        self.aux_loss = load_balance_loss(routed.probs_NE, torch.as_tensor(count_GE.sum(axis=0)),
                                          int(count_GE.sum()))
        plan = plan_dispatch(count_GE, self.placement, slots_per_rank=num_slots_local,
                             capacity_factor=self.capacity_factor, capacity_mode=self.capacity_mode)
        self.plan = plan

        # send side: served assignments ordered by slot (so by destination rank), then by global key
        expert_A = routed.expert_NK.reshape(-1)
        slot_A, kept_A = assignment_slots(expert_A, plan, comm.rank)
        self.dropped_E = np.bincount(expert_A[~kept_A].cpu().numpy(), minlength=self.num_experts)
        kept_idx = torch.nonzero(kept_A).squeeze(1)
        send_order = torch.argsort(slot_A[kept_idx], stable=True)
        send_assign_M = kept_idx[send_order]
        in_splits = plan.send_GR[comm.rank].reshape(comm.world_size, num_slots_local).sum(axis=1).tolist()
        recv_GS = plan.send_GR[:, comm.rank * num_slots_local:(comm.rank + 1) * num_slots_local]
        out_splits = recv_GS.sum(axis=1).tolist()
        x_recv_MD = all_to_all(x_ND[send_assign_M // self.top_k], out_splits, in_splits, comm, "dispatch",
                               "dispatch_grad")

        # slot compute, slot-major (within a slot: by source rank, then key = the global order)
        slot_of_row_M = torch.repeat_interleave(
            torch.arange(num_slots_local, device=x_ND.device).repeat(comm.world_size),
            torch.as_tensor(recv_GS.reshape(-1), device=x_ND.device))
        slot_major_M = torch.argsort(slot_of_row_M, stable=True)
        x_slot_MD = x_recv_MD[slot_major_M]
        num_dff = self.d_model * self.d_ff
        y_parts = []
        with comm.timed("expert_forward"):
            for s, x_part in enumerate(torch.split(x_slot_MD, recv_GS.sum(axis=0).tolist())):
                w_in_DF = self.slot_weights_SP[s, :num_dff].view(self.d_model, self.d_ff)
                w_out_FD = self.slot_weights_SP[s, num_dff:].view(self.d_ff, self.d_model)
                y_parts.append(expert_mlp(x_part, w_in_DF, w_out_FD))
            y_slot_MD = torch.cat(y_parts)
        y_recv_MD = y_slot_MD[torch.argsort(slot_major_M)]

        # combine: back to the source rank, then the gate-weighted sum over the k choices (dropped: zero)
        y_back_MD = all_to_all(y_recv_MD, in_splits, out_splits, comm, "combine", "combine_grad")
        y_AD = torch.zeros(expert_A.numel(), d, dtype=x_ND.dtype, device=x_ND.device)
        y_AD = y_AD.index_copy(0, send_assign_M, y_back_MD)
        out_ND = (y_AD.view(b * t, self.top_k, d) * routed.gate_NK.unsqueeze(-1)).sum(dim=1)
        return out_ND.reshape(b, t, d)


def _all_gather_counts(count_E: torch.Tensor, comm: Comm) -> np.ndarray:
    """[G, E] every rank's router counts (bytes: this rank's [E] vector to each other rank)."""
    if comm.world_size == 1:
        return count_E.cpu().numpy()[None, :].astype(np.int64)
    parts = [torch.empty_like(count_E) for _ in range(comm.world_size)]
    dist.all_gather(parts, count_E.contiguous())
    comm.count("popularity", (comm.world_size - 1) * count_E.numel() * count_E.element_size())
    return torch.stack(parts).cpu().numpy().astype(np.int64)
