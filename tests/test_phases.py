"""Every phase function of the simulator (phases.py) against a hand computation on one small case.

Case: 2 nodes x 1 GPU x 2 slots (slots 0, 1 on GPU 0; 2, 3 on GPU 1), links of 1 MB/s (NIC) and 2 MB/s (PCIe),
1 ms link latency; one MoE layer of 3 experts of 64 parameters (d_model 4, expert d_ff 8, GELU: 2 matrices),
2-byte weights, gradients and activations, 12-byte optimizer state; 8 tokens per step, top-1; expert 0 on slots 0
and 2 (one per GPU), expert 1 on slot 1, expert 2 on slot 3; loads 4, 2, 2 at capacity factor 1: every slot gets
ceil(8 / 4) = 2 tokens and serves them. Calibration terms chosen so that every term is visible.
"""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.placement import Placement
from symi_sim.simulator import phases
from symi_sim.simulator.calibration import flop_calibration
from symi_sim.simulator.replay import PlannedStep
from symi_sim.traces.format import LoadTrace

NIC, PCIE = 1e6, 2e6   # bytes/s
CLUSTER = Cluster(name="hand", num_nodes=2, gpus_per_node=1, slots_per_gpu=2, nic_gbps=NIC / 1.25e8, nics_per_node=1,
                  pcie_gbps=PCIE / 1.25e8, link_latency_s=1e-3)
MODEL = ModelConfig(name="hand", num_layers=1, num_moe_layers=1, d_model=4, d_ff=8, expert_d_ff=8, vocab_size=16,
                    num_experts=3, top_k=1, seq_len=4, global_batch=2, weight_bytes=2, grad_bytes=2,
                    activation_bytes=2, optimizer_bytes=12)
CAL = flop_calibration(cluster=CLUSTER, model=MODEL).with_(
    expert_gemm_flops=1e3, dense_flops=1e4, a2a_efficiency=0.5, a2a_latency_s=2e-3, collective_efficiency=0.5,
    collective_latency_s=3e-3, state_fixed_per_expert_s=1e-4, optimizer_bytes_per_s=1e5,
    optimizer_fixed_per_tensor_s=1e-4, layer_forward_fixed_s=5e-3, layer_backward_fixed_s=7e-3)
PLACEMENT = Placement.even(np.array([[0, 1, 0, 2]]), 3)
PREVIOUS = Placement.even(np.array([[0, 1, 2, 0]]), 3)
COUNTS_SLE = np.array([[[4, 2, 2]], [[4, 2, 2]]])
TRACE = LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=8)
X = 64 * 2          # one expert's gradient (or weight) bytes


def test_model_sizes_as_assumed():
    assert MODEL.expert_params == 64 and MODEL.expert_flops_per_assignment == 128 and MODEL.tokens_per_step == 8


def test_route_all_to_all_and_experts():
    plans = [PlannedStep(1, PLACEMENT, PREVIOUS, True, 0.0, np.array([2]))]
    stacked, routing = phases.route_chunk(plans, counts_SLE=COUNTS_SLE, trace=TRACE, cluster=CLUSTER,
                                          capacity_factor=1.0, capacity_mode="slot")
    np.testing.assert_array_equal(routing.served_LR, [[2, 2, 2, 2]])
    a2a_CL, expert_CL, bytes_C = phases.alltoall_and_experts(routing, stacked, num_steps=1, cluster=CLUSTER,
                                                             model=MODEL, calibration=CAL, capacity_factor=1.0,
                                                             capacity_mode="slot")
    # every GPU receives 2 buffers of 2 tokens x 8 bytes = 32 bytes, half from the other node: 16 bytes in and out
    # of each node's NIC at half efficiency, plus one message
    assert a2a_CL[0, 0] == pytest.approx(16 / NIC / 0.5 + 2e-3, rel=1e-12)
    assert expert_CL[0, 0] == pytest.approx(4 * 128 / 1e3, rel=1e-12)   # 4 tokens of 128 FLOPs per GPU
    assert bytes_C[0] == pytest.approx(4 * 32, rel=1e-12)   # 4 all-to-alls, 32 bytes leave their GPU in each
    # unpadded (what the executor computes): the same here, every slot serving its full buffer
    _, served_CL, _ = phases.alltoall_and_experts(routing, stacked, num_steps=1, cluster=CLUSTER, model=MODEL,
                                                  calibration=CAL, capacity_factor=1.0, capacity_mode="slot",
                                                  padded=False)
    assert served_CL[0, 0] == pytest.approx(expert_CL[0, 0], rel=1e-12)


