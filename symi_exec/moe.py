"""The replica-aware expert-parallel MoE layer: router, popularity exchange, dispatch to replicas, slot compute,
combine, all differentiable.

Legend: N local tokens, K top-k, A local assignments (N*K; assignment a = token a // K, choice a % K),
D d_model, F d_ff, P parameters of one expert (flat), E experts, G ranks, S slots per rank, R slots (G*S),
M rows in a communication buffer, J sub-runs of a rank's expert-sorted assignments (2 per slot: kept, dropped),
B blocks of a receive buffer (G*S: one per source rank and local slot), C blocks of the compute buffer (S*(G+1):
per local slot, one per source rank and its padding).

Which replica serves which token (identical on every rank, computed from the all-gathered counts):
  1. How many per slot: `symi_sim.routing.route` of the GLOBAL counts, assigned_R (so per-slot counts are exactly
     the simulator's): the planned shares, or with live shares the live split, which is also given every rank's
     counts and, among its optimal splits, prefers one that keeps tokens on the rank that routed them.
  2. How many from each source rank, locality first (`locality_transport_GR`): every slot takes min(its assigned
     count, the tokens of its expert that its own rank has left), the slots of one expert on one rank in ascending
     slot order; then, per expert, the tokens still left (by source rank) fill the slots' remaining counts in
     ascending slot order. That keeps on their own rank as many assignments as any split of these counts can.
  3. Which ones: rank g's assignments of expert e, by local assignment index, are cut into consecutive pieces of
     assigned_GR[g, p] tokens, e's slots in ascending slot order (`rank_dispatch`: the rank's assignments sorted
     by expert, stably).
  4. Capacity: a slot computes `served` of its tokens, `served` being `symi_sim.routing.route(...).served_LR` (slot
     or gpu mode). Fair drops: each source rank keeps a share of ITS piece in proportion to that piece
     (`symi_sim.routing.fair_kept_GR`, largest remainders), the first ones of the piece (lowest local indices); the
     rest of the piece is dropped. Drops per expert depend on served_LR only, so they equal the simulator's. A
     dropped assignment's expert output is zero, so the token only keeps its residual (and its other top-k choices).

Per layer and step everything is array arithmetic: numpy on the [G, R] plan after the one host sync (the counts'
all-gather), then device ops that need no sync (sizes come from the plan); one host-to-device copy of the plan's
index pieces. A rank's S slots compute as one grouped matmul (`torch._grouped_mm`, where the device has a kernel for
it) or one padded batched matmul.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from symi_exec.comm import Comm, all_to_all
from symi_exec.model import ModelConfig, expert_mlp, load_balance_loss, route_topk
from symi_sim.placement import Placement
from symi_sim.routing import SLOT_COMPUTE_MODES, Routing, fair_kept_GR, route

# how a rank's slots are computed: grouped (torch._grouped_mm), padded (one batched matmul over [S, rows, D] with
# zero rows), loop (one matmul pair per slot); auto: grouped where the device has the kernel, padded otherwise
SLOT_COMPUTES = ("auto", *SLOT_COMPUTE_MODES)


@dataclass(frozen=True)
class DispatchPlan:
    """One layer's token movement, the same on every rank (numpy)."""

    routing: Routing              # the simulator's routing of the global counts (1 layer)
    phy2log_R: np.ndarray         # expert held by slot p
    slot_order_R: np.ndarray      # slots sorted by (expert, slot id): the order of a rank's pieces
    assigned_GR: np.ndarray       # rank g's tokens in slot p, before capacity (locality first)
    send_GR: np.ndarray           # tokens rank g sends slot p: its fair share of the slot's served tokens
    served_R: np.ndarray          # tokens slot p computes (= send_GR.sum(0))


