"""Expert-parallel training on 3 and 4 gloo ranks equals the single-process model (float64), for every optimizer
layout (symi and symi-balanced: sharded; static: group; flexmoe: replica); with dropped tokens, equals a
single-process reference that drops the same assignments, chosen here by an independent loop over the rule.

Two ranks hide mistakes that three expose: with two ranks an expert has at most one holder other than any given
rank, so a missing phase of a replica gradient sync, or a shard bound off by one rank, can still give the right
parameters. The drop rule the loop below re-implements (symi_exec/moe.py; the split by tests/dispatch_rule.py):
  1. how many of rank g's assignments of expert e each replica of e takes: locality first (each replica takes what
     it can of its own rank's, several on one rank in ascending slot order), then per expert the rest by source
     rank over the replicas' remaining room in ascending slot order, replica p taking `route(...).assigned_LR[p]`;
  2. rank g's assignments of e, by local index, cut into consecutive pieces of those sizes, slots ascending;
  3. a slot short of capacity (`served_LR` < assigned) keeps from each source rank a share of what that rank sent
     it in proportion to the slot's served / assigned (largest remainder, ties to the lower rank), the first ones
     of that rank's piece.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from dispatch_rule import locality_counts, pieces
from test_exec_train import assert_same_parameters, read_metrics, train_and_compare, train_single_process

from symi_exec.config import TrainConfig
from symi_exec.launch import launch
from symi_sim.placement import Placement
from symi_sim.routing import route

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("num_ranks,policy", [(3, "symi"), (4, "symi-balanced"), (3, "static"), (4, "flexmoe-1")])
def test_dropless_training_on_three_and_four_ranks_matches_single_process(tmp_path: Path, num_ranks: int,
                                                                          policy: str) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=5, slots_per_rank=3, top_k=2, policy=policy,
                         steps=3, batch_size=1, dtype="float64", seed=1, lr=1e-2, capacity_factor=None,
                         router_skew=1.0)
    _, rows, _ = train_and_compare(config, num_ranks=num_ranks)
    assert all(row["dropped_fraction"] == 0 for row in rows)
    if policy in ("symi", "symi-balanced"):
        assert sum(row["replica_moves"] for row in rows[:-1]) > 0   # the placement changed between steps
    if policy == "flexmoe-1":   # re-places every step: the replica layout migrated weights and moments
        assert sum(row["bytes_optimizer_state"] for row in rows) > 0


def largest_remainder_keep(sent: list[int], served: int, assigned: int) -> list[int]:
    """How many of each source's `sent` tokens a slot of `assigned` tokens serving `served` keeps (exact)."""
    quota = [Fraction(s * served, assigned) for s in sent]
    keep = [int(q) for q in quota]
    order = sorted(range(len(sent)), key=lambda g: (-(quota[g] - keep[g]), g))
    for g in order[:served - sum(keep)]:
        keep[g] += 1
    return keep


