"""Loads + placement -> tokens per slot and per GPU, and the tokens dropped at a capacity factor (numpy).

Legend: L MoE layers, E logical experts, R physical slots, G GPUs.

Splitting: expert e's tokens go to its replicas in proportion to `share`, in whole tokens: each slot gets
floor(load * share) and the leftover tokens go one each to the replicas with the largest fractional parts
(ties: lower slot index). A placement with live shares (`placement.live_shares`) is split from the step's own
loads instead, by `symi_sim.live_shares.live_split` under the same capacity (busiest GPU least, fewest drops).
Shadowed experts (FasterMoE) are computed where their tokens come from: spread
evenly over all GPUs, outside the slots, never dropped.

Capacity (`capacity_mode`), with A = assignments per layer (k x tokens; by default the layer's total load):
  slot  every slot buffers ceil(capacity_factor * A / R) tokens; what an expert sends a slot beyond that drops
        (DeepSpeed's and the paper's semantics).
  gpu   every GPU buffers ceil(capacity_factor * A / G) tokens shared by its slots; a GPU over budget serves
        each of its slots in proportion to what it was sent (whole tokens, largest remainders).
Which of a short slot's tokens drop (`fair_kept_GR`): every source (rank) keeps a share of what it sent the slot in
proportion to what it sent (largest remainders), so no rank's tokens are systematically the ones dropped.
A capacity is never more than the layer's total tokens (no slot or GPU can be sent more), so routing is exact, in
int64, for any finite capacity factor. Simulating a factor is bounded by MAX_CAPACITY_FACTOR (padded slot buffers
cost capacity_factor x the mean load each; use None, dropless, for "never drop").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from symi_sim.checks import check_choice, check_number
from symi_sim.placement import Placement

CAPACITY_MODES = ("slot", "gpu")
# how an executor rank computes its slots (symi_exec.moe adds "auto", resolved per device); "padded" computes every
# slot of a rank at that rank's largest slot's rows, which the simulator's run reader charges
SLOT_COMPUTE_MODES = ("grouped", "padded", "loop")
MAX_CAPACITY_FACTOR = 1e6   # a buffer a million times the mean load per slot: far past any real setting


def check_capacity_factor(value: float | None, *, optional: bool = True) -> float | None:
    """A capacity factor to simulate or train with: a finite number > 0 up to MAX_CAPACITY_FACTOR (None: dropless,
    when `optional`); one ValueError naming the rule otherwise."""
    factor = check_number(value, "capacity factor", low=0, low_open=True, optional=optional)
    if factor is not None and factor > MAX_CAPACITY_FACTOR:
        raise ValueError(f"capacity factor {factor:g} is more than the {MAX_CAPACITY_FACTOR:g} that may be simulated "
                         "or trained; use 'none' (dropless) to drop no token")
    return factor


@dataclass(frozen=True)
class Routing:
    assigned_LR: np.ndarray      # tokens sent to each slot
    served_LR: np.ndarray        # tokens each slot computes (<= assigned)
    shadow_LG: np.ndarray        # shadowed-expert tokens computed on each GPU
    dropped_LE: np.ndarray       # tokens of each expert dropped
    gpu_load_LG: np.ndarray      # tokens sent to each GPU (slots + shadows), before capacity
    gpu_served_LG: np.ndarray    # tokens each GPU computes
    num_assignments_L: np.ndarray  # A: k x tokens per layer

    @property
    def dropped_fraction(self) -> float:
        total = float(self.num_assignments_L.sum())
        return float(self.dropped_LE.sum()) / total if total > 0 else 0.0

    @property
    def dropped_fraction_L(self) -> np.ndarray:
        return self.dropped_LE.sum(axis=1) / np.maximum(self.num_assignments_L, 1)

    @property
    def imbalance_L(self) -> np.ndarray:
        """[L] max/mean tokens sent per GPU (1.0 = perfectly balanced; 1.0 for an empty layer)."""
        return _max_over_mean(self.gpu_load_LG)

    @property
    def served_imbalance_L(self) -> np.ndarray:
        """[L] max/mean tokens computed per GPU after capacity."""
        return _max_over_mean(self.gpu_served_LG)


def split_tokens(load_LE: np.ndarray, placement: Placement) -> np.ndarray:
    """Whole tokens per slot. load_LE [L, E] integer counts -> assigned_LR [L, R] int64 (shadows get 0)."""
    load_LE = np.asarray(load_LE, dtype=np.int64)
    num_layers, num_experts = load_LE.shape
    phy2log_LR = placement.phy2log_LR
    if placement.shadow_LE is not None:
        load_LE = np.where(placement.shadow_LE, 0, load_LE)
    expert_load_LR = np.take_along_axis(load_LE, phy2log_LR, axis=1)
    # shares are normalised per expert so that tolerance-level errors in them cannot create or lose tokens
    share_sum_LE = np.zeros(load_LE.shape)
    layer_LR = np.broadcast_to(np.arange(num_layers)[:, None], phy2log_LR.shape)
    np.add.at(share_sum_LE, (layer_LR, phy2log_LR), placement.share_LR)
    share_sum_LR = np.take_along_axis(share_sum_LE, phy2log_LR, axis=1)
    exact_LR = expert_load_LR * (placement.share_LR / np.where(share_sum_LR > 0, share_sum_LR, 1.0))
    # floor a hair below so that floating-point error never hands out a token too many; the largest-remainder
    # pass gives such a token back to its slot, whose fractional part is then the largest
    base_LR = np.maximum(np.floor(exact_LR - 1e-6), 0).astype(np.int64)
    frac_LR = exact_LR - base_LR
    given_LE = np.zeros_like(load_LE)
    np.add.at(given_LE, (layer_LR, phy2log_LR), base_LR)
    leftover_LE = load_LE - given_LE
    assert (leftover_LE >= 0).all()
    if not leftover_LE.any():
        return base_LR
    # rank replicas of each expert by descending fractional part, lower slot first on ties
    group_R = (layer_LR * num_experts + phy2log_LR).ravel()
    slot_R = np.broadcast_to(np.arange(phy2log_LR.shape[1])[None, :], phy2log_LR.shape).ravel()
    order = np.lexsort((slot_R, -frac_LR.ravel(), group_R))
    sorted_group = group_R[order]
    first = np.searchsorted(sorted_group, sorted_group, side="left")
    rank_sorted = np.arange(order.size) - first
    rank = np.empty_like(rank_sorted)
    rank[order] = rank_sorted
    extra = rank < leftover_LE.ravel()[group_R]
    return base_LR + extra.reshape(base_LR.shape)


def route(load_LE: np.ndarray, placement: Placement, *, slots_per_gpu: int, capacity_factor: float | None = 1.0,
          capacity_mode: str = "slot", num_assignments_L: np.ndarray | None = None,
          source_LEG: np.ndarray | None = None) -> Routing:
    """Route one step's expert loads through a placement.

    load_LE: [L, E] tokens routed to each expert (integers >= 0); capacity_factor None means dropless.
    num_assignments_L: [L] k x tokens, the capacity reference (default: load_LE.sum(1)).
    source_LEG: [L, E, G] the tokens of each expert that each GPU sends (optional): a placement with live shares
    then prefers, among its optimal splits, one that keeps tokens on their sender (symi_sim.live_shares); the
    busiest GPU and the tokens served are the same either way. Planned shares ignore it.
    """
    check_choice(capacity_mode, "capacity mode", CAPACITY_MODES)
    check_number(capacity_factor, "capacity factor", low=0, low_open=True, optional=True)
    load_LE = np.asarray(load_LE)
    if load_LE.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"load shape {load_LE.shape} does not match the placement's [layers, experts] "
            f"{(placement.num_layers, placement.num_experts)}"
        )
    if not np.issubdtype(load_LE.dtype, np.integer):
        if not np.all(np.isfinite(load_LE)) or not np.array_equal(load_LE, np.round(load_LE)):
            raise ValueError("loads to route must be whole numbers of tokens")
    if (load_LE < 0).any():
        raise ValueError(f"loads to route must be non-negative, got minimum {load_LE.min()}")
    load_LE = load_LE.astype(np.int64)
    num_layers, num_slots = placement.phy2log_LR.shape
    if num_slots % slots_per_gpu:
        raise ValueError(f"{num_slots} slots do not divide into GPUs of {slots_per_gpu} slots")
    num_gpus = num_slots // slots_per_gpu
    if num_assignments_L is None:
        num_assignments_L = load_LE.sum(axis=1)
    num_assignments_L = np.asarray(num_assignments_L, dtype=np.int64)

    buffers = num_slots if capacity_mode == "slot" else num_gpus
    cap_L = None if capacity_factor is None else buffer_capacity_L(load_LE, num_assignments_L, capacity_factor,
                                                                    buffers)
    if placement.live_shares:
        # scipy's max flow, imported only when a placement asks for live shares: the policies stay numpy-only
        from symi_sim.live_shares import live_split

        assigned_LR = live_split(load_LE, placement, slots_per_gpu=slots_per_gpu, capacity_mode=capacity_mode,
                                 capacity_L=cap_L, source_LEG=source_LEG)
    else:
        assigned_LR = split_tokens(load_LE, placement)
    shadow_LG = shadow_spread_LG(load_LE, placement.shadow_LE, num_gpus)

    if cap_L is None:
        served_LR = assigned_LR
    else:
        if capacity_mode == "slot":
            served_LR = np.minimum(assigned_LR, cap_L[:, None])
        else:
            served_LR = _fit_gpu_budget(assigned_LR, cap_L, slots_per_gpu)

    dropped_LE = np.zeros_like(load_LE)
    layer_LR = np.broadcast_to(np.arange(num_layers)[:, None], assigned_LR.shape)
    np.add.at(dropped_LE, (layer_LR, placement.phy2log_LR), assigned_LR - served_LR)
    gpu_load_LG = assigned_LR.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2) + shadow_LG
    gpu_served_LG = served_LR.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2) + shadow_LG
    return Routing(assigned_LR, served_LR, shadow_LG, dropped_LE, gpu_load_LG, gpu_served_LG, num_assignments_L)


def remote_tokens_L(assigned_LR: np.ndarray, source_LEG: np.ndarray, phy2log_LR: np.ndarray,
                    slots_per_gpu: int) -> np.ndarray:
    """[L] int64 tokens a split sends off the GPU that routed them, per layer.

    assigned_LR [L, R]: tokens per slot; source_LEG [L, E, G]: each expert's tokens by the GPU that routed them. An
    (expert, GPU) holding keeps min(its tokens, what that GPU routed to the expert) on the GPU, the most any dispatch
    can (the executor's locality-first dispatch keeps exactly that); every other token travels.
    """
    num_layers, num_experts, num_gpus = source_LEG.shape
    held_LEG = np.zeros(source_LEG.shape, dtype=np.int64)
    layer_LR = np.broadcast_to(np.arange(num_layers)[:, None], phy2log_LR.shape)
    gpu_LR = np.broadcast_to(np.arange(phy2log_LR.shape[1])[None, :] // slots_per_gpu, phy2log_LR.shape)
    np.add.at(held_LEG, (layer_LR, phy2log_LR, gpu_LR), assigned_LR)
    return source_LEG.sum(axis=(1, 2)) - np.minimum(held_LEG, source_LEG).sum(axis=(1, 2))


def shadow_spread_LG(load_LE: np.ndarray, shadow_LE: np.ndarray | None, num_gpus: int) -> np.ndarray:
    """[L, G] int64 shadowed experts' tokens per GPU: each layer's spread evenly, the extra ones to the lower GPUs
    (zeros without shadows)."""
    if shadow_LE is None:
        return np.zeros((load_LE.shape[0], num_gpus), dtype=np.int64)
    base_L, rest_L = np.divmod(np.where(shadow_LE, load_LE, 0).sum(axis=1), num_gpus)
    return base_L[:, None] + (np.arange(num_gpus)[None, :] < rest_L[:, None])


def buffer_capacity_L(load_LE: np.ndarray, num_assignments_L: np.ndarray, capacity_factor: float,
                      num_buffers: int) -> np.ndarray:
    """[L] tokens one buffer (a slot or a GPU) serves: ceil(cf * A / buffers), at most the layer's tokens."""
    # clamped in float before the int64 cast, which would wrap for factors past ~1e18 / tokens per slot
    limit_L = np.maximum(num_assignments_L, load_LE.sum(axis=1)).astype(np.float64)
    with np.errstate(over="ignore"):
        return np.minimum(np.ceil(capacity_factor * (num_assignments_L / num_buffers)), limit_L).astype(np.int64)


def fair_kept_GR(assigned_GR: np.ndarray, served_R: np.ndarray) -> np.ndarray:
    """Fair drops: which share of each source's tokens a slot short of capacity keeps.

    assigned_GR [G, R]: tokens source g (a rank, or any sender) sends slot p (integers >= 0); served_R [R]: tokens
    slot p computes, 0 <= served_R <= assigned_GR.sum(0). Returns kept_GR [G, R] int64: every source keeps a share
    of ITS tokens in proportion to what it sent, floor(assigned * served / assigned total) each, the slot's leftover
    tokens going one each to the sources with the largest remainders (ties: lower source index). So the column sums
    are served_R, kept <= assigned and |kept - assigned * served / total| < 1. Exact (integer arithmetic).
    """
    assigned_GR = np.asarray(assigned_GR)
    served_R = np.asarray(served_R)
    if assigned_GR.ndim != 2 or served_R.shape != assigned_GR.shape[1:]:
        raise ValueError(f"fair drops need assigned [G, R] and served [R], got shapes {assigned_GR.shape} and "
                         f"{served_R.shape}")
    assigned_GR = assigned_GR.astype(np.int64)
    served_R = served_R.astype(np.int64)
    total_R = assigned_GR.sum(axis=0)
    if (assigned_GR < 0).any() or (served_R < 0).any() or (served_R > total_R).any():
        raise ValueError("fair drops need assigned >= 0 and 0 <= served <= assigned tokens per slot")
    kept_GR = assigned_GR.copy()
    short = np.flatnonzero(served_R < total_R)
    if short.size == 0:
        return kept_GR
    a_CG = assigned_GR.T[short]   # the short slots, one contiguous row each (sorted along rows below)
    s_C1, t_C1 = served_R[short, None], total_R[short, None]
    prod_CG = a_CG * s_C1
    base_CG = prod_CG // t_C1
    remainder_CG = prod_CG - base_CG * t_C1   # the fractional part in units of 1 / total (one unit per slot)
    leftover_C1 = s_C1 - base_CG.sum(axis=1, keepdims=True)
    order_CG = np.argsort(-remainder_CG, axis=1, kind="stable")   # ties: lower source first
    rank_CG = np.empty_like(order_CG)
    np.put_along_axis(rank_CG, order_CG, np.arange(a_CG.shape[1])[None, :], axis=1)
    kept_GR[:, short] = (base_CG + (rank_CG < leftover_C1)).T
    return kept_GR


def _fit_gpu_budget(assigned_LR: np.ndarray, budget_L: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Scale each over-budget GPU's slots down to the budget, in whole tokens by largest remainders."""
    num_layers, num_slots = assigned_LR.shape
    a_LGS = assigned_LR.reshape(num_layers, -1, slots_per_gpu)
    demand_LG = a_LGS.sum(axis=2)
    budget_LG = np.broadcast_to(budget_L[:, None], demand_LG.shape)
    over_LG = demand_LG > budget_LG
    if not over_LG.any():
        return assigned_LR.copy()
    scale_LG = np.where(over_LG, budget_LG / np.maximum(demand_LG, 1), 1.0)
    exact_LGS = a_LGS * scale_LG[..., None]
    base_LGS = np.floor(exact_LGS + 1e-9).astype(np.int64)
    leftover_LG = np.where(over_LG, budget_LG - base_LGS.sum(axis=2), 0)
    # rank slots within a GPU by descending fractional part (stable: lower slot first)
    order_LGS = np.argsort(-(exact_LGS - base_LGS), axis=2, kind="stable")
    rank_LGS = np.empty_like(order_LGS)
    np.put_along_axis(rank_LGS, order_LGS, np.arange(slots_per_gpu)[None, None, :], axis=2)
    served_LGS = base_LGS + (rank_LGS < leftover_LG[..., None])
    served_LGS = np.minimum(served_LGS, a_LGS)
    return served_LGS.reshape(num_layers, num_slots)


def _max_over_mean(x_LG: np.ndarray) -> np.ndarray:
    mean_L = x_LG.mean(axis=1)
    return np.where(mean_L > 0, x_LG.max(axis=1) / np.where(mean_L > 0, mean_L, 1.0), 1.0)
