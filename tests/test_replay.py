"""Replay: the driver that plans each step from the ones before it, scored by hand on a 4-GPU toy."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies import get_policy
from symi_sim.policies.base import Policy
from symi_sim.simulator.replay import iter_plans, known_load, plan_step, replay
from symi_sim.traces.format import LoadTrace

# 1 node x 4 GPUs x 2 slots = 8 slots, 4 experts
CLUSTER = Cluster(num_nodes=1, gpus_per_node=4, slots_per_gpu=2)
COUNTS_SLE = np.array([[[10, 10, 10, 10]], [[30, 10, 0, 0]], [[0, 0, 20, 20]]])
TRACE = LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=40)


def test_replay_scores_static_and_symi_by_hand():
    steps, summary = replay(TRACE, CLUSTER, ["static", "symi"], capacity_factor=1.0)
    by = steps.set_index(["policy", "step"])
    # static: slots hold experts [0,1,2,3,0,1,2,3]; slot capacity ceil(40/8) = 5
    # step 1 [30,10,0,0]: expert 0 sends 15 to each of its 2 slots, 10 + 10 drop; GPUs 0 and 2 get 20 of mean 10
    assert by.loc[("static", 1), "dropped_tokens"] == 20
    assert by.loc[("static", 1), "imbalance"] == pytest.approx(2.0)
    # step 2 [0,0,20,20]: experts 2 and 3 send 10 to each slot, 5 drop per slot
    assert by.loc[("static", 2), "dropped_tokens"] == 20
    # symi plans step 1 from the uniform step 0: [0,0,1,1,2,2,3,3]; GPU 0 holds both expert-0 slots: 30 of mean 10
    assert by.loc[("symi", 1), "imbalance"] == pytest.approx(3.0)
    assert by.loc[("symi", 1), "dropped_tokens"] == 20
    # step 2 is planned from [30,10,0,0]: Algorithm 1 gives counts [5,1,1,1] -> [0,0,0,0,0,1,2,3]; the hot experts
    # 2 and 3 now share GPU 3 with one slot each: 15 + 15 drop, GPU 3 carries all 40 tokens (imbalance 4)
    assert by.loc[("symi", 2), "dropped_tokens"] == 30
    assert by.loc[("symi", 2), "imbalance"] == pytest.approx(4.0)
    assert by.loc[("symi", 2), "replica_moves"] == 5
    assert by.loc[("static", 2), "replica_moves"] == 0
    summ = summary.set_index("policy")
    assert summ.loc["static", "dropped_fraction"] == pytest.approx(40 / 80)
    assert summ.loc["symi", "dropped_fraction"] == pytest.approx(50 / 80)
    assert summ.loc["symi", "imbalance"] == pytest.approx(3.5)
    assert summ.loc["symi", "moves_per_step"] == pytest.approx(2.5)
    assert summ.loc["symi", "steps"] == 2


def test_known_load_window_and_current():
    np.testing.assert_allclose(known_load(COUNTS_SLE, 2, 2, current=False), [[20, 10, 5, 5]])
    np.testing.assert_allclose(known_load(COUNTS_SLE, 2, 5, current=False), [[20, 10, 5, 5]])
    np.testing.assert_allclose(known_load(COUNTS_SLE, 1, 1, current=False), [[10, 10, 10, 10]])
    np.testing.assert_allclose(known_load(COUNTS_SLE, 2, 1, current=True), [[0, 0, 20, 20]])
    with pytest.raises(ValueError, match="no earlier step"):
        known_load(COUNTS_SLE, 0, 1, current=False)


@dataclass
class _CountingPolicy(Policy):
    """Records the loads it is asked to plan on; a new placement (rotated by one) per call."""

    name: ClassVar[str] = "counting"
    rebalance_every: int = 2
    seen: list = None

    def _plan(self, load_LE, cluster, previous):
        self.seen = (self.seen or []) + [load_LE.copy()]
        phy2log = np.roll(np.arange(cluster.num_slots) % load_LE.shape[1], len(self.seen))
        return Placement.even(phy2log[None, :], load_LE.shape[1])


def test_iter_plans_keeps_placement_between_rebalances():
    counts = np.tile(np.arange(1, 5), (6, 1, 1))
    counts[:, 0, 0] = np.arange(6)
    policy = _CountingPolicy(rebalance_every=2)
    planned = list(iter_plans(counts, policy, CLUSTER, window=1))
    assert [p.step for p in planned] == [1, 2, 3, 4, 5]
    assert [p.replanned for p in planned] == [True, False, True, False, True]
    # each plan saw the step just before it
    assert [int(seen[0, 0]) for seen in policy.seen] == [0, 2, 4]
    assert planned[1].placement is planned[0].placement
    assert planned[1].plan_time_s == 0.0
    assert int(planned[2].moves_L.sum()) == 8  # a roll by one moves every slot of [0,1,2,3,0,1,2,3]


def test_plan_step_and_errors():
    placement = plan_step(TRACE, CLUSTER, get_policy("symi"), step=2)
    assert placement.logcnt_LE.tolist() == [[5, 1, 1, 1]]
    with pytest.raises(ValueError, match="outside"):
        plan_step(TRACE, CLUSTER, get_policy("symi"), step=3)
    with pytest.raises(ValueError, match="window"):
        plan_step(TRACE, CLUSTER, get_policy("symi"), step=2, window=0)
    with pytest.raises(ValueError, match="unknown policy"):
        replay(TRACE, CLUSTER, ["static", "nope"])
    with pytest.raises(ValueError, match="impossible cluster"):
        replay(TRACE, Cluster(num_nodes=1, gpus_per_node=1, slots_per_gpu=2), ["static"])


def test_replay_plans_in_the_capacity_mode_it_scores():
    # symi-balanced re-splits shares only when told the plan is served under per-GPU budgets
    steps_gpu, _ = replay(TRACE, CLUSTER, ["symi-balanced"], capacity_mode="gpu")
    steps_slot, _ = replay(TRACE, CLUSTER, ["symi-balanced"], capacity_mode="slot")
    from symi_sim.policies import with_context

    assert with_context(get_policy("symi-balanced"), capacity_mode="gpu").capacity_mode == "gpu"
    assert with_context(get_policy("static"), capacity_mode="gpu") == get_policy("static")
    assert len(steps_gpu) == len(steps_slot) == 2
    assert steps_gpu["imbalance"].sum() <= steps_slot["imbalance"].sum()


def test_replay_can_score_plans_made_for_another_capacity_mode():
    # the oracle plans each step on its own loads; scored under per-GPU budgets of 40 / 4 = 10 tokens
    even, _ = replay(TRACE, CLUSTER, ["oracle"], capacity_factor=1.0, capacity_mode="gpu", plan_capacity_mode="slot")
    balanced, _ = replay(TRACE, CLUSTER, ["oracle"], capacity_factor=1.0, capacity_mode="gpu")
    even, balanced = even.set_index("step"), balanced.set_index("step")
    # step 1 [30,10,0,0], planned for slot buffers: counts [5,1,1,1], GPUs [1,0] [0,0] [0,2] [0,3], even shares give
    # expert 0's slots 6 tokens each: GPUs carry 16, 12, 6, 6 of a budget of 10, so 6 + 2 tokens drop
    assert even.loc[1, "dropped_tokens"] == 8
    assert even.loc[1, "imbalance"] == pytest.approx(16 / 10)
    # step 2 [0,0,20,20]: GPUs [2,3] [2,3] [2,0] [3,1]; 20 in thirds, 7, 7, 6: GPUs 0 and 1 carry 14 each, 4 + 4 drop
    assert even.loc[2, "dropped_tokens"] == 8
    # planned for GPU budgets (the default: the mode it is scored in) the same replicas' shares fit every budget
    assert balanced["dropped_tokens"].tolist() == [0, 0]
    assert balanced["imbalance"].tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="unknown plan capacity mode 'node'"):
        replay(TRACE, CLUSTER, ["oracle"], capacity_mode="gpu", plan_capacity_mode="node")
