"""simulate(): hand-computed times and bytes on tiny clusters, tables, truncation/looping, run directories."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.placement import Placement
from symi_sim.policies import Policy
from symi_sim.simulator.convergence import paper_model
from symi_sim.simulator.driver import resolve_policy, simulate, write_run
from symi_sim.traces.format import LoadTrace

NIC_BPS = 1e9      # 8 Gb/s
PCIE_BPS = 2e9     # 16 Gb/s
ALPHA = 1e-6
MODEL = ModelConfig(name="tiny", num_layers=2, num_moe_layers=2, d_model=64, d_ff=128, expert_d_ff=128,
                    vocab_size=100, num_experts=2, top_k=1, seq_len=8, global_batch=4)  # 32 tokens per step
X = MODEL.expert_grad_bytes  # = weight bytes


def _cluster(slots_per_gpu: int = 2) -> Cluster:
    return Cluster(name="two", num_nodes=2, gpus_per_node=1, slots_per_gpu=slots_per_gpu, nic_gbps=8.0,
                   pcie_gbps=16.0, link_latency_s=ALPHA, gpu_peak_flops=1e12, compute_efficiency=0.5)


def _trace(load_E: list[int], num_steps: int = 4) -> LoadTrace:
    counts = np.tile(np.array(load_E), (num_steps, MODEL.num_moe_layers, 1))
    return LoadTrace(counts, top_k=1, tokens_per_step=MODEL.tokens_per_step)


def _run(trace: LoadTrace, policies: list, cluster: Cluster | None = None, **kwargs: object) -> pd.DataFrame:
    result = simulate(trace=trace, cluster=cluster or _cluster(), model=MODEL, policies=policies, progress=False,
                      **kwargs)
    return result.iterations


def test_uniform_load_static_drops_nothing_and_matches_symi_up_to_the_documented_costs():
    it = _run(_trace([16, 16]), ["static", "symi"])
    static, symi = (it[it.policy == name].reset_index(drop=True) for name in ("static", "symi"))
    assert static.dropped_fraction.eq(0).all() and symi.dropped_fraction.eq(0).all()
    same = ["phase_a2a_forward_s", "phase_expert_forward_s", "phase_dense_forward_s", "phase_a2a_backward_s",
            "phase_expert_backward_s", "phase_dense_backward_s", "phase_optimizer_s", "bytes_a2a",
            "bytes_dense_allreduce", "bytes_pcie"]
    pd.testing.assert_frame_equal(static[same], symi[same])
    # static: both GPUs hold both experts (slot p -> p % 2): a reduce-scatter over 2 holders sends X/2 per
    # expert, X per GPU per layer. symi (contiguous [0, 0, 1, 1]): one expert per GPU, X/2 to the other owner.
    # symi also all-reduces 2 int32 counts per layer (8 bytes, 2 ceil(log2 2) = 2 messages).
    layers = MODEL.num_moe_layers
    assert static.bytes_grad_collect.eq(2 * X * layers).all()
    assert symi.bytes_grad_collect.eq(X * layers).all()
    popularity_s = layers * (8 / NIC_BPS + 2 * ALPHA)
    collect_saving_s = layers * (X / NIC_BPS - X / 2 / NIC_BPS)
    np.testing.assert_allclose(symi.phase_popularity_s, popularity_s, rtol=1e-12)
    np.testing.assert_allclose(static.phase_grad_collect_s - symi.phase_grad_collect_s, collect_saving_s, rtol=1e-9)
    np.testing.assert_allclose(symi.time_s - static.time_s, popularity_s - 2 * collect_saving_s, rtol=1e-9)
    np.testing.assert_allclose(static.phase_grad_collect_s, layers * (X / NIC_BPS + X / PCIE_BPS + ALPHA),
                               rtol=1e-12)


@dataclass
class FlipPolicy(Policy):
    """Optimizer-coupled: DeepSpeed's layout first, then experts 0 and 1 swap slots 0 and 1 for good."""

    name: ClassVar[str] = "flip"
    optimizer_layout: ClassVar[str] = "replica"

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        phy2log_R = [0, 1, 0, 1] if previous is None else [1, 0, 0, 1]
        return Placement.even(np.array([phy2log_R] * load_LE.shape[0]), load_LE.shape[1])


def test_optimizer_coupled_rebalance_costs_exactly_the_migration():
    it = _run(_trace([16, 16]), [FlipPolicy()], steps=3)
    assert it.replica_moves.tolist() == [0, 2 * MODEL.num_moe_layers, 0]
    # both moved slots are on GPU 0 (node 0): it receives 2 x (W + O) per layer, while each expert's copy comes
    # half from each of its previous holders; node 0's NIC is the busiest
    replica_bytes = MODEL.expert_weight_bytes + MODEL.expert_optimizer_bytes
    migration_s = MODEL.num_moe_layers * (2 * replica_bytes / NIC_BPS + ALPHA)
    assert it.bytes_migration.tolist() == [0, 2 * replica_bytes * MODEL.num_moe_layers, 0]
    assert it.time_s[1] - it.time_s[2] == pytest.approx(migration_s, rel=1e-9)
    assert it.time_s[0] == pytest.approx(it.time_s[2], rel=1e-12)
    assert it.phase_migration_s[1] == pytest.approx(migration_s, rel=1e-12)
    assert it.bytes_weight_sendout.eq(0).all()  # replicas keep their own optimizer state: nothing to send out


