"""Routing: the largest-remainder token split, slot and GPU capacity by hand, shadows, and conservation."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from symi_sim.placement import Placement
from symi_sim.routing import fair_kept_GR, route, split_tokens


def _even(phy2log_R: list[int], num_experts: int, shadow_E: list[bool] | None = None) -> Placement:
    shadow_LE = None if shadow_E is None else np.array([shadow_E])
    return Placement.even(np.array([phy2log_R]), num_experts, shadow_LE)


def test_split_even_largest_remainder_ties_to_lower_slot() -> None:
    p = _even([0, 1, 0, 0], 2)
    # 10 over 3 replicas: 3.33 each -> 3, 3, 3 and the 1 leftover to the lowest slot (0)
    assert split_tokens(np.array([[10, 5]]), p).tolist() == [[4, 5, 3, 3]]
    # 11: 3.67 each -> leftovers 2 to slots 0 and 2
    assert split_tokens(np.array([[11, 5]]), p).tolist() == [[4, 5, 4, 3]]
    assert split_tokens(np.array([[2, 0]]), p).tolist() == [[1, 0, 1, 0]]


def test_split_uneven_shares_largest_fraction_first() -> None:
    p = Placement(np.array([[0, 0, 0, 1]]), np.array([[0.5, 0.25, 0.25, 1.0]]), 2)
    # 7 tokens: 3.5, 1.75, 1.75 -> 3, 1, 1 with 2 left: fractions .75, .75 beat .5
    assert split_tokens(np.array([[7, 1]]), p).tolist() == [[3, 2, 2, 1]]
    p = Placement(np.array([[0, 0]]), np.array([[0.2, 0.8]]), 1)
    # 3 tokens: 0.6, 2.4 -> 0, 2 with 1 left: fraction .6 (slot 0) beats .4
    assert split_tokens(np.array([[3]]), p).tolist() == [[1, 2]]


def _reference_split(load_E: list[int], phy2log_R: list[int]) -> list[int]:
    """Even split with exact fractions: floor, then leftovers by (largest fraction, lowest slot)."""
    cnt = {e: phy2log_R.count(e) for e in set(phy2log_R)}
    exact = [Fraction(load_E[e], cnt[e]) for e in phy2log_R]
    out = [int(x) for x in exact]
    for e in cnt:
        slots = [p for p, x in enumerate(phy2log_R) if x == e]
        left = load_E[e] - sum(out[p] for p in slots)
        for p in sorted(slots, key=lambda p: (-(exact[p] - out[p]), p))[:left]:
            out[p] += 1
    return out


@pytest.mark.parametrize("seed", range(15))
def test_split_matches_exact_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_experts, num_slots = 4, 11
    phy2log_R = rng.permutation(np.r_[np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
    load_E = rng.integers(0, 1000, num_experts)
    got = split_tokens(load_E[None, :], _even(phy2log_R.tolist(), num_experts))
    assert got[0].tolist() == _reference_split(load_E.tolist(), phy2log_R.tolist())


def test_slot_capacity_by_hand() -> None:
    p = _even([0, 0, 0, 1], 2)   # 2 GPUs x 2 slots
    r = route(np.array([[90, 10]]), p, slots_per_gpu=2, capacity_factor=1.0)
    # A = 100, 4 slots: buffer ceil(100/4) = 25; expert 0 sends 30 to each of its 3 slots
    assert r.assigned_LR.tolist() == [[30, 30, 30, 10]]
    assert r.served_LR.tolist() == [[25, 25, 25, 10]]
    assert r.dropped_LE.tolist() == [[15, 0]]
    assert r.dropped_fraction == pytest.approx(0.15)
    assert r.gpu_load_LG.tolist() == [[60, 40]] and r.gpu_served_LG.tolist() == [[50, 35]]
    assert r.imbalance_L.tolist() == pytest.approx([1.2])
    assert r.served_imbalance_L.tolist() == pytest.approx([50 / 42.5])
    # capacity factor 0.5: buffer ceil(12.5) = 13
    r = route(np.array([[90, 10]]), p, slots_per_gpu=2, capacity_factor=0.5)
    assert r.served_LR.tolist() == [[13, 13, 13, 10]] and r.dropped_LE.tolist() == [[51, 0]]
    # A = 101: buffer ceil(25.25) = 26; expert 0's 91 split 31, 30, 30
    r = route(np.array([[91, 10]]), p, slots_per_gpu=2, capacity_factor=1.0)
    assert r.served_LR.tolist() == [[26, 26, 26, 10]] and r.dropped_LE.tolist() == [[13, 0]]
    assert r.dropped_fraction_L.tolist() == pytest.approx([13 / 101])


def test_gpu_capacity_by_hand() -> None:
    p = _even([0, 0, 0, 1], 2)
    r = route(np.array([[90, 10]]), p, slots_per_gpu=2, capacity_factor=1.0, capacity_mode="gpu")
    # budget ceil(100/2) = 50: GPU 0 gets 60 (scaled by 5/6 to 25 + 25), GPU 1 gets 40 (fits)
    assert r.served_LR.tolist() == [[25, 25, 30, 10]]
    assert r.dropped_LE.tolist() == [[10, 0]]
    assert r.gpu_served_LG.tolist() == [[50, 40]]


def test_gpu_capacity_largest_remainder_and_assignment_override() -> None:
    p = _even([0, 1, 2, 2], 3)
    # A overridden to 10: budget 5 per GPU; GPU 0 sent [7, 4]: 7*5/11 = 3.18, 4*5/11 = 1.82 -> 3, 1 + 1 to slot 1
    r = route(np.array([[7, 4, 0]]), p, slots_per_gpu=2, capacity_factor=1.0, capacity_mode="gpu",
              num_assignments_L=np.array([10]))
    assert r.served_LR.tolist() == [[3, 2, 0, 0]]
    assert r.dropped_LE.tolist() == [[4, 2, 0]]
    assert r.num_assignments_L.tolist() == [10] and r.dropped_fraction == pytest.approx(0.6)


def test_dropless() -> None:
    p = _even([0, 0, 0, 1], 2)
    r = route(np.array([[90, 10]]), p, slots_per_gpu=2, capacity_factor=None)
    assert r.served_LR.tolist() == r.assigned_LR.tolist() and r.dropped_fraction == 0.0


def test_shadowed_expert_spread_over_gpus_and_never_dropped() -> None:
    p = _even([0, 1, 0, 1, 0, 1, 0, 1], 2, shadow_E=[True, False])   # 4 GPUs x 2 slots
    r = route(np.array([[10, 8]]), p, slots_per_gpu=2, capacity_factor=0.1)
    assert r.shadow_LG.tolist() == [[3, 3, 2, 2]]
    assert r.assigned_LR.tolist() == [[0, 2, 0, 2, 0, 2, 0, 2]]
    # A = 18, 8 slots: buffer ceil(0.225) = 1 -> expert 1 drops 1 per slot, expert 0 nothing
    assert r.dropped_LE.tolist() == [[0, 4]]
    assert r.gpu_load_LG.tolist() == [[5, 5, 4, 4]] and r.gpu_served_LG.tolist() == [[4, 4, 3, 3]]


def test_empty_layer() -> None:
    r = route(np.zeros((2, 2), dtype=int), Placement.even(np.array([[0, 1], [1, 0]]), 2), slots_per_gpu=1)
    assert r.imbalance_L.tolist() == [1.0, 1.0] and r.dropped_fraction == 0.0
    assert r.dropped_fraction_L.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("mode", ["slot", "gpu"])
@pytest.mark.parametrize("seed", range(8))
def test_conservation_and_capacity_bounds(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_layers, num_experts, slots_per_gpu, num_gpus = 3, 6, 3, 4
    num_slots = slots_per_gpu * num_gpus
    phy2log_LR = np.stack([rng.permutation(np.r_[np.arange(num_experts),
                                                rng.integers(0, num_experts, num_slots - num_experts)])
                           for _ in range(num_layers)])
    raw_LR = rng.random((num_layers, num_slots)) + 0.1
    p = Placement.even(phy2log_LR, num_experts)
    total_LE = np.zeros((num_layers, num_experts))
    np.add.at(total_LE, (np.arange(num_layers)[:, None].repeat(num_slots, 1), phy2log_LR), raw_LR)
    uneven = Placement(phy2log_LR, raw_LR / np.take_along_axis(total_LE, phy2log_LR, 1), num_experts)
    load_LE = rng.zipf(1.5, (num_layers, num_experts)) * 7
    for placement in (p, uneven):
        r = route(load_LE, placement, slots_per_gpu=slots_per_gpu, capacity_factor=0.8, capacity_mode=mode)
        per_expert_LE = np.zeros_like(load_LE)
        np.add.at(per_expert_LE, (np.arange(num_layers)[:, None].repeat(num_slots, 1), phy2log_LR), r.assigned_LR)
        assert per_expert_LE.tolist() == load_LE.tolist()
        assert ((0 <= r.served_LR) & (r.served_LR <= r.assigned_LR)).all()
        assert r.dropped_LE.sum() == (r.assigned_LR - r.served_LR).sum()
        assert (r.dropped_LE <= load_LE).all()
        if mode == "slot":
            assert (r.served_LR <= np.ceil(0.8 * load_LE.sum(1) / num_slots)[:, None]).all()
        else:
            budget_L = np.ceil(0.8 * load_LE.sum(1) / num_gpus)
            demand_LG = r.assigned_LR.reshape(num_layers, num_gpus, -1).sum(2)
            # a GPU serves min(demand, budget) exactly: scaling in whole tokens loses none of the budget
            assert r.gpu_served_LG.tolist() == np.minimum(demand_LG, budget_L[:, None]).tolist()


def test_errors() -> None:
    p = _even([0, 0, 0, 1], 2)
    with pytest.raises(ValueError, match="unknown capacity mode 'node'; choices: slot, gpu"):
        route(np.array([[1, 1]]), p, slots_per_gpu=2, capacity_mode="node")
    with pytest.raises(ValueError, match="capacity factor must be a finite number > 0 or None, got 0"):
        route(np.array([[1, 1]]), p, slots_per_gpu=2, capacity_factor=0)
    with pytest.raises(ValueError, match=r"load shape \(1, 3\) does not match .* \(1, 2\)"):
        route(np.array([[1, 1, 1]]), p, slots_per_gpu=2)
    with pytest.raises(ValueError, match="4 slots do not divide into GPUs of 3 slots"):
        route(np.array([[1, 1]]), p, slots_per_gpu=3)


def test_split_conserves_tokens_with_shares_at_tolerance() -> None:
    p = Placement(np.array([[0, 0, 1]]), np.array([[0.6000001, 0.4, 1.0]]), 2)
    p.validate()   # accepted: the shares of expert 0 sum to 1 + 1e-7
    assigned = split_tokens(np.array([[10_000_000, 5]]), p)
    assert assigned[0, :2].sum() == 10_000_000   # gets 6,000,001 + 4,000,000


def test_route_rejects_negative_and_fractional_loads() -> None:
    p = Placement.even(np.array([[0, 1]]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        route(np.array([[-1, 3]]), p, slots_per_gpu=1)
    with pytest.raises(ValueError, match="whole numbers"):
        route(np.array([[1.5, 3.0]]), p, slots_per_gpu=1)
    with pytest.raises(ValueError, match="whole numbers"):
        route(np.array([[np.nan, 3.0]]), p, slots_per_gpu=1)
    assert route(np.array([[2.0, 3.0]]), p, slots_per_gpu=1, capacity_factor=None).assigned_LR.tolist() == [[2, 3]]


def test_route_rejects_infinite_capacity_factor() -> None:
    p = Placement.even(np.array([[0, 1]]), 2)
    with pytest.raises(ValueError, match="finite number > 0"):
        route(np.array([[1, 3]]), p, slots_per_gpu=1, capacity_factor=float("inf"))


def test_fair_drops_by_hand() -> None:
    # the case: 4 ranks x 40 tokens to one slot that computes 64 -> 16 each (not 40 / 24 / 0 / 0)
    assert fair_kept_GR(np.array([[40], [40], [40], [40]]), np.array([64])).tolist() == [[16], [16], [16], [16]]
    # 7 and 4 tokens, 5 served: 35/11 = 3.18 and 20/11 = 1.82 -> 3 and 1, the leftover to the larger remainder
    assert fair_kept_GR(np.array([[7], [4]]), np.array([5])).tolist() == [[3], [2]]
    # three equal remainders (2/3 each), 2 leftovers: to the lower ranks
    assert fair_kept_GR(np.array([[1], [1], [1]]), np.array([2])).tolist() == [[1], [1], [0]]
    # columns independent: a slot not short keeps everything, one that serves nothing keeps nothing; 0/3/3 sent
    # with 3 served: 0, 1.5, 1.5 -> the leftover to rank 1 (tie, lower rank), rank 2 keeps 1, rank 0 nothing
    kept = fair_kept_GR(np.array([[5, 3, 2, 0], [5, 1, 2, 3], [0, 0, 2, 3]]), np.array([10, 0, 3, 3]))
    assert kept.tolist() == [[5, 0, 1, 0], [5, 0, 1, 2], [0, 0, 1, 1]]


def _fair_by_fractions(assigned: list[int], served: int) -> list[int]:
    """Largest remainders with exact fractions, one slot (an independent reference)."""
    total = sum(assigned)
    if served == total:
        return list(assigned)
    exact = [Fraction(a * served, total) for a in assigned]
    kept = [int(x) for x in exact]
    for g in sorted(range(len(assigned)), key=lambda g: (-(exact[g] - kept[g]), g))[:served - sum(kept)]:
        kept[g] += 1
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_fair_drops_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        num_sources, num_slots = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        assigned_GR = rng.integers(0, 60, (num_sources, num_slots)) * (rng.random((num_sources, num_slots)) < 0.8)
        total_R = assigned_GR.sum(axis=0)
        served_R = np.array([rng.integers(0, t + 1) for t in total_R])
        kept_GR = fair_kept_GR(assigned_GR, served_R)
        assert kept_GR.dtype == np.int64
        np.testing.assert_array_equal(kept_GR.sum(axis=0), served_R)
        assert ((0 <= kept_GR) & (kept_GR <= assigned_GR)).all()
        ideal_GR = assigned_GR * served_R / np.maximum(total_R, 1)
        assert (np.abs(kept_GR - ideal_GR) < 1).all()
        for p in range(num_slots):
            assert kept_GR[:, p].tolist() == _fair_by_fractions(assigned_GR[:, p].tolist(), int(served_R[p]))
        np.testing.assert_array_equal(fair_kept_GR(assigned_GR.copy(), served_R.copy()), kept_GR)


def test_fair_drops_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match=r"assigned \[G, R\] and served \[R\]"):
        fair_kept_GR(np.array([[1, 2]]), np.array([1]))
    with pytest.raises(ValueError, match="0 <= served <= assigned"):
        fair_kept_GR(np.array([[1], [2]]), np.array([4]))
    with pytest.raises(ValueError, match="assigned >= 0"):
        fair_kept_GR(np.array([[-1], [2]]), np.array([0]))
