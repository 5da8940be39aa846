"""Injected failures: sampled job timelines that check the closed-form model of failures.py.

One run of a job of N steps under a checkpoint policy (times in seconds, all relative to the last restart point s0,
since the checkpoint schedule restarts with the job):
  none     steps of T back to back; a failure loses everything (the job restarts at step 0);
  full-K   blocks of K steps of T followed by a blocking full checkpoint of C; a failure rolls back to the last
           block whose checkpoint completed;
  sparse   blocks of K steps of T' = max(T, c) followed by a full checkpoint of C; during each step the state after
           the previous step is copied, which takes c from the step's start, so a failure at offset o into step m of
           a block rolls back to the state after step m (o >= c) or m - 1 (o < c), never before the block's start.
Failures arrive as a Poisson process of rate 1/M on the wall clock while the job runs; each costs the restart
time R (no failure is drawn during a restart, as in the closed form). A run ends when the job reaches step N.
The effective time ratio is the useful time (N T) over the mean wall time of the runs, the expectation the
closed form approximates (exactly so for `none`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from symi_sim.checks import check_positive_int


@dataclass(frozen=True)
class Timeline:
    """A job's time constants under one checkpoint policy (see the module docstring)."""

    mode: str             # "none", "full" or "sparse"
    num_steps: int        # N
    step_s: float         # T, or T' (stretched) for sparse
    every_steps: int      # K: steps between full checkpoints (unused for none)
    full_s: float         # C
    hot_s: float          # c (sparse only)
    restart_s: float      # R
    mtbf_s: float         # M

    def duration_s(self, start_step: int) -> float:
        """Failure-free wall time from `start_step` (a restart point) to step N."""
        remaining = self.num_steps - start_step
        if self.mode == "none":
            return remaining * self.step_s
        return remaining * self.step_s + (remaining // self.every_steps) * self.full_s

    def committed_step(self, start_step: int, elapsed_s: float) -> int:
        """The step the job rolls back to after failing `elapsed_s` after restarting at `start_step`."""
        if self.mode == "none":
            return 0
        block_s = self.every_steps * self.step_s + self.full_s
        num_blocks = math.floor(elapsed_s / block_s)
        base = start_step + num_blocks * self.every_steps
        if self.mode == "full":
            return base
        offset_s = elapsed_s - num_blocks * block_s
        if offset_s >= self.every_steps * self.step_s:      # writing the full checkpoint of the block's end
            return base + self.every_steps - 1
        step_in_block = math.floor(offset_s / self.step_s)
        in_step_s = offset_s - step_in_block * self.step_s
        return base + max(step_in_block - (1 if in_step_s < self.hot_s else 0), 0)


def sample_wall_times(timeline: Timeline, *, num_runs: int, seed: int, max_wall_factor: float = 1000.0,
                      max_failures: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """([runs] wall time, [runs] failures) of `num_runs` sampled runs; a run whose wall time passes
    max_wall_factor x the failure-free time, or that fails max_failures times, is stopped and given an infinite
    wall time (the job does not finish in any useful sense)."""
    check_positive_int(num_runs, "the number of failure runs")
    rng = np.random.default_rng(seed)
    cap_s = max_wall_factor * timeline.duration_s(0)
    wall_R = np.zeros(num_runs)
    failures_R = np.zeros(num_runs, dtype=np.int64)
    for run in range(num_runs):
        wall_s, start = 0.0, 0
        while True:
            remaining_s = timeline.duration_s(start)
            until_failure_s = rng.exponential(timeline.mtbf_s)
            if until_failure_s >= remaining_s:
                wall_s += remaining_s
                break
            wall_s += until_failure_s + timeline.restart_s
            failures_R[run] += 1
            start = timeline.committed_step(start, until_failure_s)
            if wall_s > cap_s or failures_R[run] >= max_failures:
                wall_s = math.inf
                break
        wall_R[run] = wall_s
    return wall_R, failures_R
