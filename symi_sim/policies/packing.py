"""Array functions shared by the balanced policies: replica lists, packing replicas onto GPUs, token shares.

Legend: L MoE layers, E logical experts, R physical slots (= G x S), G GPUs, S slots per GPU.
Slot p sits on GPU p // S, as everywhere in symi.
"""

from __future__ import annotations

import numpy as np

from symi_sim.placement import slot_holdings


def replica_experts(cnt_LE: np.ndarray) -> np.ndarray:
    """[L, E] replica counts (rows with equal sums R) -> [L, R] expert of every replica, expert-major order."""
    num_layers, num_experts = cnt_LE.shape
    num_slots = int(cnt_LE[0].sum())
    assert (cnt_LE.sum(axis=1) == num_slots).all(), cnt_LE.sum(axis=1)
    experts_LE = np.broadcast_to(np.arange(num_experts, dtype=np.int64), cnt_LE.shape)
    return np.repeat(experts_LE.ravel(), cnt_LE.ravel()).reshape(num_layers, num_slots)


def pack_rounds(item_LR: np.ndarray, slots_per_gpu: int, expert_LR: np.ndarray | None = None) -> np.ndarray:
    """LPT in rounds: items by descending weight, the next G items per round, the heaviest to the lightest GPU.

    Every GPU receives exactly one item per round, so each ends with S items, one from every weight tier (the
    round); ties go to the lower item index and the lower GPU index (stable sorts), which makes the result
    deterministic. With `expert_LR` (the expert of every item; replicas of one expert have equal weights and
    adjacent indices, as replica_experts lists them) replicas of one expert are spread: an item never joins a GPU
    that already holds its expert while a GPU free in this round does not (the greedy item by item, the lightest
    such GPU first), so an expert with at most G replicas has them on distinct GPUs.
    item_LR [L, R] weights, expert_LR [L, R] int -> slot_LR [L, R]: the slot (gpu * S + round) each item goes to.
    """
    num_layers, num_items = item_LR.shape
    assert num_items % slots_per_gpu == 0, (num_items, slots_per_gpu)
    num_gpus = num_items // slots_per_gpu
    rows_L1 = np.arange(num_layers)[:, None]
    order_LR = np.argsort(-item_LR, axis=1, kind="stable")
    gpu_load_LG = np.zeros((num_layers, num_gpus))
    slot_LR = np.empty((num_layers, num_items), dtype=np.int64)
    position_G = np.arange(num_gpus)
    gpus_LG = np.empty((num_layers, num_gpus), dtype=np.int64)
    for round_ in range(slots_per_gpu):
        items_LG = order_LR[:, round_ * num_gpus:(round_ + 1) * num_gpus]
        by_load_LG = np.argsort(gpu_load_LG, axis=1, kind="stable")
        if expert_LR is not None and round_ > 0:
            # Equal-weight replicas of one expert are adjacent in the stable order, so only the expert straddling
            # the round boundary can already sit on a GPU, on the GPUs of the previous round's tail (if it began
            # earlier still, it filled that whole round). Its items head this round: the first num_head of them
            # take the lightest GPUs not holding it, the rest of the round the remaining GPUs by load.
            head_L1 = expert_LR[rows_L1, items_LG[:, :1]]
            previous_LG = expert_LR[rows_L1, order_LR[:, (round_ - 1) * num_gpus:round_ * num_gpus]] == head_L1
            holds_LG = np.zeros((num_layers, num_gpus), dtype=bool)
            holds_LG[rows_L1, gpus_LG] = previous_LG
            num_head_L1 = (expert_LR[rows_L1, items_LG] == head_L1).sum(axis=1, keepdims=True)
            num_head_L1 *= holds_LG.any(axis=1, keepdims=True)
            rank_LG = np.empty_like(by_load_LG)
            rank_LG[rows_L1, by_load_LG] = position_G
            head_order_LG = np.argsort(holds_LG * num_gpus + rank_LG, axis=1, kind="stable")
            taken_LG = np.zeros((num_layers, num_gpus), dtype=bool)
            taken_LG[rows_L1, head_order_LG] = position_G < num_head_L1
            rest_order_LG = np.argsort(taken_LG * num_gpus + rank_LG, axis=1, kind="stable")
            by_load_LG = np.where(
                position_G < num_head_L1, head_order_LG,
                np.take_along_axis(rest_order_LG, np.maximum(position_G - num_head_L1, 0), axis=1))
        gpus_LG = by_load_LG
        slot_LR[rows_L1, items_LG] = gpus_LG * slots_per_gpu + round_
        gpu_load_LG[rows_L1, gpus_LG] += item_LR[rows_L1, items_LG]
    return slot_LR


