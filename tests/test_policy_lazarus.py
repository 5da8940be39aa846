"""Lazarus: the sequential replica formula by hand and against an exact-fraction reference; spread placement."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.policies import get_policy
from symi_sim.policies.lazarus import interleaved_gpu_order, lazarus_replica_counts

# 2 nodes x 2 GPUs x 4 slots: R = 16, G = 4; node-interleaved GPU order 0, 2, 1, 3.
CLUSTER = Cluster(num_nodes=2, gpus_per_node=2, slots_per_gpu=4)
LOAD_E = np.array([40, 10, 0, 30, 20])


def _reference_counts(load: list[int], num_slots: int, floor_replicas: int) -> list[int]:
    """The formula with exact fractions, written independently of the module."""
    order = sorted(range(len(load)), key=lambda e: (load[e], e))
    cnt = [0] * len(load)
    used = 0
    for rank, e in enumerate(order):
        rest = sum(load[x] for x in order[rank:])
        share = Fraction(load[e], rest) if rest else Fraction(1, len(load) - rank)
        cnt[e] = max(math.floor(share * (num_slots - used)), floor_replicas)
        used += cnt[e]
    return cnt


def test_hand_computed_counts() -> None:
    # ascending e2 0, e1 10, e4 20, e3 30, e0 40 (total 100):
    # e2 max(0, 1) = 1 (15 left); e1 floor(10/100*15 = 1.5) = 1 (14); e4 floor(20/90*14 = 3.11) = 3 (11);
    # e3 floor(30/70*11 = 4.71) = 4 (7); e0 floor(40/40*7) = 7.
    assert lazarus_replica_counts(LOAD_E, 16).tolist() == [7, 1, 1, 4, 3]
    # f = 2: e2 2 (14); e1 floor(1.4) -> 2 (12); e4 floor(20/90*12 = 2.67) = 2 (10); e3 floor(4.29) = 4 (6); e0 6
    assert lazarus_replica_counts(LOAD_E, 16, min_replicas=2).tolist() == [6, 2, 2, 4, 2]


def test_all_zero_layer_is_uniform() -> None:
    # 16/5 = 3.2 -> 3; 13/4 -> 3; 10/3 -> 3; 7/2 -> 3; last 4
    assert lazarus_replica_counts(np.zeros(5), 16).tolist() == [3, 3, 3, 3, 4]


@pytest.mark.parametrize("seed", range(20))
def test_counts_match_exact_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(2, 20))
    num_slots = int(rng.integers(num_experts, 4 * num_experts + 3))
    floor_replicas = int(rng.integers(1, num_slots // num_experts + 1))
    load = (rng.zipf(1.5, num_experts) * rng.integers(0, 2, num_experts)).tolist()
    expected = _reference_counts(load, num_slots, floor_replicas)
    got = lazarus_replica_counts(np.array(load, dtype=np.int64), num_slots, floor_replicas)
    assert got.tolist() == expected
    assert got.sum() == num_slots and got.min() >= floor_replicas


def test_interleaved_gpu_order() -> None:
    assert interleaved_gpu_order(2, 2).tolist() == [0, 2, 1, 3]
    assert interleaved_gpu_order(3, 2).tolist() == [0, 2, 4, 1, 3, 5]


def test_hand_computed_placement() -> None:
    # replica list [0]*7 + [1] + [2] + [3]*4 + [4]*3 dealt to GPUs 0,2,1,3,0,2,... at local slots 0,0,0,0,1,1,...
    placement = get_policy("lazarus").plan(LOAD_E[None, :], CLUSTER)
    assert placement.phy2log_LR.tolist() == [[0, 0, 2, 3, 0, 0, 3, 4, 0, 0, 3, 4, 0, 1, 3, 4]]
    np.testing.assert_allclose(placement.share_LR[0], 1.0 / placement.logcnt_LE[0][placement.phy2log_LR[0]])
    placement.validate(CLUSTER, num_layers=1)


@pytest.mark.parametrize("seed", range(5))
def test_replicas_on_distinct_gpus_and_nodes_where_possible(seed: int) -> None:
    cluster = Cluster(num_nodes=3, gpus_per_node=4, slots_per_gpu=3)   # G 12, R 36
    rng = np.random.default_rng(seed)
    load_LE = rng.zipf(1.3, (2, 10)).astype(float)
    placement = get_policy("lazarus").plan(load_LE, cluster)
    gpu_R = np.arange(36) // 3
    for layer in range(2):
        for e in range(10):
            gpus = gpu_R[placement.phy2log_LR[layer] == e]
            nodes = gpus // 4
            cnt = len(gpus)
            per_gpu = np.bincount(gpus, minlength=12)
            assert per_gpu.max() == -(-cnt // 12)        # distinct GPUs up to 12, then ceil(cnt / 12)
            assert len(set(nodes.tolist())) == min(cnt, 3)


def test_impossible_floor_raises() -> None:
    with pytest.raises(ValueError, match="min_replicas=2 x 5 experts needs 10"):
        get_policy("lazarus", min_replicas=2).plan(np.ones((1, 5)), Cluster(num_nodes=1, gpus_per_node=2,
                                                                             slots_per_gpu=4))
    with pytest.raises(ValueError, match="min_replicas"):
        get_policy("lazarus", min_replicas=0)
