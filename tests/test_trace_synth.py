"""Synthetic traces: exact top-k totals, determinism, the shape of the drift, and the shipped synthetic trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from symi_sim.cluster import load_cluster
from symi_sim.policies import get_policy
from symi_sim.routing import route
from symi_sim.traces.format import read_trace
from symi_sim.traces.stats import layer_stats
from symi_sim.traces.synth import cap_shares, counts_to_assignments, synth_trace

SHIPPED = Path(__file__).resolve().parent.parent / "traces" / "synthetic-drift.parquet"


def _tv_SL(counts_SLE: np.ndarray) -> np.ndarray:
    p = counts_SLE / counts_SLE.sum(axis=2, keepdims=True)
    return 0.5 * np.abs(p[1:] - p[:-1]).sum(axis=2)


@pytest.mark.parametrize(("top_k", "skew"), [(1, 1.0), (2, 3.0), (4, 6.0)])
def test_totals_exact_and_no_expert_over_the_token_count(top_k, skew):
    # a steep skew over few experts forces the cap: without it the top expert would want > all tokens
    trace = synth_trace(num_experts=6, num_layers=3, num_steps=50, skew=skew, drift=0.5, seed=4, top_k=top_k,
                        tokens_per_step=1000, burst_prob=0.2, burst_scale=50.0)
    np.testing.assert_array_equal(trace.counts_SLE.sum(axis=2), top_k * 1000)
    assert trace.counts_SLE.max() <= 1000
    if top_k > 1:
        assert trace.counts_SLE.max() == 1000      # the cap binds (the busiest expert is on every token)
    # and each layer is realisable by 1000 tokens that each pick top_k distinct experts
    expert_TK = counts_to_assignments(trace.counts_SLE[7, 1], top_k)
    assert expert_TK.shape == (1000, top_k)
    assert all(len(set(row)) == top_k for row in expert_TK.tolist())
    np.testing.assert_array_equal(np.bincount(expert_TK.ravel(), minlength=6), trace.counts_SLE[7, 1])


def test_deterministic_for_a_seed():
    kwargs = {"num_experts": 8, "num_layers": 2, "num_steps": 40, "skew": 1.0, "drift": 0.3, "burst_prob": 0.1}
    a, b = synth_trace(seed=5, **kwargs), synth_trace(seed=5, **kwargs)
    np.testing.assert_array_equal(a.counts_SLE, b.counts_SLE)
    assert not np.array_equal(a.counts_SLE, synth_trace(seed=6, **kwargs).counts_SLE)
    assert a.meta["synth"]["seed"] == 5 and a.model == "synthetic"


def test_cap_shares_water_filling_by_hand():
    np.testing.assert_allclose(cap_shares(np.array([0.7, 0.2, 0.1]), 0.5), [0.5, 0.2 / 0.3 * 0.5, 0.1 / 0.3 * 0.5])
    # two rounds: capping 0.6 at 0.4 lifts 0.3 to 0.45, which is then capped too
    np.testing.assert_allclose(cap_shares(np.array([[0.6, 0.3, 0.05, 0.05]]), 0.4), [[0.4, 0.4, 0.1, 0.1]])
    with pytest.raises(ValueError, match="cannot cap 3 shares at 0.25"):
        cap_shares(np.array([0.5, 0.3, 0.2]), 0.25)


def test_counts_to_assignments_by_hand_and_errors():
    np.testing.assert_array_equal(counts_to_assignments(np.array([2, 1, 3]), 2), [[0, 2], [0, 2], [1, 2]])
    with pytest.raises(ValueError, match="an expert has 3 assignments, more than the 2 tokens"):
        counts_to_assignments(np.array([3, 1]), 2)
    with pytest.raises(ValueError, match="not a multiple of top_k 2"):
        counts_to_assignments(np.array([2, 1]), 2)


def test_skew_and_drift_mean_what_they_say():
    common = {"num_experts": 16, "num_layers": 4, "num_steps": 300, "seed": 0}
    uniform = layer_stats(synth_trace(skew=0.0, drift=0.0, **common))
    # skew 0, drift 0: only multinomial noise, so max/mean ~ 1 + a few sigma of sqrt(2048)/2048
    assert (uniform["skew_median"] < 1.1).all()
    skewed = layer_stats(synth_trace(skew=1.5, drift=0.0, **common))
    # Zipf(1.5) over 16: busiest share 1 / sum_r r^-1.5 = 0.415 -> max/mean 6.6 (only sampling noise on top)
    expected = 16 / sum(r ** -1.5 for r in range(1, 17))
    np.testing.assert_allclose(skewed["skew_median"], expected, rtol=0.03)
    tv_by_drift = [synth_trace(skew=1.0, drift=d, **common) for d in (0.0, 0.1, 0.4)]
    tv_means = [_tv_SL(t.counts_SLE).mean() for t in tv_by_drift]
    assert tv_means[0] < 0.02 < tv_means[1] < tv_means[2]


def test_early_steps_and_first_layer_fluctuate_most():
    trace = synth_trace(num_experts=16, num_layers=6, num_steps=600, skew=1.0, drift=0.2, seed=2)
    tv_SL = _tv_SL(trace.counts_SLE)
    assert tv_SL[:50].mean() > 1.5 * tv_SL[-300:].mean()
    assert tv_SL[:, 0].mean() > 1.2 * tv_SL[:, 1:].mean()


def test_bursts_multiply_an_expert_for_a_few_steps():
    common = {"num_experts": 8, "num_layers": 1, "num_steps": 400, "skew": 0.0, "drift": 0.0, "seed": 9}
    calm = synth_trace(**common).counts_SLE[:, 0]
    bursty = synth_trace(burst_prob=0.05, burst_scale=9.0, **common).counts_SLE[:, 0]
    assert calm.max() < 1.2 * calm.mean()
    # a burst lifts one of 8 equal experts to weight 9 of 16: share ~ 0.56, i.e. ~4.5x the mean
    mean = bursty.sum(axis=1, keepdims=True) / 8
    assert (bursty.max(axis=1) > 4 * mean[:, 0]).mean() > 0.05


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"num_experts": 0}, "num_experts must be a positive integer"),
        ({"top_k": 9}, "top_k 9 exceeds the number of experts 8"),
        ({"skew": -1.0}, "skew must be a finite number >= 0"),
        ({"drift": 1.5}, r"drift must be a number in \[0, 1\]"),
        ({"burst_prob": 2.0}, r"burst probability must be a number in \[0, 1\]"),
        ({"burst_scale": 0.0}, "burst scale must be a finite number > 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_parameters(change, expected):
    kwargs = {"num_experts": 8, "num_layers": 1, "num_steps": 2, "skew": 1.0, "drift": 0.1, "seed": 0, **change}
    with pytest.raises(ValueError, match=expected):
        synth_trace(**kwargs)


def test_shipped_synthetic_trace_regenerates_and_drops_like_the_paper():
    shipped = read_trace(SHIPPED)
    again = synth_trace(num_experts=16, num_layers=12, num_steps=1000, skew=1.0, drift=0.2, seed=1,
                        burst_prob=0.01)
    np.testing.assert_array_equal(again.counts_SLE, shipped.counts_SLE)
    assert (shipped.top_k, shipped.tokens_per_step) == (1, 32768)
    cluster = load_cluster("paper-a100-16")
    placement = get_policy("static").plan(shipped.counts_SLE[0], cluster)
    kept_S = np.array([
        1.0 - route(shipped.counts_SLE[s], placement, slots_per_gpu=cluster.slots_per_gpu, capacity_factor=1.0,
                    num_assignments_L=shipped.num_assignments_L(s)).dropped_fraction
        for s in range(0, shipped.num_steps, 5)
    ])
    assert 0.45 <= kept_S.mean() <= 0.75
    # popularity really shifts: the busiest expert of most layers differs between early and late windows
    p_SLE = shipped.counts_SLE / shipped.counts_SLE.sum(axis=2, keepdims=True)
    moved_L = p_SLE[100:200].mean(axis=0).argmax(axis=1) != p_SLE[900:].mean(axis=0).argmax(axis=1)
    assert moved_L.sum() >= 8
