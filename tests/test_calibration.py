"""Calibration: the FLOP fallback reproduces today's model, files round-trip and refuse bad input, fits recover known
terms from synthetic data (within 1%), the shipped paper calibration reproduces the measured forward latencies
(within 5%), and a real tiny `symi train` run can be fitted."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from symi_sim.cluster import load_cluster
from symi_sim.models import load_model
from symi_sim.placement import Placement
from symi_sim.routing import route
from symi_sim.simulator import phases
from symi_sim.simulator.calibrate import GEMM_FORMS, fit_latencies, fit_runs, static_forward_s
from symi_sim.simulator.calibration import (
    FLOP_SOURCE,
    OPTIMIZER_FLOPS_PER_PARAM,
    Calibration,
    available_calibrations,
    flop_calibration,
    load_calibration,
    write_calibration,
)
from symi_sim.simulator.costs import alltoall_bytes
from symi_sim.simulator.run_dirs import PHASE_COLUMNS, estimated_served_LR, read_run
from symi_sim.traces.format import LoadTrace, write_trace

PAPER_CF = (1.0, 2.0, 4.0)
PAPER_FORWARD_MS = (455.41, 506.77, 571.42)


@pytest.fixture(scope="module")
def paper():
    return load_cluster("paper-a100-16"), load_model("gpt-small", num_experts=32)


def _write_latencies(path: Path, capacity_factors, forward_s) -> Path:
    path.write_text("capacity_factor,forward_ms\n" + "".join(
        f"{float(cf)!r},{float(1e3 * s)!r}\n" for cf, s in zip(capacity_factors, forward_s, strict=True)))
    return path


# ---------------------------------------------------------------------------------------------- the FLOP fallback


def test_flop_fallback_gives_todays_numbers(paper):
    cluster, model = paper
    cal = flop_calibration(cluster=cluster, model=model)
    assert cal.source == FLOP_SOURCE and cal.fitted == ()
    assert OPTIMIZER_FLOPS_PER_PARAM == 12  # mixed-precision Adam: moments, bias correction, sqrt, divide, update
    rng = np.random.default_rng(0)
    tokens_row_GS = rng.integers(0, 900, size=(5, cluster.num_gpus, cluster.slots_per_gpu)).astype(float)
    flops = model.expert_flops_per_assignment
    expected = tokens_row_GS.sum(axis=2).max(axis=1) * flops / cluster.achieved_flops   # phases.alltoall_and_experts
    np.testing.assert_allclose(cal.expert_time_s(tokens_row_GS=tokens_row_GS, flops_per_assignment=flops), expected,
                               rtol=1e-12)
    dense_flops = model.tokens_per_step / cluster.num_gpus * model.dense_flops_per_token / model.num_moe_layers
    assert cal.dense_time_s(flops=dense_flops) == pytest.approx(dense_flops / cluster.achieved_flops, rel=1e-12)
    assert phases.dense_layer_s(cluster=cluster, model=model, calibration=cal) == pytest.approx(
        dense_flops / cluster.achieved_flops, rel=1e-12)
    a2a = alltoall_bytes(tokens_row_GS.sum(axis=2), cluster, model.d_model * model.activation_bytes)
    busiest = a2a.busiest_link_s(cluster)
    np.testing.assert_allclose(cal.a2a_time_s(busiest_link_s=busiest, num_messages=a2a.messages), a2a.time_L(cluster),
                               rtol=1e-12)
    params = 1.5e8
    assert cal.optimizer_time_s(state_bytes=params * model.optimizer_bytes) == pytest.approx(
        params * 12 / cluster.achieved_flops, rel=1e-12)
    # the simulator's forward of the motivation configuration today (README, issue 11): 13.6 / 21.2 / 36.2 ms
    forward_ms = 1e3 * static_forward_s(calibration=cal, cluster=cluster, model=model, capacity_factors=PAPER_CF)
    np.testing.assert_allclose(forward_ms, [13.6, 21.2, 36.2], atol=0.05)


def test_gemm_curve():
    cal = flop_calibration(cluster=load_cluster("paper-a100-16"), model=load_model("gpt-small"))
    power = cal.with_(expert_saturation_tokens=1000.0, expert_small_batch_exponent=0.5, expert_gemm_flops=1e12,
                      expert_fixed_per_gemm_s=1e-5)
    tokens = np.array([0.0, 10.0, 250.0, 1000.0, 4000.0])
    got = power.gemm_time_s(tokens, flops_per_assignment=1e6)
    # below n_sat: n_sat**0.5 n**0.5 tokens' worth; above: the FLOP model; empty GEMMs cost nothing
    want = np.array([0.0, math.sqrt(1000 * 10), math.sqrt(1000 * 250), 1000.0, 4000.0]) * 1e-6 + 1e-5
    want[0] = 0.0
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.diff(power.gemm_time_s(np.linspace(1, 5000, 400), flops_per_assignment=1e6)) > 0)


def test_expert_time_sums_each_gpus_gemms_and_the_slowest_gpu_gates():
    cal = flop_calibration(cluster=load_cluster("paper-a100-16"), model=load_model("gpt-small"))
    power = cal.with_(expert_saturation_tokens=1000.0, expert_small_batch_exponent=0.5, expert_gemm_flops=1e12,
                      expert_fixed_per_gemm_s=1e-5)
    # one row, two GPUs of two GEMMs: GPU 0 has 10 and 4000 tokens, GPU 1 two GEMMs of 1000 (and an empty one)
    tokens_row_GS = np.array([[[10.0, 4000.0, 0.0], [1000.0, 1000.0, 0.0]]])
    gpu0_s = (math.sqrt(1000 * 10) + 4000) * 1e-6 + 2e-5
    gpu1_s = 2000 * 1e-6 + 2e-5
    np.testing.assert_allclose(power.expert_time_s(tokens_row_GS=tokens_row_GS, flops_per_assignment=1e6),
                               [max(gpu0_s, gpu1_s)], rtol=1e-12)
    # linear GEMMs without a fixed cost (the fast path): the busiest GPU's tokens at the GEMM rate
    linear = cal.with_(expert_gemm_flops=1e12)
    np.testing.assert_allclose(linear.expert_time_s(tokens_row_GS=tokens_row_GS, flops_per_assignment=1e6),
                               [4010 * 1e-6], rtol=1e-12)


# ---------------------------------------------------------------------------------------------- files


def test_file_round_trip_and_names(tmp_path, paper):
    cluster, model = paper
    cal = flop_calibration(cluster=cluster, model=model).with_(layer_forward_fixed_s=0.01,
                                                                fitted=("layer_forward_fixed_s",))
    path = tmp_path / "c.json"
    write_calibration(path, cal)
    loaded = load_calibration(path)
    assert loaded == cal.with_(source=str(path))
    toml = tmp_path / "c.toml"
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cal.to_dict().items())
    toml.write_text(f"[calibration]\n{body}\n")
    assert load_calibration(toml) == cal.with_(source=str(toml))
    assert "paper-a100-16-gpt-small" in available_calibrations()
    shipped = load_calibration("paper-a100-16-gpt-small")
    assert shipped.source.startswith("paper-a100-16-gpt-small (") and shipped.cluster == "paper-a100-16"


@pytest.mark.parametrize(("change", "message"), [
    ({"bogus": 1}, "unknown field(s) ['bogus']; known fields: ['schema_version', 'cluster'"),
    ({"a2a_efficiency": None}, "a2a_efficiency must be a number in (0, 1]"),
    ({"a2a_efficiency": 1.5}, "a2a_efficiency must be a number in (0, 1], got 1.5"),
    ({"layer_forward_fixed_s": -0.1}, "layer_forward_fixed_s must be a finite number >= 0, got -0.1"),
    ({"dense_flops": "fast"}, "dense_flops must be a finite number > 0, got 'fast'"),
    ({"expert_small_batch_exponent": 2}, "expert_small_batch_exponent must be a number in [0, 1]"),
    ({"optimizer_state_location": "disk"}, "optimizer_state_location 'disk'; choices: host, gpu"),
    ({"fitted": ["nonsense"]}, "fitted field 'nonsense'"),
    ({"schema_version": 2}, "schema_version must be 1"),
    ({"cluster": ""}, "cluster must be a non-empty string"),
])
def test_bad_calibration_files(tmp_path, paper, change, message):
    data = flop_calibration(cluster=paper[0], model=paper[1]).to_dict()
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        load_calibration(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_bad_files_and_names(tmp_path, paper):
    data = flop_calibration(cluster=paper[0], model=paper[1]).to_dict()
    del data["dense_flops"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    (tmp_path / "nan.json").write_text(json.dumps({**data, "dense_flops": float("nan")}))
    (tmp_path / "broken.json").write_text("{")
    for name, message in (("missing.json", "missing field(s) ['dense_flops']"), ("nan.json", "got nan"),
                          ("broken.json", "cannot be parsed"), ("absent.json", "does not exist"),
                          ("paper-a100-16", "unknown calibration 'paper-a100-16'")):
        with pytest.raises(ValueError, match=None) as info:
            load_calibration(tmp_path / name if name.endswith(".json") else name)
        assert message in str(info.value)
    with pytest.raises(ValueError, match="must be a .json file"):
        write_calibration(tmp_path / "out.toml", flop_calibration(cluster=paper[0], model=paper[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "missing.json", "nan.json"]


# ---------------------------------------------------------------------------------------------- latencies


def test_shipped_paper_calibration_reproduces_the_measured_forward(paper):
    cluster, model = paper
    cal = load_calibration("paper-a100-16-gpt-small")
    forward_ms = 1e3 * static_forward_s(calibration=cal, cluster=cluster, model=model, capacity_factors=PAPER_CF)
    assert np.max(np.abs(forward_ms / np.array(PAPER_FORWARD_MS) - 1)) < 0.05
    np.testing.assert_allclose(forward_ms, [459.96, 498.31, 575.00], atol=0.01)   # README of data/calibrations
    assert cal.fitted == ("layer_forward_fixed_s", "expert_gemm_flops")
    assert cal.layer_forward_fixed_s == pytest.approx(0.034625, rel=1e-4)
    assert cal.expert_gemm_flops == pytest.approx(7.0959e12, rel=1e-4)
    assert "FLOP fallback (not determined by these inputs): layer_backward_fixed_s" in cal.provenance


def test_paper_fits_both_forms(paper):
    cluster, model = paper
    csv_path = Path(__file__).resolve().parents[1] / "symi_sim/data/calibrations/paper-motivation-forward.csv"
    assert GEMM_FORMS == ("linear", "power")
    linear = fit_latencies(latencies_path=csv_path, cluster=cluster, model=model)
    np.testing.assert_allclose(linear.residuals["residual_pct"], [1.000, -1.669, 0.627], atol=0.001)
    errors = linear.terms.set_index("term")["std_error"]
    assert errors["layer_forward_fixed_s"] == pytest.approx(1.01e-3, rel=0.01)
    assert errors["expert_gemm_flops"] == pytest.approx(1.08e12, rel=0.01)
    power = fit_latencies(latencies_path=csv_path, cluster=cluster, model=model, gemm_form="power")
    np.testing.assert_allclose(power.residuals["residual_pct"], 0.0, atol=1e-6)   # three terms, three rows
    assert power.calibration.expert_small_batch_exponent == pytest.approx(0.2227, abs=1e-4)
    assert power.terms.set_index("term")["std_error"].isna().all()               # no degree of freedom left


@pytest.mark.parametrize("form", GEMM_FORMS)
def test_latency_fit_recovers_known_terms(tmp_path, paper, form):
    cluster, model = paper
    truth = flop_calibration(cluster=cluster, model=model).with_(layer_forward_fixed_s=0.021)
    if form == "power":
        truth = truth.with_(expert_saturation_tokens=5.0e4, expert_small_batch_exponent=0.4)
        fitted = ("layer_forward_fixed_s", "expert_saturation_tokens", "expert_small_batch_exponent")
        capacity_factors = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    else:
        truth = truth.with_(expert_gemm_flops=9.0e12)
        fitted = ("layer_forward_fixed_s", "expert_gemm_flops")
        capacity_factors = (1.0, 2.0, 4.0)
    forward_s = static_forward_s(calibration=truth, cluster=cluster, model=model, capacity_factors=capacity_factors)
    path = _write_latencies(tmp_path / "lat.csv", capacity_factors, forward_s)
    fit = fit_latencies(latencies_path=path, cluster=cluster, model=model, gemm_form=form)
    assert fit.calibration.fitted == fitted
    for name in fitted:
        assert getattr(fit.calibration, name) == pytest.approx(getattr(truth, name), rel=0.01), name
    assert np.abs(fit.residuals["residual_pct"]).max() < 1e-4


@pytest.mark.parametrize(("content", "message"), [
    ("capacity_factor,forward_ms\n1,455\n2,nan\n4,571\n", "data row 2: forward_ms must be a finite number > 0"),
    ("capacity_factor,forward_ms\n1,455\n2,-5\n4,571\n", "data row 2: forward_ms must be a finite number > 0"),
    ("capacity_factor,forward_ms\n1,455\nx,500\n4,571\n", "data row 2: capacity_factor"),
    ("capacity_factor,forward_ms,gpu\n1,455,a\n2,500,a\n4,571,a\n", "unknown ['gpu']"),
    ("capacity_factor\n1\n2\n", "missing ['forward_ms']"),
    ("capacity_factor,forward_ms\n", "no data rows"),
    ("capacity_factor,forward_ms\n1,455\n1,456\n", "1 distinct capacity factor(s) cannot determine the 2 terms"),
    ('capacity_factor,forward_ms\n1,"455\n', "not a readable CSV file"),
])
def test_bad_latency_files(tmp_path, paper, content, message):
    path = tmp_path / "lat.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        fit_latencies(latencies_path=path, cluster=paper[0], model=paper[1])
    assert message in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- run directories


def write_synthetic_run(directory: Path, *, world_size: int = 2, slots: int = 2, num_experts: int = 4,
                        d_model: int = 32, d_ff: int = 64, batch_size: int = 4, seq_len: int = 32,
                        capacity_factor: float = 1.0, steps: int = 6, seed: int = 0,
                        truth: Calibration | None = None) -> Path:
    """A run directory as `symi train --record-trace` writes it (2 layers, top-1, static placement); its times are
    1.0 s, or those `truth` gives every step (computed here from the model's formulas, independently)."""
    directory.mkdir(parents=True)
    num_layers, num_slots = 2, world_size * slots
    tokens = world_size * batch_size * seq_len
    rng = np.random.default_rng(seed)
    counts_SLE = rng.multinomial(tokens, rng.dirichlet(np.ones(num_experts)), size=(steps, num_layers))
    placement = Placement.even(np.tile(np.arange(num_slots) % num_experts, (num_layers, 1)), num_experts)
    config = {"train": {"model": "tiny", "slots_per_rank": slots, "capacity_factor": capacity_factor,
                        "capacity_mode": "slot", "batch_size": batch_size, "dtype": "float32"},
              "model": {"num_layers": num_layers, "d_model": d_model, "d_ff": d_ff, "seq_len": seq_len,
                        "num_experts": num_experts, "top_k": 1, "vocab_size": 256},
              "world_size": world_size, "tokens_per_step": tokens, "expert_optimizer": "sharded"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "COMPLETE").write_text("done\n")   # the marker a finished `symi train` writes last
    with open(directory / "placements.jsonl", "w") as f:
        for step in range(steps):
            routing = route(counts_SLE[step], placement, slots_per_gpu=slots, capacity_factor=capacity_factor)
            f.write(json.dumps({"step": step, "phy2log": placement.phy2log_LR.tolist(),
                                "share": placement.share_LR.tolist(), "dropped": routing.dropped_LE.tolist()}) + "\n")
    write_trace(LoadTrace(counts_SLE, top_k=1, tokens_per_step=tokens), directory / "trace.parquet")
    times = {column: np.ones(steps) for column in PHASE_COLUMNS.values()}
    if truth is not None:
        _write_metrics(directory, steps, times)
        run = read_run(directory, warmup_steps=0)
        flops = run.model.expert_flops_per_assignment
        gemm_row_GS = np.where(run.tokens_row_GS > 0, run.tokens_row_GS * flops / truth.expert_gemm_flops, 0.0)
        a2a_row = np.where(run.link_s_row > 0, run.link_s_row / truth.a2a_efficiency
                           + (world_size - 1) * truth.a2a_latency_s, 0.0)
        compute_row = gemm_row_GS.sum(axis=2).max(axis=1) + run.dense_flops_layer / truth.dense_flops + 2 * a2a_row
        # the forward also all-reduces every layer's E counts of 4 bytes (tree: 2 log2 G messages)
        popularity = (2 * (world_size - 1) / world_size * 4 * num_experts / (run.cluster.intra_node_gbps * 1.25e8)
                      / truth.collective_efficiency + 2 * math.ceil(math.log2(world_size)) * truth.collective_latency_s)
        times["time_forward_s"] = (truth.layer_forward_fixed_s + compute_row + popularity).reshape(steps, -1).sum(
            axis=1)
        # the backward: twice the forward's compute, the same two all-to-alls (their gradients)
        backward_row = truth.layer_backward_fixed_s + 2 * compute_row - 2 * a2a_row
        times["time_backward_s"] = backward_row.reshape(steps, -1).sum(axis=1)
        times["time_optimizer_s"] = run.state_bytes_S / truth.optimizer_bytes_per_s
    _write_metrics(directory, steps, times)
    return directory


def _write_metrics(directory: Path, steps: int, times: dict[str, np.ndarray]) -> None:
    byte_columns = ("bytes_replica_grad_sync", "bytes_grad_collection", "bytes_weight_sendout",
                    "bytes_optimizer_state")
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", *times, *byte_columns])
        writer.writeheader()
        for step in range(steps):
            writer.writerow({"step": step, "loss": 3.0, **{k: v[step] for k, v in times.items()},
                             **dict.fromkeys(byte_columns, 1000)})


RUN_SHAPES = (  # d_model, d_ff, batch, world size, capacity factor: enough variety to tell every forward term apart
    (32, 64, 4, 2, 1.0), (32, 256, 4, 2, 1.0), (64, 64, 8, 2, 2.0), (32, 128, 2, 4, 1.0), (64, 256, 6, 2, 0.5))


def test_run_fit_recovers_known_terms(tmp_path):
    probe = read_run(write_synthetic_run(tmp_path / "probe"), warmup_steps=0)
    truth = flop_calibration(cluster=probe.cluster, model=probe.model).with_(
        layer_forward_fixed_s=2e-3, layer_backward_fixed_s=3e-3, expert_gemm_flops=3e10, dense_flops=8e10,
        a2a_efficiency=0.01, optimizer_bytes_per_s=1e9)
    run_dirs = [write_synthetic_run(tmp_path / f"run{i}", d_model=d, d_ff=f, batch_size=b, world_size=g,
                                    capacity_factor=cf, seed=i, truth=truth)
                for i, (d, f, b, g, cf) in enumerate(RUN_SHAPES)]
    fit = fit_runs(run_dirs=run_dirs, warmup_steps=1)
    fitted = ("layer_forward_fixed_s", "expert_gemm_flops", "dense_flops", "a2a_efficiency", "layer_backward_fixed_s",
              "optimizer_bytes_per_s")
    assert fit.calibration.fitted == fitted
    for name in fitted:
        assert getattr(fit.calibration, name) == pytest.approx(getattr(truth, name), rel=0.01), name
    assert np.abs(fit.residuals["residual_pct"]).max() < 1e-4
    assert len(fit.residuals) == 3 * len(RUN_SHAPES)
    # one run determines one forward term: the others keep the fallback
    single = fit_runs(run_dirs=run_dirs[:1], warmup_steps=1).calibration
    assert single.fitted == ("layer_forward_fixed_s", "layer_backward_fixed_s", "optimizer_bytes_per_s")
    assert single.optimizer_bytes_per_s == pytest.approx(1e9, rel=1e-6)


def test_estimated_tokens_per_slot():
    placement = Placement.even(np.array([[0, 0, 1, 2]]), 3)
    load_LE = np.array([[10, 3, 1]])
    routing = route(load_LE, placement, slots_per_gpu=2, capacity_factor=1.0)   # capacity ceil(14 / 4) = 4
    estimate = estimated_served_LR(routing.dropped_LE, placement.phy2log_LR, num_assignments=14, capacity_factor=1.0,
                                   capacity_mode="slot")
    np.testing.assert_allclose(estimate, [[4, 4, 2, 2]])   # expert 0 dropped: its slots full; 4 tokens over 2 slots
    np.testing.assert_array_equal(routing.served_LR, [[4, 4, 3, 1]])


@pytest.mark.parametrize(("breakage", "message"), [
    ("no-metrics", "has no metrics.csv"),
    ("partial", "is not complete (no COMPLETE marker): its job failed or is still running"),
    ("nan", "metrics.csv, data row 2: time_forward_s must be a finite number >= 0, got nan"),
    ("negative", "metrics.csv, data row 2: time_forward_s must be a finite number >= 0, got -1.0"),
    ("missing-column", "missing column(s) ['time_backward_s']"),
    ("placements", "placements.jsonl line 2:"),
    ("config", "config.json [model]: missing field 'd_ff'"),
    ("warmup", "none left after 6 warm-up step(s)"),
])
def test_bad_run_directories(tmp_path, breakage, message):
    run = write_synthetic_run(tmp_path / "run")
    metrics = (run / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    warmup = 6 if breakage == "warmup" else 1
    if breakage == "no-metrics":
        (run / "metrics.csv").unlink()
    elif breakage == "partial":
        (run / "COMPLETE").unlink()
    elif breakage in ("nan", "negative"):
        row = metrics[2].split(",")
        row[header.index("time_forward_s")] = "nan" if breakage == "nan" else "-1.0"
        (run / "metrics.csv").write_text("\n".join([*metrics[:2], ",".join(row), *metrics[3:]]) + "\n")
    elif breakage == "missing-column":
        keep = [i for i, name in enumerate(header) if name != "time_backward_s"]
        (run / "metrics.csv").write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in metrics))
    elif breakage == "placements":
        lines = (run / "placements.jsonl").read_text().splitlines()
        lines[1] = lines[1][:-5]
        (run / "placements.jsonl").write_text("\n".join(lines) + "\n")
    elif breakage == "config":
        config = json.loads((run / "config.json").read_text())
        del config["model"]["d_ff"]
        (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        fit_runs(run_dirs=[run], warmup_steps=warmup)
    assert message in str(info.value)


@pytest.mark.slow
def test_fit_of_a_real_tiny_training_run(tmp_path):
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch

    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=2, steps=8, record_trace=True,
                         log_interval=1000)
    run_dir = launch(config, 2, log_level=logging.WARNING)
    estimated = shutil.copytree(run_dir, tmp_path / "estimated")
    (estimated / "trace.parquet").unlink()
    for runs, exact in (([run_dir], True), ([estimated], False)):
        fit = fit_runs(run_dirs=runs, warmup_steps=3)
        assert read_run(runs[0], warmup_steps=3).exact_tokens is exact
        assert np.isfinite(fit.residuals[["measured_ms", "predicted_ms", "residual_pct"]].to_numpy()).all()
        assert fit.calibration.layer_forward_fixed_s > 0 and fit.calibration.optimizer_bytes_per_s > 0
        assert fit.calibration.cluster == "executor" and fit.calibration.model == "executor-tiny"
