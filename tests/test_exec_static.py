"""Static (DeepSpeed-like) placement on 2 gloo ranks trains exactly like one process (float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_exec_train import NUM_RANKS, assert_same_parameters, read_metrics, train_single_process

from symi_exec.trainer import TrainConfig, launch


def test_static_matches_single_process(tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=2, top_k=1, policy="static",
                         steps=3, batch_size=2, dtype="float64", seed=1, lr=1e-2)
    launch(config, NUM_RANKS)
    out = Path(config.out)
    reference, losses, _ = train_single_process(config, NUM_RANKS)
    assert_same_parameters(out, reference, config.seed)
    rows = read_metrics(out)
    assert [row["loss"] for row in rows] == pytest.approx(losses, rel=1e-12)
    assert all(row["replica_moves"] == 0 for row in rows)
    assert not (out / "trace.parquet").exists()
