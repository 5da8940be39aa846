"""Size ceilings refused up front with one line naming the limit, routing exact for any capacity factor, and a
1-step trace explained in the user's terms (issue 12)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_error_line, small_trace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symi_sim.cluster import MAX_GPUS, MAX_SLOTS, Cluster, load_cluster
from symi_sim.failures.model import MAX_SAMPLED_RUNS
from symi_sim.placement import Placement
from symi_sim.routing import MAX_CAPACITY_FACTOR, route
from symi_sim.traces.format import MAX_TOKEN_COUNT, LoadTrace, read_trace, write_trace
from symi_sim.traces.importers import import_trace
from symi_sim.traces.synth import MAX_SYNTH_COUNTS

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- clusters


@SETTINGS
@given(nodes=st.integers(1, 10**9), gpus=st.integers(1, 10**4), how=st.sampled_from(["json", "toml", "slots"]))
def test_giant_clusters_are_refused_naming_the_limit(nodes, gpus, how):
    if how == "slots":
        nodes, gpus = 1, 4   # cpu-4 with a giant --slots
    if nodes * gpus <= MAX_GPUS and how != "slots":
        nodes = MAX_GPUS // gpus + 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trace = small_trace(tmp)
        if how == "json":
            spec = tmp / "c.json"
            spec.write_text(json.dumps({"base": "cpu-4", "num_nodes": nodes, "gpus_per_node": gpus}))
        elif how == "toml":
            spec = tmp / "c.toml"
            spec.write_text(f"[cluster]\nnum_nodes = {nodes}\ngpus_per_node = {gpus}\n")
        else:
            spec = "cpu-4"
        extra = ["--slots", str(MAX_SLOTS // 4 + 1 + nodes)] if how == "slots" else []
        error = one_error_line(tmp, "simulate", "--trace", trace, "--cluster", spec, *extra, "--out", tmp / "run")
    limit = MAX_SLOTS if how == "slots" else MAX_GPUS
    assert f"more than the {limit} a cluster may have" in error


def test_the_largest_allowed_cluster_loads():
    assert load_cluster("h100-2048", num_nodes=MAX_GPUS // 8).num_gpus == MAX_GPUS
    with pytest.raises(ValueError, match=f"more than the {MAX_GPUS}"):
        Cluster(num_nodes=MAX_GPUS + 1)


# ---------------------------------------------------------------- failure runs, synth shapes


@SETTINGS
@given(runs=st.integers(MAX_SAMPLED_RUNS + 1, 10**12))
def test_too_many_failure_runs_are_refused(runs):
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        error = one_error_line(tmp, "simulate", "--trace", small_trace(tmp), "--cluster", "cpu-4",
                               "--fit-model-to-trace", "--mtbf-hours", "1", "--failure-runs", runs, "--out",
                               tmp / "run")
    assert f"--failure-runs) is {runs}, more than the {MAX_SAMPLED_RUNS}" in error


@SETTINGS
@given(steps=st.integers(1, 10**7), layers=st.integers(1, 1000), experts=st.integers(1, 4096))
def test_giant_synth_shapes_are_refused_before_any_work(steps, layers, experts):
    if steps * layers * experts <= MAX_SYNTH_COUNTS:
        steps = MAX_SYNTH_COUNTS // (layers * experts) + 1
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        error = one_error_line(tmp, "trace", "synth", tmp / "s.parquet", "--steps", steps, "--layers", layers,
                               "--experts", experts)
    assert f"more than the {MAX_SYNTH_COUNTS} a synthesised trace may hold" in error


# ---------------------------------------------------------------- capacity factors


def _placement(num_layers: int, num_experts: int, slots: int, rng: np.random.Generator) -> Placement:
    phy2log = np.concatenate([np.tile(np.arange(num_experts), (num_layers, 1)),
                              rng.integers(0, num_experts, (num_layers, slots - num_experts))], axis=1)
    return Placement.even(phy2log, num_experts)


@SETTINGS
@given(exponent=st.floats(3, 308), mode=st.sampled_from(["slot", "gpu"]), seed=st.integers(0, 100))
def test_routing_is_exact_for_any_capacity_factor(exponent, mode, seed):
    """Past the total tokens a capacity cannot matter: no drops, and the same routing as a factor that just fits
    (the int64 capacity used to wrap negative past ~1e18 / tokens per slot and drop everything)."""
    rng = np.random.default_rng(seed)
    load_LE = rng.integers(0, 2**31 - 1, (3, 4))
    placement = _placement(3, 4, 8, rng)
    huge = route(load_LE, placement, slots_per_gpu=2, capacity_factor=10.0**exponent, capacity_mode=mode)
    fits = route(load_LE, placement, slots_per_gpu=2, capacity_factor=float(8 * 4), capacity_mode=mode)
    assert huge.dropped_LE.sum() == 0
    assert np.array_equal(huge.served_LR, fits.served_LR) and np.array_equal(huge.served_LR, huge.assigned_LR)


@SETTINGS
@given(factor=st.floats(MAX_CAPACITY_FACTOR, 1e300, exclude_min=True), command=st.sampled_from(["simulate", "plan"]))
def test_capacity_factors_over_the_ceiling_are_refused(factor, command):
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trace = small_trace(tmp)
        args = (["simulate", "--fit-model-to-trace"] if command == "simulate" else ["plan", "--replay"])
        error = one_error_line(tmp, *args, "--trace", trace, "--cluster", "cpu-4", "--capacity-factor", repr(factor),
                               "--out", tmp / "run")
    assert f"more than the {MAX_CAPACITY_FACTOR:g}" in error and "'none'" in error


# ---------------------------------------------------------------- huge counts in traces


@SETTINGS
@given(count=st.one_of(st.integers(MAX_TOKEN_COUNT + 1, 2**63 - 1), st.integers(2**63, 2**80)))
def test_huge_counts_in_jsonl_are_refused_naming_the_limit(count):
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "m.jsonl").write_text(json.dumps({"iteration": 0, "layer": 0, "tokens_per_expert": [1, count]}) + "\n")
        error = one_error_line(tmp, "trace", "convert", tmp / "m.jsonl", tmp / "m.parquet", "--from", "counts-jsonl")
    assert f"holds {count}, more than the {MAX_TOKEN_COUNT} tokens" in error and "line 1" in error


@SETTINGS
@given(count=st.integers(MAX_TOKEN_COUNT + 1, 2**62 - 1), row=st.integers(0, 2))
def test_huge_counts_in_csv_are_refused_naming_the_limit(count, row):
    tokens = [1, 2, 3]
    tokens[row] = count
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "c.csv").write_text("step,layer,expert,tokens\n" + "".join(
            f"0,0,{e},{t}\n" for e, t in enumerate(tokens)))
        error = one_error_line(tmp, "trace", "info", tmp / "c.csv")
        with pytest.raises(ValueError, match=f"more than the {MAX_TOKEN_COUNT}"):
            import_trace(tmp / "c.csv", fmt="csv")
    assert f"data row {row + 1}: tokens {count} is more than the {MAX_TOKEN_COUNT}" in error


def test_the_largest_count_round_trips(tmp_path):
    trace = LoadTrace(np.array([[[MAX_TOKEN_COUNT, 0]]]))
    write_trace(trace, tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet").counts_SLE.max() == MAX_TOKEN_COUNT


# ---------------------------------------------------------------- a 1-step trace


@pytest.mark.parametrize(("args", "command"), [
    (["simulate", "--fit-model-to-trace", "--policies", "static"], "simulate"),
    (["simulate", "--fit-model-to-trace", "--policies", "static", "--steps", "3", "--loop"], "simulate"),
    (["plan", "--replay"], "plan --replay"),
    (["plan", "--step", "0"], "a plan"),
    (["plan", "--step", "1"], "a plan"),
])
def test_a_one_step_trace_is_explained(tmp_path, args, command):
    error = one_error_line(tmp_path, *args, "--trace", small_trace(tmp_path, num_steps=1), "--cluster", "cpu-4",
                           "--out", tmp_path / ("plan.json" if "--step" in args else "run"))
    assert f"the trace has 1 step; {command} needs at least 2 (one to plan from, one to score)" in error
