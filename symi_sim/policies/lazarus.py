"""Lazarus's replica allocation: load-proportional counts with a fault-tolerance floor, spread over GPUs and nodes.

Legend: L MoE layers, E logical experts, R physical slots (= N*c: N GPUs x c slots), G GPUs.

Counts, per layer, experts taken in ascending load order (ties: lower expert id first), f = min_replicas:

    r_e = max(floor(t_e / sum_{e' >= e} t_e' * (R - sum_{e' < e} r_e')), f)

Each step re-divides the slots still free among the experts still waiting, so the slots that flooring leaves
over are handed on to the hotter experts, and the hottest expert (last) takes exactly what is left: the counts
always sum to R, no separate leftover pass is needed. An all-zero layer is treated as uniformly loaded.
R >= f * E is required.

Placement: the replica list (expert 0's replicas, then expert 1's, ...) is dealt to GPUs in a node-interleaved
round robin (GPU 0 of node 0, GPU 0 of node 1, ..., GPU 1 of node 0, ...), so an expert with r_e <= N replicas
lands on r_e different nodes and one with r_e <= G on r_e different GPUs; beyond that each GPU gets
floor or ceil of r_e / G of them.

Shares are even. Lazarus's own dispatch is capacity-aware (each source GPU keeps min(share, local tokens) on a
local replica and spreads the rest in proportion to leftover capacity), which depends on where tokens come from;
a placement has no source ranks, so that dispatch is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.checks import check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy


def lazarus_replica_counts(load_E: np.ndarray, num_slots: int, min_replicas: int = 1) -> np.ndarray:
    """Lazarus's sequential allocation. load_E [E] -> cnt_E [E] int64 summing to num_slots."""
    num_experts = load_E.shape[0]
    if min_replicas * num_experts > num_slots:
        raise ValueError(
            f"lazarus: min_replicas={min_replicas} x {num_experts} experts needs {min_replicas * num_experts} "
            f"slots, only {num_slots} available"
        )
    order_E = np.argsort(load_E, kind="stable")
    sorted_E = load_E[order_E].astype(np.float64)
    suffix_E = np.cumsum(sorted_E[::-1])[::-1]   # sum of t_e' over e' >= e, in sorted order
    cnt_E = np.zeros(num_experts, dtype=np.int64)
    remaining_slots = num_slots
    for rank, expert in enumerate(order_E):
        num_waiting = num_experts - rank
        # t * S / T (not t / T * S) keeps the quotient exact for integer counts, so floor() is not fooled.
        if suffix_E[rank] > 0:
            goal = sorted_E[rank] * remaining_slots / suffix_E[rank]
        else:
            goal = remaining_slots / num_waiting
        cnt = remaining_slots if num_waiting == 1 else max(int(np.floor(goal)), min_replicas)
        cnt_E[expert] = cnt
        remaining_slots -= cnt
    assert cnt_E.sum() == num_slots and cnt_E.min() >= min_replicas, cnt_E
    return cnt_E


def interleaved_gpu_order(num_nodes: int, gpus_per_node: int) -> np.ndarray:
    """[G] GPUs ordered GPU 0 of every node first, then GPU 1 of every node, ..."""
    return (np.arange(num_nodes)[None, :] * gpus_per_node + np.arange(gpus_per_node)[:, None]).ravel()


def spread_phy2log(cnt_E: np.ndarray, cluster: Cluster) -> np.ndarray:
    """[E] replica counts -> phy2log_R [R], replicas dealt round robin over node-interleaved GPUs."""
    num_gpus, slots_per_gpu = cluster.num_gpus, cluster.slots_per_gpu
    replicas_K = np.repeat(np.arange(cnt_E.shape[0]), cnt_E)
    position_K = np.arange(replicas_K.shape[0])
    gpu_K = interleaved_gpu_order(cluster.num_nodes, cluster.gpus_per_node)[position_K % num_gpus]
    slot_K = gpu_K * slots_per_gpu + position_K // num_gpus
    phy2log_R = np.empty(cluster.num_slots, dtype=np.int64)
    phy2log_R[slot_K] = replicas_K
    return phy2log_R


@dataclass
class LazarusPolicy(Policy):
    name: ClassVar[str] = "lazarus"
    min_replicas: int = 1

    def __post_init__(self) -> None:
        check_positive_int(self.min_replicas, "lazarus: min_replicas")

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        phy2log_LR = np.stack([
            spread_phy2log(lazarus_replica_counts(load_E, cluster.num_slots, self.min_replicas), cluster)
            for load_E in load_LE
        ])
        return Placement.even(phy2log_LR, load_LE.shape[1])


POLICY = LazarusPolicy
