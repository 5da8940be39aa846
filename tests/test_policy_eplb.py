"""eplb: DeepSeek EPLB reimplemented in numpy, checked on EPLB's README example and hand-worked cases; eplb_fast's
forms (closed-form replication, packing in rounds) against eplb's literal one-item-per-step loops."""

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.policies import eplb, eplb_fast, get_policy
from symi_sim.policies.eplb import balanced_packing, rebalance_experts, rebalance_slots, replicate_experts

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


def random_loads(rng, shape, kind):
    """Continuous loads, or loads full of exact ties (small integers, zeros, all zero)."""
    if kind == "lognormal":
        return rng.lognormal(0.0, 2.0, shape)
    if kind == "zipf":
        return 1.0 / rng.permuted(np.tile(np.arange(1.0, shape[1] + 1), (shape[0], 1)), axis=1) ** rng.uniform(0.5, 2)
    if kind == "uniform":
        return rng.random(shape)
    if kind == "small-int":
        return rng.integers(0, 4, shape).astype(float)
    if kind == "some-zero":
        return rng.lognormal(0.0, 1.0, shape) * (rng.random(shape) < 0.7)
    return np.zeros(shape)


KINDS = ("lognormal", "zipf", "uniform", "small-int", "some-zero", "all-zero")


def assert_arrays_equal(got, want):
    assert len(got) == len(want)
    for got_array, want_array in zip(got, want, strict=True):
        np.testing.assert_array_equal(got_array, want_array)


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_replication_equals_greedy(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for _ in range(40):
        num_rows, num_log = int(rng.integers(1, 6)), int(rng.integers(1, 70))
        weight = random_loads(rng, (num_rows, num_log), kind).astype(np.float32)
        num_extra = int(rng.integers(1, 400))
        fast = eplb_fast.replicate_closed_form(weight, num_log + num_extra)
        assert_arrays_equal(fast, eplb._replicate_one_by_one(weight, num_log + num_extra))


@pytest.mark.parametrize("kind", KINDS)
def test_packing_in_rounds_equals_item_by_item(kind):
    rng = np.random.default_rng(10 + KINDS.index(kind))
    for _ in range(40):
        num_rows, num_packs, per_pack = int(rng.integers(1, 6)), int(rng.integers(1, 50)), int(rng.integers(1, 9))
        weight = random_loads(rng, (num_rows, num_packs * per_pack), kind).astype(np.float32)
        order = eplb_fast.descending_order(weight)
        np.testing.assert_array_equal(order, np.argsort(-weight, axis=1, kind="stable"))
        sorted_weight = np.take_along_axis(weight, order, axis=1)
        assert_arrays_equal(eplb_fast.pack_in_rounds(sorted_weight, num_packs),
                            eplb._pack_item_by_item(sorted_weight, num_packs))


def rebalance_with(monkeypatch, fast, *args):
    """rebalance_experts with only the fast forms, or only the literal loops (the original implementation)."""
    with monkeypatch.context() as patch:
        patch.setattr(eplb_fast, "ROUNDS_MIN_PACKS", 1 if fast else 1 << 30)
        patch.setattr(eplb_fast, "CLOSED_FORM_MIN_EXTRAS", 1 if fast else 1 << 30)
        return rebalance_experts(*args)


def test_fast_forms_equal_loops_end_to_end(monkeypatch):
    rng = np.random.default_rng(21)
    for trial in range(60):
        num_nodes = int(rng.choice([1, 2, 4]))
        num_gpus = num_nodes * int(rng.choice([1, 3, 8, 20]))
        num_groups = num_nodes * int(rng.choice([1, 2]))
        num_experts = num_groups * int(rng.integers(1, 9))
        num_replicas = num_gpus * int(rng.integers(1, 6))
        if num_replicas < num_experts:
            continue
        weight = random_loads(rng, (3, num_experts), KINDS[trial % len(KINDS)])
        for hierarchical in (None, False):
            args = (weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical)
            assert_arrays_equal(rebalance_with(monkeypatch, True, *args), rebalance_with(monkeypatch, False, *args))


def test_fast_forms_equal_loops_at_2048_gpus(monkeypatch):
    # the simulator's large shape (256 experts, 2,048 GPUs x 5 slots, global), 2 of its 58 layers, Zipf loads
    rng = np.random.default_rng(5)
    weight = np.round(6e7 / rng.permuted(np.tile(np.arange(1.0, 257), (2, 1)), axis=1))
    args = (weight, 10240, 1, 256, 2048)
    phy2log, log2phy, logcnt = rebalance_with(monkeypatch, True, *args)
    assert_arrays_equal((phy2log, log2phy, logcnt), rebalance_with(monkeypatch, False, *args))
    # the policy's entry point: the same placement, with each slot's replica rank instead of log2phy
    slot_phy2log, slot_rank, slot_logcnt = rebalance_slots(*args)
    assert_arrays_equal((slot_phy2log, slot_logcnt), (phy2log, logcnt))
    np.testing.assert_array_equal(log2phy[np.arange(2)[:, None], phy2log, slot_rank], np.tile(np.arange(10240), (2, 1)))


def test_loads_must_fit_float32():
    with pytest.raises(ValueError, match="float32"):
        rebalance_experts([[1e39, 1.0]], 4, 1, 1, 2)
