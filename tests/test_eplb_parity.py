"""Our eplb policy against an independent reimplementation of DeepSeek's eplb.py (deepseek-ai/EPLB @ 57919718,
rebalance_experts: hierarchical when num_groups % num_nodes == 0, else the hierarchical function with one group on
one node), written here from the documented algorithm, one layer and one item at a time.

The reference sorts with torch, as eplb.py does. torch's sort is not stable: among equal weights in rows of more
than 16 items its order is not index order (it is for up to 16). So the claim, checked on random inputs with ties
(1-4 nodes, 1-4 GPUs per node, 8-64 experts, 1-8 groups):
  - with a stable sort in the reference, phy2log and logcnt are identical in every case;
  - with torch's default sort (eplb.py's): logcnt and the load of every slot are identical in every case, and
    phy2log is identical wherever torch's order of a packing row equals the stable one; elsewhere equal-load
    replicas of different experts trade slots.
"""

import numpy as np
import pytest

from symi_sim.policies.eplb import rebalance_experts

torch = pytest.importorskip("torch")


class Reference:
    """EPLB's three steps in plain Python over float32 numbers; `stable` picks the sort."""

    def __init__(self, stable: bool):
        self.stable = stable
        self.reordered = False  # did torch's order differ from the stable one in some packing row?
        self.longest_row = 0  # items in the longest row sorted

    def order(self, weights):
        values = torch.tensor(weights, dtype=torch.float32)
        order = torch.sort(values, descending=True, stable=self.stable).indices.tolist()
        stable = torch.sort(values, descending=True, stable=True).indices.tolist()
        self.reordered |= order != stable
        self.longest_row = max(self.longest_row, len(weights))
        return order

    def pack(self, weights, num_packs):
        """-> (pack, rank in pack) per item: heaviest first into the lightest pack with room, lowest index on ties."""
        per_pack = len(weights) // num_packs
        if per_pack == 1:
            return list(range(len(weights))), [0] * len(weights)
        pack_of, rank_of = [0] * len(weights), [0] * len(weights)
        load = [np.float32(0)] * num_packs
        items = [0] * num_packs
        for item in self.order(weights):
            open_packs = [p for p in range(num_packs) if items[p] < per_pack]
            best = min(open_packs, key=lambda p: load[p])  # min keeps the first of equal keys
            pack_of[item], rank_of[item] = best, items[best]
            load[best] = np.float32(load[best] + np.float32(weights[item]))
            items[best] += 1
        return pack_of, rank_of

    @staticmethod
    def replicate(weights, num_slots):
        """-> (expert of each slot: 0..n-1 then redundant ones in creation order, replica count per expert)."""
        weights = np.asarray(weights, dtype=np.float32)
        count = [1] * len(weights)
        slots = list(range(len(weights)))
        for _ in range(num_slots - len(weights)):
            per_replica = weights / np.asarray(count, dtype=np.float32)
            best = int(np.argmax(per_replica))  # first maximum, as torch's max(dim) returns
            slots.append(best)
            count[best] += 1
        return slots, count

    def layer(self, weights, num_slots, num_groups, num_nodes, num_gpus):
        """One layer -> (expert of each slot [R], replicas per expert [E], load of each slot [R] float32)."""
        num_experts = len(weights)
        group_size = num_experts // num_groups
        groups_per_node = num_groups // num_nodes
        gpus_per_node = num_gpus // num_nodes
        slots_per_gpu = num_slots // num_gpus
        slots_per_node = num_slots // num_nodes
        group_load = [float(np.float32(sum(weights[g * group_size:(g + 1) * group_size])))
                      for g in range(num_groups)]
        node_of_group, rank_of_group = self.pack(group_load, num_nodes)
        # node n's experts, in the order of its groups' ranks
        node_experts = [[0] * (groups_per_node * group_size) for _ in range(num_nodes)]
        for group in range(num_groups):
            for i in range(group_size):
                node_experts[node_of_group[group]][rank_of_group[group] * group_size + i] = group * group_size + i
        phy2log, slot_load = [0] * num_slots, [np.float32(0)] * num_slots
        logcnt = [0] * num_experts
        for node, experts in enumerate(node_experts):
            node_weights = [weights[e] for e in experts]
            replica_of, count = self.replicate(node_weights, slots_per_node)
            replica_load = [float(np.float32(node_weights[m]) / np.float32(count[m])) for m in replica_of]
            gpu_of, rank_of = self.pack(replica_load, gpus_per_node)
            for replica, local in enumerate(replica_of):
                slot = node * slots_per_node + gpu_of[replica] * slots_per_gpu + rank_of[replica]
                phy2log[slot] = experts[local]
                slot_load[slot] = np.float32(replica_load[replica])
            for local, expert in enumerate(experts):
                logcnt[expert] = count[local]
        return phy2log, logcnt, slot_load

    def rebalance(self, weight_LE, num_slots, num_groups, num_nodes, num_gpus):
        if num_groups % num_nodes:
            num_groups, num_nodes = 1, 1  # eplb.py's global policy
        rows = [self.layer([float(w) for w in row], num_slots, num_groups, num_nodes, num_gpus) for row in weight_LE]
        return tuple(np.array([row[i] for row in rows]) for i in range(3))


