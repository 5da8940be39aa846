"""Cost formulas: exact bytes and times computed by hand, and the paper's cost analysis and worked example."""

import numpy as np
import pytest

from symi_sim.cluster import BYTES_PER_GBPS, Cluster
from symi_sim.simulator.costs import (
    allreduce_bytes,
    alltoall_bytes,
    bytes_time_s,
    expert_state_bytes,
    migration_bytes,
    optimizer_params_per_gpu,
    paper_collection_time_s,
)

X = 3.375e9  # the paper's example: one GPT-3-175B-sized expert's gradient (or weights), bytes


def _cluster(**fields: object) -> Cluster:
    base = dict(num_nodes=2, gpus_per_node=1, slots_per_gpu=1, nic_gbps=8.0, intra_node_gbps=80.0, pcie_gbps=16.0,
                link_latency_s=0.0)
    base.update(fields)
    return Cluster(**base)


def test_bytes_time_is_alpha_beta():
    assert bytes_time_s(1.25e8, 1.0, 1e-3) == pytest.approx(1.001, rel=1e-15)
    assert bytes_time_s(0, 1.0, 1e-3) == 0.0
    np.testing.assert_array_equal(bytes_time_s(np.array([0.0, 2.5e8]), 2.0), [0.0, 1.0])
    with pytest.raises(ValueError, match="bandwidth"):
        bytes_time_s(1.0, 0.0)


def test_paper_worked_example():
    args = dict(num_experts=64, num_ranks=2048, slots_per_rank=2, expert_bytes=X, pcie_gbps=512.0, nic_gbps=400.0)
    static_s = paper_collection_time_s(layout="group", **args)
    symi_s = paper_collection_time_s(layout="sharded", **args)
    assert symi_s / static_s - 1 == pytest.approx(0.0152, abs=5e-5)  # "+1.52% per phase"
    assert X / (400 * BYTES_PER_GBPS) == pytest.approx(0.0675, rel=1e-12)  # one expert's weights
    assert 8 * X / (400 * BYTES_PER_GBPS) == pytest.approx(0.54, rel=1e-12)  # its optimizer state (8x)


def test_expert_state_bytes_reproduce_the_paper_formulas():
    # 2048 ranks (one GPU per node), 2 slots each, 64 experts placed as DeepSpeed does (slot p holds p % 64):
    # every rank holds 2 distinct experts, each expert is on 64 ranks
    cluster = _cluster(num_nodes=2048, slots_per_gpu=2, nic_gbps=400.0, pcie_gbps=512.0)
    phy2log_LR = (np.arange(4096) % 64)[None, :]
    group = expert_state_bytes(phy2log_LR, cluster, 64, "group", X)
    sharded = expert_state_bytes(phy2log_LR, cluster, 64, "sharded", X)
    np.testing.assert_allclose(group.nic_LN, (2 * 2048 - 64) / 2048 * X, rtol=1e-12)
    np.testing.assert_allclose(sharded.nic_LN, (2 * 2048 - 2) / 2048 * X, rtol=1e-12)
    np.testing.assert_allclose(group.pcie_LG, 64 / 2048 * X, rtol=1e-12)
    np.testing.assert_allclose(sharded.pcie_LG, 64 / 2048 * X, rtol=1e-12)
    args = dict(num_experts=64, num_ranks=2048, slots_per_rank=2, expert_bytes=X, pcie_gbps=512.0, nic_gbps=400.0)
    assert group.time_L(cluster)[0] == pytest.approx(paper_collection_time_s(layout="group", **args), rel=1e-12)
    assert sharded.time_L(cluster)[0] == pytest.approx(paper_collection_time_s(layout="sharded", **args), rel=1e-12)


