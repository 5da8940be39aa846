"""Static (DeepSpeed-like) placement on 2 gloo ranks trains exactly like one process (float64), in DeepSpeed's
group optimizer layout (tests/test_exec_group.py has the groups of several ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_exec_train import train_and_compare

from symi_exec.config import TrainConfig

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow


def test_static_matches_single_process(tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=2, top_k=1, policy="static",
                         steps=3, batch_size=2, dtype="float64", seed=1, lr=1e-2, capacity_factor=None)
    out, rows, _ = train_and_compare(config)
    assert all(row["replica_moves"] == 0 for row in rows)
    assert not (out / "trace.parquet").exists()
    assert json.loads((out / "config.json").read_text())["expert_optimizer"] == "group"
    # slots 0 1 | 2 3: every expert's replica group is one rank, so no expert byte leaves its rank
    for kind in ("replica_grad_sync", "grad_collection", "weight_sendout", "optimizer_state"):
        assert all(row[f"bytes_{kind}"] == 0 for row in rows), kind
