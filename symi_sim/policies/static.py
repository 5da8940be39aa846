"""DeepSpeed-MoE's static placement: equal replicas per expert, never moved, tokens over capacity dropped.

Slot p holds expert p % E, so the r = R/E replicas of an expert sit on different GPUs (as DeepSpeed's
expert-parallel groups do) and every GPU holds slots_per_gpu distinct experts when E >= slots_per_gpu.
When E does not divide R, the first R % E experts get one replica more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies.base import Policy


def static_phy2log(*, num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """[L, R] DeepSpeed's layout in every layer: slot p holds expert p % E."""
    phy2log_R = np.arange(num_slots, dtype=np.int64) % num_experts
    return np.tile(phy2log_R, (num_layers, 1))


@dataclass
class StaticPolicy(Policy):
    name: ClassVar[str] = "static"
    optimizer_layout: ClassVar[str] = "group"
    needs_popularity: ClassVar[bool] = False

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        num_layers, num_experts = load_LE.shape
        phy2log_LR = static_phy2log(num_layers=num_layers, num_experts=num_experts, num_slots=cluster.num_slots)
        return Placement.even(phy2log_LR, num_experts)


POLICY = StaticPolicy