def plan_dispatch(count_GE: np.ndarray, placement: Placement, *, slots_per_rank: int,
                  capacity_factor: float | None, capacity_mode: str = "slot") -> DispatchPlan:
    """The dispatch of one MoE layer from every rank's router counts count_GE [G, E] and a 1-layer placement."""
    if placement.shadow_LE is not None:
        raise ValueError("the executor does not run shadowed (FasterMoE) experts yet")
    count_GE = np.asarray(count_GE, dtype=np.int64)
    global_E = count_GE.sum(axis=0)
    # live shares prefer, among the optimal splits, one that keeps tokens on the rank that routed them
    routing = route(global_E[None, :], placement, slots_per_gpu=slots_per_rank, capacity_factor=capacity_factor,
                    capacity_mode=capacity_mode, num_assignments_L=np.array([global_E.sum()]),
                    source_LEG=count_GE.T[None])
    assigned_R = routing.assigned_LR[0]
    served_R = routing.served_LR[0]
    phy2log_R = placement.phy2log_LR[0]
    assigned_GR = locality_transport_GR(count_GE, phy2log_R, assigned_R, slots_per_rank=slots_per_rank)
    # Slots sorted by (expert, slot id): the order in which a rank's expert-sorted assignments are cut into pieces.
    order = np.lexsort((np.arange(phy2log_R.size), phy2log_R))
    send_GR = fair_kept_GR(assigned_GR, served_R)
    return DispatchPlan(routing, phy2log_R, order, assigned_GR, send_GR, served_R)


def locality_transport_GR(count_GE: np.ndarray, phy2log_R: np.ndarray, assigned_R: np.ndarray, *,
                          slots_per_rank: int) -> np.ndarray:
    """How many of rank g's assignments of its expert slot p takes: assigned_GR [G, R] int64, locality first.

    count_GE [G, E]: every rank's router counts; phy2log_R [R]: the expert of slot p (on rank p // slots_per_rank);
    assigned_R [R]: the tokens slot p takes (per expert they add up to the expert's global count).
      1. local first: each slot takes min(its room, its rank's tokens of its expert that are left), the slots of one
         expert on one rank in ascending slot order;
      2. the rest: per expert, the tokens still left (by source rank) fill the rooms still left (by slot id) in that
         order, the north-west corner of the remaining counts.
    Row sums are count_GE[:, phy2log_R] per expert, column sums assigned_R. Step 1 keeps sum over (rank, expert) of
    min(count, that rank's slots' rooms) on the sending rank, the most any split with these sums can: afterwards a
    rank's tokens of an expert are used up or its slots of the expert are full, so step 2 moves only across ranks.
    """
    num_ranks, num_experts = count_GE.shape
    num_slots = phy2log_R.size
    slot_R = np.arange(num_slots)
    rank_R = slot_R // slots_per_rank
    home_R = rank_R * num_experts + phy2log_R   # (rank, expert) of each slot, flat
    # 1. the slots grouped by (rank, expert), ascending ids; the room of a group's earlier slots comes first
    by_home = np.lexsort((slot_R, home_R))
    room_H = assigned_R[by_home]
    before_H = np.cumsum(room_H) - room_H
    first_H = np.r_[True, home_R[by_home][1:] != home_R[by_home][:-1]]
    # before_H never decreases, so the running maximum of its values at group starts is each group's own start
    before_H -= np.maximum.accumulate(np.where(first_H, before_H, 0))
    local_R = np.empty(num_slots, dtype=np.int64)
    local_R[by_home] = np.clip(count_GE.reshape(-1)[home_R[by_home]] - before_H, 0, room_H)
    rest_GE = count_GE - np.bincount(home_R, weights=local_R, minlength=num_ranks * num_experts).astype(
        np.int64).reshape(num_ranks, num_experts)
    room_R = assigned_R - local_R
    # 2. per expert, the rest in (source rank) order against the rooms in slot order: interval overlaps in one key
    # space that holds the experts in id order
    by_expert = np.lexsort((slot_R, phy2log_R))
    room_begin_R = np.empty(num_slots, dtype=np.int64)
    room_begin_R[by_expert] = np.cumsum(room_R[by_expert]) - room_R[by_expert]
    rest_E = rest_GE.sum(axis=0)
    assert (np.bincount(phy2log_R, weights=room_R, minlength=num_experts) == rest_E).all(), "slots miss tokens"
    src_begin_GR = ((np.cumsum(rest_E) - rest_E) + (np.cumsum(rest_GE, axis=0) - rest_GE))[:, phy2log_R]
    lo_GR = np.maximum(src_begin_GR, room_begin_R)
    hi_GR = np.minimum(src_begin_GR + rest_GE[:, phy2log_R], room_begin_R + room_R)
    assigned_GR = np.maximum(hi_GR - lo_GR, 0)
    assigned_GR[rank_R, slot_R] += local_R
    return assigned_GR


