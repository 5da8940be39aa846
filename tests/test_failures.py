"""failures.py: hand-computed expected costs of rank failures per checkpoint policy; simulate and CLI wiring."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.cluster import Cluster
from symi_sim.failures.model import (
    FAILURE_COLUMNS,
    Checkpointing,
    FailureModel,
    checkpoint_bandwidth_bytes_per_s,
    failure_costs,
    full_checkpoint_bytes,
    hot_experts_SL,
    hot_snapshot_bytes,
    parse_checkpoint,
)
from symi_sim.models import ModelConfig
from symi_sim.simulator.driver import simulate
from symi_sim.traces.format import LoadTrace, write_trace

# embeddings 100 x 64 + 8 x 64 = 6,912; attention 2 x 4 x 64^2 = 32,768; routers 2 x 64 x 2 = 256
# -> dense 39,936; experts 2 layers x 2 x (2 x 64 x 128 = 16,384) = 65,536 -> total 105,472 params
MODEL = ModelConfig(name="tiny", num_layers=2, num_moe_layers=2, d_model=64, d_ff=128, expert_d_ff=128,
                    vocab_size=100, num_experts=2, top_k=1, seq_len=8, global_batch=4)
FULL_BYTES = 105_472 * 18
DENSE_BYTES = 39_936 * 18
EXPERT_BYTES = 16_384 * 18
COUNTS_SLE = np.array([[[30, 2], [16, 16]]])  # hot share 0.8: 1 expert in layer 0 (30 >= 25.6), 2 in layer 1


def _one_gpu(full_checkpoint_s: float = 10.0) -> Cluster:
    """One GPU whose PCIe writes the full checkpoint in `full_checkpoint_s`."""
    return Cluster(name="one", pcie_gbps=FULL_BYTES / full_checkpoint_s / 1.25e8)


def _costs(checkpoint: str, cluster: Cluster | None = None, step_time_s: float = 1.0, iterations: float = 1000.0,
           **mtbf: float) -> dict[str, float]:
    failures = FailureModel(checkpoint=checkpoint, **(mtbf or {"mtbf_hours": 1.0}))
    return failure_costs(step_time_s=step_time_s, iterations_to_target=iterations, model=MODEL,
                         cluster=cluster or _one_gpu(), counts_SLE=COUNTS_SLE, failures=failures)


def test_checkpoint_sizes():
    assert MODEL.total_params == 105_472 and MODEL.dense_params == 39_936
    assert full_checkpoint_bytes(MODEL) == FULL_BYTES
    assert hot_experts_SL(COUNTS_SLE, 0.8).tolist() == [[1, 2]]
    assert hot_snapshot_bytes(MODEL, COUNTS_SLE, 0.8) == DENSE_BYTES + 3 * EXPERT_BYTES
    # 5, 8, 10, 10 of 10: half needs 1 expert, 0.8 needs 2, all needs 3 (the idle one never); an idle layer 0
    loads = np.array([[[5, 3, 2, 0], [0, 0, 0, 0]]])
    assert [hot_experts_SL(loads, share)[0].tolist() for share in (0.5, 0.8, 1.0)] == [[1, 0], [2, 0], [3, 0]]
    # mean over steps: 1 then 2 hot experts in the single layer
    two_steps = np.array([[[9, 1]], [[5, 5]]])
    one_layer = MODEL.with_(num_layers=1, num_moe_layers=1)
    assert hot_snapshot_bytes(one_layer, two_steps, 0.8) == one_layer.dense_params * 18 + 1.5 * EXPERT_BYTES


def test_checkpoint_bandwidth_is_the_slower_of_pcie_and_the_nic_share():
    assert checkpoint_bandwidth_bytes_per_s(Cluster(pcie_gbps=16.0)) == 2e9  # one node: host memory only
    # 8 GPUs share 2 x 400 Gb/s: 100 Gb/s each, below PCIe's 512
    big = Cluster(num_nodes=2, gpus_per_node=8, nic_gbps=400.0, nics_per_node=2, pcie_gbps=512.0)
    assert checkpoint_bandwidth_bytes_per_s(big) == 100 * 1.25e8
    assert checkpoint_bandwidth_bytes_per_s(big.with_(pcie_gbps=64.0)) == 64 * 1.25e8


def test_full_k_on_one_gpu_is_young_daly_first_order():
    # T = 1 s, K = 100, C = R = 10 s, M = 3600 s: lost = 50 + 10, ratio = (1 - 60/3600) / (1 + 10/100)
    costs = _costs("full-100")
    assert costs["lost_work_s_per_failure"] == pytest.approx(60.0, rel=1e-12)
    assert costs["effective_time_ratio"] == pytest.approx((59 / 60) / 1.1, rel=1e-12)
    assert costs["checkpoint_bytes_per_step"] == FULL_BYTES / 100
    assert costs["failures_per_day"] == 24.0
    assert costs["time_to_target_with_failures_s"] == pytest.approx(1000 * 1.1 * 60 / 59, rel=1e-12)


def test_sparse_overlaps_the_hot_snapshot_and_loses_about_a_step():
    hot_bytes = DENSE_BYTES + 3 * EXPERT_BYTES
    hot_s = 10.0 * hot_bytes / FULL_BYTES  # about 8.45 s at the rate that writes everything in 10 s
    # T = 20 s > hot_s: no stretch; lost = 20/2 + hot_s + R (10); full snapshot every 100 steps adds 10 s / 100 steps
    costs = _costs("sparse-100:hot=0.8", step_time_s=20.0)
    assert costs["checkpoint_bytes_per_step"] == pytest.approx(hot_bytes + FULL_BYTES / 100, rel=1e-12)
    assert costs["lost_work_s_per_failure"] == pytest.approx(10 + hot_s + 10, rel=1e-12)
    assert costs["effective_time_ratio"] == pytest.approx((1 - (20 + hot_s) / 3600) / (1 + 10 / 2000), rel=1e-12)
    # T = 1 s < hot_s: each step stretches to hot_s
    costs = _costs("sparse-100:hot=0.8", step_time_s=1.0)
    assert costs["lost_work_s_per_failure"] == pytest.approx(1.5 * hot_s + 10, rel=1e-12)
    assert costs["effective_time_ratio"] == pytest.approx((1 - (1.5 * hot_s + 10) / 3600) / (hot_s + 10 / 100),
                                                          rel=1e-12)


def test_none_restarts_from_scratch():
    # U = M ln 2: e^(U/M) - 1 = 1 expected failure, W = M + R, lost = M + R - U
    mtbf_s, useful_s = 3600.0, 3600.0 * math.log(2)
    costs = _costs("none", iterations=useful_s)
    assert costs["effective_time_ratio"] == pytest.approx(useful_s / 3610, rel=1e-12)
    assert costs["lost_work_s_per_failure"] == pytest.approx(mtbf_s + 10 - useful_s, rel=1e-12)
    assert costs["time_to_target_with_failures_s"] == pytest.approx(3610, rel=1e-12)
    assert costs["checkpoint_bytes_per_step"] == 0.0
    # a job far longer than its MTBF never finishes; nor does one that loses more than M per failure
    assert _costs("none", iterations=1e7)["effective_time_ratio"] == 0.0
    hopeless = _costs("full-10000")
    assert hopeless["effective_time_ratio"] == 0.0 and hopeless["time_to_target_with_failures_s"] == math.inf


def test_gpu_mtbf_divides_by_the_gpus_and_more_gpus_lower_the_ratio():
    two = Cluster(name="two", num_nodes=2, pcie_gbps=8.0, nic_gbps=8.0)
    assert _costs("full-100", two, gpu_mtbf_hours=2.0) == _costs("full-100", two, mtbf_hours=1.0)
    ratios = [_costs("full-100", two.with_(num_nodes=n), gpu_mtbf_hours=10.0)["effective_time_ratio"]
              for n in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False)), ratios
    assert _costs("full-100", two.with_(num_nodes=16), gpu_mtbf_hours=10.0)["failures_per_day"] == 24 * 16 / 10


def test_sparse_bytes_never_exceed_full_bytes():
    rng = np.random.default_rng(0)
    counts = rng.multinomial(1000, rng.dirichlet(np.ones(2) * 0.3), size=(20, 2))
    sizes = [hot_snapshot_bytes(MODEL, counts, share) for share in (0.1, 0.5, 0.8, 0.95, 1.0)]
    assert sizes == sorted(sizes) and sizes[-1] <= FULL_BYTES


@pytest.mark.parametrize(("spec", "expected"), [
    ("none", Checkpointing("none")),
    ("full-7", Checkpointing("full", 7)),
    ("sparse", Checkpointing("sparse", 100, 0.8)),
    ("sparse-50", Checkpointing("sparse", 50, 0.8)),
    ("sparse-50:hot=0.5", Checkpointing("sparse", 50, 0.5)),
    ("sparse:hot=1", Checkpointing("sparse", 100, 1.0)),
])
def test_parse_checkpoint(spec, expected):
    assert parse_checkpoint(spec) == expected


@pytest.mark.parametrize("spec", ["full-0", "full", "full--3", "sparse-0", "sparse:hot=0", "sparse:hot=1.5",
                                  "sparse:hot=x", "bogus", ""])
def test_bad_checkpoint_specs(spec):
    with pytest.raises(ValueError, match="checkpoint"):
        parse_checkpoint(spec)


@pytest.mark.parametrize("kwargs", [{"mtbf_hours": -1.0}, {"mtbf_hours": 0.0}, {"gpu_mtbf_hours": math.inf},
                                    {"mtbf_hours": math.nan}, {}, {"mtbf_hours": 1.0, "gpu_mtbf_hours": 1.0},
                                    {"mtbf_hours": 1.0, "checkpoint": "full-0"},
                                    {"mtbf_hours": 1.0, "restart_overhead_s": -1.0}])
def test_bad_failure_models(kwargs):
    with pytest.raises(ValueError):
        FailureModel(**kwargs)


def test_simulate_adds_the_columns_and_records_the_settings(tmp_path):
    counts = np.tile(np.array([24, 8]), (4, MODEL.num_moe_layers, 1))
    trace = LoadTrace(counts, top_k=1, tokens_per_step=MODEL.tokens_per_step)
    cluster = Cluster(name="two", num_nodes=2, slots_per_gpu=2, nic_gbps=8.0, pcie_gbps=16.0)
    failures = FailureModel(checkpoint="sparse-10:hot=0.5", gpu_mtbf_hours=2.0)
    result = simulate(trace=trace, cluster=cluster, model=MODEL, policies=["static", "symi"], progress=False,
                      failures=failures)
    for row in result.summary.itertuples(index=False):
        expected = failure_costs(step_time_s=row.mean_time_s, iterations_to_target=row.iterations_to_target,
                                 model=MODEL, cluster=cluster, counts_SLE=counts[1:], failures=failures)
        assert {column: getattr(row, column) for column in FAILURE_COLUMNS} == expected
    # 24 of 32 tokens: one hot expert per layer covers half
    assert result.summary.checkpoint_bytes_per_step.eq(DENSE_BYTES + 2 * EXPERT_BYTES + FULL_BYTES / 10).all()
    assert result.summary.failures_per_day.eq(24.0).all()
    assert result.config["failures"]["checkpoint"] == "sparse-10:hot=0.5"
    assert result.config["failures"]["job_mtbf_s"] == 3600.0
    plain = simulate(trace=trace, cluster=cluster, model=MODEL, policies=["static"], progress=False)
    assert plain.config["failures"] is None and "effective_time_ratio" not in plain.summary
    with pytest.raises(ValueError, match="FailureModel"):
        simulate(trace=trace, cluster=cluster, model=MODEL, policies=["static"], progress=False, failures="full-10")


@pytest.fixture()
def trace_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.parquet"
    write_trace(LoadTrace(rng.multinomial(64, [0.4, 0.3, 0.2, 0.1], size=(5, 2)), top_k=1, tokens_per_step=64), path)
    return path


def _cli(tmp_path, trace_path, *extra: str):
    args = ["simulate", "--trace", str(trace_path), "--cluster", "cpu-4", "--slots", "2", "--fit-model-to-trace",
            "--policies", "static,symi", "--steps", "3", "--out", str(tmp_path / "run"), *extra]
    return CliRunner().invoke(symi, args)


def test_cli_failure_columns(tmp_path, trace_path):
    result = _cli(tmp_path, trace_path, "--mtbf-hours", "2", "--checkpoint", "full-50")
    assert result.exit_code == 0, result.output
    assert "effective_time_ratio" in result.output and "time_to_target_with_failures_s" in result.output
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert summary.failures_per_day.eq(12.0).all()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["failures"]["checkpoint"], config["failures"]["mtbf_hours"]) == ("full-50", 2.0)
    assert config["failures"]["gpu_mtbf_hours"] is None


def test_cli_injected_failures_add_sampled_columns(tmp_path, trace_path):
    result = _cli(tmp_path, trace_path, "--mtbf-hours", "0.001", "--checkpoint", "full-2", "--failure-runs", "50",
                  "--failure-seed", "7")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert {"sampled_effective_time_ratio", "sampled_ratio_stderr", "sampled_failures_per_run"} <= set(summary)
    assert summary.sampled_effective_time_ratio.between(0, 1).all()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["failures"]["sampled_runs"], config["failures"]["seed"]) == (50, 7)


@pytest.mark.parametrize(("extra", "message"), [
    (["--mtbf-hours", "-1"], "mtbf hours must be a finite number > 0"),
    (["--mtbf-hours", "1", "--checkpoint", "full-0"], "the interval must be a positive integer, got 0"),
    (["--mtbf-hours", "1", "--checkpoint", "hourly"], "unknown checkpoint mode"),
    (["--checkpoint", "full-10"], "needs --mtbf-hours"),
    (["--mtbf-hours", "1", "--gpu-mtbf-hours", "1"], "exactly one"),
    (["--failure-runs", "10"], "--failure-runs needs --mtbf-hours"),
    (["--mtbf-hours", "1", "--failure-runs", "-3"], "number of failure runs must be an integer >= 0"),
])
def test_cli_bad_failure_options_leave_nothing(tmp_path, trace_path, extra, message):
    result = _cli(tmp_path, trace_path, *extra)
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
