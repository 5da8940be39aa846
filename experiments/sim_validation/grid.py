"""The executor configurations of the validation, split into the half the calibration is fitted on and the held-out
half it predicts, and the runner that trains each of them (`symi train`'s launch, gloo on CPU).

The calibration half has 2 ranks, 8 experts, 4 slots per rank and the policies static and symi; the held-out half
has 4 ranks, 16 experts, 2 slots per rank and the policies symi-balanced and flexmoe-10, none of which the
calibration half holds, beside configurations that share some of its values. Both halves have capacity factors 1
and 2 and even (router skew 0) and skewed (0.5) routing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

CALIBRATION, HELD_OUT = "calibration", "held-out"


@dataclass(frozen=True)
class RunSpec:
    """One executor configuration of the grid."""

    half: str
    ranks: int
    experts: int
    slots: int
    policy: str
    capacity_factor: float
    router_skew: float

    @property
    def name(self) -> str:
        return (f"g{self.ranks}-e{self.experts}-s{self.slots}-{self.policy}-cf{self.capacity_factor:g}-"
                f"skew{self.router_skew:g}")

    @property
    def group(self) -> str:
        """What the policies of one comparison share: everything but the policy."""
        return self.name.replace(f"-{self.policy}-", "-")


def grid(*, quick: bool = False) -> list[RunSpec]:
    """The configurations (quick: 2 calibration runs and 2 held-out ones, for tests)."""
    specs = [RunSpec(CALIBRATION, 2, 8, 4, policy, cf, skew)
             for policy in ("static", "symi") for cf in (1.0, 2.0) for skew in (0.0, 0.5)]
    specs += [RunSpec(HELD_OUT, 4, 8, 4, policy, cf, 0.5)
              for policy in ("static", "symi", "symi-balanced", "flexmoe-10") for cf in (1.0, 2.0)]
    specs += [RunSpec(HELD_OUT, 4, 16, 4, policy, 1.0, skew) for policy in ("static", "symi-balanced")
              for skew in (0.0, 0.5)]
    specs += [RunSpec(HELD_OUT, 4, 8, 2, policy, 2.0, 0.0) for policy in ("symi", "flexmoe-10")]
    if quick:
        specs = [specs[0], specs[5], specs[10], specs[12]]
    return specs


def train_run(spec: RunSpec, *, out: Path, model: str, d_ff: int | None, steps: int, batch_size: int,
              seed: int) -> Path:
    """Train `spec` once (its run directory at `out`, trace recorded): what the validation measures. `d_ff`
    overrides the preset's expert width (None: the preset's)."""
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch

    config = TrainConfig(out=str(out), model=model, num_experts=spec.experts, slots_per_rank=spec.slots,
                         policy=spec.policy, capacity_factor=spec.capacity_factor, router_skew=spec.router_skew,
                         steps=steps, batch_size=batch_size, seed=seed, record_trace=True, log_interval=steps,
                         model_overrides={} if d_ff is None else {"d_ff": d_ff})
    return launch(config, spec.ranks, log_level=logging.WARNING)
