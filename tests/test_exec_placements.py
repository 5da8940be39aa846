"""Any placement sequence: random replica layouts with uneven token shares (several replicas of one expert on one
rank included), changing every step, still train exactly like one process (float64, 2 gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_exec_train import train_and_compare

from symi_exec.config import TrainConfig
from symi_sim.cluster import Cluster
from symi_sim.placement import Placement

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow


def random_planner(step: int, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
    """A different random placement every step: every expert >= 1 replica, random uneven shares."""
    rng = np.random.default_rng(1000 + step)
    num_layers, num_experts = load_LE.shape
    phy2log, share = [], []
    for _ in range(num_layers):
        extra = rng.integers(0, num_experts, cluster.num_slots - num_experts)
        row = rng.permutation(np.concatenate([np.arange(num_experts), extra]))
        weights = rng.uniform(0.1, 1.0, row.size)
        weights /= np.bincount(row, weights=weights, minlength=num_experts)[row]
        phy2log.append(row)
        share.append(weights)
    return Placement(np.array(phy2log), np.array(share), num_experts)


def test_random_uneven_placements_match_single_process(tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=3, slots_per_rank=4, top_k=2, policy="symi",
                         steps=3, batch_size=2, dtype="float64", seed=2, lr=1e-2, grad_clip=0.5, capacity_factor=None)
    out, rows, _ = train_and_compare(config, planner=random_planner)
    assert all(row["replica_moves"] > 0 for row in rows)
    assert all(row["grad_norm"] > config.grad_clip for row in rows)   # clipping was active