def test_paper_accounting_reproduces_the_paper_formula_for_any_placement():
    # SYMI's contiguous placement of the worked example (2048 ranks x 2 slots, 64 experts: expert e on the 64
    # slots 64e..64e+63): both slots of a rank hold one expert. Pairs send once per rank, (N-1)/N X; the paper
    # counts every slot, (s N - s)/N X, and its +1.52% per phase against static holds exactly.
    cluster = _cluster(num_nodes=2048, slots_per_gpu=2, nic_gbps=400.0, pcie_gbps=512.0)
    contiguous_LR = np.repeat(np.arange(64), 64)[None, :]
    args = dict(num_experts=64, num_ranks=2048, slots_per_rank=2, expert_bytes=X, pcie_gbps=512.0, nic_gbps=400.0)
    pairs = expert_state_bytes(contiguous_LR, cluster, 64, "sharded", X)
    paper = expert_state_bytes(contiguous_LR, cluster, 64, "sharded", X, accounting="paper")
    np.testing.assert_allclose(pairs.nic_LN, (2048 - 1) / 2048 * X, rtol=1e-12)
    np.testing.assert_allclose(paper.nic_LN, (2 * 2048 - 2) / 2048 * X, rtol=1e-12)
    np.testing.assert_allclose(paper.pcie_LG, 64 / 2048 * X, rtol=1e-12)
    paper_s = paper.time_L(cluster)[0]
    assert paper_s == pytest.approx(paper_collection_time_s(layout="sharded", **args), rel=1e-12)
    static = expert_state_bytes((np.arange(4096) % 64)[None, :], cluster, 64, "group", X)
    assert paper_s / static.time_L(cluster)[0] - 1 == pytest.approx(0.0152, abs=5e-5)   # "+1.52% per phase"
    # "paper" changes SYMI's sharded layout only; group and replica count distinct holdings either way
    for layout in ("group", "replica"):
        one = expert_state_bytes(contiguous_LR, cluster, 64, layout, X)
        other = expert_state_bytes(contiguous_LR, cluster, 64, layout, X, accounting="paper")
        np.testing.assert_array_equal(one.nic_LN, other.nic_LN)
    with pytest.raises(ValueError, match="expert-state accounting"):
        expert_state_bytes(contiguous_LR, cluster, 64, "sharded", X, accounting="slots")
    with pytest.raises(ValueError, match="optimizer location"):
        expert_state_bytes(contiguous_LR, cluster, 64, "sharded", X, location="disk")


def test_slots_of_one_expert_on_one_gpu_send_once():
    cluster = _cluster(num_nodes=2, slots_per_gpu=2)
    # GPU 0 holds expert 0 twice, GPU 1 holds experts 0 and 1: 3 holdings; each sends X/2 to the other owner
    sharded = expert_state_bytes(np.array([[0, 0, 0, 1]]), cluster, 2, "sharded", 1000.0)
    assert sharded.network_L.tolist() == [1500.0]
    # node 0 sends 500, receives 2 holdings x 500 = 1000; node 1 sends 1000, receives 500
    assert sharded.nic_LN.tolist() == [[1000.0, 1000.0]]
    assert sharded.pcie_LG.tolist() == [[1000.0, 1000.0]]  # E X / G each


def test_replica_layout_all_reduces_then_pays_pcie_per_holding():
    cluster = _cluster(num_nodes=2, slots_per_gpu=2)
    replica = expert_state_bytes(np.array([[0, 1, 0, 1]]), cluster, 2, "replica", 1000.0)
    # each GPU all-reduces 2 experts over 2 holders: 2 x 2 (2-1)/2 X, in 2 messages (reduce-scatter, all-gather)
    assert replica.nic_LN.tolist() == [[2000.0, 2000.0]]
    assert replica.messages == 2
    # host memory (the default): each holding's full X goes down PCIe, and its weights come back up, PCIe only
    assert replica.pcie_LG.tolist() == [[2000.0, 2000.0]]
    sendout = expert_state_bytes(np.array([[0, 1, 0, 1]]), cluster, 2, "replica", 1000.0, phase="sendout")
    assert sendout.pcie_LG.tolist() == [[2000.0, 2000.0]]
    assert sendout.network_L.tolist() == [0.0] and sendout.nic_LN.tolist() == [[0.0, 0.0]]
    # no message either: no latency on a cluster that has one
    assert sendout.time_L(cluster.with_(link_latency_s=1e-3)).tolist() == [2000.0 / (16.0 * BYTES_PER_GBPS)]
    # state on the GPU: nothing crosses PCIe, in any layout
    for layout in ("sharded", "group", "replica"):
        for phase in ("collect", "sendout"):
            on_gpu = expert_state_bytes(np.array([[0, 1, 0, 1]]), cluster, 2, layout, 1000.0, location="gpu",
                                        phase=phase)
            assert on_gpu.pcie_LG.tolist() == [[0.0, 0.0]]
    # group (static's ZeRO-1) moves the 1/r shard of each holding: X/2 x 2 holdings
    group = expert_state_bytes(np.array([[0, 1, 0, 1]]), cluster, 2, "group", 1000.0)
    assert group.pcie_LG.tolist() == [[1000.0, 1000.0]] and group.nic_LN.tolist() == [[1000.0, 1000.0]]
    assert optimizer_params_per_gpu(np.array([[0, 1, 0, 1]]), cluster, 2, "replica", 10).tolist() == [20.0]
    assert optimizer_params_per_gpu(np.array([[0, 1, 0, 1]]), cluster, 2, "group", 10).tolist() == [10.0]
    assert optimizer_params_per_gpu(np.array([[0, 1, 0, 1]]), cluster, 2, "sharded", 10).tolist() == [10.0]


