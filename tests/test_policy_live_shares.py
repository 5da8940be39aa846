"""The `shares` option of SYMI's policies (symi, symi-balanced, oracle): "live" marks the placement the policy plans
from history so that routing splits each step's tokens from that step's own counts; other policies refuse it."""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.cluster import Cluster, load_cluster
from symi_sim.placement import Placement
from symi_sim.policies import get_policy
from symi_sim.routing import route

SYMI_POLICIES = ("symi", "symi-balanced", "oracle")
OTHER_POLICIES = ("static", "eplb", "flexmoe", "fastermoe", "lazarus")
# 1 node x 2 GPUs x 3 slots, 3 experts
SMALL = Cluster(num_nodes=1, gpus_per_node=2, slots_per_gpu=3)


@pytest.mark.parametrize("mode", ["slot", "gpu"])
@pytest.mark.parametrize("name", SYMI_POLICIES)
def test_live_keeps_the_planned_replicas_and_shares_and_marks_the_placement(name: str, mode: str) -> None:
    cluster = load_cluster("paper-a100-16")
    load_LE = np.random.default_rng(4).integers(0, 900, size=(3, 16)) ** 2   # skewed
    planned = get_policy(name, capacity_mode=mode) if name != "symi" else get_policy(name)
    live = get_policy(f"{name}:shares=live", **({"capacity_mode": mode} if name != "symi" else {}))
    a, b = planned.plan(load_LE, cluster), live.plan(load_LE, cluster)
    assert not a.live_shares and b.live_shares
    np.testing.assert_array_equal(a.phy2log_LR, b.phy2log_LR)
    np.testing.assert_array_equal(a.share_LR, b.share_LR)
    b.validate(cluster, num_layers=3)
    assert live.config()["shares"] == "live" and planned.config()["shares"] == "planned"
    # a live placement is a valid `previous`, and the next plan stays live
    assert live.plan(load_LE[::-1], cluster, previous=b).live_shares
    # and it survives the placement file
    assert Placement.from_json_dict(b.to_json_dict(cluster)).same_as(b)


def test_live_split_of_a_symi_placement_by_hand() -> None:
    # symi from history [1, 1, 4] on 6 slots: counts [1, 1, 4], contiguous: GPU 0 holds experts 0, 1, 2 and GPU 1
    # three replicas of expert 2
    live = get_policy("symi", shares="live").plan(np.array([[1, 1, 4]]), SMALL)
    planned = get_policy("symi").plan(np.array([[1, 1, 4]]), SMALL)
    assert live.phy2log_LR.tolist() == [[0, 1, 2, 2, 2, 2]]
    load_LE = np.array([[30, 10, 40]])
    # planned (even) shares: expert 2 sends 10 to each slot: GPU 0 carries 30 + 10 + 10 = 50, GPU 1 30
    # (max / mean 50 / 40); at capacity factor 1.0 in gpu mode each GPU buffers 40: 10 dropped on GPU 0
    even = route(load_LE, planned, slots_per_gpu=3, capacity_factor=1.0, capacity_mode="gpu")
    assert even.assigned_LR.tolist() == [[30, 10, 10, 10, 10, 10]]
    assert even.imbalance_L.tolist() == [1.25] and even.dropped_LE.sum() == 10
    # live: experts 0 and 1 (one GPU each) fix GPU 0 at 40; the least busiest GPU is 40, so all of expert 2 goes to
    # GPU 1, 40 over its 3 slots there as 14, 13, 13 (the extra token to the lower slot): balanced, nothing dropped
    split = route(load_LE, live, slots_per_gpu=3, capacity_factor=1.0, capacity_mode="gpu")
    assert split.assigned_LR.tolist() == [[30, 10, 0, 14, 13, 13]]
    assert split.imbalance_L.tolist() == [1.0] and split.dropped_LE.sum() == 0


@pytest.mark.parametrize("name", SYMI_POLICIES)
def test_unknown_shares_value_is_refused_naming_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match=r"^unknown shares 'dynamic'; choices: planned, live$"):
        get_policy(name, shares="dynamic")
    with pytest.raises(ValueError, match=r"^unknown shares True; choices: planned, live$"):
        get_policy(f"{name}:shares=true")   # option values parse as bool where they can


@pytest.mark.parametrize("name", OTHER_POLICIES)
def test_other_policies_do_not_take_shares(name: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['shares'\] for policy '{name}'"):
        get_policy(f"{name}:shares=live")
