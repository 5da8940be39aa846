"""The policy contract, checked for every registered policy (policies added later are covered automatically).

Per (policy, cluster, load): a valid placement with R slots and >= 1 replica per expert, shares summing to 1,
deterministic output, `previous=` accepted; uniform load is balanced; a one-hot load is never served worse than
DeepSpeed's static layout. Bad loads, impossible clusters and unknown names/options raise ValueError.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symi_sim.cluster import Cluster, load_cluster
from symi_sim.placement import Placement
from symi_sim.policies import available_policies, get_policy
from symi_sim.policies.base import OPTIMIZER_LAYOUTS
from symi_sim.routing import route

POLICIES = available_policies()
NUM_LAYERS = 2
# (cluster, num_experts): E divides R, E divides R with several GPUs per node, E does not divide R
CLUSTERS = {
    "paper-a100-16": (load_cluster("paper-a100-16"), 16),
    "2n4g2s": (Cluster(name="2n4g2s", num_nodes=2, gpus_per_node=4, slots_per_gpu=2), 8),
    "2n3g2s-e5": (Cluster(name="2n3g2s-e5", num_nodes=2, gpus_per_node=3, slots_per_gpu=2), 5),
}
LOADS = ("uniform", "zipf", "onehot", "zero")


def _load(kind: str, cluster: Cluster, num_experts: int) -> np.ndarray:
    """[L, E] integer token counts."""
    if kind == "uniform":
        per_expert = 1000 * max(cluster.num_slots // num_experts, 1)
        return np.full((NUM_LAYERS, num_experts), per_expert, dtype=np.int64)
    if kind == "zipf":
        weight_E = 1.0 / np.arange(1, num_experts + 1) ** 1.2
        row_E = np.round(8192 * weight_E / weight_E.sum()).astype(np.int64)
        return np.stack([row_E, row_E[::-1]])   # hottest expert first in layer 0, last in layer 1
    if kind == "onehot":
        load_LE = np.zeros((NUM_LAYERS, num_experts), dtype=np.int64)
        load_LE[0, 0] = 8192
        load_LE[1, num_experts - 1] = 8192
        return load_LE
    assert kind == "zero"
    return np.zeros((NUM_LAYERS, num_experts), dtype=np.int64)


def _check_placement(placement: Placement, cluster: Cluster, num_experts: int) -> None:
    assert isinstance(placement, Placement)
    assert placement.phy2log_LR.shape == (NUM_LAYERS, cluster.num_slots)
    assert placement.num_experts == num_experts
    assert np.issubdtype(placement.phy2log_LR.dtype, np.integer)
    assert placement.phy2log_LR.min() >= 0 and placement.phy2log_LR.max() < num_experts
    placement.validate(cluster, num_layers=NUM_LAYERS)
    for layer in range(NUM_LAYERS):
        count_E = np.bincount(placement.phy2log_LR[layer], minlength=num_experts)
        assert count_E.min() >= 1, f"layer {layer}: an expert has no replica: {count_E}"
        assert count_E.tolist() == placement.logcnt_LE[layer].tolist()
        for e in range(num_experts):
            total = sum(placement.share_LR[layer, p] for p in range(cluster.num_slots)
                        if placement.phy2log_LR[layer, p] == e)
            assert total == pytest.approx(1.0, abs=1e-9)
    if placement.shadow_LE is not None:
        assert placement.shadow_LE.shape == (NUM_LAYERS, num_experts)


def _max_gpu_load_L(load_LE: np.ndarray, placement: Placement, cluster: Cluster) -> np.ndarray:
    return route(load_LE, placement, slots_per_gpu=cluster.slots_per_gpu, capacity_factor=None).gpu_load_LG.max(1)


@pytest.mark.parametrize("load_kind", LOADS)
@pytest.mark.parametrize("cluster_name", list(CLUSTERS))
@pytest.mark.parametrize("name", POLICIES)
def test_contract(name: str, cluster_name: str, load_kind: str) -> None:
    cluster, num_experts = CLUSTERS[cluster_name]
    load_LE = _load(load_kind, cluster, num_experts)
    policy = get_policy(name)
    placement = policy.plan(load_LE, cluster)
    _check_placement(placement, cluster, num_experts)

    # deterministic: the same instance again, and a fresh instance, give the same placement
    assert policy.plan(load_LE.copy(), cluster).same_as(placement)
    assert get_policy(name).plan(load_LE, cluster).same_as(placement)

    # previous= works, step after step, and stays deterministic
    second = policy.plan(load_LE, cluster, previous=placement)
    _check_placement(second, cluster, num_experts)
    other_LE = _load("zipf", cluster, num_experts)[::-1].copy()
    third = policy.plan(other_LE, cluster, previous=second)
    _check_placement(third, cluster, num_experts)
    assert get_policy(name).plan(other_LE, cluster, previous=second).same_as(third)

    # the placement and the policy's options serialise (what `symi plan` writes)
    text = json.dumps(placement.to_json_dict(cluster, policy.config()), default=lambda v: v.item())
    assert Placement.from_json_dict(json.loads(text)).same_as(placement)

    routing = route(load_LE, placement, slots_per_gpu=cluster.slots_per_gpu, capacity_factor=1.0)
    if load_kind == "uniform":
        if cluster.num_slots % num_experts == 0:
            # every expert needs R/E equal slots to fit slot buffers of A/R tokens: balanced, nothing dropped
            assert routing.imbalance_L.tolist() == [1.0] * NUM_LAYERS
            assert routing.dropped_LE.sum() == 0
        else:
            spread_L = placement.logcnt_LE.max(axis=1) - placement.logcnt_LE.min(axis=1)
            assert spread_L.max() <= 1, placement.logcnt_LE
    if load_kind == "onehot":
        static = get_policy("static").plan(load_LE, cluster)
        assert (_max_gpu_load_L(load_LE, placement, cluster) <= _max_gpu_load_L(load_LE, static, cluster)).all()
    if load_kind == "zero":
        assert routing.dropped_LE.sum() == 0 and routing.imbalance_L.tolist() == [1.0] * NUM_LAYERS
    if not policy.needs_popularity:
        assert get_policy(name).plan(_load("zipf", cluster, num_experts), cluster).same_as(placement)


@pytest.mark.parametrize("name", POLICIES)
def test_class_attributes(name: str) -> None:
    policy = get_policy(name)
    assert policy.name == name
    assert isinstance(policy.optimizer_coupled, bool) and isinstance(policy.uses_current_load, bool)
    assert isinstance(policy.needs_popularity, bool)
    assert isinstance(policy.rebalance_every, int) and policy.rebalance_every >= 1
    assert policy.config()["name"] == name
    assert policy.optimizer_layout in OPTIMIZER_LAYOUTS
    # moving a replica moves its optimizer state exactly in the layout where every replica holds it
    assert policy.optimizer_coupled == (policy.optimizer_layout == "replica")


def test_optimizer_layouts() -> None:
    layouts = {name: get_policy(name).optimizer_layout for name in POLICIES}
    assert layouts["static"] == layouts["fastermoe"] == "group"
    assert layouts["flexmoe"] == "replica"
    assert layouts["symi"] == layouts["symi-balanced"] == layouts["eplb"] == layouts["oracle"] == "sharded"


BAD_LOADS = {
    "1-D": (np.ones(8), "2-D"),
    "3-D": (np.ones((2, 2, 8)), "2-D"),
    "no experts": (np.ones((2, 0)), "2-D"),
    "negative": (np.array([[1, 2, -3, 4, 5, 6, 7, 8]] * 2), "negative"),
    "NaN": (np.array([[1, 2, np.nan, 4, 5, 6, 7, 8]] * 2), "NaN"),
    "inf": (np.array([[1, 2, np.inf, 4, 5, 6, 7, 8]] * 2), "infinite"),
    "strings": (np.array([["a"] * 8] * 2), "numeric"),
}


@pytest.mark.parametrize("bad", list(BAD_LOADS))
@pytest.mark.parametrize("name", POLICIES)
def test_bad_load_raises(name: str, bad: str) -> None:
    load, message = BAD_LOADS[bad]
    cluster, _ = CLUSTERS["2n4g2s"]
    with pytest.raises(ValueError, match=message):
        get_policy(name).plan(load, cluster)


@pytest.mark.parametrize("name", POLICIES)
def test_impossible_cluster_raises(name: str) -> None:
    cluster = Cluster(num_nodes=1, gpus_per_node=2, slots_per_gpu=3)
    with pytest.raises(ValueError, match=r"impossible cluster: 7 experts .* 6 slots"):
        get_policy(name).plan(np.ones((1, 7)), cluster)


@pytest.mark.parametrize("name", POLICIES)
def test_mismatched_previous_raises(name: str) -> None:
    cluster, num_experts = CLUSTERS["2n4g2s"]
    load_LE = _load("zipf", cluster, num_experts)
    wrong_experts = get_policy("static").plan(np.ones((NUM_LAYERS, num_experts - 1)), cluster)
    wrong_layers = get_policy("static").plan(np.ones((NUM_LAYERS + 1, num_experts)), cluster)
    wrong_slots = get_policy("static").plan(np.ones((NUM_LAYERS, num_experts)), cluster.with_(slots_per_gpu=3))
    policy = get_policy(name)
    with pytest.raises(ValueError, match="experts"):
        policy.plan(load_LE, cluster, previous=wrong_experts)
    with pytest.raises(ValueError, match="layers"):
        policy.plan(load_LE, cluster, previous=wrong_layers)
    with pytest.raises(ValueError, match="slots"):
        policy.plan(load_LE, cluster, previous=wrong_slots)


def test_get_policy_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="unknown policy 'nope'") as info:
        get_policy("nope")
    for name in POLICIES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown policy 'static-50'"):   # static has no rebalance period
        get_policy("static-50")
    for name in POLICIES:
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]") as info:
            get_policy(name, bogus=1)
        assert "options:" in str(info.value)


def test_policies_import_nothing_heavy() -> None:
    code = (
        "import sys, symi_sim.policies\n"
        "print(sorted(m for m in ('torch', 'simpy', 'pandas', 'pyarrow', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


def test_policy_spec_with_options_after_colons() -> None:
    from symi_sim.policies import parse_options

    policy = get_policy("symi-balanced:packing=grouped:num_share_iters=3")
    assert (policy.packing, policy.num_share_iters) == ("grouped", 3)
    flex = get_policy("flexmoe-50:min_gain_ratio=0:threshold=1.5")
    assert (flex.rebalance_every, flex.min_gain_ratio, flex.threshold) == (50, 0, 1.5)
    assert get_policy("symi-balanced:packing=grouped", packing="spread").packing == "spread"  # keywords win
    assert parse_options(["a=1", "b=2.5", "c=true", "d=none", "e=text"]) == {
        "a": 1, "b": 2.5, "c": True, "d": None, "e": "text"}
    with pytest.raises(ValueError, match="must look like key=value"):
        get_policy("symi:packing")
    with pytest.raises(ValueError, match="unknown option"):
        get_policy("symi:bogus=1")
    with pytest.raises(ValueError, match="unknown packing"):
        get_policy("symi-balanced:packing=tight")
