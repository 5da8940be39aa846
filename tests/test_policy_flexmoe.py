"""FlexMoE: threshold trigger, greedy replica shifting by hand, the schedule rule (default) and FlexMoE's own
cost-benefit rule with the drops a move saves."""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies import get_policy

# 1 node x 4 GPUs x 2 slots; GPU g holds slots 2g, 2g+1. The static layout puts experts [0,1] on GPUs 0 and 2,
# [2,3] on GPUs 1 and 3. achieved_flops 384 FLOP/s; with d_model 4, d_ff 8 an expert has 64 params, so a token
# costs 6*64 = 384 FLOPs (1 s) and a move ships 18*64 = 1152 bytes.
FAST_NIC = Cluster(num_nodes=1, gpus_per_node=4, slots_per_gpu=2, nic_gbps=100.0, gpu_peak_flops=384.0,
                   compute_efficiency=1.0)
SHAPES = {"d_model": 4, "d_ff": 8}


def _static(cluster: Cluster, num_layers: int, num_experts: int) -> Placement:
    return get_policy("static").plan(np.ones((num_layers, num_experts)), cluster)


def test_first_plan_is_static() -> None:
    load_LE = np.array([[600, 200, 100, 100]])
    first = get_policy("flexmoe").plan(load_LE, FAST_NIC)
    assert first.same_as(_static(FAST_NIC, 1, 4))
    assert first.phy2log_LR.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]


def test_below_threshold_returns_previous_unchanged() -> None:
    # GPU loads [55+50, 50+50, 55+50, 50+50] = [105, 100, 105, 100]: balance 105/102.5 = 1.024 < 1.1
    previous = _static(FAST_NIC, 1, 4)
    out = get_policy("flexmoe", **SHAPES).plan(np.array([[110, 100, 100, 100]]), FAST_NIC, previous=previous)
    assert out is previous


def test_hand_made_skew_moves_exactly_two_replicas() -> None:
    # Loads [600,200,100,100] on [0,1,2,3,0,1,2,3]: per replica [300,100,50,50], GPUs [400,100,400,100] -> 1.6.
    # Move 1: receiver 0 (300/replica), donor 2 (50, ties with 3 -> lower id). Freeing slot 2 or slot 6 both leave
    #   max 300 (expert 0 at 200/replica on GPUs 0, 2) -> lower slot 2. Max 400 -> 300: gain 100 tokens.
    # Move 2: per replica [200,100,100,50]; receiver 0, donor 3. Slot 3 -> GPU1 = 150+150 = 300;
    #   slot 7 -> every GPU 250: pick slot 7. Max 300 -> 250: gain 50 tokens.
    # Move 3: per replica [150,100,100,100]; donor 1: best case GPU loads reach 320 > 250: no gain, stop.
    previous = _static(FAST_NIC, 1, 4)
    out = get_policy("flexmoe", **SHAPES).plan(np.array([[600, 200, 100, 100]]), FAST_NIC, previous=previous)
    assert out.phy2log_LR.tolist() == [[0, 1, 0, 3, 0, 1, 2, 0]]
    assert out.logcnt_LE.tolist() == [[4, 2, 1, 1]]
    np.testing.assert_allclose(out.share_LR, [[1 / 4, 1 / 2, 1 / 4, 1, 1 / 4, 1 / 2, 1, 1 / 4]])
    assert out.replica_moves(previous).tolist() == [2]


