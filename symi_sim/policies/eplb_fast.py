"""EPLB's two greedy loops in vectorised form, with the same results; eplb.py calls them where they are cheaper.

Legend: B rows of a batched sub-problem (layers, or layers x nodes), M items per row, P packs, N redundant
        replicas per row (R - M), K gathered indices per row; X a flattened [B, ...] array.

Replication (replicate_closed_form): the k-th redundant replica of an item bids float32(weight / k), and the
greedy takes the N highest bids, equal bids lowest item first (a D'Hondt apportionment). The counts come from a
bisection on the cut bid, the creation order (which fixes slot order and replica ranks) from one sort of the
taken bids. Packing (pack_in_rounds): the next items go one each to the lightest open packs for as long as the
one-item rule agrees, checked item by item.

Ties are broken exactly as the loops break them (equal bids: lower item, then earlier replica; equal items: lower
index; equal packs: lower index; float32 pack sums added in the same order), so the results equal the loops', with
or without exact ties (tests/test_policy_eplb.py: continuous loads and tie-heavy integer and zero loads). At 2,048
GPUs (58 x 256 experts, 10,240 slots) one rebalance takes about 50 ms instead of 1.5-4 s; the worst case of the
rounds (heavy-tailed items, several per pack, which min-max replication does not produce) is about twice the
item-by-item loop.
"""

from __future__ import annotations

import numpy as np

# Below these sizes the literal one-item-per-step loops are faster (measured crossovers; same results either way).
ROUNDS_MIN_PACKS = 16
CLOSED_FORM_MIN_EXTRAS = 128

_FLOAT32_INF_BITS = 0x7F800000


def _order_key(value: np.ndarray) -> np.ndarray:
    """Non-negative float32 [...] -> int64 [...] in the same order (IEEE bit patterns read as integers)."""
    return value.view(np.int32).astype(np.int64)


def _row_start(num_rows: int, width: int) -> np.ndarray:
    """[B, 1] offsets of each row in the flattened [B, width] array."""
    return np.arange(num_rows, dtype=np.int64)[:, None] * width


def gather(value_BM: np.ndarray, index_BK: np.ndarray) -> np.ndarray:
    """value_BM [B, M], index_BK [B, K] -> [B, K] value_BM[b, index_BK[b, k]] (np.take_along_axis on axis 1;
    flat indices are 2-3x faster)."""
    return np.take(value_BM.reshape(-1), index_BK + _row_start(*value_BM.shape))


def inverse(perm_BM: np.ndarray) -> np.ndarray:
    """perm_BM [B, M] permutations of 0..M-1 -> their inverses [B, M]."""
    num_rows, width = perm_BM.shape
    inv_X = np.empty(num_rows * width, dtype=perm_BM.dtype)
    inv_X[(perm_BM + _row_start(num_rows, width)).reshape(-1)] = np.tile(np.arange(width, dtype=perm_BM.dtype),
                                                                         num_rows)
    return inv_X.reshape(num_rows, width)


def descending_order(weight_BM: np.ndarray) -> np.ndarray:
    """weight_BM [B, M] non-negative float32 (no -0.0) -> order_BM [B, M] int64: heaviest first, ties to the lower
    index.

    The order of a stable argsort of -weight: one unique int64 key per item, (weight descending, index), whose
    low bits are the index, so a plain np.sort (3x faster than argsort, 10x faster than a stable float sort)
    yields the order."""
    num_items = weight_BM.shape[1]
    shift = max(num_items - 1, 1).bit_length()
    key_BM = ((_FLOAT32_INF_BITS - _order_key(weight_BM)) << shift) | np.arange(num_items)
    return np.sort(key_BM, axis=1) & ((1 << shift) - 1)


def pack_in_rounds(sorted_weight_BM: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """The balanced packing of eplb._pack_item_by_item, many items per step; same result.

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


def replicate_closed_form(weight_BM: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The min-max replication of eplb._replicate_one_by_one in closed form; same result.

    weight_BM [B, M] float32 >= 0 (no -0.0) -> (phy2log_BR [B, num_phy], rank_BR [B, num_phy], logcnt_BM [B, M]),
    all int64, as eplb.replicate_experts returns them.
    """
    return _replicas_in_creation_order(weight_BM, _dhondt_extra_counts(weight_BM, num_phy - weight_BM.shape[1]))


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
    """The redundant replicas per item that the greedy ends with, in closed form.

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
    """The replication's outputs from its final counts: the redundant replicas in the greedy's creation order.

    weight_BM [B, M] float32, extra_BM [B, M] int64 (equal row sums N) -> (phy2log_BR, rank_BR, logcnt_BM).
    """
    num_rows, num_log = weight_BM.shape
    num_extra = int(extra_BM[0].sum())
    extra_X = extra_BM.reshape(-1)
    item_BN = np.repeat(np.tile(np.arange(num_log), num_rows), extra_X).reshape(num_rows, num_extra)
    k_BN = (np.arange(num_rows * num_extra) - np.repeat(np.cumsum(extra_X) - extra_X, extra_X) + 1).reshape(
        num_rows, num_extra)
    bid_BN = gather(weight_BM, item_BN) / k_BN.astype(np.float32)
    # bids are laid out in (item, k) order, the greedy's order among equal bids
    created_BN = descending_order(bid_BN)
    phy2log_BR = np.empty((num_rows, num_log + num_extra), dtype=np.int64)
    phy2log_BR[:, :num_log] = np.arange(num_log)
    phy2log_BR[:, num_log:] = gather(item_BN, created_BN)
    rank_BR = np.zeros((num_rows, num_log + num_extra), dtype=np.int64)
    rank_BR[:, num_log:] = gather(k_BN, created_BN)
    return phy2log_BR, rank_BR, extra_BM + 1