def test_two_gpus_all_to_all_exact_time():
    cluster = _cluster(num_nodes=2, nic_gbps=8.0, link_latency_s=1e-3)  # 1e9 bytes/s per NIC
    a2a = alltoall_bytes(np.array([[100.0, 300.0]]), cluster, token_bytes=1e6)
    # GPU 0 receives 100 tokens, half of them from GPU 1; it sends GPU 1 half of GPU 1's 300
    assert a2a.nic_LN.tolist() == [[150e6, 150e6]]
    assert a2a.network_L.tolist() == [200e6]
    assert a2a.time_L(cluster).tolist() == [pytest.approx(0.15 + 1e-3, rel=1e-15)]


def test_shared_nic_carries_both_gpus_traffic():
    # 2 nodes x 2 GPUs; only node 1's GPUs receive (a tokens each). Each node-0 GPU sends a/2 across: the node's
    # NIC carries both, so its time is the sum of the two GPUs' transfer times
    cluster = _cluster(num_nodes=2, gpus_per_node=2, nic_gbps=8.0)
    a = 1000.0
    a2a = alltoall_bytes(np.array([[0.0, 0.0, a, a]]), cluster, token_bytes=1.0)
    per_gpu_sent_s = (a / 2) / 1e9
    assert a2a.nic_LN.tolist() == [[a, a]]
    assert a2a.time_L(cluster)[0] == pytest.approx(2 * per_gpu_sent_s, rel=1e-15)
    # inside node 1, each GPU gets a/4 of the other's tokens over NVLink
    assert a2a.nvlink_LG.tolist() == [[0.0, 0.0, a / 4, a / 4]]


def test_ring_allreduce_bytes():
    cluster = _cluster(num_nodes=2, gpus_per_node=2, link_latency_s=1e-6)
    ring = allreduce_bytes(np.array([4000.0]), cluster)
    assert ring.nic_LN.tolist() == [[6000.0, 6000.0]]  # 2 (G-1)/G x bytes
    assert ring.nvlink_LG.tolist() == [[6000.0] * 4]
    assert ring.network_L.tolist() == [24000.0]
    assert ring.messages == 4  # 2 ceil(log2 4)
    assert ring.time_L(cluster)[0] == pytest.approx(6000.0 / 1e9 + 4e-6, rel=1e-12)


def test_migration_moves_weights_and_optimizer_state():
    cluster = _cluster(num_nodes=2, slots_per_gpu=2, nic_gbps=8.0, link_latency_s=1e-3)
    replica_bytes = 1e9  # W + O
    moved = migration_bytes(np.array([[1, 0, 0, 1]]), np.array([[0, 1, 0, 1]]), cluster, 2, replica_bytes)
    # GPU 0 receives 2 replicas; each comes half from each previous holder (slots 0/2 or 1/3): node 0 sends 1,
    # receives 2 replicas' bytes; node 1 sends 1
    assert moved.network_L.tolist() == [2e9]
    assert moved.nic_LN.tolist() == [[2e9, 1e9]]
    assert moved.time_L(cluster).tolist() == [pytest.approx(2.0 + 1e-3, rel=1e-15)]
    unchanged = migration_bytes(np.array([[0, 1, 0, 1]]), np.array([[0, 1, 0, 1]]), cluster, 2, replica_bytes)
    assert unchanged.time_L(cluster).tolist() == [0.0]