def keep_mask(expert_NK: torch.Tensor, phy2log_R: np.ndarray, share_R: np.ndarray, *, num_ranks: int,
              num_experts: int, slots_per_rank: int, capacity_factor: float, capacity_mode: str,
              live_shares: bool = False) -> torch.Tensor:
    """[N, K] bool: which assignments of the global batch (rank g's tokens are the g-th N/G rows) are served."""
    num_tokens, top_k = expert_NK.shape
    expert_GA = expert_NK.reshape(num_ranks, num_tokens // num_ranks * top_k).numpy()
    count_E = np.bincount(expert_GA.reshape(-1), minlength=num_experts)
    placement = Placement(phy2log_R[None, :], share_R[None, :], num_experts, live_shares=live_shares)
    count_GE = [[int((row == e).sum()) for e in range(num_experts)] for row in expert_GA]
    # a live split knows every rank's counts (it keeps tokens on their rank where the optimum allows)
    routing = route(count_E[None, :], placement, slots_per_gpu=slots_per_rank, capacity_factor=capacity_factor,
                    capacity_mode=capacity_mode, num_assignments_L=np.array([count_E.sum()]),
                    source_LEG=np.array(count_GE).T[None])
    assigned_R, served_R = routing.assigned_LR[0], routing.served_LR[0]
    split = locality_counts(count_GE, phy2log_R.tolist(), assigned_R.tolist(), slots_per_rank)
    kept_GA = np.zeros(expert_GA.shape, dtype=bool)
    for slot, parts in enumerate(pieces(list(expert_GA), phy2log_R.tolist(), split)):
        sent = [len(parts[src]) for src in range(num_ranks)]
        assert sum(sent) == assigned_R[slot]
        keep = largest_remainder_keep(sent, int(served_R[slot]), int(assigned_R[slot])) if sum(sent) else sent
        for src in range(num_ranks):
            for a in parts[src][:keep[src]]:
                kept_GA[src, a] = True
    return torch.from_numpy(kept_GA.reshape(num_tokens, top_k))


def placement_keep_rules(config: TrainConfig, num_ranks: int, placements: list[dict]
                         ) -> Callable[[int], list[Callable[[torch.Tensor], torch.Tensor]]]:
    """step -> every MoE layer's rule: drop what `keep_mask` says under the placement the step ran with
    (placements.jsonl, live shares where the record says so)."""
    def rule(phy2log_R: np.ndarray, share_R: np.ndarray, live: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda expert_NK: keep_mask(expert_NK, phy2log_R, share_R, num_ranks=num_ranks,
                                           num_experts=config.num_experts, slots_per_rank=config.slots_per_rank,
                                           capacity_factor=config.capacity_factor,
                                           capacity_mode=config.capacity_mode, live_shares=live)

    def rules(step: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        record = placements[step]
        live = record.get("shares", "planned") == "live"
        return [rule(np.array(phy2log_R), np.array(share_R), live)
                for phy2log_R, share_R in zip(record["phy2log"], record["share"], strict=True)]

    return rules


@pytest.mark.parametrize("num_ranks,policy,mode,factor", [(3, "symi-balanced", "slot", 0.6), (4, "symi", "gpu", 0.7)])
def test_training_with_drops_matches_a_reference_dropping_the_same_assignments(
        tmp_path: Path, num_ranks: int, policy: str, mode: str, factor: float) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=5, slots_per_rank=2, top_k=2, policy=policy,
                         steps=3, batch_size=1, dtype="float64", seed=2, lr=1e-2, capacity_factor=factor,
                         capacity_mode=mode, router_skew=1.5)
    launch(config, num_ranks)
    out = Path(config.out)
    placements = [json.loads(line) for line in (out / "placements.jsonl").read_text().splitlines()]
    reference, losses, _ = train_single_process(config, num_ranks,
                                                keep_rules=placement_keep_rules(config, num_ranks, placements))
    assert_same_parameters(out, reference, config.seed)
    rows = read_metrics(out)
    assert [row["loss"] for row in rows] == pytest.approx(losses, rel=1e-12)
    assert sum(row["dropped_fraction"] for row in rows) > 0   # tokens were really dropped


def test_largest_remainder_keep_by_hand() -> None:
    # the case: 4 ranks send 40 tokens each to one slot that serves 64
    assert largest_remainder_keep([40, 40, 40, 40], 64, 160) == [16, 16, 16, 16]
    # quotas 10.5 / 4 / 5.5 (served 20 of 40): floors 10, 4, 5 leave one token; equal fractions: the lower rank
    assert largest_remainder_keep([21, 8, 11], 20, 40) == [11, 4, 5]
    assert largest_remainder_keep([7, 2, 1], 5, 10) == [4, 1, 0]   # quotas 3.5, 1, 0.5: the larger fraction first
    assert largest_remainder_keep([3, 3], 3, 6) == [2, 1]   # equal fractions: the lower rank first
