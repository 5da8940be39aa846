"""Dropped tokens in real expert-parallel training (2 gloo ranks) equal what the simulator's routing predicts for
the same loads and placements, per step, layer and expert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_exec_train import NUM_RANKS, read_metrics

from symi_exec.config import TrainConfig
from symi_exec.launch import launch
from symi_sim.placement import Placement
from symi_sim.routing import route
from symi_sim.traces.format import read_trace

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode,factor,policy", [("slot", 0.75, "symi"), ("gpu", 0.9, "static")])
def test_dropped_tokens_equal_simulator_routing(tmp_path: Path, mode: str, factor: float, policy: str) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=3, top_k=2, policy=policy,
                         capacity_factor=factor, capacity_mode=mode, steps=3, batch_size=2, record_trace=True,
                         aux_loss_coef=0.0, seed=3)
    launch(config, NUM_RANKS)
    out = Path(config.out)
    trace = read_trace(out / "trace.parquet")
    rows = read_metrics(out)
    records = [json.loads(line) for line in (out / "placements.jsonl").read_text().splitlines()]
    assert len(records) == config.steps
    total_dropped = 0
    for step, record in enumerate(records):
        placement = Placement(np.array(record["phy2log"]), np.array(record["share"]), config.num_experts)
        predicted = route(trace.counts_SLE[step], placement, slots_per_gpu=config.slots_per_rank,
                          capacity_factor=factor, capacity_mode=mode,
                          num_assignments_L=np.full(trace.num_layers, trace.top_k * trace.tokens_per_step))
        np.testing.assert_array_equal(np.array(record["dropped"]), predicted.dropped_LE)
        assert rows[step]["dropped_fraction"] == pytest.approx(predicted.dropped_fraction, abs=1e-12)
        total_dropped += predicted.dropped_LE.sum()
    assert total_dropped > 0