def test_dense_and_popularity():
    flops = 8 / 2 * MODEL.dense_flops_per_token   # the tokens of one GPU through everything but the experts
    assert phases.dense_layer_s(cluster=CLUSTER, model=MODEL, calibration=CAL) == pytest.approx(flops / 1e4)
    seconds_C, bytes_C = phases.popularity(num_steps=2, num_experts=3, num_layers=1, cluster=CLUSTER,
                                           calibration=CAL, needed=True)
    # all-reduce of 3 x 4 bytes: 2 (G - 1) / G x 12 = 12 bytes through each NIC, 2 messages (tree)
    np.testing.assert_allclose(seconds_C, 12 / NIC / 0.5 + 2 * 3e-3, rtol=1e-12)
    np.testing.assert_allclose(bytes_C, 24)
    zeros = phases.popularity(num_steps=2, num_experts=3, num_layers=1, cluster=CLUSTER, calibration=CAL,
                              needed=False)
    assert all(np.all(z == 0) for z in zeros)


@pytest.mark.parametrize(("layout", "net_s", "pcie_bytes", "net_bytes", "sendout_net_s", "sendout_pcie_bytes"), [
    # sharded: each GPU holds 2 experts and sends half of each gradient to the other's shard (128 bytes out,
    # 128 in), one message (G - 1); 3 experts' shards of 64 bytes up and down PCIe; a fixed cost per expert (3)
    ("sharded", 128 / NIC / 0.5 + 3e-3 + 3e-4, 3 * X / 2, 256, 128 / NIC / 0.5 + 3e-3 + 3e-4, 3 * X / 2),
    # group: only expert 0 has 2 holders: a reduce-scatter of its half (64 bytes) over the NIC, one ring step;
    # PCIe: a half shard of expert 0 and a whole expert; 2 experts held per GPU
    ("group", 64 / NIC / 0.5 + 3e-3 + 2e-4, X / 2 + X, 128, 64 / NIC / 0.5 + 3e-3 + 2e-4, X / 2 + X),
    # replica: expert 0's gradient all-reduced (2 (r - 1) / r X = 128 bytes per holder, 2 ring steps); both
    # experts' full copies over PCIe; the send-out is PCIe only, with no fixed cost
    ("replica", 128 / NIC / 0.5 + 2 * 3e-3 + 2e-4, 2 * X, 256, 0.0, 2 * X),
])
def test_expert_state(layout, net_s, pcie_bytes, net_bytes, sendout_net_s, sendout_pcie_bytes):
    runs = phases.PlacementRuns.of([PLACEMENT])
    state = phases.expert_state(runs, PLACEMENT, cluster=CLUSTER, model=MODEL, calibration=CAL, num_experts=3,
                                layout=layout, location="host", accounting="pairs")
    assert state.collect_net_s[0] == pytest.approx(net_s, rel=1e-12)
    assert state.collect_pcie_s[0] == pytest.approx(pcie_bytes / PCIE, rel=1e-12)
    assert state.collect_bytes[0] == pytest.approx(net_bytes, rel=1e-12)
    assert state.collect_pcie_bytes[0] == pytest.approx(2 * pcie_bytes, rel=1e-12)   # both GPUs
    assert state.sendout_net_s[0] == pytest.approx(sendout_net_s, rel=1e-12)
    assert state.sendout_pcie_s[0] == pytest.approx(sendout_pcie_bytes / PCIE, rel=1e-12)
    on_gpu = phases.expert_state(runs, PLACEMENT, cluster=CLUSTER, model=MODEL, calibration=CAL, num_experts=3,
                                 layout=layout, location="gpu", accounting="pairs")
    assert on_gpu.collect_pcie_s[0] == 0 and on_gpu.collect_net_s[0] == pytest.approx(net_s, rel=1e-12)


def test_expert_state_local_memory_work():
    runs = phases.PlacementRuns.of([PLACEMENT])
    local = CAL.with_(state_local_s_per_byte=1e-6)
    for layout in ("sharded", "group", "replica"):
        state = phases.expert_state(runs, PLACEMENT, cluster=CLUSTER, model=MODEL, calibration=local, num_experts=3,
                                    layout=layout, location="gpu", accounting="pairs")
        # collection: 2 slots' gradients read + 2 held experts' partial sums written; send-out: 2 slots written
        assert state.collect_local_s[0] == pytest.approx((2 + 2) * X * 1e-6, rel=1e-12)
        assert state.sendout_local_s[0] == pytest.approx(2 * X * 1e-6, rel=1e-12)
    zero = phases.expert_state(runs, PLACEMENT, cluster=CLUSTER, model=MODEL, calibration=CAL, num_experts=3,
                               layout="sharded", location="gpu", accounting="pairs")
    assert zero.collect_local_s[0] == 0 and zero.sendout_local_s[0] == 0


