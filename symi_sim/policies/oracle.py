"""oracle: symi-balanced planned on the loads of the very step it serves (the driver hands it those loads).

No real system can do this (the loads are known only after routing); it bounds what any planner that re-places
replicas every step can reach. Same options as symi-balanced; with `shares=live` the tokens of the step are also
split over the replicas by the live rule (symi_sim.live_shares) instead of the planned shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from symi_sim.policies.symi_balanced import SymiBalancedPolicy


@dataclass
class OraclePolicy(SymiBalancedPolicy):
    name: ClassVar[str] = "oracle"
    uses_current_load: ClassVar[bool] = True


POLICY = OraclePolicy
