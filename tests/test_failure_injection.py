"""Injected failures on sampled timelines: hand-computed rollback points, and agreement with the closed form where
it is exact (no checkpoints) or first-order accurate (checkpoint period much shorter than the MTBF), and the
direction of its error where it is not."""

import math

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.failures.injection import Timeline, sample_wall_times
from symi_sim.failures.model import FailureModel, failure_costs
from symi_sim.models import ModelConfig

MODEL = ModelConfig(name="tiny", num_layers=2, num_moe_layers=2, d_model=64, d_ff=128, expert_d_ff=128,
                    vocab_size=100, num_experts=2, top_k=1, seq_len=8, global_batch=4)
FULL_BYTES = 105_472 * 18
COUNTS_SLE = np.array([[[30, 2], [16, 16]]])
ONE_GPU = Cluster(name="one", pcie_gbps=FULL_BYTES / 10.0 / 1.25e8)   # writes a full checkpoint in 10 s


def test_rollback_points_by_hand():
    full = Timeline(mode="full", num_steps=100, step_s=1.0, every_steps=10, full_s=2.0, hot_s=0.0, restart_s=5.0,
                    mtbf_s=60.0)
    assert full.duration_s(0) == 100 + 10 * 2 and full.duration_s(20) == 80 + 8 * 2
    assert full.committed_step(0, 11.9) == 0 and full.committed_step(0, 12.0) == 10
    assert full.committed_step(20, 25.0) == 40          # blocks of 12 s: two complete
    sparse = Timeline(mode="sparse", num_steps=100, step_s=1.0, every_steps=10, full_s=2.0, hot_s=0.3,
                      restart_s=5.0, mtbf_s=60.0)
    assert sparse.committed_step(0, 5.2) == 4           # step 6 running, the copy of step 5's state unfinished
    assert sparse.committed_step(0, 5.5) == 5           # ... finished
    assert sparse.committed_step(0, 0.1) == 0           # never before the restart point
    assert sparse.committed_step(0, 10.5) == 9          # during the full checkpoint of step 10
    assert sparse.committed_step(7, 12.4) == 17         # second block, step 1's copy done
    none = Timeline(mode="none", num_steps=100, step_s=1.0, every_steps=0, full_s=0.0, hot_s=0.0, restart_s=5.0,
                    mtbf_s=60.0)
    assert none.committed_step(0, 99.0) == 0 and none.duration_s(0) == 100


def test_same_seed_same_runs_and_no_failures_without_time():
    timeline = Timeline(mode="full", num_steps=50, step_s=1.0, every_steps=5, full_s=1.0, hot_s=0.0,
                        restart_s=2.0, mtbf_s=30.0)
    a = sample_wall_times(timeline, num_runs=20, seed=3)
    b = sample_wall_times(timeline, num_runs=20, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert (a[0] >= timeline.duration_s(0)).all()
    # every extra second of wall time beyond the failure-free one is explained by failures (each costs >= R)
    assert ((a[0] - timeline.duration_s(0) >= a[1] * 2.0 - 1e-9) | (a[1] == 0)).all()
    with pytest.raises(ValueError, match="positive integer"):
        sample_wall_times(timeline, num_runs=0, seed=0)


def _both(checkpoint: str, step_time_s: float, iterations: float, runs: int = 3000) -> dict[str, float]:
    failures = FailureModel(checkpoint=checkpoint, mtbf_hours=1.0, sampled_runs=runs, seed=1)
    return failure_costs(step_time_s=step_time_s, iterations_to_target=iterations, model=MODEL, cluster=ONE_GPU,
                         counts_SLE=COUNTS_SLE, failures=failures)


def test_no_checkpoint_matches_the_exact_expectation():
    costs = _both("none", step_time_s=1.0, iterations=3600 * math.log(3))   # two failures expected
    assert costs["sampled_failures_per_run"] == pytest.approx(2.0, rel=0.1)
    assert abs(costs["sampled_effective_time_ratio"] - costs["effective_time_ratio"]) \
        < 4 * costs["sampled_ratio_stderr"]


@pytest.mark.parametrize("checkpoint", ["full-20", "sparse-50:hot=0.8"])
def test_short_periods_match_the_first_order_model(checkpoint):
    costs = _both(checkpoint, step_time_s=1.0, iterations=20_000, runs=400)
    assert costs["sampled_effective_time_ratio"] == pytest.approx(costs["effective_time_ratio"], rel=0.01)


def test_periods_near_the_mtbf_beat_the_first_order_model():
    # K T = 3000 s against M = 3600 s: failures strike early in a period more often than half-way, so the sampled
    # job loses less than K T / 2 per failure and the first-order ratio is too pessimistic
    costs = _both("full-3000", step_time_s=1.0, iterations=30_000, runs=400)
    assert costs["sampled_effective_time_ratio"] > costs["effective_time_ratio"] + 5 * costs["sampled_ratio_stderr"]
