"""eplb: DeepSeek EPLB reimplemented in numpy, checked on EPLB's README example and hand-worked cases."""

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.policies import get_policy
from symi_sim.policies.eplb import balanced_packing, rebalance_experts, replicate_experts

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def gpu_loads(weight_LE, phy2log_LR, logcnt_LE, num_gpus):
    rows = np.arange(weight_LE.shape[0])[:, None]
    per_slot = weight_LE[rows, phy2log_LR] / logcnt_LE[rows, phy2log_LR]
    return per_slot.reshape(weight_LE.shape[0], num_gpus, -1).sum(axis=2)


def test_readme_example_hierarchical():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    np.testing.assert_array_equal(phy2log, README_PHY2LOG)
    np.testing.assert_array_equal(logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
    # EPLB's own output for this input (replica ranks in creation order)
    np.testing.assert_array_equal(log2phy[0], [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1],
                                               [3, -1], [4, -1], [9, -1], [8, 10], [14, -1]])
    np.testing.assert_array_equal(log2phy[1], [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4],
                                               [0, -1], [6, 3], [7, -1], [1, -1], [5, -1]])
    # per-GPU loads worked by hand from the README placement (2 slots per GPU, even shares)
    loads = gpu_loads(README_WEIGHT, phy2log, logcnt, 8)
    np.testing.assert_allclose(loads[0], [121.5, 86.5, 125, 113, 147.5, 131.5, 156, 152])
    np.testing.assert_allclose(loads[1], [173, 179.5, 120.5, 172, 123, 152, 118.5, 117.5])
    assert loads.max(axis=1).tolist() == [156, 179.5]


def test_log2phy_logcnt_consistent_on_random_loads():
    rng = np.random.default_rng(3)
    weight = rng.integers(0, 10_000, size=(5, 32))
    phy2log, log2phy, logcnt = rebalance_experts(weight, 64, 8, 4, 16)
    assert (logcnt >= 1).all() and (logcnt.sum(axis=1) == 64).all()
    for layer in range(5):
        for expert in range(32):
            slots = log2phy[layer, expert]
            used = slots[slots >= 0]
            assert (slots[len(used):] == -1).all()
            assert sorted(used.tolist()) == np.flatnonzero(phy2log[layer] == expert).tolist()
            assert len(used) == logcnt[layer, expert]


def test_global_mode_hand_worked():
    # extra slots: 6/1 -> e0; then 6/2 = 3 ties 3/1, lowest id -> e0. Replica loads [2,3,2,1,2,2] packed
    # heaviest first into the lighter of 2 GPUs with room: GPU0 {e1, e0, e3} = 6, GPU1 {e0, e2, e0} = 6.
    phy2log, log2phy, logcnt = rebalance_experts([[6, 3, 2, 1]], 6, 1, 1, 2)
    np.testing.assert_array_equal(phy2log, [[1, 0, 3, 0, 2, 0]])
    np.testing.assert_array_equal(logcnt, [[3, 1, 1, 1]])
    np.testing.assert_array_equal(log2phy, [[[3, 1, 5], [0, -1, -1], [4, -1, -1], [2, -1, -1]]])
    # 2 groups on 2 nodes is hierarchical by EPLB's rule; hierarchical=False forces the global result
    assert not np.array_equal(rebalance_experts([[6, 3, 2, 1]], 6, 2, 2, 2)[0], phy2log)
    np.testing.assert_array_equal(rebalance_experts([[6, 3, 2, 1]], 6, 2, 2, 2, hierarchical=False)[0], phy2log)
    # hierarchical: groups {e0,e1}=9 and {e2,e3}=3 one per node; node 0 slots [e0,e1,e0], node 1 [e2,e3,e2]
    np.testing.assert_array_equal(rebalance_experts([[6, 3, 2, 1]], 6, 2, 2, 2)[0], [[0, 1, 0, 2, 3, 2]])


def test_layers_are_independent():
    rng = np.random.default_rng(7)
    weight = rng.integers(0, 500, size=(4, 16))
    together = rebalance_experts(weight, 32, 4, 2, 8)[0]
    for layer in range(4):
        np.testing.assert_array_equal(rebalance_experts(weight[layer:layer + 1], 32, 4, 2, 8)[0][0], together[layer])


def test_building_blocks():
    pack, rank = balanced_packing(np.array([[5, 1, 4, 2]], dtype=np.float32), 2)
    np.testing.assert_array_equal(pack, [[0, 0, 1, 1]])  # 5 -> p0, 4 -> p1, 2 -> p1 (4 < 5), 1 -> p0
    np.testing.assert_array_equal(rank, [[0, 1, 0, 1]])
    phy2log, rank, cnt = replicate_experts(np.array([[8, 3]], dtype=np.float32), 5)
    np.testing.assert_array_equal(phy2log, [[0, 1, 0, 0, 1]])  # 8 -> e0; 4 vs 3 -> e0; 8/3 < 3 -> e1
    np.testing.assert_array_equal(rank, [[0, 0, 1, 2, 1]])
    np.testing.assert_array_equal(cnt, [[3, 2]])


def test_policy_uses_cluster_topology():
    cluster = Cluster(num_nodes=2, gpus_per_node=4, slots_per_gpu=2)
    placement = get_policy("eplb", num_groups=4).plan(README_WEIGHT, cluster)
    np.testing.assert_array_equal(placement.phy2log_LR, README_PHY2LOG)
    placement.validate(cluster, num_layers=2)
    np.testing.assert_allclose(placement.share_LR, 1.0 / placement.logcnt_LE[np.arange(2)[:, None], README_PHY2LOG])


def test_bad_input():
    with pytest.raises(ValueError, match="num_groups 3 is not a multiple of num_nodes 2"):
        rebalance_experts(README_WEIGHT, 16, 3, 2, 8, hierarchical=True)
    with pytest.raises(ValueError, match="do not split into num_groups 5"):
        rebalance_experts(README_WEIGHT, 20, 5, 5, 10)
    with pytest.raises(ValueError, match="not a multiple of num_gpus 5"):
        rebalance_experts(README_WEIGHT, 16, 1, 1, 5)
    with pytest.raises(ValueError, match="num_groups"):
        get_policy("eplb", num_groups=0)
    with pytest.raises(ValueError, match="hierarchical"):
        get_policy("eplb", hierarchical="yes")
