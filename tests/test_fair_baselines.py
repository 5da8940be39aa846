"""Fair baselines (issue 11 item 5), on hand-computed simulated times: one optimizer location for every layout,
FasterMoE's shadowed tokens charged once, SYMI's expert-state traffic by the paper's formula, and the policies
pricing their decisions with the simulated model's byte sizes and capacity."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.placement import Placement
from symi_sim.policies import Policy, get_policy
from symi_sim.policies.static import static_phy2log
from symi_sim.simulator.calibration import OPTIMIZER_FLOPS_PER_PARAM
from symi_sim.simulator.driver import resolve_policy, simulate, write_run
from symi_sim.traces.format import LoadTrace

NIC_BPS = 1e9      # 8 Gb/s
PCIE_BPS = 2e9     # 16 Gb/s
ALPHA = 1e-6
MODEL = ModelConfig(name="tiny", num_layers=2, num_moe_layers=2, d_model=64, d_ff=128, expert_d_ff=128,
                    vocab_size=100, num_experts=2, top_k=1, seq_len=8, global_batch=4)  # 32 tokens per step
X = MODEL.expert_grad_bytes    # = weight bytes: 2 x 64 x 128 params x 2 bytes
P = MODEL.expert_params
LAYERS = MODEL.num_moe_layers
# 2 nodes x 1 GPU x 2 slots: static's layout [0, 1, 0, 1] puts both experts on both GPUs (2 holders each)
CLUSTER = Cluster(name="two", num_nodes=2, gpus_per_node=1, slots_per_gpu=2, nic_gbps=8.0, pcie_gbps=16.0,
                  link_latency_s=ALPHA, gpu_peak_flops=1e12, compute_efficiency=0.5)
TOKEN_S = MODEL.expert_flops_per_assignment / CLUSTER.achieved_flops   # one token's forward expert compute
POPULARITY_S = LAYERS * (8 / NIC_BPS + 2 * ALPHA)   # 2 int32 counts per layer, 2 ceil(log2 2) messages


def _trace(load_E: list[int], num_steps: int = 4) -> LoadTrace:
    counts = np.tile(np.array(load_E), (num_steps, LAYERS, 1))
    return LoadTrace(counts, top_k=1, tokens_per_step=MODEL.tokens_per_step)


def _by_policy(iterations: pd.DataFrame, name: str) -> pd.DataFrame:
    return iterations[iterations.policy == name].reset_index(drop=True)


@pytest.mark.parametrize("capacity_mode", ["slot", "gpu"])
@pytest.mark.parametrize("location", ["host", "gpu"])
def test_flexmoe_without_moves_is_never_faster_than_static(location: str, capacity_mode: str) -> None:
    # A threshold FlexMoE never reaches: static's layout for good, as static. Same placement, same routing, so the
    # forward and backward are equal; the differences are FlexMoE's popularity all-reduce and its layout:
    #   static (group):    collect X/NIC + a [+ X/PCIe], optimizer P, send-out [X/PCIe +] X/NIC + a  (per layer)
    #   flexmoe (replica): collect 2X/NIC + 2a [+ 2X/PCIe], optimizer 2P, send-out [2X/PCIe]
    # ([...]: host only). Before this change the replica layout paid no PCIe on a host run: faster than static
    # for the layout's sake alone.
    flex = get_policy("flexmoe", threshold=1e9)
    result = simulate(trace=_trace([22, 10]), cluster=CLUSTER, model=MODEL, policies=["static", flex],
                      capacity_mode=capacity_mode, capacity_factor=2.0 if capacity_mode == "gpu" else 1.0,
                      optimizer_location=location, progress=False)
    static, flexmoe = (_by_policy(result.iterations, name) for name in ("static", "flexmoe"))
    assert flexmoe.replica_moves.eq(0).all()
    optimizer_s = LAYERS * P * OPTIMIZER_FLOPS_PER_PARAM / CLUSTER.achieved_flops
    pcie_s = LAYERS * 2 * X / PCIE_BPS if location == "host" else 0.0
    np.testing.assert_allclose(flexmoe.time_s - static.time_s, POPULARITY_S + optimizer_s + pcie_s, rtol=1e-9)
    assert (flexmoe.time_s >= static.time_s).all()
    np.testing.assert_allclose(flexmoe.phase_weight_sendout_s, LAYERS * 2 * X / PCIE_BPS if location == "host"
                               else 0.0, rtol=1e-12, atol=0)
    np.testing.assert_allclose(static.phase_weight_sendout_s, LAYERS * ((X / PCIE_BPS if location == "host" else 0)
                                                                        + X / NIC_BPS + ALPHA), rtol=1e-12)
    # PCIe bytes of both GPUs, both phases: 2 holdings x X (replica) or X/2 (group) each
    per_step_pcie = LAYERS * 2 * 2 * (2 * X if location == "host" else 0)
    assert flexmoe.bytes_pcie.eq(per_step_pcie).all() and static.bytes_pcie.eq(per_step_pcie / 2).all()
    assert flexmoe.bytes_weight_sendout.eq(0).all()   # the replica layout sends no weights over the network


@dataclass
class ShadowZero(Policy):
    """Static's layout with expert 0 shadowed (FasterMoE's mechanism, its decision left out)."""

    name: ClassVar[str] = "shadow0"
    optimizer_layout: ClassVar[str] = "group"

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        num_layers, num_experts = load_LE.shape
        shadow_LE = np.zeros((num_layers, num_experts), dtype=bool)
        shadow_LE[:, 0] = True
        phy2log_LR = static_phy2log(num_layers=num_layers, num_experts=num_experts, num_slots=cluster.num_slots)
        return Placement.even(phy2log_LR, num_experts, shadow_LE)


def test_shadowed_tokens_are_charged_once_in_slot_mode() -> None:
    # 4 slots of ceil(32 / 4) = 8 tokens, 2 per GPU ([0, 1] each). Without shadows every GPU computes its 2 padded
    # buffers: 16 tokens. With expert 0 shadowed its 22 tokens are computed where they come from, 11 per GPU,
    # and its slots lie idle: one padded buffer (expert 1's, 5 tokens in it) + 11 = 19 tokens, not 16 + 11 = 27.
    result = simulate(trace=_trace([22, 10]), cluster=CLUSTER, model=MODEL, policies=["static", ShadowZero()],
                      progress=False)
    static, shadow = (_by_policy(result.iterations, name) for name in ("static", "shadow0"))
    np.testing.assert_allclose(static.phase_expert_forward_s, LAYERS * 16 * TOKEN_S, rtol=1e-12)
    np.testing.assert_allclose(shadow.phase_expert_forward_s, LAYERS * 19 * TOKEN_S, rtol=1e-12)
    np.testing.assert_allclose(shadow.phase_expert_backward_s, 2 * LAYERS * 19 * TOKEN_S, rtol=1e-12)
    assert static.dropped_fraction.eq(6 / 32).all() and shadow.dropped_fraction.eq(0).all()
    # the all-to-all moves the busy buffers only: each GPU receives 8 tokens of 128 bytes, half from the other node
    token_bytes = MODEL.d_model * MODEL.activation_bytes
    np.testing.assert_allclose(shadow.phase_a2a_forward_s, LAYERS * 2 * (8 * token_bytes / 2 / NIC_BPS + ALPHA),
                               rtol=1e-12)
    np.testing.assert_allclose(static.phase_a2a_forward_s, LAYERS * 2 * (16 * token_bytes / 2 / NIC_BPS + ALPHA),
                               rtol=1e-12)


def test_paper_accounting_charges_every_slot() -> None:
    # symi on uniform load places [0, 0, 1, 1]: one expert per GPU, in both its slots. Pairs: each GPU sends X/2
    # to the other owner once; the paper's formula, (s N - s)/N X = X per GPU: twice. PCIe: E X / G = X either way.
    trace = _trace([16, 16])
    pairs = simulate(trace=trace, cluster=CLUSTER, model=MODEL, policies=["symi"], progress=False).iterations
    paper = simulate(trace=trace, cluster=CLUSTER, model=MODEL, policies=["symi"], progress=False,
                     expert_state_accounting="paper").iterations
    assert pairs.bytes_grad_collect.eq(LAYERS * X).all() and paper.bytes_grad_collect.eq(LAYERS * 2 * X).all()
    np.testing.assert_allclose(pairs.phase_grad_collect_s, LAYERS * (X / 2 / NIC_BPS + ALPHA + X / PCIE_BPS),
                               rtol=1e-12)
    np.testing.assert_allclose(paper.phase_grad_collect_s, LAYERS * (X / NIC_BPS + ALPHA + X / PCIE_BPS),
                               rtol=1e-12)
    np.testing.assert_allclose(paper.time_s - pairs.time_s, 2 * LAYERS * X / 2 / NIC_BPS, rtol=1e-9)


def test_options_reach_config_and_bad_values_raise(tmp_path) -> None:
    result = simulate(trace=_trace([16, 16]), cluster=CLUSTER, model=MODEL, policies=["static"], progress=False,
                      optimizer_location="gpu", expert_state_accounting="paper")
    config = json.loads((write_run(result, tmp_path / "run") / "config.json").read_text())
    assert (config["optimizer_location"], config["expert_state_accounting"]) == ("gpu", "paper")
    default = simulate(trace=_trace([16, 16]), cluster=CLUSTER, model=MODEL, policies=["static"], progress=False)
    assert (default.config["optimizer_location"], default.config["expert_state_accounting"]) == ("host", "pairs")
    with pytest.raises(ValueError, match="optimizer location"):
        simulate(trace=_trace([16, 16]), cluster=CLUSTER, model=MODEL, policies=["static"], progress=False,
                 optimizer_location="disk")
    with pytest.raises(ValueError, match="expert-state accounting"):
        simulate(trace=_trace([16, 16]), cluster=CLUSTER, model=MODEL, policies=["static"], progress=False,
                 expert_state_accounting="slots")


def test_policies_price_with_the_simulated_model_and_capacity() -> None:
    model = MODEL.with_(weight_bytes=3, activation_bytes=5, optimizer_bytes=12)
    _, faster = resolve_policy("fastermoe", model)
    assert (faster.weight_bytes, faster.activation_bytes, faster.d_model, faster.d_ff) == (3, 5, 64, 128)
    comp_s, feat_s, send_model_s = faster.times_s(CLUSTER)
    assert feat_s == pytest.approx(64 * 5 / NIC_BPS, rel=1e-12)
    assert send_model_s == pytest.approx(2 * 2 * 64**2 * 3 / NIC_BPS, rel=1e-12)   # alpha = 128 / 64 = 2
    _, flex = resolve_policy("flexmoe-10:rule=cost_benefit", model, "gpu", 1.5)
    assert (flex.weight_bytes, flex.optimizer_bytes, flex.capacity_mode, flex.capacity_factor) == (3, 12, "gpu", 1.5)
    assert flex.migration_cost_s(CLUSTER) == pytest.approx(15 * 2 * 64 * 128 / NIC_BPS, rel=1e-12)