def random_case(rng):
    """Sizes in the ranges of the claim, loads with many exact ties (small integers, zeros) or few."""
    num_nodes, gpus_per_node = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    num_gpus = num_nodes * gpus_per_node
    num_groups = int(rng.integers(1, 9))
    group_size = int(rng.integers(max(1, -(-8 // num_groups)), 64 // num_groups + 1))
    num_experts = num_groups * group_size
    num_slots = num_gpus * (-(-num_experts // num_gpus) + int(rng.integers(0, 4)))
    kind = rng.integers(0, 4)
    shape = (2, num_experts)
    if kind == 0:
        load = rng.integers(0, 4, shape)
    elif kind == 1:
        load = rng.integers(0, 100, shape) * (rng.random(shape) < 0.7)
    elif kind == 2:
        load = np.round(1000 / rng.permuted(np.tile(np.arange(1.0, num_experts + 1), (2, 1)), axis=1))
    else:
        load = rng.integers(0, 1_000_000, shape)
    return load.astype(np.float64), num_slots, num_groups, num_nodes, num_gpus


CASES = [random_case(np.random.default_rng(seed)) for seed in range(120)]


def slot_load(weight_LE, phy2log_LR, logcnt_LE):
    rows = np.arange(weight_LE.shape[0])[:, None]
    return weight_LE.astype(np.float32)[rows, phy2log_LR] / logcnt_LE[rows, phy2log_LR].astype(np.float32)


def test_cases_cover_the_claimed_ranges():
    nodes = {case[3] for case in CASES}
    experts = [case[0].shape[1] for case in CASES]
    assert nodes == {1, 2, 3, 4} and {case[2] for case in CASES} == set(range(1, 9))
    assert min(experts) >= 8 and max(experts) <= 64
    assert {case[2] % case[3] == 0 for case in CASES} == {True, False}  # hierarchical and global both


def test_same_as_the_reference_with_a_stable_sort():
    for weight, *sizes in CASES:
        phy2log, _, logcnt = rebalance_experts(weight, *sizes)
        want_phy2log, want_logcnt, _ = Reference(stable=True).rebalance(weight, *sizes)
        np.testing.assert_array_equal(phy2log, want_phy2log, err_msg=str(sizes))
        np.testing.assert_array_equal(logcnt, want_logcnt, err_msg=str(sizes))


def test_against_the_reference_with_torchs_sort():
    identical = 0
    for weight, *sizes in CASES:
        phy2log, _, logcnt = rebalance_experts(weight, *sizes)
        reference = Reference(stable=False)
        want_phy2log, want_logcnt, want_slot_load = reference.rebalance(weight, *sizes)
        np.testing.assert_array_equal(logcnt, want_logcnt, err_msg=str(sizes))
        # every slot carries the same load (float32, bit for bit): only equal-load replicas trade places
        np.testing.assert_array_equal(slot_load(weight, phy2log, logcnt), want_slot_load, err_msg=str(sizes))
        if not reference.reordered:
            np.testing.assert_array_equal(phy2log, want_phy2log, err_msg=str(sizes))
        if not np.array_equal(phy2log, want_phy2log):
            # torch orders ties by index in rows of up to 16 items (its CPU sort is an insertion sort there)
            assert reference.longest_row > 16, sizes
        identical += np.array_equal(phy2log, want_phy2log)
    # the README quotes this count, measured with torch 2.13 on the CPU (ties between different experts are the rule
    # here, by design); another torch may order ties otherwise, which the checks above already allow
    if torch.__version__.startswith("2.13."):
        assert identical == 37