def test_gpu_with_twice_the_tokens_gates_the_layer():
    cluster = _cluster(slots_per_gpu=1)
    flops_per_token_s = MODEL.expert_flops_per_assignment / cluster.achieved_flops
    skewed = _run(_trace([22, 10]), ["static"], cluster, capacity_mode="gpu", capacity_factor=2.0)
    even = _run(_trace([16, 16]), ["static"], cluster, capacity_mode="gpu", capacity_factor=2.0)
    assert skewed.dropped_fraction.eq(0).all()
    np.testing.assert_allclose(skewed.phase_expert_forward_s, MODEL.num_moe_layers * 22 * flops_per_token_s,
                               rtol=1e-12)
    np.testing.assert_allclose(skewed.phase_expert_backward_s, 2 * MODEL.num_moe_layers * 22 * flops_per_token_s,
                               rtol=1e-12)
    np.testing.assert_allclose(even.phase_expert_forward_s, MODEL.num_moe_layers * 16 * flops_per_token_s,
                               rtol=1e-12)


def test_slot_mode_pads_buffers_and_drops_the_excess():
    # 4 slots of ceil(32 / 4) = 8 tokens; static gives each expert 2 slots: expert 0 keeps 16 of 22
    it = _run(_trace([22, 10]), ["static"])
    assert it.dropped_fraction.eq(6 / 32).all()
    # padded buffers: each GPU computes its 2 full slots whatever the load
    flops_per_token_s = MODEL.expert_flops_per_assignment / _cluster().achieved_flops
    np.testing.assert_allclose(it.phase_expert_forward_s, MODEL.num_moe_layers * 16 * flops_per_token_s, rtol=1e-12)


def test_steps_truncate_and_loop_cycles():
    trace = _trace([16, 16], num_steps=4)
    assert _run(trace, ["symi"]).step.tolist() == [1, 2, 3]
    assert _run(trace, ["symi"], steps=2).step.tolist() == [1, 2]
    assert _run(trace, ["symi"], steps=7, loop=True).step.tolist() == list(range(1, 8))
    with pytest.raises(ValueError, match="pass --loop"):
        _run(trace, ["symi"], steps=7)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        _run(trace, ["symi"], steps=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policies": ["nope"]}, "unknown policy 'nope'"),
    ({"policies": ["symi", "symi"]}, "more than once"),
    ({"policies": []}, "no policy"),
    ({"capacity_mode": "node"}, "unknown capacity mode"),
    ({"capacity_factor": 0}, "capacity factor"),
    ({"window": 0}, "window"),
])
def test_bad_arguments(kwargs, message):
    args = {"policies": ["symi"], **kwargs}
    with pytest.raises(ValueError, match=message):
        _run(_trace([16, 16]), **args)


def test_model_and_trace_must_agree():
    trace = LoadTrace(np.full((3, 2, 4), 8), top_k=1, tokens_per_step=32)
    with pytest.raises(ValueError, match="does not match the trace"):
        _run(trace, ["symi"])


def test_summary_time_to_target_and_speedup():
    result = simulate(trace=_trace([22, 10]), cluster=_cluster(), model=MODEL, policies=["static", "symi"],
                      progress=False)
    summary = result.summary.set_index("policy")
    for name in ("static", "symi"):
        row = summary.loc[name]
        group = result.iterations[result.iterations.policy == name]
        assert row.steps == 3
        assert row.mean_time_s == pytest.approx(group.time_s.mean(), rel=1e-12)
        assert row.survival == pytest.approx(1 - row.dropped_fraction, rel=1e-12)
        assert row.iterations_to_target == pytest.approx(paper_model().iterations_to_target(row.survival))
        assert row.time_to_target_s == pytest.approx(row.iterations_to_target * row.mean_time_s, rel=1e-12)
    assert summary.loc["static", "dropped_fraction"] == pytest.approx(6 / 32)
    assert summary.loc["symi", "dropped_fraction"] < summary.loc["static", "dropped_fraction"]
    assert summary.loc["symi", "speedup_vs_static"] == pytest.approx(
        summary.loc["static", "time_to_target_s"] / summary.loc["symi", "time_to_target_s"], rel=1e-12)
    phases = [c for c in result.iterations.columns if c.startswith("phase_")]
    np.testing.assert_allclose(result.iterations[phases].sum(axis=1), result.iterations.time_s, rtol=1e-12)


def test_policies_with_model_shape_get_the_models():
    _, policy = resolve_policy("flexmoe-50", MODEL)
    assert (policy.d_model, policy.d_ff, policy.rebalance_every) == (64, 128, 50)


def test_write_run(tmp_path):
    result = simulate(trace=_trace([22, 10]), cluster=_cluster(), model=MODEL, policies=["static", "symi"],
                      progress=False)
    out = write_run(result, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "config.json", "iterations.parquet",
                                                     "summary.csv"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "tiny" and config["cluster"]["name"] == "two"
    assert [p["label"] for p in config["policies"]] == ["static", "symi"]
    assert [p["optimizer_layout"] for p in config["policies"]] == ["group", "sharded"]
    assert len(pd.read_parquet(out / "iterations.parquet")) == 6
    with pytest.raises(ValueError, match="not empty"):
        write_run(result, out)
