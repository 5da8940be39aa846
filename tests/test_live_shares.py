"""The live split rule (symi_sim.live_shares) against hand-computed cases and the linear program (scipy HiGHS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import symi_sim.live_shares as live_shares
from symi_sim.live_reference import lp_least_remote, lp_max_served, lp_min_max
from symi_sim.live_shares import live_split
from symi_sim.placement import Placement
from symi_sim.routing import remote_tokens_L, route


def live(phy2log_LR: np.ndarray, num_experts: int) -> Placement:
    even = Placement.even(np.asarray(phy2log_LR), num_experts)
    return Placement(even.phy2log_LR, even.share_LR, num_experts, live_shares=True)


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(w_E, phy2log_R, slots_per_gpu): every expert has a replica, the rest random; skewed loads, some zero."""
    num_gpus, slots_per_gpu = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    num_slots = num_gpus * slots_per_gpu
    num_experts = int(rng.integers(1, num_slots + 1))
    phy2log_R = np.concatenate([np.arange(num_experts), rng.integers(0, num_experts, num_slots - num_experts)])
    rng.shuffle(phy2log_R)
    w_E = (rng.zipf(1.3, num_experts) * rng.integers(0, 60, num_experts)).clip(0, 20_000).astype(np.int64)
    return w_E, phy2log_R, slots_per_gpu