def balance_shares(phy2log_LR: np.ndarray, load_LE: np.ndarray, slots_per_gpu: int, num_iters: int) -> np.ndarray:
    """Uneven token shares that even out GPU loads, by projected diffusion from the even split.

    Each pass moves every replicated expert's tokens toward its least-loaded GPUs:
        x_p += a_e * (mean of L_g over e's replicas - L_g(p)),  then x >= 0 and each expert's x sums to its load,
    where x_p = tokens of slot p, L_g = tokens on GPU g, and a_e = 1 / (most replicated slots on one of e's
    GPUs), small enough that GPUs pulled by several experts at once do not overshoot.
    phy2log_LR [L, R], load_LE [L, E] -> share_LR [L, R] (each expert's shares sum to 1; even for zero load).
    """
    num_layers, num_slots = phy2log_LR.shape
    num_experts = load_LE.shape[1]
    num_gpus = num_slots // slots_per_gpu
    group_LR = np.arange(num_layers)[:, None] * num_experts + phy2log_LR
    group_R = group_LR.ravel()
    num_groups = num_layers * num_experts
    cnt_LR = np.bincount(group_R, minlength=num_groups)[group_LR]
    load_LR = load_LE.ravel()[group_LR]
    even_LR = 1.0 / cnt_LR
    replicated_LR = cnt_LR > 1
    if num_iters == 0 or not replicated_LR.any():
        return even_LR
    replicated_per_gpu_LG = replicated_LR.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2)
    crowd_LR = np.repeat(replicated_per_gpu_LG, slots_per_gpu, axis=1)
    crowd_E = np.zeros(num_groups, dtype=np.int64)
    np.maximum.at(crowd_E, group_R, crowd_LR.ravel())
    step_LR = np.where(replicated_LR, 1.0 / np.maximum(crowd_E[group_LR], 1), 0.0)
    x_LR = load_LR * even_LR
    for _ in range(num_iters):
        gpu_LR = np.repeat(x_LR.reshape(num_layers, num_gpus, slots_per_gpu).sum(axis=2), slots_per_gpu, axis=1)
        mean_E = np.bincount(group_R, weights=gpu_LR.ravel(), minlength=num_groups)
        x_LR = np.maximum(x_LR + step_LR * (mean_E[group_LR] / cnt_LR - gpu_LR), 0.0)
        total_E = np.bincount(group_R, weights=x_LR.ravel(), minlength=num_groups)
        x_LR = x_LR * (load_LR / np.where(total_E > 0, total_E, 1.0)[group_LR])
    return np.where(load_LR > 0, x_LR / np.where(load_LR > 0, load_LR, 1.0), even_LR)


