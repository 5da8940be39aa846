"""DeepSeek's EPLB (expert-parallelism load balancer), reimplemented in numpy and vectorised over layers.

Legend: L MoE layers, E logical experts, R physical slots (replicas), G GPUs, N nodes, X max replicas of one expert;
        B rows of a batched sub-problem (layers, or layers x nodes), M items per row, P packs.

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

Fast, with the same results as the literal rules (which are kept here and run where they are cheaper: fewer
than _CLOSED_FORM_MIN_EXTRAS redundant slots, fewer than _ROUNDS_MIN_PACKS packs). Step 2 is in closed form:
the k-th redundant replica of an expert bids float32(load / k), and the greedy takes the R - E highest bids,
equal bids lowest expert first (a D'Hondt apportionment), so the counts come from a bisection on the cut bid
and the creation order (which fixes slot order and replica ranks) from one sort of the taken bids. Steps 1
and 3 pack in rounds: the next items go one each to the lightest open packs for as long as the one-item rule
agrees, checked item by item. Ties are broken exactly as the loops break them (equal bids: lower expert, then
earlier replica; equal items: lower index; equal packs: lower index; float32 pack sums added in the same
order), so the results equal the loops', with or without exact ties (randomized tests with continuous loads
and with tie-heavy integer and zero loads). At 2,048 GPUs (58 x 256 experts, 10,240 slots) one call takes
about 50 ms instead of 1.5-4 s; the worst case of the rounds (heavy-tailed items, several per pack, which
min-max replication does not produce) is about twice the item-by-item loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy, check_load

# Below these sizes the literal one-item-per-step loops are faster than the batched forms (same results).
_ROUNDS_MIN_PACKS = 16
_CLOSED_FORM_MIN_EXTRAS = 128
_FLOAT32_INF_BITS = 0x7F800000


def _order_key(value: np.ndarray) -> np.ndarray:
    """Non-negative float32 [...] -> int64 [...] in the same order (IEEE bit patterns read as integers)."""
    return value.view(np.int32).astype(np.int64)


def _row_start(num_rows: int, width: int) -> np.ndarray:
    """[B, 1] offsets of each row in the flattened [B, width] array."""
    return np.arange(num_rows, dtype=np.int64)[:, None] * width


def _gather(value_BM: np.ndarray, index_BK: np.ndarray) -> np.ndarray:
    """value_BM [B, M], index_BK [B, K] -> [B, K] value_BM[b, index_BK[b, k]] (np.take_along_axis on axis 1;
    flat indices are 2-3x faster)."""
    return np.take(value_BM.reshape(-1), index_BK + _row_start(*value_BM.shape))


def _inverse(perm_BM: np.ndarray) -> np.ndarray:
    """perm_BM [B, M] permutations of 0..M-1 -> their inverses [B, M]."""
    num_rows, width = perm_BM.shape
    inv_X = np.empty(num_rows * width, dtype=perm_BM.dtype)
    inv_X[(perm_BM + _row_start(num_rows, width)).reshape(-1)] = np.tile(np.arange(width, dtype=perm_BM.dtype),
                                                                         num_rows)
    return inv_X.reshape(num_rows, width)


def _descending_order(weight_BM: np.ndarray) -> np.ndarray:
    """weight_BM [B, M] non-negative float32 -> order_BM [B, M] int64: heaviest first, ties to the lower index.

    The order of a stable argsort of -weight: one unique int64 key per item, (weight descending, index), whose
    low bits are the index, so a plain np.sort (3x faster than argsort, 10x faster than a stable float sort)
    yields the order."""
    num_items = weight_BM.shape[1]
    shift = max(num_items - 1, 1).bit_length()
    key_BM = ((_FLOAT32_INF_BITS - _order_key(weight_BM)) << shift) | np.arange(num_items)
    return np.sort(key_BM, axis=1) & ((1 << shift) - 1)


def balanced_packing(weight_BM: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Items into packs of exactly M / P items each, heaviest item first into the lightest pack with room.

    weight_BM [B, M] float32 -> (pack_BM [B, M] int64 pack of each item, rank_BM [B, M] int64 its rank in the pack).
    Equal weights go in index order, equal packs lowest index first (a stable sort, then argmin).
    """
    num_rows, num_items = weight_BM.shape
    assert num_items % num_packs == 0, (num_items, num_packs)
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_BM = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight_BM.shape).copy()
        return pack_BM, np.zeros_like(pack_BM)
    # + 0 turns -0.0 into +0.0, whose bit pattern orders like its value
    weight_BM = np.asarray(weight_BM, dtype=np.float32) + np.float32(0)
    order_BM = _descending_order(weight_BM)
    sorted_weight_BM = _gather(weight_BM, order_BM)
    if num_packs < _ROUNDS_MIN_PACKS:
        pack_sorted_BM, rank_sorted_BM = _pack_item_by_item(sorted_weight_BM, num_packs)
    else:
        pack_sorted_BM, rank_sorted_BM = _pack_in_rounds(sorted_weight_BM, num_packs)
    unsort_BM = _inverse(order_BM)
    return _gather(pack_sorted_BM, unsort_BM), _gather(rank_sorted_BM, unsort_BM)


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