def adversarial_instances() -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Cases a greedy or one-hop rebalancing gets wrong, plus degenerate ones."""
    return [
        # a chain: GPU 0 must shed load to GPU 2 through expert 1 on GPUs 1 and 2 (loads 10, 9, 8 -> 9, 9, 9)
        (np.array([2, 16, 9]), np.array([0, 2, 0, 1, 1, 2]), 2),
        # everything on one expert with replicas on every GPU
        (np.array([1001, 0, 0, 0]), np.array([0, 1, 0, 2, 0, 3, 0, 0]), 2),
        # an expert's replicas all on one GPU (no split possible) beside a splittable one
        (np.array([50, 7, 7]), np.array([0, 0, 1, 2, 1, 2]), 2),
        # one GPU
        (np.array([5, 3]), np.array([0, 1, 0]), 3),
        # no load at all
        (np.zeros(3, dtype=np.int64), np.array([0, 1, 2, 0]), 2),
        # ties everywhere
        (np.array([6, 6, 6, 6]), np.array([0, 1, 2, 3, 0, 1, 2, 3]), 2),
    ]


def instances(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return adversarial_instances() + [random_instance(rng) for _ in range(count)]


def gpu_loads(x_R: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    return x_R.reshape(-1, slots_per_gpu).sum(axis=1)


def check_split(x_R: np.ndarray, w_E: np.ndarray, phy2log_R: np.ndarray) -> None:
    assert x_R.dtype == np.int64 and (x_R >= 0).all()
    assert np.array_equal(np.bincount(phy2log_R, weights=x_R, minlength=w_E.size).astype(np.int64), w_E)


def test_hand_computed_case() -> None:
    # GPU 0 holds experts 0 and 1 (8 tokens, fixed), GPU 1 experts 0 and 2 (no tokens): expert 0's 10 tokens
    # split 1 / 9, so both GPUs carry 9
    x = live_split(np.array([[10, 8, 0]]), live([[0, 1, 0, 2]], 3), slots_per_gpu=2)
    assert x.tolist() == [[1, 8, 9, 0]]


def test_two_replicas_on_one_gpu_share_its_part_evenly() -> None:
    # expert 0: slots 0, 1 on GPU 0 and slot 2 on GPU 1; expert 1 (9 tokens) on GPU 1. 21 tokens of expert 0:
    # T* = 15: GPU 0 takes 15 (8 + 7 over its two replicas, the extra token to the lower slot), GPU 1 6 + 9
    x = live_split(np.array([[21, 9]]), live([[0, 0, 0, 1]], 2), slots_per_gpu=2)
    assert x.tolist() == [[8, 7, 6, 9]]


def test_residual_search_matches_scipy_breadth_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # every min cut the search for T* steps from (the nodes reachable in the residual network) equals scipy's breadth
    # first search over the same residual arcs, on random instances in every mode
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    reached = live_shares._Network.reached_from_source
    checked = []

    def compared(net: live_shares._Network) -> tuple[np.ndarray, np.ndarray]:
        in_x, in_g = reached(net)
        row_Z = np.repeat(np.arange(net.num_nodes), np.diff(net.indptr))
        residual = csr_matrix((np.ones(int(net.open_Z.sum())), (row_Z[net.open_Z], net.indices[net.open_Z])),
                              shape=net.shape)
        expect = np.zeros(net.num_nodes, dtype=bool)
        expect[breadth_first_order(residual, 0, directed=True, return_predecessors=False)] = True
        assert np.array_equal(in_x, expect[2:2 + in_x.size])
        assert np.array_equal(in_g.reshape(-1), expect[2 + in_x.size:])
        checked.append(1)
        return in_x, in_g

    monkeypatch.setattr(live_shares._Network, "reached_from_source", compared)
    rng = np.random.default_rng(7)
    for _ in range(100):
        num_experts, slots_per_gpu = int(rng.integers(4, 12)), int(rng.integers(2, 5))
        num_gpus = int(rng.integers(3, 9))
        if num_gpus * slots_per_gpu < num_experts:
            continue
        phy2log_LR = np.stack([np.r_[rng.permutation(num_experts),
                                     rng.integers(0, num_experts, num_gpus * slots_per_gpu - num_experts)]
                               for _ in range(8)])
        load_LE = rng.integers(0, 60, (8, num_experts)) * (rng.random((8, num_experts)) < 0.8)
        mode, factor = [("gpu", None), ("gpu", 0.9), ("slot", 1.0)][int(rng.integers(3))]
        buffers = phy2log_LR.shape[1] if mode == "slot" else num_gpus
        capacity_L = None if factor is None else np.ceil(factor * load_LE.sum(axis=1) / buffers).astype(np.int64)
        live_split(load_LE, live(phy2log_LR, num_experts), slots_per_gpu=slots_per_gpu, capacity_mode=mode,
                   capacity_L=capacity_L)
    assert len(checked) >= 10


def test_gpu_mode_over_budget_serves_the_most_then_fills_to_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU 0 holds experts 0 and 1 (6 tokens, fixed), GPU 1 experts 0 and 2 (2 tokens); budget 5 per GPU. T* = 9
    # (18 tokens on 2 GPUs) > 5: first the max flow at the budget, which serves GPU 1's 3 free tokens from expert 0
    # (GPU 0 is over budget already); expert 0's 7 left then fit straight onto the room below 9 (3 on GPU 0, 4 more
    # on GPU 1), so that one flow is all it takes
    flows = []
    max_flow = live_shares._Network.max_flow
    monkeypatch.setattr(live_shares._Network, "max_flow",
                        lambda net, *a, **k: flows.append(1) or max_flow(net, *a, **k))
    x = live_split(np.array([[10, 6, 2]]), live([[0, 1, 0, 2]], 3), slots_per_gpu=2, capacity_mode="gpu",
                   capacity_L=np.array([5]))
    assert x.tolist() == [[3, 6, 7, 2]]
    assert len(flows) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_dropless_max_load_is_the_lp_optimum_rounded_up(seed: int) -> None:
    for w_E, phy2log_R, slots_per_gpu in instances(60, seed):
        num_experts = w_E.size
        x_R = live_split(w_E[None, :], live(phy2log_R[None, :], num_experts), slots_per_gpu=slots_per_gpu)[0]
        check_split(x_R, w_E, phy2log_R)
        optimum = lp_min_max(w_E.astype(float), phy2log_R, slots_per_gpu)
        peak = gpu_loads(x_R, slots_per_gpu).max()
        assert optimum - 1e-6 <= peak <= np.ceil(optimum - 1e-6), (w_E, phy2log_R, peak, optimum)


@pytest.mark.parametrize("seed", [2, 3])
def test_gpu_mode_serves_the_most_and_peaks_at_the_optimum(seed: int) -> None:
    for w_E, phy2log_R, slots_per_gpu in instances(60, seed):
        num_gpus = phy2log_R.size // slots_per_gpu
        placement = live(phy2log_R[None, :], w_E.size)
        peak = gpu_loads(live_split(w_E[None, :], placement, slots_per_gpu=slots_per_gpu)[0], slots_per_gpu).max()
        for factor in (0.8, 1.0, 1.2):
            budget = int(np.ceil(factor * w_E.sum() / num_gpus))
            x_R = live_split(w_E[None, :], placement, slots_per_gpu=slots_per_gpu, capacity_mode="gpu",
                             capacity_L=np.array([budget]))[0]
            check_split(x_R, w_E, phy2log_R)
            load_G = gpu_loads(x_R, slots_per_gpu)
            assert load_G.max() == peak
            served = np.minimum(load_G, budget).sum()
            # an integer max flow serves the LP's most (its optimum is integral at integer capacities)
            assert served == pytest.approx(lp_max_served(w_E.astype(float), phy2log_R, slots_per_gpu, budget),
                                           abs=1e-6)


@pytest.mark.parametrize("seed", [4, 5])
def test_slot_mode_drops_the_fewest_then_balances(seed: int) -> None:
    for w_E, phy2log_R, slots_per_gpu in instances(60, seed):
        num_slots = phy2log_R.size
        cnt_E = np.bincount(phy2log_R, minlength=w_E.size)
        for factor in (0.7, 1.0, 1.5):
            cap = int(np.ceil(factor * w_E.sum() / num_slots))
            x_R = live_split(w_E[None, :], live(phy2log_R[None, :], w_E.size), slots_per_gpu=slots_per_gpu,
                             capacity_mode="slot", capacity_L=np.array([cap]))[0]
            check_split(x_R, w_E, phy2log_R)
            assert np.maximum(x_R - cap, 0).sum() == np.maximum(w_E - cnt_E * cap, 0).sum()
            optimum = lp_min_max(w_E.astype(float), phy2log_R, slots_per_gpu, slot_cap=cap)
            assert gpu_loads(x_R, slots_per_gpu).max() <= np.ceil(optimum - 1e-6)


def test_layers_are_independent_and_deterministic() -> None:
    rng = np.random.default_rng(7)
    num_layers, num_experts, num_gpus, slots_per_gpu = 30, 6, 4, 3
    num_slots = num_gpus * slots_per_gpu
    phy2log_LR = np.stack([rng.permutation(np.concatenate([np.arange(num_experts),
                                                           rng.integers(0, num_experts, num_slots - num_experts)]))
                           for _ in range(num_layers)])
    load_LE = (rng.zipf(1.4, (num_layers, num_experts)) * rng.integers(0, 40, (num_layers, num_experts)))
    load_LE = load_LE.clip(0, 5000).astype(np.int64)
    placement = live(phy2log_LR, num_experts)
    budget_L = load_LE.sum(axis=1) // num_gpus
    together = live_split(load_LE, placement, slots_per_gpu=slots_per_gpu, capacity_mode="gpu", capacity_L=budget_L)
    for layer in range(num_layers):
        alone = live_split(load_LE[layer:layer + 1], placement.take_layers(slice(layer, layer + 1)),
                           slots_per_gpu=slots_per_gpu, capacity_mode="gpu", capacity_L=budget_L[layer:layer + 1])
        assert np.array_equal(alone[0], together[layer])
    again = live_split(load_LE, placement, slots_per_gpu=slots_per_gpu, capacity_mode="gpu", capacity_L=budget_L)
    assert np.array_equal(again, together)


@pytest.mark.parametrize("capacity_mode", ["dropless", "slot"])
def test_many_layers_in_one_call_each_reach_their_lp_optimum(capacity_mode: str) -> None:
    # the lower bounds that start the search index experts by their place within a layer: layers of different
    # sizes in one call must each still end at their own optimum (a bound above it would show as a higher peak)
    rng = np.random.default_rng(11)
    num_layers, num_experts, num_gpus, slots_per_gpu = 40, 8, 5, 3
    num_slots = num_gpus * slots_per_gpu
    phy2log_LR = np.stack([rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(
        0, rng.integers(1, num_experts + 1), num_slots - num_experts)])) for _ in range(num_layers)])
    load_LE = (rng.zipf(1.3, (num_layers, num_experts)) * rng.integers(0, 50, (num_layers, num_experts)))
    load_LE = load_LE.clip(0, 20_000).astype(np.int64)
    cap_L = -(-load_LE.sum(axis=1) // num_slots)
    slot = capacity_mode == "slot"
    x_LR = live_split(load_LE, live(phy2log_LR, num_experts), slots_per_gpu=slots_per_gpu,
                      capacity_mode="slot" if slot else "gpu", capacity_L=cap_L if slot else None)
    for layer in range(num_layers):
        check_split(x_LR[layer], load_LE[layer], phy2log_LR[layer])
        optimum = lp_min_max(load_LE[layer].astype(float), phy2log_LR[layer], slots_per_gpu,
                             slot_cap=int(cap_L[layer]) if slot else None)
        assert gpu_loads(x_LR[layer], slots_per_gpu).max() == np.ceil(optimum - 1e-6), layer


def test_route_applies_the_live_rule_only_to_live_placements() -> None:
    phy2log_LR = np.array([[0, 1, 0, 2]])
    load_LE = np.array([[10, 8, 0]])
    planned = Placement.even(phy2log_LR, 3)
    live_routing = route(load_LE, live(phy2log_LR, 3), slots_per_gpu=2, capacity_factor=None)
    planned_routing = route(load_LE, planned, slots_per_gpu=2, capacity_factor=None)
    assert live_routing.assigned_LR.tolist() == [[1, 8, 9, 0]]
    assert planned_routing.assigned_LR.tolist() == [[5, 8, 5, 0]]
    assert live_routing.imbalance_L[0] == pytest.approx(1.0)
    assert planned_routing.imbalance_L[0] == pytest.approx(13 / 9)
    # gpu mode at factor 1.0: a budget of 9 per GPU; live drops nothing, planned drops 4 on GPU 0
    live_gpu = route(load_LE, live(phy2log_LR, 3), slots_per_gpu=2, capacity_factor=1.0, capacity_mode="gpu")
    planned_gpu = route(load_LE, planned, slots_per_gpu=2, capacity_factor=1.0, capacity_mode="gpu")
    assert live_gpu.dropped_LE.sum() == 0 and planned_gpu.dropped_LE.sum() == 4


def test_shadowed_tokens_count_as_fixed_gpu_load() -> None:
    # expert 2 shadowed: its 6 tokens spread 3 / 3 over the GPUs outside the slots; expert 0 balances around them
    placement = Placement(np.array([[0, 1, 0, 2]]), np.array([[0.5, 1, 0.5, 1]]), 3,
                          shadow_LE=np.array([[False, False, True]]), live_shares=True)
    x = live_split(np.array([[10, 4, 6]]), placement, slots_per_gpu=2)
    assert x.tolist() == [[3, 4, 7, 0]]


def test_token_counts_past_the_network_capacity_are_refused() -> None:
    with pytest.raises(ValueError, match="int32"):
        live_split(np.array([[2 ** 31, 1]]), live([[0, 1, 0, 1]], 2), slots_per_gpu=2)


def test_placement_json_keeps_the_share_mode() -> None:
    placement = live([[0, 1, 0, 2]], 3)
    data = placement.to_json_dict()
    assert data["shares"] == "live"
    again = Placement.from_json_dict(data)
    assert again.live_shares and again.same_as(placement)
    assert "shares" not in Placement.even(np.array([[0, 1, 0, 2]]), 3).to_json_dict()
    with pytest.raises(ValueError, match="shares"):
        Placement.from_json_dict({**data, "shares": "sometimes"})


def random_sources(w_E: np.ndarray, num_gpus: int, rng: np.random.Generator) -> np.ndarray:
    """[E, G] each expert's tokens over the GPUs that routed them, skewed per expert."""
    return np.stack([rng.multinomial(w, rng.dirichlet(np.full(num_gpus, 0.7))) for w in w_E]).astype(np.int64)


