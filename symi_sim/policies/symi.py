"""SYMI's replica allocation, the paper's Algorithm 1, faithfully: popularity-proportional counts, >= 1 each,
placed contiguously in (GPU, slot) order, tokens split evenly over an expert's replicas.

    goal = popularity / sum(popularity) * R;  cnt = floor(max(goal, 1));  diff = cnt - goal
    while sum(cnt) > R: i = argmax(diff) among cnt > 1;  cnt[i] -= 1; diff[i] -= 1
    while sum(cnt) < R: i = argmin(diff);                cnt[i] += 1; diff[i] += 1
    phy2log = [e repeated cnt[e] times for e in 0..E-1]

Ties in argmax/argmin go to the lowest expert id (numpy's first occurrence), which makes it deterministic.
A layer with no load at all gets the even allocation.

Option `shares` (policies.base.SHARE_MODES): "planned" (default, the paper) serves every step with the even
shares; "live" keeps the same replicas and marks the placement `live_shares`, so that each step's tokens split
over them from that step's own counts (symi_sim.live_shares: busiest GPU least, fewest drops first); the even
shares are then only a default that the live rule overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy, check_shares, with_shares


def symi_replica_counts(load_LE: np.ndarray, num_slots: int) -> np.ndarray:
    """Algorithm 1's replica counts. load_LE [L, E] -> cnt_LE [L, E] int64, rows summing to num_slots."""
    num_layers, num_experts = load_LE.shape
    total_L = load_LE.sum(axis=1, keepdims=True)
    popularity_LE = np.where(total_L > 0, load_LE / np.where(total_L > 0, total_L, 1.0), 1.0 / num_experts)
    goal_LE = popularity_LE * num_slots
    cnt_LE = np.floor(np.maximum(goal_LE, 1.0)).astype(np.int64)
    diff_LE = cnt_LE - goal_LE
    rows = np.arange(num_layers)
    # The loops run at most E times (each pass moves one replica in every layer that still needs it).
    while True:
        over_L = cnt_LE.sum(axis=1) > num_slots
        if not over_L.any():
            break
        candidates = np.where(cnt_LE > 1, diff_LE, -np.inf)
        pick = np.argmax(candidates, axis=1)
        r = rows[over_L]
        cnt_LE[r, pick[over_L]] -= 1
        diff_LE[r, pick[over_L]] -= 1
    while True:
        under_L = cnt_LE.sum(axis=1) < num_slots
        if not under_L.any():
            break
        pick = np.argmin(diff_LE, axis=1)
        r = rows[under_L]
        cnt_LE[r, pick[under_L]] += 1
        diff_LE[r, pick[under_L]] += 1
    return cnt_LE


def contiguous_phy2log(cnt_LE: np.ndarray) -> np.ndarray:
    """[L, E] replica counts -> [L, R] phy2log with expert e repeated cnt[e] times, in expert order."""
    experts = np.arange(cnt_LE.shape[1])
    return np.stack([np.repeat(experts, cnt_E) for cnt_E in cnt_LE])


@dataclass
class SymiPolicy(Policy):
    """Option: shares "planned" | "live" (module docstring)."""

    name: ClassVar[str] = "symi"
    shares: str = "planned"

    def __post_init__(self) -> None:
        check_shares(self.shares)

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        cnt_LE = symi_replica_counts(load_LE, cluster.num_slots)
        return with_shares(Placement.even(contiguous_phy2log(cnt_LE), load_LE.shape[1]), self.shares)


POLICY = SymiPolicy
