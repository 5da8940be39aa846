"""The policy contract shared by the simulator and the executor (numpy only).

    policy = get_policy("symi", **config)
    placement = policy.plan(load_LE, cluster, previous=placement_or_None)

Legend: L MoE layers, E logical experts, R physical slots, G GPUs.

Class attributes tell a driver (simulator, replay, executor) what a plan costs and when to ask for one:
  rebalance_every    ask for a new plan only every that many steps (keep the previous placement otherwise)
  optimizer_layout   how the policy's system keeps the experts' optimizer state: "sharded" (SYMI: 1/G of every
                     expert on every GPU, never moved), "group" (DeepSpeed: ZeRO-1 sharded within each expert's
                     replica group) or "replica" (FlexMoE: every replica holds its expert's full state)
  optimizer_coupled  (derived) moving a replica also moves its optimizer state: the "replica" layout
  uses_current_load  plans on the loads of the very step it serves (the oracle), not the previous ones
  needs_popularity   the policy needs the per-iteration popularity all-reduce
  shadows_experts    its placements may shadow experts (FasterMoE: weights broadcast, tokens computed locally)

SYMI's policies (symi, symi-balanced, oracle) take `shares` (SHARE_MODES): "planned" (default), every step served
by a placement splits its experts' tokens by the placement's shares; "live", the placement (replicas from history,
as planned) is marked `live_shares` and every step's tokens split over its replicas from that step's own counts
(symi_sim.live_shares, applied by symi_sim.routing.route wherever the placement is routed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from symi_sim.checks import check_choice
from symi_sim.cluster import Cluster
from symi_sim.placement import SHARE_MODES, Placement

OPTIMIZER_LAYOUTS = ("sharded", "group", "replica")


@dataclass
class Policy:
    """A replica-allocation policy; the class attributes are described in the module docstring."""

    name: ClassVar[str] = "policy"
    optimizer_layout: ClassVar[str] = "sharded"
    uses_current_load: ClassVar[bool] = False
    needs_popularity: ClassVar[bool] = True
    shadows_experts: ClassVar[bool] = False
    rebalance_every: ClassVar[int] = 1  # a policy with a period makes it a dataclass field instead

    @property
    def optimizer_coupled(self) -> bool:
        return self.optimizer_layout == "replica"

    def plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None = None) -> Placement:
        """Placement for the next step from the popularity `load_LE` [L, E] (token counts or averages)."""
        load_LE = check_load(load_LE)
        cluster.check_experts(load_LE.shape[1])
        if previous is not None:
            previous.validate(cluster, num_layers=load_LE.shape[0])
            if previous.num_experts != load_LE.shape[1]:
                raise ValueError(f"previous placement has {previous.num_experts} experts, load has {load_LE.shape[1]}")
        placement = self._plan(load_LE, cluster, previous)
        return placement

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        raise NotImplementedError

    def config(self) -> dict[str, object]:
        """The policy's name and options (what a result table or placement file records)."""
        return {"name": self.name, **dataclasses.asdict(self)}


def check_shares(shares: str) -> str:
    """A policy's `shares` option: one of SHARE_MODES, else one ValueError naming the option and its choices."""
    return check_choice(shares, "shares", SHARE_MODES)


def with_shares(placement: Placement, shares: str) -> Placement:
    """`placement` as served under `shares`: marked live_shares for "live", unchanged for "planned"."""
    if shares == "planned":
        return placement
    return Placement(placement.phy2log_LR, placement.share_LR, placement.num_experts, placement.shadow_LE,
                     live_shares=True)


def check_load(load_LE: np.ndarray) -> np.ndarray:
    """Validate a popularity matrix; return it as float64 [L, E]."""
    load = np.asarray(load_LE)
    if load.ndim != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        raise ValueError(f"load must be a non-empty 2-D array [layers, experts], got shape {load.shape}")
    if not np.issubdtype(load.dtype, np.number) or np.issubdtype(load.dtype, np.complexfloating):
        raise ValueError(f"load must be numeric, got dtype {load.dtype}")
    load = load.astype(np.float64, copy=False)
    if not np.all(np.isfinite(load)):
        raise ValueError("load holds NaN or infinite values")
    if (load < 0).any():
        layer, expert = np.argwhere(load < 0)[0]
        raise ValueError(f"load holds negative counts (layer {layer}, expert {expert}: {load[layer, expert]})")
    return load
