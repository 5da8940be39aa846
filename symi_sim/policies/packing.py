"""Array functions shared by the balanced policies: replica lists, packing replicas onto GPUs, token shares.

Legend: L MoE layers, E logical experts, R physical slots (= G x S), G GPUs, S slots per GPU.
Slot p sits on GPU p // S, as everywhere in symi.
"""

from __future__ import annotations

import numpy as np


def replica_experts(cnt_LE: np.ndarray) -> np.ndarray:
    """[L, E] replica counts (rows with equal sums R) -> [L, R] expert of every replica, expert-major order."""
    num_layers, num_experts = cnt_LE.shape
    num_slots = int(cnt_LE[0].sum())
    assert (cnt_LE.sum(axis=1) == num_slots).all(), cnt_LE.sum(axis=1)
    experts_LE = np.broadcast_to(np.arange(num_experts, dtype=np.int64), cnt_LE.shape)
    return np.repeat(experts_LE.ravel(), cnt_LE.ravel()).reshape(num_layers, num_slots)


def pack_rounds(item_LR: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """LPT in rounds: items by descending weight, the next G items per round, the heaviest to the lightest GPU.

    Every GPU receives exactly one item per round, so each ends with S items; ties go to the lower item index
    and the lower GPU index (stable sorts), which makes the result deterministic.
    item_LR [L, R] weights -> slot_LR [L, R]: the slot (gpu * S + round) each item goes to.
    """
    num_layers, num_items = item_LR.shape
    assert num_items % slots_per_gpu == 0, (num_items, slots_per_gpu)
    num_gpus = num_items // slots_per_gpu
    rows_L1 = np.arange(num_layers)[:, None]
    order_LR = np.argsort(-item_LR, axis=1, kind="stable")
    gpu_load_LG = np.zeros((num_layers, num_gpus))
    slot_LR = np.empty((num_layers, num_items), dtype=np.int64)
    for round_ in range(slots_per_gpu):
        items_LG = order_LR[:, round_ * num_gpus:(round_ + 1) * num_gpus]
        gpus_LG = np.argsort(gpu_load_LG, axis=1, kind="stable")
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
