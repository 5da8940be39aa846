"""Training-loss curves: smoothing and steps to a target loss (shared by the executor benchmark and experiments)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from symi_sim.checks import check_positive_int


def smoothed(losses: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` steps (a step's loss is one small batch: noisy)."""
    check_positive_int(window, "smoothing window")
    return [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]


def steps_to(target: float, curve: Sequence[float], window: int) -> int | None:
    """Steps trained when the smoothed loss first reaches `target` (a full window in); None if it never does."""
    for i in range(window - 1, len(curve)):
        if curve[i] <= target:
            return i + 1
    return None