@dataclass(frozen=True)
class RankDispatch:
    """One rank's share of a DispatchPlan as index arithmetic (numpy, sizes J, B and S; no per-token arrays).

    Send side: sorting the rank's assignments by expert (stable) and cutting them into pieces of assigned_GR[rank]
    in the plan's slot order gives each slot its piece; piece j splits into its kept head and dropped tail (sub-runs
    2j, 2j + 1). Sorted position i of sub-run J goes to send-buffer row i + sort_delta_J[J] (kept ones: by slot id,
    then local index; dropped ones after the num_kept kept rows).
    Receive side: row i of the receive buffer (by source rank, then local slot, then the source's local index) in
    block B goes to row i + recv_delta_B[B] of the compute buffer: slot-major rows (grouped / loop), or S blocks of
    max_rows (padded); the other way round, compute-buffer row j of block C is receive row j + fill_delta_C[C]
    (padding: below 0).
    """

    num_kept: int
    in_splits: list[int]          # rows sent to each rank
    out_splits: list[int]         # rows received from each rank
    sort_len_J: np.ndarray
    sort_delta_J: np.ndarray
    recv_len_B: np.ndarray
    recv_delta_B: np.ndarray
    fill_len_C: np.ndarray
    fill_delta_C: np.ndarray
    rows_S: np.ndarray            # rows each local slot computes
    buffer_rows: int              # rows of the compute buffer
    dropped_E: np.ndarray         # this rank's dropped assignments per expert


def rank_dispatch(plan: DispatchPlan, rank: int, *, slots_per_rank: int, padded: bool) -> RankDispatch:
    """Rank `rank`'s RankDispatch under `plan`; `padded`: the compute buffer is S blocks of max rows."""
    num_ranks, num_slots = plan.send_GR.shape
    order = plan.slot_order_R
    a_J = plan.assigned_GR[rank, order]
    k_J = plan.send_GR[rank, order]
    start_J = np.cumsum(a_J) - a_J
    kept_row_R = np.cumsum(plan.send_GR[rank]) - plan.send_GR[rank]   # send-buffer rows: by slot id
    num_kept = int(k_J.sum())
    d_J = a_J - k_J
    dropped_start_J = np.cumsum(d_J) - d_J
    sort_len_J = np.stack([k_J, d_J], axis=1).reshape(-1)
    sort_delta_J = np.stack([kept_row_R[order] - start_J,
                             num_kept + dropped_start_J - (start_J + k_J)], axis=1).reshape(-1)

    lo, hi = rank * slots_per_rank, (rank + 1) * slots_per_rank
    recv_GS = plan.send_GR[:, lo:hi]
    rows_S = recv_GS.sum(axis=0)
    recv_start_GS = (np.cumsum(recv_GS.reshape(-1)) - recv_GS.reshape(-1)).reshape(recv_GS.shape)
    max_rows = int(rows_S.max()) if rows_S.size else 0
    slot_start_S = (np.arange(slots_per_rank) * max_rows) if padded else (np.cumsum(rows_S) - rows_S)
    within_GS = np.cumsum(recv_GS, axis=0) - recv_GS   # rows of the slot from lower source ranks
    recv_delta_B = (slot_start_S + within_GS - recv_start_GS).reshape(-1)
    buffer_rows = slots_per_rank * max_rows if padded else int(rows_S.sum())
    # the same blocks in compute-buffer order (slot, then source), each slot's padding block after its rows
    pad_S = (max_rows - rows_S) if padded else np.zeros_like(rows_S)
    fill_len_C = np.concatenate([recv_GS.T, pad_S[:, None]], axis=1).reshape(-1)
    fill_delta_C = np.concatenate([-recv_delta_B.reshape(recv_GS.shape).T,
                                   np.full((slots_per_rank, 1), -buffer_rows - 1)], axis=1).reshape(-1)

    num_experts = plan.routing.dropped_LE.shape[1]
    dropped_E = np.bincount(plan.phy2log_R, weights=plan.assigned_GR[rank] - plan.send_GR[rank],
                            minlength=num_experts).astype(np.int64)
    return RankDispatch(
        num_kept=num_kept,
        in_splits=plan.send_GR[rank].reshape(num_ranks, slots_per_rank).sum(axis=1).tolist(),
        out_splits=recv_GS.sum(axis=1).tolist(),
        sort_len_J=sort_len_J, sort_delta_J=sort_delta_J, recv_len_B=recv_GS.reshape(-1),
        recv_delta_B=recv_delta_B, fill_len_C=fill_len_C, fill_delta_C=fill_delta_C, rows_S=rows_S,
        buffer_rows=buffer_rows, dropped_E=dropped_E)


