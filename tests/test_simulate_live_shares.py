"""Live shares in the simulator and replay: a policy's `shares=live` placements are routed with the live split, so
imbalance, drops, expert compute and all-to-all come from it (hand-worked toy, and route() of the same placements);
stacked placements and run directories keep the flag; the CLI's simulate and plan --replay take the option."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.placement import Placement
from symi_sim.policies import Policy, get_policy
from symi_sim.routing import route
from symi_sim.simulator.driver import simulate
from symi_sim.simulator.phases import stack_placements
from symi_sim.simulator.replay import replay
from symi_sim.simulator.run_dirs import _read_placements
from symi_sim.traces.format import LoadTrace, write_trace

# 1 MoE layer, 3 experts, 80 tokens per step, top-1; 2 GPUs x 3 slots
COUNTS_SLE = np.array([[[10, 10, 60]], [[30, 10, 40]], [[20, 40, 20]]])
TRACE = LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=80)
CLUSTER = Cluster(name="two", num_nodes=2, gpus_per_node=1, slots_per_gpu=3, nic_gbps=8.0, pcie_gbps=16.0,
                  link_latency_s=1e-6, gpu_peak_flops=1e12, compute_efficiency=0.5)
MODEL = ModelConfig(name="toy", num_layers=1, num_moe_layers=1, d_model=64, d_ff=128, expert_d_ff=128,
                    vocab_size=100, num_experts=3, top_k=1, seq_len=8, global_batch=10)   # 80 tokens per step
# Algorithm 1 plans step 1 from step 0 [10, 10, 60]: counts [1, 1, 4], slots [0, 1, 2 | 2, 2, 2]; step 2 from
# step 1 [30, 10, 40]: goal [2.25, 0.75, 3] -> counts [2, 1, 3], slots [0, 0, 1 | 2, 2, 2]
PHY2LOG_STEP = {1: [0, 1, 2, 2, 2, 2], 2: [0, 0, 1, 2, 2, 2]}


def _live(step: int) -> Placement:
    """The placement symi:shares=live serves `step` with, built by hand."""
    return Placement(np.array([PHY2LOG_STEP[step]]), np.array([[1, 1, .25, .25, .25, .25]] if step == 1 else
                                                                [[.5, .5, 1, 1 / 3, 1 / 3, 1 / 3]]), 3,
                     live_shares=True)


@pytest.mark.parametrize("mode", ["gpu", "slot"])
def test_replay_scores_live_shares_by_hand_and_by_route(mode: str) -> None:
    steps, summary = replay(TRACE, CLUSTER, ["symi", "symi:shares=live"], capacity_factor=1.0, capacity_mode=mode)
    by = steps.set_index(["policy", "step"])
    # step 1 [30, 10, 40]: even shares give GPU 0 30 + 10 + 10 = 50, GPU 1 30; live, GPU 0 keeps its 40 of experts
    # 0 and 1 and expert 2's 40 all go to GPU 1: 40 / 40
    assert by.loc[("symi", 1), "imbalance"] == pytest.approx(1.25)
    assert by.loc[("symi:shares=live", 1), "imbalance"] == pytest.approx(1.0)
    # gpu mode, 40 per GPU: planned drops GPU 0's 10 extra, live nothing. Slot mode, 14 per slot: expert 0's 30 on
    # one slot drop 16 either way (live shares cannot move an expert with one replica)
    assert by.loc[("symi", 1), "dropped_tokens"] == (10 if mode == "gpu" else 16)
    assert by.loc[("symi:shares=live", 1), "dropped_tokens"] == (0 if mode == "gpu" else 16)
    # step 2 [20, 40, 20]: every expert on one GPU, nothing to split: GPU 0 carries 60 either way, 20 beyond its
    # budget in gpu mode; slot mode: expert 1's 40 on one slot of 14 drop 26
    for name in ("symi", "symi:shares=live"):
        assert by.loc[(name, 2), "imbalance"] == pytest.approx(1.5)
        assert by.loc[(name, 2), "dropped_tokens"] == (20 if mode == "gpu" else 26)
    # the same numbers from route() of the hand-built live placements
    for step in (1, 2):
        routing = route(COUNTS_SLE[step], _live(step), slots_per_gpu=3, capacity_factor=1.0, capacity_mode=mode)
        assert by.loc[("symi:shares=live", step), "imbalance"] == pytest.approx(routing.imbalance_L.mean())
        assert by.loc[("symi:shares=live", step), "dropped_tokens"] == routing.dropped_LE.sum()
    summ = summary.set_index("policy")
    assert summ.loc["symi:shares=live", "imbalance"] == pytest.approx((1.0 + 1.5) / 2)


@dataclass
class HandShares(Policy):
    """Planned shares equal to the live split of step 1 (expert 2: 0 on GPU 0, 14, 13, 13 on GPU 1)."""

    name: ClassVar[str] = "hand"

    def _plan(self, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        return Placement(np.array([PHY2LOG_STEP[1]]), np.array([[1, 1, 0, 14 / 40, 13 / 40, 13 / 40]]), 3)


def test_simulated_costs_come_from_the_live_split() -> None:
    result = simulate(trace=TRACE, cluster=CLUSTER, model=MODEL, policies=["symi", "symi:shares=live", HandShares()],
                      steps=1, capacity_mode="gpu", capacity_factor=1.0, progress=False)
    it = result.iterations.set_index("policy")
    live, hand, planned = it.loc["symi:shares=live"], it.loc["hand"], it.loc["symi"]
    # the live run costs exactly what planned shares equal to the live split cost: same tokens on every slot
    for column in ("imbalance", "dropped_tokens", "bytes_a2a", "phase_expert_forward_s", "phase_a2a_forward_s",
                   "phase_expert_backward_s", "time_s"):
        assert live[column] == pytest.approx(hand[column], rel=1e-12), column
    assert (live["imbalance"], live["dropped_tokens"]) == (1.0, 0)
    assert (planned["imbalance"], planned["dropped_tokens"]) == (1.25, 10)
    # expert compute: the busiest GPU computes 40 tokens live, 40 of its 50 planned (its budget): equal here; the
    # all-to-all moves the 80 served tokens live, 70 planned
    flops_per_token_s = MODEL.expert_flops_per_assignment / CLUSTER.achieved_flops
    assert live["phase_expert_forward_s"] == pytest.approx(40 * flops_per_token_s, rel=1e-12)
    assert live["bytes_a2a"] == pytest.approx(planned["bytes_a2a"] * 80 / 70, rel=1e-12)


def test_stack_placements_keeps_one_mode_and_refuses_a_mix() -> None:
    live = stack_placements([_live(1), _live(2)])
    assert live.live_shares and live.phy2log_LR.tolist() == [PHY2LOG_STEP[1], PHY2LOG_STEP[2]]
    planned = Placement.even(np.array([PHY2LOG_STEP[1]]), 3)
    assert not stack_placements([planned, planned]).live_shares
    with pytest.raises(ValueError, match=r"mix live shares \(placement 1\) and planned shares \(placement 0\)"):
        stack_placements([planned, _live(2)])


def test_run_directory_placements_keep_the_flag(tmp_path) -> None:
    path = tmp_path / "placements.jsonl"
    records = [{"step": 0, "phy2log": [PHY2LOG_STEP[1]], "share": [[1, 1, .25, .25, .25, .25]], "shares": "live",
                "dropped": [[0, 0, 0]]},
               {"step": 1, "phy2log": [PHY2LOG_STEP[1]], "share": [[1, 1, .25, .25, .25, .25]], "dropped": [[0, 0, 0]]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    steps = _read_placements(path, num_steps=2, num_layers=1, num_experts=3, num_slots=6)
    assert [placement.live_shares for placement, _ in steps] == [True, False]
    records[1]["shares"] = "sometimes"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=rf"{path} line 2: shares must be 'planned' or 'live', got 'sometimes'"):
        _read_placements(path, num_steps=2, num_layers=1, num_experts=3, num_slots=6)


@pytest.fixture()
def toy_files(tmp_path):
    trace_path, cluster_path, model_path = tmp_path / "toy.parquet", tmp_path / "toy.toml", tmp_path / "model.toml"
    write_trace(TRACE, trace_path)
    cluster_path.write_text("num_nodes = 2\ngpus_per_node = 1\nslots_per_gpu = 3\n")
    model_path.write_text("num_layers = 1\nnum_moe_layers = 1\nd_model = 64\nd_ff = 128\nexpert_d_ff = 128\n"
                          "vocab_size = 100\nnum_experts = 3\ntop_k = 1\nseq_len = 8\nglobal_batch = 10\n")
    return trace_path, cluster_path, model_path


def test_cli_plan_replay_and_simulate_take_shares_live(tmp_path, toy_files) -> None:
    trace_path, cluster_path, model_path = toy_files
    common = ["--trace", str(trace_path), "--cluster", str(cluster_path), "--capacity-mode", "gpu"]
    out = tmp_path / "replay"
    result = CliRunner().invoke(symi, ["plan", *common, "--replay", "--policies", "symi,symi:shares=live",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    steps = pd.read_csv(out / "steps.csv").set_index(["policy", "step"])
    assert steps.loc[("symi:shares=live", 1), ["imbalance", "dropped_tokens"]].tolist() == [1.0, 0]
    assert steps.loc[("symi", 1), ["imbalance", "dropped_tokens"]].tolist() == [1.25, 10]

    out = tmp_path / "sim"
    result = CliRunner().invoke(symi, ["simulate", *common, "--model", str(model_path), "--policies",
                                       "symi-balanced,symi-balanced:shares=live", "--out", str(out)])
    assert result.exit_code == 0, result.output
    it = pd.read_parquet(out / "iterations.parquet")
    for name, live in (("symi-balanced", False), ("symi-balanced:shares=live", True)):
        rows = it[it.policy == name].set_index("step")
        for step in (1, 2):
            placement = get_policy("symi-balanced", capacity_mode="gpu").plan(COUNTS_SLE[step - 1], CLUSTER)
            placement = Placement(placement.phy2log_LR, placement.share_LR, 3, live_shares=live)
            routing = route(COUNTS_SLE[step], placement, slots_per_gpu=3, capacity_factor=1.0, capacity_mode="gpu")
            assert rows.loc[step, "imbalance"] == pytest.approx(routing.imbalance_L.mean(), rel=1e-12)
            assert rows.loc[step, "dropped_tokens"] == routing.dropped_LE.sum()
    # symi-balanced's gpu-mode shares, planned from the step before, miss: 1.25 and 1.425, 10 and 17 dropped; live
    # balances both steps and drops nothing
    by = it.set_index(["policy", "step"])
    assert by.loc["symi-balanced", "imbalance"].round(6).tolist() == [1.25, 1.425]
    assert by.loc["symi-balanced", "dropped_tokens"].tolist() == [10, 17]
    assert by.loc["symi-balanced:shares=live", "imbalance"].tolist() == [1.0, 1.0]
    assert by.loc["symi-balanced:shares=live", "dropped_tokens"].tolist() == [0, 0]
    # the option is refused where it does not apply
    result = CliRunner().invoke(symi, ["simulate", *common, "--model", str(model_path), "--policies",
                                       "eplb:shares=live", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "unknown option(s) ['shares'] for policy 'eplb'" in result.output
    assert not (tmp_path / "bad").exists()
