"""DeepSeek's EPLB (expert-parallelism load balancer), reimplemented in numpy and vectorised over layers.

Legend: L MoE layers, E logical experts, R physical slots (replicas), G GPUs, N nodes, Q expert groups,
        X max replicas of one expert; B rows of a batched sub-problem (layers, or layers x nodes), M items per
        row, P packs.

EPLB (github.com/deepseek-ai/EPLB, eplb.py) in three steps, all with even token shares:
  1. hierarchical only: pack the num_groups expert groups onto the N nodes (balanced packing on group loads);
  2. within each node, give every redundant slot to argmax(load / replicas) (greedy min-max replication);
  3. pack each node's replicas (weight load / replicas) onto that node's GPUs (balanced packing).
Balanced packing = items by descending weight, each into the lightest pack that still has room, every pack
taking exactly M / P items (ties: the lowest pack index). The global policy is the same with one group and one
node. EPLB's own rule picks hierarchical when num_groups % num_nodes == 0.

Same results as EPLB: arithmetic is float32 as in EPLB (loads, load / replicas, pack sums), so for integer
loads whose sums stay below 2**24 the comparisons are exact and phy2log / logcnt match EPLB's. One documented
difference: EPLB sorts pack items with torch's unstable descending sort, whose order among equal weights is an
implementation detail (for rows of more than 16 items it is not index order); we sort stably (lower index first,
which is what torch returns for rows of up to 16 items). Equal weights are mostly replicas of one expert, which
are interchangeable, so phy2log and logcnt still match and only the replica ranks inside log2phy may be permuted;
equal loads of different experts (e.g. several experts with zero load) in rows of more than 16 items can be
placed differently.

The two greedy loops below are the algorithm. At scale they are slow (a step per item or redundant slot: 1.5-4 s
at 2,048 GPUs), so from eplb_fast.ROUNDS_MIN_PACKS packs and eplb_fast.CLOSED_FORM_MIN_EXTRAS redundant slots
on, the same results come from eplb_fast's vectorised forms (about 50 ms there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.checks import check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies import eplb_fast
from symi_sim.policies.base import Policy, check_load
from symi_sim.policies.eplb_fast import descending_order, gather, inverse


def balanced_packing(weight_BM: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Items into packs of exactly M / P items each, heaviest item first into the lightest pack with room.

    weight_BM [B, M] float32 -> (pack_BM [B, M] int64 pack of each item, rank_BM [B, M] int64 its rank in the pack).
    Equal weights go in index order, equal packs lowest index first (a stable sort, then argmin).
    """
    num_rows, num_items = weight_BM.shape
    assert num_items % num_packs == 0, (num_items, num_packs)
    if num_items == num_packs:
        pack_BM = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight_BM.shape).copy()
        return pack_BM, np.zeros_like(pack_BM)
    # + 0 turns -0.0 into +0.0, whose bit pattern orders like its value
    weight_BM = np.asarray(weight_BM, dtype=np.float32) + np.float32(0)
    order_BM = descending_order(weight_BM)
    sorted_weight_BM = gather(weight_BM, order_BM)
    if num_packs >= eplb_fast.ROUNDS_MIN_PACKS:
        pack_sorted_BM, rank_sorted_BM = eplb_fast.pack_in_rounds(sorted_weight_BM, num_packs)
    else:
        pack_sorted_BM, rank_sorted_BM = _pack_item_by_item(sorted_weight_BM, num_packs)
    unsort_BM = inverse(order_BM)
    return gather(pack_sorted_BM, unsort_BM), gather(rank_sorted_BM, unsort_BM)