def test_migration():
    plans = [PlannedStep(1, PLACEMENT, PREVIOUS, True, 0.0, np.array([2]))]
    seconds_C, bytes_C = phases.migration(plans, cluster=CLUSTER, model=MODEL, calibration=CAL, num_experts=3,
                                          coupled=True)
    # slots 2 and 3 change (2 -> 0, 0 -> 2): GPU 1 receives 2 replicas of 64 x (2 + 12) = 896 bytes; GPU 0 sends
    # half of expert 0 (it held 2 of its copies before), GPU 1 the other half and expert 2: node 1's NIC carries 1,792
    assert seconds_C[0] == pytest.approx(1792 / NIC / 0.5 + 3e-3, rel=1e-12)
    assert bytes_C[0] == 1792
    decoupled = phases.migration(plans, cluster=CLUSTER, model=MODEL, calibration=CAL, num_experts=3, coupled=False)
    assert decoupled[0][0] == 0 and decoupled[1][0] == 0


@pytest.mark.parametrize(("layout", "expert_params", "tensors"), [
    ("sharded", 3 * 64 / 2, 1), ("group", 64 / 2 + 64, 2), ("replica", 2 * 64, 2)])
def test_optimizer(layout, expert_params, tensors):
    runs = phases.PlacementRuns.of([PLACEMENT, PLACEMENT])
    seconds_C = phases.optimizer(runs, cluster=CLUSTER, model=MODEL, calibration=CAL, num_experts=3, layout=layout)
    want = (expert_params + MODEL.dense_params) * 12 / 1e5 + tensors * 1e-4
    np.testing.assert_allclose(seconds_C, want, rtol=1e-12)


def test_shadow_broadcast():
    shadowed = Placement.even(np.array([[0, 1, 0, 2]]), 3, shadow_LE=np.array([[True, False, False]]))
    seconds_C, bytes_C = phases.shadow_broadcast(phases.stack_placements([shadowed]), num_steps=1, cluster=CLUSTER,
                                                 model=MODEL, calibration=CAL)
    # one expert's weights (128 bytes) into the other node, one tree level; the reduction back moves as much
    assert seconds_C[0] == pytest.approx(X / NIC / 0.5 + 3e-3, rel=1e-12)
    assert bytes_C[0] == 2 * X
    none = phases.shadow_broadcast(phases.stack_placements([PLACEMENT]), num_steps=1, cluster=CLUSTER, model=MODEL,
                                   calibration=CAL)
    assert none[0][0] == 0 and none[1][0] == 0


def test_backward_segments():
    a2a_CL, expert_CL = np.array([[0.01]]), np.array([[0.2]])
    a2a_CK, expert_CK, dense_CK, allreduce_CK, allreduce_bytes = phases.backward_segments(
        a2a_CL, expert_CL, layer_s=0.03, fixed_s=7e-3, cluster=CLUSTER, model=MODEL, calibration=CAL)
    assert a2a_CK[0, 0] == pytest.approx(0.02) and expert_CK[0, 0] == pytest.approx(0.4)
    assert dense_CK[0, 0] == pytest.approx(2 * 0.03 + 7e-3)
    grads = MODEL.dense_params * 2   # one bucket: every dense gradient, ring all-reduce (2 (G-1)/G), 2 messages
    assert allreduce_CK[0, 0] == pytest.approx(grads / NIC / 0.5 + 2 * 3e-3, rel=1e-12)
    assert allreduce_bytes == pytest.approx(2 * grads)


def test_chunk_work_assembles_the_phases():
    plans = [PlannedStep(1, PLACEMENT, PREVIOUS, True, 0.0, np.array([2]))]
    work, columns = phases.chunk_work(plans, PLACEMENT, counts_SLE=COUNTS_SLE, trace=TRACE, cluster=CLUSTER,
                                      model=MODEL, calibration=CAL, needs_popularity=True, optimizer_coupled=False,
                                      layout="sharded", capacity_factor=1.0, capacity_mode="slot")
    a2a = 16 / NIC / 0.5 + 2e-3
    assert work.a2a_forward_s[0] == pytest.approx(2 * a2a)
    assert work.expert_forward_s[0] == pytest.approx(0.512)
    dense = 8 / 2 * MODEL.dense_flops_per_token / 1e4
    assert work.dense_forward_s[0] == pytest.approx(dense + 5e-3)
    assert work.dense_backward_SK[0, 0] == pytest.approx(2 * dense + 7e-3)
    assert work.popularity_s[0] == pytest.approx(12 / NIC / 0.5 + 2 * 3e-3)
    assert work.migration_s[0] == 0 and work.shadow_broadcast_s[0] == 0
    assert work.grad_collect_net_s[0] == pytest.approx(128 / NIC / 0.5 + 3e-3 + 3e-4)
    assert columns["dropped_tokens"][0] == 0 and columns["replica_moves"][0] == 2
    assert columns["bytes_a2a"][0] == pytest.approx(128)