def test_sources_keep_tokens_local_where_the_optimum_leaves_room() -> None:
    # GPU 0 holds expert 0 alone (10 tokens: T* = 10); expert 1 (8 tokens) on GPUs 1 and 2, routed 6 by GPU 1 and
    # 2 by GPU 2: any split of expert 1 is optimal, and 6 / 2 keeps all of them where they were routed
    phy2log_LR, load_LE = np.array([[0, 1, 1]]), np.array([[10, 8]])
    source_LEG = np.array([[[10, 0, 0], [0, 6, 2]]])
    x = live_split(load_LE, live(phy2log_LR, 2), slots_per_gpu=1, source_LEG=source_LEG)
    assert x.tolist() == [[10, 6, 2]]
    # where the optimum needs remote tokens: GPUs 0 | 1 | 2 hold experts 0, 3 | 1, 2 | 1, 3; experts 0 (10 tokens)
    # and 2 (5) are held once, so T* = 10 and expert 3 (4, all routed by GPU 0) must go to GPU 2; expert 1 (8, all
    # routed by GPU 1) keeps 5 there, as many as GPU 1's room, and sends 3 to GPU 2
    x = live_split(np.array([[10, 8, 5, 4]]), live([[0, 3, 1, 2, 1, 3]], 4), slots_per_gpu=2,
                   source_LEG=np.array([[[10, 0, 0], [0, 8, 0], [0, 5, 0], [4, 0, 0]]]))
    assert x.tolist() == [[10, 0, 5, 5, 3, 4]]


