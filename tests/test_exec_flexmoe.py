"""FlexMoE in the executor (2 gloo ranks, float64): every holder rank keeps its experts' full AdamW state, which
migrates with the replicas when the policy re-plans. Training still equals one process, and the optimizer-state
bytes moved are exactly the moved experts' moments, counted by hand from the placements."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_exec_train import replica_sync_bytes, train_and_compare

from symi_exec.config import TrainConfig

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow

ELEM_BYTES = 8   # float64


def migrations(phy2log_LR: np.ndarray, next_phy2log_LR: np.ndarray, slots_per_rank: int) -> int:
    """(layer, expert, rank) triples where a rank hosts the expert in the next placement but not in this one."""
    count = 0
    for phy2log_R, next_R in zip(phy2log_LR, next_phy2log_LR, strict=True):
        for e in range(int(max(phy2log_R.max(), next_R.max())) + 1):
            before = set(np.flatnonzero(phy2log_R == e) // slots_per_rank)
            after = set(np.flatnonzero(next_R == e) // slots_per_rank)
            count += len(after - before)
    return count


def test_flexmoe_matches_single_process_and_migrates_exactly_the_moved_state(tmp_path: Path) -> None:
    # min_gain_ratio=0: rebalance on schedule whenever the max GPU load drops (the cost-aware default never moves
    # replicas of experts this small); flexmoe-2: a new plan only after steps 1, 3, 5
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=3, top_k=2, policy="flexmoe-2",
                         policy_options={"min_gain_ratio": 0}, steps=6, batch_size=2, dtype="float64", seed=3,
                         lr=1e-2, grad_clip=0.5, capacity_factor=None)
    out, rows, _ = train_and_compare(config)
    assert all(row["dropped_fraction"] == 0 for row in rows)
    assert all(row["grad_norm"] > config.grad_clip for row in rows)   # clipping active: each expert counted once
    assert json.loads((out / "config.json").read_text())["expert_optimizer"] == "replica"

    lines = (out / "placements.jsonl").read_text().splitlines()
    phy2log_SLR = [np.array(json.loads(line)["phy2log"]) for line in lines]
    final = torch.load(out / "checkpoint.pt")["placement"]
    phy2log_SLR.append(np.array([layer["phy2log"] for layer in final["layers"]]))
    cfg = config.model_config()
    state_bytes = cfg.expert_numel * ELEM_BYTES
    num_migrated = []
    for step, row in enumerate(rows):
        before, after = phy2log_SLR[step], phy2log_SLR[step + 1]
        if (step + 1) % 2:   # between re-plans the placement is kept
            assert row["replica_moves"] == 0 and np.array_equal(before, after)
        moved = migrations(before, after, config.slots_per_rank)
        num_migrated.append(moved)
        assert row["bytes_optimizer_state"] == moved * 2 * state_bytes   # AdamW's two moments per moved expert
        assert row["bytes_weight_sendout"] == moved * state_bytes        # and its weights, nothing else
        assert row["bytes_grad_collection"] == 0                         # no 1/G shards: every holder updates
        assert row["bytes_replica_grad_sync"] == replica_sync_bytes(before, config.slots_per_rank, cfg.expert_numel,
                                                                    ELEM_BYTES)
    assert sum(num_migrated) >= 2   # the policy really moved replicas across ranks, more than once
    # a move that stays on a rank hosting the expert moves nothing: moves outnumber migrations here
    assert sum(row["replica_moves"] for row in rows) > sum(num_migrated)
