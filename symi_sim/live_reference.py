"""The linear programs the live split (symi_sim.live_shares) is held to, one layer each (scipy.optimize.linprog, HiGHS).

Legend: E experts, R slots, G GPUs, H holdings (an expert's replicas on one GPU).

Real-valued splits of one layer's loads w_E over a placement's slots: x_R >= 0 summing to w_e over expert e's
replicas. The integer split of the live rule can sit at most one token above these optima (peaks) and never below;
tests/test_live_shares.py checks it against them, benchmarks/bench_live_shares.py times them beside it. Milliseconds
per layer: references, not something to run per step.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog


def lp_min_max(w_E: np.ndarray, phy2log_R: np.ndarray, slots_per_gpu: int, slot_cap: int | None = None) -> float:
    """min T over real splits with every GPU's load <= T.

    slot_cap (slot mode's capacity C): an expert that fits under its replicas' caps (w <= n C) gives each at most C;
    one that does not gives each floor(w / n) or one more (the fewest drops, as the live rule fixes them).
    """
    w_E = np.asarray(w_E, dtype=np.float64)
    num_slots = phy2log_R.size
    num_gpus = num_slots // slots_per_gpu
    cost = np.zeros(num_slots + 1)
    cost[-1] = 1.0
    a_eq = np.zeros((w_E.size, num_slots + 1))
    a_eq[phy2log_R, np.arange(num_slots)] = 1.0
    a_ub = np.zeros((num_gpus, num_slots + 1))
    a_ub[np.arange(num_slots) // slots_per_gpu, np.arange(num_slots)] = 1.0
    a_ub[:, -1] = -1.0
    bounds = [(0.0, None)] * (num_slots + 1)
    if slot_cap is not None:
        count_E = np.bincount(phy2log_R, minlength=w_E.size)
        for slot, expert in enumerate(phy2log_R):
            floor = float(w_E[expert] // count_E[expert])
            fits = w_E[expert] <= count_E[expert] * slot_cap
            bounds[slot] = (0.0, float(slot_cap)) if fits else (floor, floor + 1.0)
    return _solve(cost, a_ub, np.zeros(num_gpus), a_eq, w_E, bounds)


def lp_max_served(w_E: np.ndarray, phy2log_R: np.ndarray, slots_per_gpu: int, budget: float) -> float:
    """max over real splits of sum_g min(load_g, budget): the most tokens gpu capacity mode serves."""
    w_E = np.asarray(w_E, dtype=np.float64)
    num_slots = phy2log_R.size
    num_gpus = num_slots // slots_per_gpu
    # variables: x_R, then s_G <= min(load_g, budget) (the tokens GPU g serves)
    cost = np.concatenate([np.zeros(num_slots), -np.ones(num_gpus)])
    a_eq = np.zeros((w_E.size, num_slots + num_gpus))
    a_eq[phy2log_R, np.arange(num_slots)] = 1.0
    a_ub = np.zeros((num_gpus, num_slots + num_gpus))
    a_ub[np.arange(num_slots) // slots_per_gpu, np.arange(num_slots)] = -1.0
    a_ub[np.arange(num_gpus), num_slots + np.arange(num_gpus)] = 1.0
    bounds = [(0.0, None)] * num_slots + [(0.0, float(budget))] * num_gpus
    return -_solve(cost, a_ub, np.zeros(num_gpus), a_eq, w_E, bounds)


def lp_least_remote(w_E: np.ndarray, source_EG: np.ndarray, phy2log_R: np.ndarray, slots_per_gpu: int,
                    peak: float) -> float:
    """The fewest tokens any real split with every GPU <= peak sends off the GPU that routed them.

    source_EG [E, G]: each expert's tokens by the GPU that routed them. A holding h = (e, g) carries x_h, of which
    l_h <= min(x_h, source[e, g]) stay on g; the program maximises sum l_h.
    """
    w_E = np.asarray(w_E, dtype=np.float64)
    num_gpus = phy2log_R.size // slots_per_gpu
    holdings = sorted({(int(e), slot // slots_per_gpu) for slot, e in enumerate(phy2log_R)})
    num_h = len(holdings)
    # variables: x_H, then l_H
    cost = np.concatenate([np.zeros(num_h), -np.ones(num_h)])
    a_ub = np.zeros((num_gpus + num_h, 2 * num_h))
    a_eq = np.zeros((w_E.size, 2 * num_h))
    for h, (e, g) in enumerate(holdings):
        a_ub[g, h] = 1.0
        a_ub[num_gpus + h, [h, num_h + h]] = [-1.0, 1.0]
        a_eq[e, h] = 1.0
    bounds = [(0.0, None)] * num_h + [(0.0, float(source_EG[e, g])) for e, g in holdings]
    b_ub = np.concatenate([np.full(num_gpus, float(peak)), np.zeros(num_h)])
    return float(w_E.sum() + _solve(cost, a_ub, b_ub, a_eq, w_E, bounds))


def _solve(cost: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray, a_eq: np.ndarray, b_eq: np.ndarray,
           bounds: list[tuple[float, float | None]]) -> float:
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if result.status != 0:
        raise ValueError(f"live split reference: the linear program has no optimum ({result.message})")
    return float(result.fun)
