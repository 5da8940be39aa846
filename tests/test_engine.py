"""The simpy timeline: exact simulated times, SimPy-test style (durations chosen so every sum is exact)."""

import numpy as np

from symi_sim.simulator.engine import PHASES, Engine, IterationWork


def _work(num_steps: int = 1, num_segments: int = 1, **given: object) -> IterationWork:
    """Zero work except `given` (scalars fill every step / segment)."""
    values = {}
    for name in IterationWork.__dataclass_fields__:
        shape = (num_steps, num_segments) if name.endswith("_SK") else (num_steps,)
        value = given.get(name, 0.0)
        values[name] = np.broadcast_to(np.asarray(value, dtype=float), shape).copy()
    return IterationWork(**values)


def test_two_transfers_through_one_link_serialise():
    engine = Engine()
    done = {}

    def transfer(name: str, duration_s: float):
        yield from engine.hold("net", duration_s, "a2a_forward")
        done[name] = engine.env.now

    engine.env.process(transfer("first", 2.0))
    engine.env.process(transfer("second", 3.0))
    engine.env.run()
    assert done == {"first": 2.0, "second": 5.0}


def test_different_links_run_at_once():
    engine = Engine()
    done = {}

    def transfer(name: str, resource: str, duration_s: float):
        yield from engine.hold(resource, duration_s, "grad_collect")
        done[name] = engine.env.now

    engine.env.process(transfer("nic", "net", 2.0))
    engine.env.process(transfer("pcie", "pcie", 3.0))
    engine.env.run()
    assert done == {"nic": 2.0, "pcie": 3.0}


def test_sequential_phases_add_up():
    work = _work(num_steps=2, popularity_s=0.5, a2a_forward_s=1.0, expert_forward_s=2.0, dense_forward_s=0.25,
                 a2a_backward_SK=2.0, expert_backward_SK=4.0, dense_backward_SK=0.5, grad_collect_net_s=3.0,
                 grad_collect_pcie_s=0.125, optimizer_s=0.0625, sendout_pcie_s=0.125, sendout_net_s=3.0)
    out = Engine().run_iterations(work)
    assert out["time_s"].tolist() == [16.5625, 16.5625]
    assert out["phase_grad_collect_s"].tolist() == [3.125, 3.125]
    assert out["phase_a2a_backward_s"].tolist() == [2.0, 2.0]
    assert out["phase_dense_allreduce_s"].tolist() == [0.0, 0.0]


def test_allreduce_bucket_hides_behind_compute():
    # segment 0's bucket (1 s) runs on the network while segment 1 computes (3 s): fully hidden
    work = _work(num_segments=2, expert_backward_SK=[[1.0, 3.0]], allreduce_SK=[[1.0, 0.0]])
    out = Engine().run_iterations(work)
    assert out["time_s"].tolist() == [4.0]
    assert out["phase_dense_allreduce_s"].tolist() == [0.0]


def test_allreduce_bucket_delays_the_next_all_to_all():
    # t=1: segment 0's compute ends and its 5 s bucket takes the network; segment 1's all-to-all (two halves of
    # 1 s around 1 s of compute) waits until t=6: it ends at 9, and the 5 s wait is charged to the all-reduce
    work = _work(num_segments=2, expert_backward_SK=[[1.0, 1.0]], a2a_backward_SK=[[0.0, 2.0]],
                 allreduce_SK=[[5.0, 0.0]])
    out = Engine().run_iterations(work)
    assert out["time_s"].tolist() == [9.0]
    assert out["phase_dense_allreduce_s"].tolist() == [5.0]
    assert out["phase_a2a_backward_s"].tolist() == [2.0]
    assert out["phase_expert_backward_s"].tolist() == [2.0]


def test_exposed_allreduce_tail_is_waited_for():
    # the last segment's bucket (2 s) cannot overlap anything: exposed after the backward
    work = _work(num_segments=2, expert_backward_SK=[[1.0, 1.0]], allreduce_SK=[[0.5, 2.0]], optimizer_s=1.0)
    out = Engine().run_iterations(work)
    assert out["time_s"].tolist() == [5.0]
    assert out["phase_dense_allreduce_s"].tolist() == [2.0]
    assert out["phase_optimizer_s"].tolist() == [1.0]


def test_phases_sum_to_iteration_time():
    rng = np.random.default_rng(0)
    given = {name: rng.uniform(0, 1, size=(3, 2) if name.endswith("_SK") else 3)
             for name in IterationWork.__dataclass_fields__}
    out = Engine().run_iterations(IterationWork(**given))
    total = sum(out[f"phase_{name}_s"] for name in PHASES)
    np.testing.assert_allclose(total, out["time_s"], rtol=1e-12)
    assert (out["time_s"] > 0).all()