def pack_grouped(cnt_LE: np.ndarray, weight_LE: np.ndarray, slots_per_gpu: int, num_nodes: int) -> np.ndarray:
    """Few distinct (expert, GPU) holdings: replicas of an expert kept together, singles balanced by LPT.

    SYMI's per-step expert traffic (gradient collection, weight send-out; costs.expert_state_bytes) is one transfer
    of X / G per holding and owner: a node's NICs carry its own holdings out and all other holdings in, so a step
    costs max((G - gpn) x the most holdings on a node, gpn x (all holdings - the fewest on a node)) x X / G. With one
    GPU per node the busiest GPU's holdings count (G - 1 times), so `_alias_tape` bounds them; with several GPUs per
    node GPUs of few and of many holdings share a node and even out, so the total counts and `_grouped_tape`
    minimises it. Both fill GPUs one after another (a tape of S slots per GPU); the slots they leave to experts with
    a single replica (and to a lone last replica) are then filled by descending weight, LPT in rounds
    (`_place_singles`): which such expert takes which slot does not change the holdings. With several GPUs per
    node the GPUs are dealt to nodes by holdings (the k-th fewest to node k % N), so node totals come out even.
    cnt_LE [L, E] replica counts (rows summing to R = G x S), weight_LE [L, E] predicted load of one replica
    -> phy2log_LR [L, R].
    """
    num_layers, num_experts = cnt_LE.shape
    num_slots = int(cnt_LE[0].sum())
    assert num_slots % slots_per_gpu == 0 and (num_slots // slots_per_gpu) % num_nodes == 0, (num_slots, num_nodes)
    num_gpus = num_slots // slots_per_gpu
    gpus_per_node = num_gpus // num_nodes
    if gpus_per_node == 1:
        tape_LR, pool_LE = _alias_tape(cnt_LE, slots_per_gpu)
    else:
        tape_LR, pool_LE = _grouped_tape(cnt_LE, slots_per_gpu)
    bins_LGS = tape_LR.reshape(num_layers, num_gpus, slots_per_gpu)
    _place_singles(bins_LGS, pool_LE, weight_LE)
    if gpus_per_node == 1:
        return bins_LGS.reshape(num_layers, num_slots)
    ordered_LGS = np.sort(bins_LGS, axis=2)
    holdings_LG = 1 + (ordered_LGS[:, :, 1:] != ordered_LGS[:, :, :-1]).sum(axis=2)
    rank_LG = np.argsort(holdings_LG, axis=1, kind="stable")
    gpu_G = np.arange(num_gpus)
    target_G = (gpu_G % num_nodes) * gpus_per_node + gpu_G // num_nodes
    placed_LGS = np.empty_like(bins_LGS)
    placed_LGS[np.arange(num_layers)[:, None], target_G] = np.take_along_axis(bins_LGS, rank_LG[:, :, None], axis=1)
    return placed_LGS.reshape(num_layers, num_slots)


def _alias_tape(cnt_LE: np.ndarray, slots_per_gpu: int) -> tuple[np.ndarray, np.ndarray]:
    """GPUs filled one by one, an extension of Walker's alias method; few holdings on the busiest GPU.

    With n experts still to place and m GPUs left, a GPU first takes ceil(n / m) - 1 whole experts among those with
    the fewest replicas left (experts with one replica first), then fills its other slots from the expert with the
    most replicas left (lowest id on ties), the next one only if that runs out. While n <= m a GPU is filled by
    one hot expert alone; once n > m each GPU finishes about n / m experts. With E <= G + 1 every GPU holds at most
    2 experts (the largest expert left always covers the slots a small one leaves) and there are at most E + G - 1
    holdings; with E > G about E / G + 1 per GPU.
    cnt_LE [L, E] -> (tape_LR [L, R]: expert of every slot, -1 where a pooled expert goes; pool_LE [L, E] bool:
    the experts with one replica).
    """
    num_layers, num_experts = cnt_LE.shape
    num_slots = int(cnt_LE[0].sum())
    num_gpus = num_slots // slots_per_gpu
    rows_L = np.arange(num_layers)
    pool_LE = cnt_LE == 1
    rem_LE = np.where(pool_LE, 0, cnt_LE).astype(np.int64)
    pool_L = pool_LE.sum(axis=1)
    left_L = (rem_LE > 0).sum(axis=1) + pool_L
    no_L = np.full(num_layers, -1, dtype=np.int64)
    piece_expert, piece_len = [], []
    for gpu in range(num_gpus):
        need_L = -(-left_L // (num_gpus - gpu)) - 1
        # pooled experts (one replica) have the fewest replicas left: they go first
        take_L = np.minimum(need_L, pool_L)
        piece_expert.append(no_L)
        piece_len.append(take_L)
        pool_L = pool_L - take_L
        left_L = left_L - take_L
        need_L = need_L - take_L
        free_L = slots_per_gpu - take_L
        while (need_L > 0).any():
            expert_L = np.argmin(np.where(rem_LE > 0, rem_LE, num_slots + 1), axis=1)
            take_L = np.where(need_L > 0, rem_LE[rows_L, expert_L], 0)
            piece_expert.append(expert_L)
            piece_len.append(take_L)
            rem_LE[rows_L, expert_L] -= take_L
            free_L = free_L - take_L
            left_L = left_L - (take_L > 0)
            need_L = np.maximum(need_L - 1, 0)
        while free_L.any():
            expert_L = np.argmax(rem_LE, axis=1)
            have_L = rem_LE[rows_L, expert_L]
            take_L = np.minimum(have_L, free_L)
            piece_expert.append(expert_L)
            piece_len.append(take_L)
            rem_LE[rows_L, expert_L] -= take_L
            left_L = left_L - ((take_L == have_L) & (take_L > 0))
            # no replicated expert left: pooled experts fill the rest of the GPU
            pooled_L = np.where(have_L == 0, free_L, 0)
            piece_expert.append(no_L)
            piece_len.append(pooled_L)
            pool_L = pool_L - pooled_L
            left_L = left_L - pooled_L
            free_L = free_L - take_L - pooled_L
    assert not rem_LE.any() and not pool_L.any()
    tape_R = np.repeat(np.stack(piece_expert, axis=1).ravel(), np.stack(piece_len, axis=1).ravel())
    return tape_R.reshape(num_layers, num_slots), pool_LE


def _grouped_tape(cnt_LE: np.ndarray, slots_per_gpu: int) -> tuple[np.ndarray, np.ndarray]:
    """Fewest holdings in total: every expert on ceil(count / S) GPUs where the singles allow it.

    An expert with count c = q S + r fills q GPUs alone; a last lone replica (r = 1) joins the singles' pool; the
    other remainders (2 <= r < S), by descending r (lowest id on ties), each take a GPU with S - r pooled slots as
    long as the pool lasts (largest r first: they need the fewest), and the rest follow back to back, in the same
    order, an expert split only where a GPU boundary falls inside it; the pool fills the slots left.
    cnt_LE [L, E] -> (tape_LR [L, R]: expert of every slot, -1 where a pooled expert goes; pool_LE [L, E] bool).
    """
    num_layers, num_experts = cnt_LE.shape
    num_slots = int(cnt_LE[0].sum())
    s = slots_per_gpu
    full_LE, part_LE = np.divmod(cnt_LE, s)
    pool_LE = (cnt_LE == 1) | ((cnt_LE > 1) & (part_LE == 1))
    part_LE = np.where(part_LE >= 2, part_LE, 0)
    pure_start_LE = s * (np.cumsum(full_LE, axis=1) - full_LE)
    pure_end_L = s * full_LE.sum(axis=1)
    order_LE = np.argsort(-part_LE, axis=1, kind="stable")
    part_sorted_LE = np.take_along_axis(part_LE, order_LE, axis=1)
    gap_sorted_LE = np.where(part_sorted_LE > 0, s - part_sorted_LE, 0)
    paired_sorted_LE = (np.cumsum(gap_sorted_LE, axis=1) <= pool_LE.sum(axis=1, keepdims=True)) & (part_sorted_LE > 0)
    num_paired_L1 = paired_sorted_LE.sum(axis=1, keepdims=True)
    rank_E = np.arange(num_experts)
    tail_sorted_LE = np.where(paired_sorted_LE, 0, part_sorted_LE)
    start_sorted_LE = pure_end_L[:, None] + np.where(
        paired_sorted_LE, s * rank_E, s * num_paired_L1 + np.cumsum(tail_sorted_LE, axis=1) - tail_sorted_LE)
    part_start_LE = np.empty_like(start_sorted_LE)
    np.put_along_axis(part_start_LE, order_LE, start_sorted_LE, axis=1)
    # replica j of expert e: the j-th of its pure slots, then of its remainder
    expert_LR = replica_experts(cnt_LE)
    rows_L1 = np.arange(num_layers)[:, None]
    first_LE = np.cumsum(cnt_LE, axis=1) - cnt_LE
    j_LR = np.arange(num_slots) - first_LE[rows_L1, expert_LR]
    num_pure_LR = s * full_LE[rows_L1, expert_LR]
    position_LR = np.where(j_LR < num_pure_LR, pure_start_LE[rows_L1, expert_LR] + j_LR,
                           part_start_LE[rows_L1, expert_LR] + j_LR - num_pure_LR)
    placed_LR = (j_LR < num_pure_LR) | (part_LE[rows_L1, expert_LR] > 0)
    tape_LR = np.full((num_layers, num_slots), -1, dtype=np.int64)
    layer_X, replica_X = np.nonzero(placed_LR)
    tape_LR[layer_X, position_LR[layer_X, replica_X]] = expert_LR[layer_X, replica_X]
    return tape_LR, pool_LE


def _place_singles(bins_LGS: np.ndarray, single_LE: np.ndarray, weight_LE: np.ndarray) -> None:
    """Fill the -1 slots of bins_LGS [L, G, S] (in place) with the pooled experts single_LE [L, E], one slot each
    (their count matches), LPT in rounds.

    Round j serves the GPUs with more than j single slots: the heaviest singles left, the heaviest to the GPU
    lightest so far (stable sorts: ties to the lower expert id and the lower GPU).
    """
    num_layers, num_gpus, slots_per_gpu = bins_LGS.shape
    rows_L1 = np.arange(num_layers)[:, None]
    num_singles_L = single_LE.sum(axis=1)
    if not num_singles_L.any():
        return
    singles_LE = np.argsort(np.where(single_LE, -weight_LE, np.inf), axis=1, kind="stable")
    held_LGS = bins_LGS >= 0
    load_LG = np.where(held_LGS, weight_LE[rows_L1[:, :, None], np.maximum(bins_LGS, 0)], 0.0).sum(axis=2)
    open_LG = (~held_LGS).sum(axis=2)
    # the free slots of each GPU, in slot order
    free_slot_LGS = np.argsort(held_LGS, axis=2, kind="stable")
    position_G = np.arange(num_gpus)
    next_L1 = np.zeros((num_layers, 1), dtype=np.int64)
    for round_ in range(slots_per_gpu):
        eligible_LG = open_LG > round_
        if not eligible_LG.any():
            break
        by_load_LG = np.argsort(np.where(eligible_LG, load_LG, np.inf), axis=1, kind="stable")
        use_LG = position_G < eligible_LG.sum(axis=1, keepdims=True)
        index_LG = np.minimum(next_L1 + position_G, single_LE.shape[1] - 1)
        expert_LG = np.take_along_axis(singles_LE, index_LG, axis=1)
        layer_X, rank_X = np.nonzero(use_LG)
        gpu_X = by_load_LG[layer_X, rank_X]
        bins_LGS[layer_X, gpu_X, free_slot_LGS[layer_X, gpu_X, round_]] = expert_LG[layer_X, rank_X]
        load_LG[layer_X, gpu_X] += weight_LE[layer_X, expert_LG[layer_X, rank_X]]
        next_L1 += use_LG.sum(axis=1, keepdims=True)


def spread_duplicates(phy2log_LR: np.ndarray, load_LE: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Every slot that repeats an expert already held on its GPU (in a lower slot) re-pointed to the expert, among
    those its GPU does not hold, with the most predicted tokens per GPU holding it (ties to the lower id; one slot
    per layer at a time, so each choice sees the holdings the earlier ones made). [L, R] int, [L, E] -> [L, R].

    The result holds every (expert, GPU) pair the input held, and more: under live shares with one budget per GPU
    (gpu capacity mode, dropless) a split can route an expert's tokens to any GPU holding it whatever its slots
    there, so a repeated slot adds nothing, and a new holding can only lower the busiest GPU and the drops.
    Without a repeated slot the input itself comes back (so a caller can tell that nothing changed).
    """
    num_layers, num_slots = phy2log_LR.shape
    num_gpus = num_slots // slots_per_gpu
    expert_LGS = phy2log_LR.reshape(num_layers, num_gpus, slots_per_gpu).copy()
    repeat_LGS = slot_holdings(phy2log_LR, slots_per_gpu)[1] > 0
    if not repeat_LGS.any():
        return phy2log_LR
    held_LGE = np.zeros((num_layers, num_gpus, load_LE.shape[1]), dtype=bool)
    rows_L11 = np.arange(num_layers)[:, None, None]
    held_LGE[rows_L11, np.arange(num_gpus)[None, :, None], expert_LGS] = True
    num_gpus_LE = held_LGE.sum(axis=1)
    layer_D, gpu_D, slot_D = np.nonzero(repeat_LGS)
    turn_D = np.arange(layer_D.size) - np.searchsorted(layer_D, layer_D)
    for turn in range(int(turn_D.max()) + 1):
        layer_T, gpu_T, slot_T = layer_D[turn_D == turn], gpu_D[turn_D == turn], slot_D[turn_D == turn]
        per_gpu_TE = np.where(held_LGE[layer_T, gpu_T], -np.inf, load_LE[layer_T] / num_gpus_LE[layer_T])
        expert_T = np.argmax(per_gpu_TE, axis=1)
        new_T = np.isfinite(per_gpu_TE[np.arange(layer_T.size), expert_T])   # a GPU holding every expert keeps it
        layer_T, gpu_T, slot_T, expert_T = layer_T[new_T], gpu_T[new_T], slot_T[new_T], expert_T[new_T]
        expert_LGS[layer_T, gpu_T, slot_T] = expert_T
        held_LGE[layer_T, gpu_T, expert_T] = True
        num_gpus_LE[layer_T, expert_T] += 1
    return expert_LGS.reshape(num_layers, num_slots)
