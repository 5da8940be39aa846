"""FasterMoE shadowing: the greedy latency model by hand, the defaults' break-even load, and routing of shadows."""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.policies import get_policy
from symi_sim.policies.fastermoe import shadow_mask
from symi_sim.routing import route

# d_model 4, d_ff 8 (alpha 2): feat = 16 B / bw_net, send_model = 2*2*16*4 = 256 B / bw_net, comp = 128 / bw_mm.
# bw_net 16 B/s and bw_mm 128 FLOP/s make feat = 1 s, send_model = 16 s, comp = 1 s: latency(B) = 7 B.
UNIT = Cluster(num_nodes=2, gpus_per_node=2, slots_per_gpu=3, nic_gbps=16 / 1.25e8, gpu_peak_flops=128.0,
               compute_efficiency=1.0)
SHAPES = {"d_model": 4, "d_ff": 8}
LOAD_E = np.array([5, 40, 2, 20, 30, 1])   # descending: e1 40, e4 30, e3 20, e0 5, e2 2, e5 1


def test_unit_times() -> None:
    comp_s, feat_s, send_model_s = get_policy("fastermoe", **SHAPES).times_s(UNIT)
    assert (comp_s, feat_s, send_model_s) == pytest.approx((1.0, 1.0, 16.0))


def test_hand_computed_shadows() -> None:
    # lat = 7*40 = 280; i=0: 7*30+16 = 226 < 280 shadow e1; i=1: 7*20+32 = 172 shadow e4;
    # i=2: 7*5+48 = 83 shadow e3; i=3: 7*2+64 = 78 shadow e0; i=4: 7*1+80 = 87 >= 78 stop.
    # (Comparing with the unshadowed 280 instead would also shadow e2: the running estimate is what FasterMoE uses.)
    placement = get_policy("fastermoe", **SHAPES).plan(LOAD_E[None, :], UNIT)
    assert np.flatnonzero(placement.shadow_LE[0]).tolist() == [0, 1, 3, 4]
    # slots keep the static layout
    assert placement.phy2log_LR.tolist() == [(np.arange(12) % 6).tolist()]
    placement.validate(UNIT, num_layers=1)


def test_max_shadow_caps_the_hottest_first() -> None:
    placement = get_policy("fastermoe", max_shadow=2, **SHAPES).plan(LOAD_E[None, :], UNIT)
    assert np.flatnonzero(placement.shadow_LE[0]).tolist() == [1, 4]
    assert not get_policy("fastermoe", max_shadow=0, **SHAPES).plan(LOAD_E[None, :], UNIT).shadow_LE.any()


def test_coldest_expert_never_shadowed_and_ties_by_id() -> None:
    # send_model 0: every step lowers the estimate while loads decrease; equal loads do not (7B+0 == 7B).
    mask = shadow_mask(np.array([9.0, 3.0, 9.0, 1.0]), comp_s=1.0, feat_s=1.0, send_model_s=0.0)
    # order e0 9, e2 9, e1 3, e3 1: i=0 lat_new 63 == 63 -> stop at once
    assert mask.tolist() == [False, False, False, False]
    mask = shadow_mask(np.array([1.0, 3.0, 9.0, 5.0]), comp_s=1.0, feat_s=1.0, send_model_s=0.0)
    assert mask.tolist() == [False, True, True, True]   # all but the coldest


def test_uniform_load_shadows_nothing() -> None:
    cluster = Cluster(num_nodes=16, slots_per_gpu=4)
    assert not get_policy("fastermoe").plan(np.full((3, 16), 2048), cluster).shadow_LE.any()


def test_default_shapes_break_even_on_the_paper_cluster() -> None:
    # One-hot load T: shadowing the hot expert costs send_model = 2*768*3072*4 / 12.5e9 s and saves
    # T * (3*comp + 4*feat) with comp = 4*768*3072 / 124.8e12 and feat = 768*4 / 12.5e9; a second shadow never pays.
    cluster = Cluster(num_nodes=16, slots_per_gpu=4, nic_gbps=100.0, gpu_peak_flops=312e12, compute_efficiency=0.4)
    send_model = 2 * 768 * 3072 * 4 / 12.5e9
    per_token = 3 * 4 * 768 * 3072 / 124.8e12 + 4 * 768 * 4 / 12.5e9
    break_even = send_model / per_token
    assert 1000 < break_even < 2000
    policy = get_policy("fastermoe")
    load_LE = np.zeros((2, 16))
    load_LE[0, 5] = np.ceil(break_even) + 1
    load_LE[1, 5] = np.floor(break_even) - 1
    shadow_LE = policy.plan(load_LE, cluster).shadow_LE
    assert np.flatnonzero(shadow_LE[0]).tolist() == [5]
    assert not shadow_LE[1].any()


def test_decision_prices_the_given_byte_sizes() -> None:
    # The simulator charges 2-byte weights and activations (driver.resolve_policy passes them); FasterMoE's own
    # fp32 sizes are the defaults. Break-even of a one-hot load T on the paper cluster: send_model / per_token,
    # 2 bytes: 2*768*3072*2 / 12.5e9 over 3*comp + 4*768*2 / 12.5e9, about 1053 tokens; 4 bytes: about 1248.
    cluster = Cluster(num_nodes=16, slots_per_gpu=4, nic_gbps=100.0, gpu_peak_flops=312e12, compute_efficiency=0.4)
    comp = 4 * 768 * 3072 / 124.8e12
    half = get_policy("fastermoe", weight_bytes=2, activation_bytes=2)
    assert half.times_s(cluster) == pytest.approx((comp, 768 * 2 / 12.5e9, 2 * 768 * 3072 * 2 / 12.5e9))
    break_even_2 = (2 * 768 * 3072 * 2 / 12.5e9) / (3 * comp + 4 * 768 * 2 / 12.5e9)
    break_even_4 = (2 * 768 * 3072 * 4 / 12.5e9) / (3 * comp + 4 * 768 * 4 / 12.5e9)
    assert 1050 < break_even_2 < 1060 and 1245 < break_even_4 < 1250
    load_LE = np.zeros((1, 16))
    load_LE[0, 5] = 1150
    assert np.flatnonzero(half.plan(load_LE, cluster).shadow_LE[0]).tolist() == [5]
    assert not get_policy("fastermoe").plan(load_LE, cluster).shadow_LE.any()


def test_routing_spreads_shadowed_tokens_over_gpus() -> None:
    placement = get_policy("fastermoe", **SHAPES).plan(LOAD_E[None, :], UNIT)
    routing = route(LOAD_E[None, :], placement, slots_per_gpu=3, capacity_factor=None)
    shadow_tokens = 5 + 40 + 20 + 30
    assert routing.shadow_LG.sum() == shadow_tokens and routing.shadow_LG.max() - routing.shadow_LG.min() <= 1
    # only e2 (2 tokens over 2 slots) and e5 (1 token over 2 slots) use slots
    assert routing.assigned_LR.sum() == 3


@pytest.mark.parametrize("bad", [{"max_shadow": -1}, {"d_model": 0}, {"d_ff": True}, {"weight_bytes": 0},
                                 {"activation_bytes": 2.5}])
def test_bad_options_raise(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_policy("fastermoe", **bad)