def _pack_in_rounds(sorted_weight_BM: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """The packing of _pack_item_by_item, many items per step; same result.

    sorted_weight_BM [B, M] float32 heaviest first -> (pack_BM, rank_BM) [B, M] int64, in that sorted order.
    A step offers the next items, in order, to the open packs from the lightest up, one each, and keeps the
    longest prefix on which that is what the one-item rule does: item i goes to the i-th lightest open pack
    unless a pack that took one of items 0..i-1 is still open and now lighter (weight + its new item). Every
    step keeps at least one item per row; with near-equal items (replicas after min-max replication) a step
    is a whole round of P items, so a 10,240-item row takes about M / P steps.
    """
    num_rows, num_items = sorted_weight_BM.shape
    items_per_pack = num_items // num_packs
    # a pack's key is (weight, pack index) in one int64: "lightest, then lowest index" becomes a plain minimum,
    # and the sorted keys carry their pack in the low bits; full packs weigh more than infinity
    shift = max(num_packs - 1, 1).bit_length()
    closed = (_FLOAT32_INF_BITS + 1) << shift
    packs_P = np.arange(num_packs)
    pack_start_B1 = _row_start(num_rows, num_packs)
    item_start_B1 = _row_start(num_rows, num_items)
    sorted_weight_X = sorted_weight_BM.reshape(-1)
    pack_weight_BP = np.zeros((num_rows, num_packs), dtype=np.float32)
    pack_items_BP = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_X = np.empty(num_rows * num_items, dtype=np.int64)
    rank_X = np.empty(num_rows * num_items, dtype=np.int64)
    done_B = np.zeros(num_rows, dtype=np.int64)
    while (done_B < num_items).any():
        key_BP = np.where(pack_items_BP < items_per_pack, _order_key(pack_weight_BP) << shift, closed) | packs_P
        lightest_key_BP = np.sort(key_BP, axis=1)
        lightest_BP = lightest_key_BP & ((1 << shift) - 1)
        flat_BP = lightest_BP + pack_start_B1
        item_BP = done_B[:, None] + packs_P
        new_weight_BP = pack_weight_BP.reshape(-1)[flat_BP] + sorted_weight_X[np.minimum(item_BP, num_items - 1)
                                                                              + item_start_B1]
        rank_BP = pack_items_BP.reshape(-1)[flat_BP]
        new_key_BP = np.where(rank_BP + 1 < items_per_pack, _order_key(new_weight_BP) << shift, closed) | lightest_BP
        keep_BP = (item_BP < num_items) & (lightest_key_BP < closed)
        keep_BP[:, 1:] &= lightest_key_BP[:, 1:] < np.minimum.accumulate(new_key_BP, axis=1)[:, :-1]
        kept_B = np.where(keep_BP.all(axis=1), num_packs, np.argmin(keep_BP, axis=1))
        kept_BP = packs_P < kept_B[:, None]
        flat_K = flat_BP[kept_BP]
        pack_weight_BP.reshape(-1)[flat_K] = new_weight_BP[kept_BP]
        pack_items_BP.reshape(-1)[flat_K] += 1
        item_K = (item_BP + item_start_B1)[kept_BP]
        pack_X[item_K] = lightest_BP[kept_BP]
        rank_X[item_K] = rank_BP[kept_BP]
        done_B += kept_B
    return pack_X.reshape(num_rows, num_items), rank_X.reshape(num_rows, num_items)


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
    num_extra = num_phy - num_log
    if num_extra < _CLOSED_FORM_MIN_EXTRAS:
        return _replicate_one_by_one(weight_BM, num_phy)
    return _replicas_in_creation_order(weight_BM, _dhondt_extra_counts(weight_BM, num_extra))


def _replicate_one_by_one(weight_BM: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """replicate_experts applied literally, one redundant slot per step (all rows at once)."""
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


def _count_bids_at_least(weight_BM: np.ndarray, bid_B: np.ndarray, cap: int) -> np.ndarray:
    """#{k >= 1 : float32(w / k) >= bid} for each item: exact up to cap, at least cap beyond it, never above.

    weight_BM [B, M] float32 >= 0, bid_B [B] float32 > 0 -> [B, M] int64.
    """
    bid_B1 = bid_B[:, None]
    ratio_BM = weight_BM.astype(np.float64) / bid_B1.astype(np.float64)
    # The count is floor(w / bid) or one more (float32 rounding of w / k), and the floor of the float64 ratio
    # overshoots the true floor by at most one: so all k <= base count, and count - base is 0, 1 or 2.
    base_BM = np.clip(np.floor(ratio_BM) - 1, 0, cap).astype(np.int64)
    first_BM = weight_BM / (base_BM + 1).astype(np.float32) >= bid_B1
    second_BM = first_BM & (weight_BM / (base_BM + 2).astype(np.float32) >= bid_B1)
    return base_BM + first_BM + second_BM


def _bits_to_float32(bits_B: np.ndarray) -> np.ndarray:
    return bits_B.astype(np.int32).view(np.float32)


def _dhondt_extra_counts(weight_BM: np.ndarray, num_extra: int) -> np.ndarray:
    """The redundant replicas per item that replicate_experts' greedy ends with, in closed form.

    weight_BM [B, M] float32 >= 0 -> extra_BM [B, M] int64, rows summing to num_extra. The greedy's k-th
    redundant replica of item m bids float32(w_m / k), non-increasing in k, and the greedy always takes the
    highest open bid, ties to the lower item: a merge of sorted lists, so it takes the num_extra highest bids
    over all (m, k), equal bids in (m, k) order (a D'Hondt apportionment). The cut bid is found by bisection
    on float32 bit patterns, each probe counting the bids at or above it in O(M).
    """
    num_rows = weight_BM.shape[0]
    # invariant: at least num_extra bids >= float(low_B), fewer >= float(high_B); bid 0.0 counts without limit
    # (every item's bids reach zero), and no bid passes the largest weight
    low_B = np.zeros(num_rows, dtype=np.int64)
    high_B = _order_key(weight_BM.max(axis=1)) + 1
    while (open_B := high_B - low_B > 1).any():
        mid_B = np.where(open_B, (low_B + high_B) // 2, 1)
        enough_B = _count_bids_at_least(weight_BM, _bits_to_float32(mid_B), num_extra).sum(axis=1) >= num_extra
        low_B = np.where(open_B & enough_B, mid_B, low_B)
        high_B = np.where(open_B & ~enough_B, mid_B, high_B)
    above_BM = _count_bids_at_least(weight_BM, _bits_to_float32(high_B), num_extra)
    left_B = num_extra - above_BM.sum(axis=1)
    # the rest go to bids equal to the cut, lowest items first; a cut of 0.0 gives them all to item 0, whose
    # zero bids never end
    at_cut_BM = _count_bids_at_least(weight_BM, _bits_to_float32(np.maximum(low_B, 1)), num_extra) - above_BM
    zero_cut_B = low_B == 0
    at_cut_BM[zero_cut_B] = 0
    at_cut_BM[zero_cut_B, 0] = left_B[zero_cut_B]
    before_BM = np.cumsum(at_cut_BM, axis=1) - at_cut_BM
    return above_BM + np.clip(left_B[:, None] - before_BM, 0, at_cut_BM)


def _replicas_in_creation_order(weight_BM: np.ndarray, extra_BM: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """replicate_experts' outputs from its final counts: the redundant replicas in the greedy's creation order.

    weight_BM [B, M] float32, extra_BM [B, M] int64 (equal row sums) -> (phy2log_BR, rank_BR, logcnt_BM).
    """
    num_rows, num_log = weight_BM.shape
    num_extra = int(extra_BM[0].sum())
    extra_X = extra_BM.reshape(-1)
    item_BN = np.repeat(np.tile(np.arange(num_log), num_rows), extra_X).reshape(num_rows, num_extra)
    k_BN = (np.arange(num_rows * num_extra) - np.repeat(np.cumsum(extra_X) - extra_X, extra_X) + 1).reshape(
        num_rows, num_extra)
    bid_BN = _gather(weight_BM, item_BN) / k_BN.astype(np.float32)
    # bids are laid out in (item, k) order, the greedy's order among equal bids
    created_BN = _descending_order(bid_BN)
    phy2log_BR = np.empty((num_rows, num_log + num_extra), dtype=np.int64)
    phy2log_BR[:, :num_log] = np.arange(num_log)
    phy2log_BR[:, num_log:] = _gather(item_BN, created_BN)
    rank_BR = np.zeros((num_rows, num_log + num_extra), dtype=np.int64)
    rank_BR[:, num_log:] = _gather(k_BN, created_BN)
    return phy2log_BR, rank_BR, extra_BM + 1


def _rebalance_hierarchical(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                            num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> phy2log_LR, phyrank_LR (replica rank in creation order), logcnt_LE."""
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
    mlog2log_LE = _inverse(log2mlog_LE)

    # 2. replicas within each node: rows are (layer, node)
    mlog_load_BM = _gather(weight_LE, mlog2log_LE).reshape(-1, experts_per_node)
    phy2mlog_BM, phyrank_BM, mlogcnt_BM = replicate_experts(mlog_load_BM, num_replicas // num_nodes)

    # 3. replicas onto the node's GPUs
    per_replica_BM = mlog_load_BM / mlogcnt_BM.astype(np.float32)
    phy_load_BM = _gather(per_replica_BM, phy2mlog_BM)
    pack_BM, rank_in_pack_BM = balanced_packing(phy_load_BM, num_gpus // num_nodes)
    pphy2phy_BM = _inverse(pack_BM * slots_per_gpu + rank_in_pack_BM)

    pphy2mlog_BM = _gather(phy2mlog_BM, pphy2phy_BM)
    node_offset_N = np.arange(num_nodes, dtype=np.int64) * experts_per_node
    pphy2mlog_LR = (pphy2mlog_BM.reshape(num_layers, num_nodes, -1) + node_offset_N[None, :, None]).reshape(
        num_layers, num_replicas)
    phy2log_LR = _gather(mlog2log_LE, pphy2mlog_LR)
    phyrank_LR = _gather(phyrank_BM, pphy2phy_BM).reshape(num_layers, num_replicas)
    logcnt_LE = _gather(mlogcnt_BM.reshape(num_layers, num_experts), log2mlog_LE)
    return phy2log_LR, phyrank_LR, logcnt_LE


def check_eplb_shape(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                     hierarchical: bool) -> None:
    """Raise ValueError naming the value when EPLB cannot run with these sizes."""
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"EPLB: {name} must be a positive integer, got {value!r}")
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
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, (int, np.integer)) \
                or self.num_groups < 1:
            raise ValueError(f"eplb: num_groups must be a positive integer, got {self.num_groups!r}")
        if self.hierarchical not in (None, True, False):
            raise ValueError(f"eplb: hierarchical must be true, false or None, got {self.hierarchical!r}")

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        phy2log_LR, _, _ = rebalance_slots(load_LE, cluster.num_slots, self.num_groups, cluster.num_nodes,
                                           cluster.num_gpus, self.hierarchical)
        return Placement.even(phy2log_LR, load_LE.shape[1])


POLICY = EplbPolicy
