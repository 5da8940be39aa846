"""DeepSpeed's static layout and SYMI's Algorithm 1 (hand-computed counts, tie rules, contiguous placement)."""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.cluster import Cluster, load_cluster
from symi_sim.policies import get_policy
from symi_sim.policies.symi import contiguous_phy2log, symi_replica_counts

PAPER = load_cluster("paper-a100-16")   # 16 GPUs x 4 slots = 64


def _algorithm1(load: list[float], num_slots: int) -> list[int]:
    """The paper's pseudocode, one expert list at a time, in plain Python (independent reference)."""
    total = sum(load)
    goal = [x / total * num_slots if total else num_slots / len(load) for x in load]
    cnt = [int(max(g, 1.0) // 1) for g in goal]
    diff = [c - g for c, g in zip(cnt, goal, strict=True)]
    while sum(cnt) > num_slots:
        i = min((-d, e) for e, d in enumerate(diff) if cnt[e] > 1)[1]   # largest diff, lowest id on ties
        cnt[i] -= 1
        diff[i] -= 1
    while sum(cnt) < num_slots:
        i = min((d, e) for e, d in enumerate(diff))[1]
        cnt[i] += 1
        diff[i] += 1
    return cnt


# ------------------------------------------------------------------ static
def test_static_paper_layout() -> None:
    placement = get_policy("static").plan(np.ones((3, 16)), PAPER)
    assert placement.phy2log_LR.shape == (3, 64)
    assert placement.phy2log_LR[0].tolist() == list(range(16)) * 4
    assert placement.logcnt_LE.tolist() == [[4] * 16] * 3
    np.testing.assert_array_equal(placement.share_LR, 0.25)
    # the 4 replicas of every expert sit on 4 different GPUs; every GPU holds 4 distinct experts
    for e in range(16):
        assert np.unique(np.flatnonzero(placement.phy2log_LR[0] == e) // 4).size == 4
    assert all(np.unique(row).size == 4 for row in placement.phy2log_LR[0].reshape(16, 4))


def test_static_uneven_gives_first_experts_one_more() -> None:
    cluster = Cluster(num_nodes=1, gpus_per_node=5, slots_per_gpu=2)   # R = 10, E = 4
    placement = get_policy("static").plan(np.array([[0, 0, 0, 99]]), cluster)
    assert placement.phy2log_LR.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    assert placement.logcnt_LE.tolist() == [[3, 3, 2, 2]]
    np.testing.assert_allclose(placement.share_LR[0], [1 / 3, 1 / 3, 1 / 2, 1 / 2] * 2 + [1 / 3, 1 / 3])
    assert not get_policy("static").needs_popularity


# ------------------------------------------------------------------ SYMI Algorithm 1
def test_algorithm1_paper_pattern_by_hand() -> None:
    # loads [100, 50, 10, 1] x 4 (E = 16, total 644) on 64 slots: goal = load * 64 / 644 =
    # [9.9379, 4.9689, 0.9938, 0.0994]; cnt = floor(max(goal, 1)) = [9, 4, 1, 1] (60 slots);
    # diff = [-0.938, -0.969, 0.006, 0.901]; the 4 missing slots go to argmin diff, the 50s (-0.969 < -0.938):
    # experts 1, 5, 9, 13 in turn (lowest id first; each one's diff becomes 0.031 once served).
    load_LE = np.array([[100, 50, 10, 1] * 4])
    cnt = symi_replica_counts(load_LE, 64)
    assert cnt.tolist() == [[9, 5, 1, 1] * 4]
    placement = get_policy("symi").plan(load_LE, PAPER)
    expected = np.repeat(np.arange(16), [9, 5, 1, 1] * 4)
    assert placement.phy2log_LR.tolist() == [expected.tolist()]
    np.testing.assert_allclose(placement.share_LR[0], 1.0 / np.array([9, 5, 1, 1] * 4)[expected])


def test_algorithm1_removal_tie_goes_to_lowest_id() -> None:
    # loads [1, 1, 0] on 4 slots: goal [2, 2, 0], cnt [2, 2, 1] = 5 > 4, diff [0, 0, 1];
    # among cnt > 1 the diffs tie (0, 0): expert 0 gives one up.
    assert symi_replica_counts(np.array([[1.0, 1.0, 0.0]]), 4).tolist() == [[1, 2, 1]]


def test_algorithm1_addition_tie_goes_to_lowest_id() -> None:
    # uniform [1, 1, 1] on 4 slots: goal 4/3 each, cnt [1, 1, 1], diff -1/3 each: expert 0 gets the extra slot
    assert symi_replica_counts(np.array([[1.0, 1.0, 1.0]]), 4).tolist() == [[2, 1, 1]]
    # one-hot on 4 x 2: goal [8, 0, 0, 0] -> cnt [8, 1, 1, 1] (11): only expert 0 may give up slots
    assert symi_replica_counts(np.array([[5.0, 0, 0, 0]]), 8).tolist() == [[5, 1, 1, 1]]


def test_algorithm1_all_zero_layer_is_even() -> None:
    assert symi_replica_counts(np.zeros((1, 4)), 10).tolist() == [[3, 3, 2, 2]]


@pytest.mark.parametrize("seed", range(25))
def test_algorithm1_matches_plain_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(1, 24))
    num_slots = int(rng.integers(num_experts, 5 * num_experts + 1))
    load_LE = rng.zipf(1.4, (3, num_experts)) * rng.integers(0, 2, (3, num_experts))
    cnt_LE = symi_replica_counts(load_LE.astype(float), num_slots)
    for layer in range(3):
        assert cnt_LE[layer].tolist() == _algorithm1(load_LE[layer].tolist(), num_slots)
    assert (cnt_LE.sum(axis=1) == num_slots).all() and cnt_LE.min() >= 1


def test_contiguous_phy2log() -> None:
    assert contiguous_phy2log(np.array([[2, 1, 3], [1, 4, 1]])).tolist() == [[0, 0, 1, 2, 2, 2], [0, 1, 1, 1, 1, 2]]


def test_symi_layers_are_independent() -> None:
    cluster = Cluster(num_nodes=2, gpus_per_node=1, slots_per_gpu=3)   # R = 6
    placement = get_policy("symi").plan(np.array([[6, 0, 0], [0, 0, 6]]), cluster)
    assert placement.phy2log_LR.tolist() == [[0, 0, 0, 0, 1, 2], [0, 1, 2, 2, 2, 2]]