def send_order(expert_A: torch.Tensor, dispatch: RankDispatch, sort_len_J: torch.Tensor,
               sort_delta_J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The send buffer's assignments send_assign_M [num_kept] (by slot, then local index) and each assignment's
    send-buffer row row_A [A] (num_kept where dropped; kept_A is row_A < num_kept).

    sort_len_J / sort_delta_J: the dispatch's arrays on expert_A's device. No host sync.
    """
    num_assign = expert_A.numel()
    order_A = torch.argsort(expert_A, stable=True)
    dest_A = block_offsets(num_assign, sort_len_J, sort_delta_J)
    send_assign_M = torch.empty_like(order_A).scatter_(0, dest_A, order_A)[:dispatch.num_kept]
    row_A = torch.empty_like(order_A).scatter_(0, order_A, dest_A.clamp(max=dispatch.num_kept))
    return send_assign_M, row_A


def block_offsets(num_rows: int, len_X: torch.Tensor, delta_X: torch.Tensor) -> torch.Tensor:
    """[num_rows] i + delta_X[block of i], rows in consecutive blocks of len_X (no host sync: num_rows is known)."""
    return torch.arange(num_rows, device=len_X.device) + torch.repeat_interleave(delta_X, len_X,
                                                                                  output_size=num_rows)


@functools.cache
def _grouped_kernel(device_type: str, index: int | None) -> bool:
    # torch._grouped_mm's CUDA kernel (CUTLASS, bf16) is built for compute capability 9.x/10.x; elsewhere torch
    # falls back to a loop that copies the offsets to the host (a sync), no better than the padded matmul
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(index)[0] in (9, 10)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> bool:
    """Whether the slots run as torch._grouped_mm: CUDA with capability 9.x/10.x, bf16, 16-byte aligned rows."""
    return (dtype == torch.bfloat16 and d_model % 8 == 0 and d_ff % 8 == 0
            and _grouped_kernel(device.type, device.index))


def slot_mlp(x_MD: torch.Tensor, w_in_SDF: torch.Tensor, w_out_SFD: torch.Tensor, *, rows_S: np.ndarray,
             offs_S: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Every local slot's expert MLP on its rows of the compute buffer x_MD; [M, D] out, rows in place.

    grouped / loop: rows slot-major, rows_S [S] each (offs_S: their int32 cumulative ends on the device, grouped
    only); padded: S blocks of M / S rows, the rows past a slot's own zero (GELU(0) = 0: they output zero and add
    nothing to any gradient).
    """
    num_slots, d_model, _ = w_in_SDF.shape
    if mode == "grouped":
        h_MF = F.gelu(torch._grouped_mm(x_MD, w_in_SDF, offs=offs_S))
        return torch._grouped_mm(h_MF, w_out_SFD, offs=offs_S)
    if mode == "padded":
        y_SMD = expert_mlp(x_MD.view(num_slots, x_MD.shape[0] // num_slots, d_model), w_in_SDF, w_out_SFD)
        return y_SMD.reshape(-1, d_model)
    assert mode == "loop", mode
    parts = torch.split(x_MD, rows_S.tolist())
    return torch.cat([expert_mlp(x, w_in_SDF[s], w_out_SFD[s]) for s, x in enumerate(parts)])


class ReplicatedMoE(nn.Module):
    """Expert-parallel MoE layer: this rank's S slots hold the weights of the experts the placement gives them.

    The training loop sets `placement` (1 layer) before forward and fills `slot_weights_SP` with the matching experts'
    weights (optim.ShardedExpertOptimizer.send_out). After forward the layer exposes this step's counts (count_GE),
    plan, dropped_E, kept_A and aux_loss. `slot_compute` picks how the slots compute (SLOT_COMPUTES).
    """

    def __init__(self, router: nn.Linear, config: ModelConfig, *, slots_per_rank: int, comm: Comm,
                 capacity_factor: float | None, capacity_mode: str = "slot", slot_compute: str = "auto") -> None:
        super().__init__()
        if slot_compute not in SLOT_COMPUTES:
            raise ValueError(f"unknown slot compute {slot_compute!r}; choices: {', '.join(SLOT_COMPUTES)}")
        self.router = router
        self.top_k = config.top_k
        self.router_skew = config.router_skew
        self.num_experts = config.num_experts
        self.d_model, self.d_ff = config.d_model, config.d_ff
        self.slots_per_rank = slots_per_rank
        self.comm = comm
        self.capacity_factor = capacity_factor
        self.capacity_mode = capacity_mode
        self.slot_compute = slot_compute
        weight = router.weight
        self.slot_weights_SP = nn.Parameter(
            torch.zeros(slots_per_rank, config.expert_numel, dtype=weight.dtype, device=weight.device))
        self.placement: Placement | None = None
        # set by forward
        self.aux_loss: torch.Tensor | None = None
        self.count_GE: np.ndarray | None = None
        self.plan: DispatchPlan | None = None
        self.dropped_E: np.ndarray | None = None   # this rank's dropped assignments per expert
        self.kept_A: torch.Tensor | None = None    # [A] bool on the device: assignment served (route_topk's order)
        self.expert_NK: torch.Tensor | None = None  # this rank's top-k expert ids (trace_megatron records them)

    def compute_mode(self) -> str:
        """The slot compute this forward uses (`slot_compute`, with auto resolved for the weights' device)."""
        if self.slot_compute != "auto":
            return self.slot_compute
        weight = self.slot_weights_SP
        grouped = grouped_mm_supported(weight.device, weight.dtype, self.d_model, self.d_ff)
        return "grouped" if grouped else "padded"

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        assert self.placement is not None, "set the layer's placement before forward"
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        comm, num_slots_local, device = self.comm, self.slots_per_rank, x_ND.device
        routed = route_topk(x_ND, self.router, self.top_k, self.router_skew)
        self.expert_NK = routed.expert_NK

        # popularity exchange: every rank learns every rank's counts (the all-reduce's sum and the offsets); the
        # layer's one host sync
        count_GE = _all_gather_counts(routed.count_E, comm)
        self.count_GE = count_GE
        plan = plan_dispatch(count_GE, self.placement, slots_per_rank=num_slots_local,
                             capacity_factor=self.capacity_factor, capacity_mode=self.capacity_mode)
        self.plan = plan
        mode = self.compute_mode()
        dispatch = rank_dispatch(plan, comm.rank, slots_per_rank=num_slots_local, padded=mode == "padded")
        if mode == "grouped" and dispatch.buffer_rows == 0:
            mode = "loop"   # nothing to compute; the grouped kernel wants rows
        self.dropped_E = dispatch.dropped_E
        global_E = count_GE.sum(axis=0)
        sort_len_J, sort_delta_J, recv_len_B, recv_delta_B, fill_len_C, fill_delta_C, offs_S, global_count_E = (
            _to_device([dispatch.sort_len_J, dispatch.sort_delta_J, dispatch.recv_len_B, dispatch.recv_delta_B,
                        dispatch.fill_len_C, dispatch.fill_delta_C, np.cumsum(dispatch.rows_S), global_E], device))
        self.aux_loss = load_balance_loss(routed.probs_NE, global_count_E, int(global_E.sum()))

        # send side: kept assignments ordered by slot (so by destination rank), then by local index
        expert_A = routed.expert_NK.reshape(-1)
        send_assign_M, row_A = send_order(expert_A, dispatch, sort_len_J, sort_delta_J)
        self.kept_A = row_A < dispatch.num_kept
        x_recv_MD = all_to_all(x_ND.index_select(0, send_assign_M // self.top_k), dispatch.out_splits,
                               dispatch.in_splits, comm, "dispatch", "dispatch_grad")

        # slot compute on the compute buffer (slot-major, or padded per slot), rows back in receive order. Padding
        # rows copy receive row 0 rather than zeros (a gather, not a scatter into zeros): no output row reads them,
        # so their gradient is exactly zero and they add exactly nothing to the weights' gradients.
        # Always a gather from x_recv_MD, even of nothing (no rows received means an empty buffer): every rank's
        # graph must reach both all-to-alls, or a rank skips their backward and the collectives fall out of step.
        num_recv = x_recv_MD.shape[0]
        fill_M = block_offsets(dispatch.buffer_rows, fill_len_C, fill_delta_C).clamp(min=0)
        x_buf_MD = x_recv_MD.index_select(0, fill_M)
        num_dff = self.d_model * self.d_ff
        w_in_SDF = self.slot_weights_SP[:, :num_dff].view(num_slots_local, self.d_model, self.d_ff)
        w_out_SFD = self.slot_weights_SP[:, num_dff:].view(num_slots_local, self.d_ff, self.d_model)
        with comm.timed("expert_forward"):
            y_buf_MD = slot_mlp(x_buf_MD, w_in_SDF, w_out_SFD, rows_S=dispatch.rows_S,
                                offs_S=offs_S.to(torch.int32) if mode == "grouped" else None, mode=mode)
        y_recv_MD = y_buf_MD.index_select(0, block_offsets(num_recv, recv_len_B, recv_delta_B))

        # combine: back to the source rank, then the gate-weighted sum over the k choices (dropped: the zero row)
        y_back_MD = all_to_all(y_recv_MD, dispatch.in_splits, dispatch.out_splits, comm, "combine", "combine_grad")
        y_NKD = torch.cat([y_back_MD, y_back_MD.new_zeros(1, d)]).index_select(0, row_A).view(b * t, self.top_k, d)
        gate_NK = routed.gate_NK
        out_ND = y_NKD[:, 0] * gate_NK[:, :1]
        for k in range(1, self.top_k):
            out_ND = torch.addcmul(out_ND, y_NKD[:, k], gate_NK[:, k:k + 1])
        return out_ND.reshape(b, t, d)


def _to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The int64 arrays on `device` in one copy, which on a GPU does not wait for the device (pinned, non-blocking)."""
    sizes = [a.size for a in arrays]
    packed = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    return list(torch.split(packed, sizes))


def _all_gather_counts(count_E: torch.Tensor, comm: Comm) -> np.ndarray:
    """[G, E] every rank's router counts (bytes: this rank's [E] vector to each other rank)."""
    if comm.world_size == 1:
        return count_E.cpu().numpy()[None, :].astype(np.int64)
    parts = [torch.empty_like(count_E) for _ in range(comm.world_size)]
    dist.all_gather(parts, count_E.contiguous())
    comm.count("popularity", (comm.world_size - 1) * count_E.numel() * count_E.element_size())
    return torch.stack(parts).cpu().numpy().astype(np.int64)