@pytest.mark.parametrize("capacity_mode,factor", [("dropless", None), ("gpu", 0.9), ("gpu", 1.1), ("slot", 1.0)])
def test_sources_change_no_optimum_and_cut_traffic_to_near_the_least(capacity_mode: str, factor: float | None
                                                                     ) -> None:
    rng = np.random.default_rng(21)
    remote = {"sources": 0, "blind": 0, "least": 0.0}
    for w_E, phy2log_R, slots_per_gpu in instances(80, 13):
        num_gpus = phy2log_R.size // slots_per_gpu
        source_EG = random_sources(w_E, num_gpus, rng)
        buffers = phy2log_R.size if capacity_mode == "slot" else num_gpus
        kwargs = {"slots_per_gpu": slots_per_gpu, "capacity_factor": factor,
                  "capacity_mode": "slot" if capacity_mode == "slot" else "gpu"}
        placement = live(phy2log_R[None, :], w_E.size)
        blind = route(w_E[None, :], placement, **kwargs)
        local = route(w_E[None, :], placement, source_LEG=source_EG[None], **kwargs)
        check_split(local.assigned_LR[0], w_E, phy2log_R)
        # the same busiest GPU and the same tokens served: sources only choose among optimal splits
        assert local.gpu_load_LG.max() == blind.gpu_load_LG.max(), (w_E, phy2log_R, buffers)
        assert local.dropped_LE.sum() == blind.dropped_LE.sum()
        remote["sources"] += remote_tokens_L(local.assigned_LR, source_EG[None], phy2log_R[None], slots_per_gpu)[0]
        remote["blind"] += remote_tokens_L(blind.assigned_LR, source_EG[None], phy2log_R[None], slots_per_gpu)[0]
        if capacity_mode == "dropless":
            remote["least"] += lp_least_remote(w_E.astype(float), source_EG, phy2log_R, slots_per_gpu,
                                               int(local.gpu_load_LG.max()))
    assert remote["sources"] < remote["blind"], remote
    if capacity_mode == "dropless":
        assert remote["least"] - 1e-6 <= remote["sources"] <= 1.01 * remote["least"], remote