def test_migration_cost_between_the_two_gains_allows_one_move() -> None:
    # FlexMoE's own rule on balance alone (dropless: no drops to save). Gain per token taken off the max GPU:
    # 1 s x rebalance_every 10 = 10 s; move 1 gains 1000 s, move 2 500 s. A NIC of 1152 bytes / 750 s makes a
    # move cost 750 s: only move 1 pays.
    cluster = FAST_NIC.with_(nic_gbps=1152 / 750 / 1.25e8)
    policy = get_policy("flexmoe", rule="cost_benefit", capacity_factor=None, **SHAPES)
    assert policy.migration_cost_s(cluster) == pytest.approx(750.0)
    assert policy.gain_s_per_token(cluster) == pytest.approx(10.0)
    out = policy.plan(np.array([[600, 200, 100, 100]]), cluster, previous=_static(cluster, 1, 4))
    assert out.phy2log_LR.tolist() == [[0, 1, 0, 3, 0, 1, 2, 3]]
    # rebalance_every 5 halves the gain: move 1 is worth 500 s < 750 s, nothing moves
    prev = _static(cluster, 1, 4)
    assert get_policy("flexmoe-5", rule="cost_benefit", capacity_factor=None, **SHAPES).plan(
        np.array([[600, 200, 100, 100]]), cluster, previous=prev) is prev
    # the schedule rule (the default) pays the migration whatever it costs: both moves
    assert get_policy("flexmoe", **SHAPES).plan(np.array([[600, 200, 100, 100]]), cluster,
                                                previous=prev).phy2log_LR.tolist() == [[0, 1, 0, 3, 0, 1, 2, 0]]


def test_enormous_migration_cost_moves_nothing_under_the_cost_rule() -> None:
    cluster = FAST_NIC.with_(nic_gbps=1e-12)
    previous = _static(cluster, 2, 4)
    load_LE = np.array([[600, 200, 100, 100], [0, 0, 0, 5000]])
    assert get_policy("flexmoe", rule="cost_benefit", **SHAPES).plan(load_LE, cluster, previous=previous) is previous
    assert get_policy("flexmoe", **SHAPES).plan(load_LE, cluster, previous=previous) is not previous


def test_cost_rule_counts_the_drops_a_move_saves() -> None:
    # rebalance_every 1: a token is worth 1 s; a move costs 160 s. Loads [600,200,100,100] (A = 1000), capacity
    # factor 1. Balance alone: move 1 gains 100 tokens, move 2 50 (test above): nothing pays.
    # slot mode, ceil(1000 / 8) = 125 tokens per slot; drops = sum_e max(load - cnt * 125, 0):
    #   cnt [2,2,2,2]: 350 -> move 1 [3,2,1,2]: 225 (saves 125; gain 100 + 125 = 225 s > 160)
    #   -> move 2 [4,2,1,1]: 100 (saves 125; gain 50 + 125 = 175 s > 160)
    #   -> move 3 (donor 1, receiver 0) [5,1,1,1]: 75 (saves 25), max GPU load 250 -> 320: gain -45 s: stop.
    # gpu mode, ceil(1000 / 4) = 250 tokens per GPU; drops = sum_g max(gpu - 250, 0):
    #   GPUs [400,100,400,100]: 300 -> move 1 [300,250,300,150]: 100 (gain 100 + 200 = 300 s > 160)
    #   -> move 2, every GPU 250: 0 (gain 50 + 100 = 150 s < 160): stop after one move.
    cluster = FAST_NIC.with_(nic_gbps=1152 / 160 / 1.25e8)
    load_LE = np.array([[600, 200, 100, 100]])
    previous = _static(cluster, 1, 4)
    options = {"rule": "cost_benefit", "rebalance_every": 1, **SHAPES}
    assert get_policy("flexmoe", capacity_factor=None, **options).plan(load_LE, cluster, previous=previous) is previous
    slot = get_policy("flexmoe", capacity_mode="slot", **options).plan(load_LE, cluster, previous=previous)
    assert slot.phy2log_LR.tolist() == [[0, 1, 0, 3, 0, 1, 2, 0]]
    gpu = get_policy("flexmoe", capacity_mode="gpu", **options).plan(load_LE, cluster, previous=previous)
    assert gpu.phy2log_LR.tolist() == [[0, 1, 0, 3, 0, 1, 2, 3]]
    # capacity factor 4 (500 tokens per slot) drops nothing: balance alone again, no move
    assert get_policy("flexmoe", capacity_factor=4.0, **options).plan(load_LE, cluster, previous=previous) is previous