def _pack_item_by_item(sorted_weight_BM: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """The packing rule applied literally, one item per step (all rows at once).

    sorted_weight_BM [B, M] float32 heaviest first -> (pack_BM, rank_BM) [B, M] int64, in that sorted order.
    """
    num_rows, num_items = sorted_weight_BM.shape
    items_per_pack = num_items // num_packs
    rows_B = np.arange(num_rows)
    pack_weight_BP = np.zeros((num_rows, num_packs), dtype=np.float32)
    pack_items_BP = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_BM = np.empty((num_rows, num_items), dtype=np.int64)
    rank_BM = np.empty((num_rows, num_items), dtype=np.int64)
    for column in range(num_items):
        open_weight_BP = np.where(pack_items_BP < items_per_pack, pack_weight_BP, np.inf)
        pack_B = np.argmin(open_weight_BP, axis=1)
        pack_BM[:, column] = pack_B
        rank_BM[:, column] = pack_items_BP[rows_B, pack_B]
        pack_weight_BP[rows_B, pack_B] += sorted_weight_BM[:, column]
        pack_items_BP[rows_B, pack_B] += 1
    return pack_BM, rank_BM


def replicate_experts(weight_BM: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy min-max replication: each of the num_phy - M redundant slots goes to argmax(weight / replicas).

    weight_BM [B, M] float32 -> (phy2log_BR [B, num_phy], rank_BR [B, num_phy] replica rank in creation order,
    logcnt_BM [B, M]), all int64. Slot i < M holds item i, slot M + j the j-th redundant replica created; ties
    go to the lowest item index.
    """
    num_rows, num_log = weight_BM.shape
    assert num_phy >= num_log, (num_phy, num_log)
    # + 0 turns -0.0 into +0.0, whose bit pattern orders like its value
    weight_BM = np.asarray(weight_BM, dtype=np.float32) + np.float32(0)
    if num_phy - num_log >= eplb_fast.CLOSED_FORM_MIN_EXTRAS:
        return eplb_fast.replicate_closed_form(weight_BM, num_phy)
    return _replicate_one_by_one(weight_BM, num_phy)


def _replicate_one_by_one(weight_BM: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replication rule applied literally, one redundant slot per step (all rows at once).

    weight_BM [B, M] float32 -> (phy2log_BR, rank_BR, logcnt_BM) as replicate_experts returns them.
    """
    num_rows, num_log = weight_BM.shape
    rows_B = np.arange(num_rows)
    phy2log_BR = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log_BR[:, :num_log] = np.arange(num_log)
    rank_BR = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt_BM = np.ones((num_rows, num_log), dtype=np.int64)
    per_replica_BM = weight_BM.copy()
    for slot in range(num_log, num_phy):
        pick_B = np.argmax(per_replica_BM, axis=1)
        phy2log_BR[:, slot] = pick_B
        rank_BR[:, slot] = logcnt_BM[rows_B, pick_B]
        logcnt_BM[rows_B, pick_B] += 1
        # float32 division, as EPLB's weight / logcnt
        per_replica_BM[rows_B, pick_B] = weight_BM[rows_B, pick_B] / logcnt_BM[rows_B, pick_B].astype(np.float32)
    return phy2log_BR, rank_BR, logcnt_BM


def _rebalance_hierarchical(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                            num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's three steps. weight_LE [L, E] float32 -> (phy2log_LR [L, R], phyrank_LR [L, R] replica rank in
    creation order, logcnt_LE [L, E]), int64."""
    num_layers, num_experts = weight_LE.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    experts_per_node = num_experts // num_nodes

    # 1. groups onto nodes; "mlog" renumbers experts so that node n holds mlog ids [n*E/N, (n+1)*E/N)
    group_load_LQ = weight_LE.reshape(num_layers, num_groups, group_size).sum(axis=2, dtype=np.float32)
    group_pack_LQ, group_rank_LQ = balanced_packing(group_load_LQ, num_nodes)
    group_start_LQ = (group_pack_LQ * groups_per_node + group_rank_LQ) * group_size
    log2mlog_LE = (group_start_LQ[:, :, None] + np.arange(group_size)).reshape(num_layers, num_experts)
    mlog2log_LE = inverse(log2mlog_LE)

    # 2. replicas within each node: rows are (layer, node)
    mlog_load_BM = gather(weight_LE, mlog2log_LE).reshape(-1, experts_per_node)
    phy2mlog_BM, phyrank_BM, mlogcnt_BM = replicate_experts(mlog_load_BM, num_replicas // num_nodes)

    # 3. replicas onto the node's GPUs
    per_replica_BM = mlog_load_BM / mlogcnt_BM.astype(np.float32)
    phy_load_BM = gather(per_replica_BM, phy2mlog_BM)
    pack_BM, rank_in_pack_BM = balanced_packing(phy_load_BM, num_gpus // num_nodes)
    pphy2phy_BM = inverse(pack_BM * slots_per_gpu + rank_in_pack_BM)

    pphy2mlog_BM = gather(phy2mlog_BM, pphy2phy_BM)
    node_offset_N = np.arange(num_nodes, dtype=np.int64) * experts_per_node
    pphy2mlog_LR = (pphy2mlog_BM.reshape(num_layers, num_nodes, -1) + node_offset_N[None, :, None]).reshape(
        num_layers, num_replicas)
    phy2log_LR = gather(mlog2log_LE, pphy2mlog_LR)
    phyrank_LR = gather(phyrank_BM, pphy2phy_BM).reshape(num_layers, num_replicas)
    logcnt_LE = gather(mlogcnt_BM.reshape(num_layers, num_experts), log2mlog_LE)
    return phy2log_LR, phyrank_LR, logcnt_LE


def check_eplb_shape(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                     hierarchical: bool) -> None:
    """Raise ValueError naming the value when EPLB cannot run with these sizes."""
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        check_positive_int(value, f"EPLB: {name}")
    if num_replicas < num_experts:
        raise ValueError(f"EPLB: {num_replicas} replicas cannot hold {num_experts} experts")
    if num_gpus % num_nodes:
        raise ValueError(f"EPLB: num_gpus {num_gpus} is not a multiple of num_nodes {num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"EPLB: num_replicas {num_replicas} is not a multiple of num_gpus {num_gpus}")
    if hierarchical:
        if num_experts % num_groups:
            raise ValueError(f"EPLB: {num_experts} experts do not split into num_groups {num_groups} groups")
        if num_groups % num_nodes:
            raise ValueError(
                f"EPLB hierarchical: num_groups {num_groups} is not a multiple of num_nodes {num_nodes}")


def rebalance_experts(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, hierarchical: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point with its signature and return values.

    weight_LE [L, E] loads -> (phy2log [L, R], log2phy [L, E, X] -1 padded, logcnt [L, E]), numpy int64, where
    R = num_replicas and slot p sits on GPU p // (R / num_gpus). hierarchical None is EPLB's rule
    (num_groups % num_nodes == 0); False forces the global policy; True demands the hierarchical one.
    log2phy lists an expert's slots in replica-creation order, as EPLB does.
    """
    phy2log_LR, phyrank_LR, logcnt_LE = rebalance_slots(weight_LE, num_replicas, num_groups, num_nodes, num_gpus,
                                                        hierarchical)
    num_layers, num_experts = logcnt_LE.shape
    max_cnt = int(logcnt_LE.max())
    log2phy_LEX = np.full((num_layers, num_experts * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(log2phy_LEX, phy2log_LR * max_cnt + phyrank_LR,
                      np.broadcast_to(np.arange(num_replicas, dtype=np.int64), phy2log_LR.shape), axis=1)
    return phy2log_LR, log2phy_LEX.reshape(num_layers, num_experts, max_cnt), logcnt_LE


def rebalance_slots(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                    hierarchical: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rebalance_experts without log2phy (at 2,048 GPUs log2phy is L x E x ~R/4 int64, over 100 MB).

    Same arguments -> (phy2log_LR [L, R], phyrank_LR [L, R] each slot's replica rank in creation order,
    logcnt_LE [L, E]), int64.
    """
    load_LE = check_load(weight_LE)
    if load_LE.max() > np.finfo(np.float32).max:
        raise ValueError(f"EPLB: loads must fit in float32 (EPLB computes in float32), got {load_LE.max():g}")
    weight_LE = load_LE.astype(np.float32)
    num_experts = weight_LE.shape[1]
    if hierarchical is None:
        hierarchical = num_groups % num_nodes == 0
    check_eplb_shape(num_experts, num_replicas, num_groups, num_nodes, num_gpus, hierarchical)
    if hierarchical:
        return _rebalance_hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    return _rebalance_hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)


@dataclass
class EplbPolicy(Policy):
    """EPLB every step on the previous step's loads; even token shares.

    num_groups: expert groups (DeepSeek-V3: 8); hierarchical: None = EPLB's rule, True / False forces it.
    """

    name: ClassVar[str] = "eplb"
    num_groups: int = 1
    hierarchical: bool | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.num_groups, "eplb: num_groups")
        if self.hierarchical not in (None, True, False):
            raise ValueError(f"eplb: hierarchical must be true, false or None, got {self.hierarchical!r}")

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        phy2log_LR, _, _ = rebalance_slots(load_LE, cluster.num_slots, self.num_groups, cluster.num_nodes,
                                           cluster.num_gpus, self.hierarchical)
        return Placement.even(phy2log_LR, load_LE.shape[1])


POLICY = EplbPolicy