def test_remote_tokens_count_what_leaves_the_routing_gpu() -> None:
    # GPUs 0 | 1 hold experts 0, 1 | 0, 1. Expert 0 takes 4 / 6, routed 7 by GPU 0 and 3 by GPU 1: 4 + 3 stay, 3
    # travel; expert 1 takes 0 / 2, both routed by GPU 0: both travel
    assigned_LR, phy2log_LR = np.array([[4, 0, 6, 2]]), np.array([[0, 1, 0, 1]])
    source_LEG = np.array([[[7, 3], [2, 0]]])
    assert remote_tokens_L(assigned_LR, source_LEG, phy2log_LR, 2).tolist() == [5]
    # two slots of expert 0 on GPU 0 (slots 0, 1) hold 4 together
    assert remote_tokens_L(np.array([[1, 3, 6, 0]]), np.array([[[4, 6], [0, 0]]]), np.array([[0, 0, 0, 1]]),
                           2).tolist() == [0]


@pytest.mark.parametrize("source_LEG", [[[[2, 1], [1, 1]]], [[[5, -1], [1, 1]]], [[[4], [2]]]])
def test_sources_must_match_the_loads(source_LEG: list) -> None:
    # sums off, a negative count, one GPU too few
    with pytest.raises(ValueError, match="source counts"):
        live_split(np.array([[4, 2]]), live([[0, 1, 0, 1]], 2), slots_per_gpu=2, source_LEG=np.array(source_LEG))


def test_bench_live_shares_quick_run_writes_time_and_traffic_tables(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_live_shares.py"), "--repeats", "2", "--draws", "1",
                    "--lp-draws", "1", "--traffic-every", "50", "--out", str(tmp_path)], cwd=tmp_path, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    timing = json.loads((tmp_path / "bench_live_shares.json").read_text())
    assert [(r["shape"], r["mode"]) for r in timing["results"]] == [
        (shape, mode) for shape in ("paper", "deepseek") for mode in ("dropless", "gpu", "slot")]
    assert timing["meta"]["scipy_floor_ms"] > 0
    assert all(row["max_flows_per_call"] >= 1 for row in timing["results"])
    traffic = json.loads((tmp_path / "bench_live_shares_traffic.json").read_text())["results"]
    assert [r["mode"] for r in traffic] == ["dropless", "gpu"]
    for row in traffic:
        assert 0 < row["remote_live_sources"] < row["remote_live"] <= 1
    assert traffic[0]["remote_lp_least"] <= traffic[0]["remote_live_sources"] + 1e-9