def test_threshold_is_inclusive_and_per_layer() -> None:
    # Layer 0 balance is exactly 1.6; layer 1 is uniform (1.0) and must keep its row and shares.
    previous = _static(FAST_NIC, 2, 4)
    load_LE = np.array([[600, 200, 100, 100], [100, 100, 100, 100]])
    at = get_policy("flexmoe", threshold=1.6, **SHAPES).plan(load_LE, FAST_NIC, previous=previous)
    assert at.phy2log_LR.tolist() == [[0, 1, 0, 3, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1, 2, 3]]
    np.testing.assert_array_equal(at.share_LR[1], previous.share_LR[1])
    above = get_policy("flexmoe", threshold=1.61, **SHAPES).plan(load_LE, FAST_NIC, previous=previous)
    assert above is previous


def test_default_shapes_cost_and_gain() -> None:
    # GPT-Small expert: 2*768*3072 = 4,718,592 params; 18 bytes each over 100 Gb/s = 12.5e9 B/s.
    cluster = Cluster(nic_gbps=100.0, gpu_peak_flops=312e12, compute_efficiency=0.4)
    policy = get_policy("flexmoe")
    assert policy.migration_cost_s(cluster) == pytest.approx(18 * 4_718_592 / 12.5e9)
    assert policy.gain_s_per_token(cluster) == pytest.approx(6 * 4_718_592 / 124.8e12 * 10)
    assert policy.optimizer_coupled and policy.rebalance_every == 10
    assert (policy.rule, policy.min_gain_ratio) == ("schedule", None)
    # the model's byte sizes price the move: 3-byte weights and 8-byte state make 11 bytes per param
    assert get_policy("flexmoe", weight_bytes=3, optimizer_bytes=8).migration_cost_s(cluster) == pytest.approx(
        11 * 4_718_592 / 12.5e9)


@pytest.mark.parametrize("bad", [{"rebalance_every": 0}, {"threshold": 0.5}, {"threshold": float("nan")},
                                 {"d_model": 0}, {"d_ff": 2.5}, {"rule": "greedy"}, {"weight_bytes": 0},
                                 {"optimizer_bytes": 1.5}, {"capacity_mode": "node"}, {"capacity_factor": 0}])
def test_bad_options_raise(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_policy("flexmoe", **bad)


def test_default_rebalances_on_schedule_and_the_cost_rule_keeps_the_layout() -> None:
    # GPT-Small on the paper's cluster: one move costs ~6.8 ms of migration but gains at most ~1.8 ms by FlexMoE's
    # estimate (0.227 us x 10 steps per token: at most 400 tokens off the busiest GPU's 5000 and the 388 drops of
    # one more 388-token slot), so the cost-benefit rule keeps the layout; the default schedule rule moves
    # replicas while the max GPU load drops.
    from symi_sim.cluster import PRESETS
    from symi_sim.routing import route

    cluster = PRESETS["paper-a100-16"]
    load_LE = np.array([[8000, 6000, 4000, 2000] + [1000] * 4 + [100] * 8], dtype=float)
    first = get_policy("flexmoe").plan(load_LE, cluster)
    assert get_policy("flexmoe", rule="cost_benefit").plan(load_LE, cluster, previous=first) is first
    moved = get_policy("flexmoe").plan(load_LE, cluster, previous=first)
    assert int(moved.replica_moves(first).sum()) > 0
    # min_gain_ratio=0, the earlier spelling of rebalancing on schedule, plans the same
    assert get_policy("flexmoe", min_gain_ratio=0).plan(load_LE, cluster, previous=first).same_as(moved)
    before = route(load_LE.astype(int), first, slots_per_gpu=4, capacity_factor=None).gpu_load_LG.max()
    after = route(load_LE.astype(int), moved, slots_per_gpu=4, capacity_factor=None).gpu_load_LG.max()
    assert after < before
    with pytest.raises(ValueError, match="min_gain_ratio"):
        get_policy("flexmoe", rule="cost_benefit", min_gain_ratio=-1.0)
    with pytest.raises(ValueError, match="min_gain_ratio 1 applies to rule=cost_benefit"):
        get_policy("flexmoe", min_gain_ratio=1)
