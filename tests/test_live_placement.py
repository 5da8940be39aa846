"""symi-balanced:shares=live in gpu capacity mode: repeated slots go to new holdings (policies.packing.
spread_duplicates), and a live split over more holdings is never worse (symi_sim.live_shares)."""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.cluster import load_cluster
from symi_sim.live_shares import live_split
from symi_sim.placement import Placement
from symi_sim.policies import get_policy, with_context
from symi_sim.policies.packing import spread_duplicates


def holdings(phy2log_LR: np.ndarray, slots_per_gpu: int) -> set[tuple[int, int, int]]:
    """{(layer, GPU, expert)} of a placement."""
    return {(layer, slot // slots_per_gpu, int(e))
            for layer, row in enumerate(phy2log_LR) for slot, e in enumerate(row)}


def test_spread_duplicates_hand_worked() -> None:
    # GPU 0 holds expert 0 twice, GPU 1 experts 0 and 1; predicted loads 8, 6, 3: the repeated slot (slot 1) goes
    # to the expert GPU 0 lacks with the most tokens per GPU holding it: expert 1 (6 / 1) over expert 2 (3 / 1)
    phy2log = np.array([[0, 0, 0, 1, 2, 2]])
    got = spread_duplicates(phy2log, np.array([[8.0, 6.0, 3.0]]), 2)
    # then GPU 2's repeat of expert 2: expert 0 has 8 / 2 per GPU holding it, expert 1 now 6 / 2
    assert got.tolist() == [[0, 1, 0, 1, 2, 0]]
    # nothing to do: the same array back
    assert spread_duplicates(got, np.array([[8.0, 6.0, 3.0]]), 2) is got


def test_spread_duplicates_keeps_every_holding_and_fills_gpus() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        num_layers, num_gpus, slots_per_gpu = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 5))
        num_experts = int(rng.integers(1, num_gpus * slots_per_gpu + 1))
        phy2log = rng.integers(0, num_experts, (num_layers, num_gpus * slots_per_gpu))
        phy2log[:, :num_experts] = np.arange(num_experts)
        load = rng.random((num_layers, num_experts)) * 100
        got = spread_duplicates(phy2log, load, slots_per_gpu)
        assert holdings(got, slots_per_gpu) >= holdings(phy2log, slots_per_gpu)
        for row in got.reshape(num_layers, num_gpus, slots_per_gpu):
            for gpu_experts in row:   # every GPU holds as many distinct experts as it can
                assert len(set(gpu_experts.tolist())) == min(slots_per_gpu, num_experts)


def test_more_holdings_never_make_the_live_split_worse() -> None:
    rng = np.random.default_rng(9)
    for _ in range(80):
        num_gpus, slots_per_gpu = int(rng.integers(2, 6)), int(rng.integers(2, 5))
        num_experts = int(rng.integers(2, num_gpus * slots_per_gpu + 1))
        phy2log = rng.integers(0, num_experts, (1, num_gpus * slots_per_gpu))
        phy2log[0, :num_experts] = rng.permutation(num_experts)
        load = (rng.zipf(1.5, (1, num_experts)) * rng.integers(1, 50, (1, num_experts))).clip(0, 5000)
        spread = spread_duplicates(phy2log, rng.random((1, num_experts)), slots_per_gpu)
        budget = np.array([int(np.ceil(load.sum() / num_gpus))])
        for capacity_L in (None, budget):
            loads = []
            for p in (phy2log, spread):
                placement = Placement(p, np.full(p.shape, 1.0), num_experts, live_shares=True)
                x = live_split(load, placement, slots_per_gpu=slots_per_gpu, capacity_mode="gpu",
                               capacity_L=capacity_L)
                loads.append(x.reshape(num_gpus, slots_per_gpu).sum(axis=1))
            before, after = loads
            assert after.max() <= before.max()
            if capacity_L is not None:
                assert np.minimum(after, budget[0]).sum() >= np.minimum(before, budget[0]).sum()


def test_policy_spreads_repeats_only_when_asked_in_gpu_mode() -> None:
    cluster = load_cluster("paper-a100-16")
    rng = np.random.default_rng(2)
    load = rng.zipf(1.2, (3, 16)).astype(float) * 100   # a few experts with more replicas than GPUs

    def plan(options: str, mode: str) -> Placement:
        return with_context(get_policy(f"symi-balanced{options}"), capacity_mode=mode).plan(load, cluster)

    planned, spread = plan("", "gpu"), plan(":shares=live:repeats=spread", "gpu")
    assert spread.live_shares
    assert holdings(spread.phy2log_LR, 4) > holdings(planned.phy2log_LR, 4)
    np.testing.assert_allclose(np.bincount(spread.phy2log_LR[0], weights=spread.share_LR[0], minlength=16), 1.0)
    # the default keeps the plan's replicas (byte counts as planned shares'); so does slot capacity
    np.testing.assert_array_equal(plan(":shares=live", "gpu").phy2log_LR, planned.phy2log_LR)
    np.testing.assert_array_equal(plan(":shares=live:repeats=spread", "slot").phy2log_LR,
                                  plan("", "slot").phy2log_LR)
    for options in (":repeats=spread", ":shares=live:repeats=spread:packing=grouped", ":shares=live:repeats=some"):
        with pytest.raises(ValueError, match="repeats"):
            get_policy(f"symi-balanced{options}")
