"""The simulator's phase costs applied to an executor run (run_predict), checked against a hand computation, and the
run fit (calibrate.fit_runs) recovering known terms from runs whose times those costs give."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.simulator.calibrate import fit_runs
from symi_sim.simulator.calibration import Calibration, flop_calibration
from symi_sim.simulator.run_dirs import INNER_COLUMNS, PHASE_COLUMNS, read_run
from symi_sim.simulator.run_predict import PREDICTED_PHASES, predict_steps, predicted_phase
from symi_sim.traces.format import LoadTrace, write_trace

BYTES_PER_S = 1e6                                       # the test cluster's per-GPU link: 1 MB/s
SLOW_LINK = Cluster(name="executor", num_nodes=1, gpus_per_node=2, slots_per_gpu=2,
                    intra_node_gbps=BYTES_PER_S / 1.25e8)


def write_run(directory: Path, *, layout: str, counts_SLE: np.ndarray, phy2log_LR: np.ndarray, world_size: int = 2,
              slots: int = 2, d_model: int = 8, d_ff: int = 16, batch_size: int = 2, seq_len: int = 4,
              capacity_factor: float = 1.0, times: dict[str, np.ndarray] | None = None,
              cpu: tuple[int, int] | None = None, slot_compute: str | None = None) -> Path:
    """A run directory as `symi train --record-trace` writes it (top-1, one placement for every step); its times
    are 1 s unless `times` (metrics column -> [steps]) gives them; `cpu` = (cores, threads per rank)."""
    directory.mkdir(parents=True)
    num_steps, num_layers, num_experts = counts_SLE.shape
    config = {"train": {"model": "tiny", "slots_per_rank": slots, "capacity_factor": capacity_factor,
                        "capacity_mode": "slot", "batch_size": batch_size, "dtype": "float32"},
              "model": {"num_layers": num_layers, "d_model": d_model, "d_ff": d_ff, "seq_len": seq_len,
                        "num_experts": num_experts, "top_k": 1, "vocab_size": 256},
              "world_size": world_size, "tokens_per_step": world_size * batch_size * seq_len,
              "expert_optimizer": layout}
    if cpu is not None:
        config.update(device="cpu", cpu_cores=cpu[0], threads_per_rank=cpu[1])
    if slot_compute is not None:
        config.update(slot_compute=slot_compute)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "COMPLETE").write_text("done\n")   # the marker a finished `symi train` writes last
    placement = Placement.even(phy2log_LR, num_experts)
    with open(directory / "placements.jsonl", "w") as f:
        for step in range(num_steps):
            f.write(json.dumps({"step": step, "phy2log": placement.phy2log_LR.tolist(),
                                "share": placement.share_LR.tolist(),
                                "dropped": np.zeros((num_layers, num_experts), dtype=int).tolist()}) + "\n")
    write_trace(LoadTrace(counts_SLE, top_k=1, tokens_per_step=int(config["tokens_per_step"])),
                directory / "trace.parquet")
    columns = [*PHASE_COLUMNS.values(), *INNER_COLUMNS.values()]
    times = times or {}
    byte_columns = ("bytes_replica_grad_sync", "bytes_grad_collection", "bytes_weight_sendout",
                    "bytes_optimizer_state")
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *columns, *byte_columns])
        writer.writeheader()
        for step in range(num_steps):
            writer.writerow({"step": step, **{c: times[c][step] if c in times else 1.0 for c in columns},
                             **dict.fromkeys(byte_columns, 0)})
    return directory


HAND = dict(layer_forward_fixed_s=1e-2, layer_backward_fixed_s=2e-2, expert_gemm_flops=1e6,
            expert_fixed_per_gemm_s=1e-3, dense_flops=1e8, a2a_efficiency=0.5, a2a_latency_s=1e-3,
            collective_efficiency=0.25, collective_latency_s=2e-3, state_fixed_per_expert_s=3e-4,
            optimizer_bytes_per_s=1e7, optimizer_fixed_per_tensor_s=5e-4)


@pytest.mark.parametrize("layout", ["group", "sharded"])
def test_prediction_by_hand(tmp_path, layout):
    # 1 layer, 2 ranks x 2 slots, 4 experts on slots 0..3; 16 tokens, loads 6 4 4 2, capacity ceil(16 / 4) = 4
    counts_SLE = np.tile([[[6, 4, 4, 2]]], (3, 1, 1))
    run_dir = write_run(tmp_path / "run", layout=layout, counts_SLE=counts_SLE, phy2log_LR=np.array([[0, 1, 2, 3]]))
    run = read_run(run_dir, warmup_steps=0, cluster=SLOW_LINK)
    calibration = flop_calibration(cluster=SLOW_LINK, model=run.model).with_(**HAND)
    got = predict_steps(run=run, calibration=calibration)
    model = run.model
    assert model.expert_params == 2 * 8 * 16 and model.expert_flops_per_assignment == 512
    # served tokens: rank 0 slots 4, 4; rank 1 slots 4, 2. One token's GEMMs: 512 FLOP / 1e6 FLOP/s
    token_s, gemm_s = 512 / 1e6, 1e-3
    expert = max(2 * (4 * token_s + gemm_s), (4 * token_s + gemm_s) + (2 * token_s + gemm_s))
    # all-to-all: ranks receive 8 and 6 tokens of 8 x 4 bytes, half from the other rank: the busiest link carries
    # 4 tokens (rank 0 in, rank 1 out) = 128 bytes; one message (2 ranks)
    a2a = 128 / BYTES_PER_S / 0.5 + 1 * 1e-3
    # popularity: all-reduce of 4 counts x 4 bytes: each rank sends and receives 2 (G-1)/G x 16 = 16 bytes, 2 messages
    popularity = 16 / BYTES_PER_S / 0.25 + 2 * 2e-3
    dense = 16 / 2 * model.dense_flops_per_token / 1e8
    dense_grad = 2 * 1 / 2 * model.dense_params * 4 / BYTES_PER_S / 0.25 + 2 * 2e-3
    if layout == "group":
        # one holder per expert: no bytes move; 2 experts' state on the busiest rank, 2 x 256 parameters in 2 tensors
        state, tensors = 2 * 3e-4, 2
    else:
        # SYMI: each rank's 2 held experts' gradients (1,024 bytes each) send half to the other rank's shard and it
        # receives as much: 1,024 bytes over the link, one message; a shard of all 4 experts on every rank, in one
        # tensor per layer
        state, tensors = 1024 / BYTES_PER_S / 0.25 + 1 * 2e-3 + 4 * 3e-4, 1
    optimizer = (512 + model.dense_params) * 8 / 1e7 + tensors * 5e-4
    expected = {"expert_forward": expert, "a2a_forward": 2 * a2a, "a2a_backward": 2 * a2a,
                "forward": 1e-2 + dense + expert + 2 * a2a + popularity,
                "backward": 2e-2 + 2 * dense + 2 * expert + 2 * a2a,
                "dense_grad": dense_grad, "expert_grad": state, "send_out": state, "optimizer": optimizer}
    expected["step"] = sum(expected[p] for p in ("forward", "backward", "dense_grad", "expert_grad", "optimizer",
                                                  "send_out"))
    assert set(got) == set(PREDICTED_PHASES)
    for phase, value in expected.items():
        np.testing.assert_allclose(got[phase], np.full(3, value), rtol=1e-9, err_msg=phase)


def test_padded_slot_compute_costs_the_ranks_largest_slot_per_slot(tmp_path):
    # test_prediction_by_hand's run: rank 0 serves 4, 4 and rank 1 4, 2. Padded (config.json slot_compute), rank
    # 1's slots compute 4 rows each: both ranks 2 x (4 tokens + one GEMM); the all-to-all still moves served tokens
    counts_SLE = np.tile([[[6, 4, 4, 2]]], (2, 1, 1))
    runs = {mode: read_run(write_run(tmp_path / str(mode), layout="group", counts_SLE=counts_SLE,
                                     phy2log_LR=np.array([[0, 1, 2, 3]]), slot_compute=mode),
                           warmup_steps=0, cluster=SLOW_LINK)
            for mode in (None, "grouped", "padded")}
    np.testing.assert_array_equal(runs["padded"].tokens_row_GS, [[[4, 4], [4, 4]]] * 2)
    np.testing.assert_array_equal(runs["grouped"].tokens_row_GS, [[[4, 4], [4, 2]]] * 2)
    np.testing.assert_array_equal(runs[None].tokens_row_GS, runs["grouped"].tokens_row_GS)   # runs before the field
    np.testing.assert_array_equal(runs["padded"].link_s_row, runs["grouped"].link_s_row)
    calibration = flop_calibration(cluster=SLOW_LINK, model=runs["padded"].model).with_(**HAND)
    got = predict_steps(run=runs["padded"], calibration=calibration)
    np.testing.assert_allclose(got["expert_forward"], 2 * (4 * 512 / 1e6 + 1e-3), rtol=1e-12)
    with pytest.raises(ValueError, match="slot_compute"):
        read_run(write_run(tmp_path / "bad", layout="group", counts_SLE=counts_SLE,
                           phy2log_LR=np.array([[0, 1, 2, 3]]), slot_compute="sideways"),
                 warmup_steps=0, cluster=SLOW_LINK)


def test_ranks_that_share_cores_compute_slower(tmp_path):
    counts_SLE = np.tile([[[6, 4, 4, 2]]], (2, 1, 1))
    runs = [read_run(write_run(tmp_path / name, layout="group", counts_SLE=counts_SLE,
                               phy2log_LR=np.array([[0, 1, 2, 3]]), cpu=cpu), warmup_steps=0, cluster=SLOW_LINK)
            for name, cpu in (("alone", (8, 1)), ("shared", (1, 1)))]
    assert [run.cpu_share for run in runs] == [1.0, 0.5]    # 2 ranks x 1 thread on 8 cores, then on 1
    calibration = flop_calibration(cluster=SLOW_LINK, model=runs[0].model).with_(**HAND)
    alone, shared = (predict_steps(run=run, calibration=calibration) for run in runs)
    np.testing.assert_allclose(shared["optimizer"], 2 * alone["optimizer"], rtol=1e-12)
    # the ranks' expert work (6.096 and 5.072 ms, test_prediction_by_hand) passes through one core: their sum
    np.testing.assert_allclose(alone["expert_forward"], 6.096e-3, rtol=1e-12)
    np.testing.assert_allclose(shared["expert_forward"], 6.096e-3 + 5.072e-3, rtol=1e-12)
    fixed = 1e-2 + 16 / 2 * runs[0].model.dense_flops_per_token / 1e8    # the forward's per-rank fixed + dense work
    np.testing.assert_allclose(shared["forward"] - alone["forward"], fixed + 5.072e-3, rtol=1e-9)
    for phase in ("a2a_forward", "dense_grad", "expert_grad", "send_out"):   # transfers: not compute
        np.testing.assert_allclose(shared[phase], alone[phase], rtol=1e-12)


# layout, ranks, slots, experts, d_model, d_ff, batch, capacity factor: shapes that tell every term apart
FIT_SHAPES = (("group", 2, 2, 4, 8, 16, 2, 1.0), ("sharded", 2, 2, 4, 16, 32, 4, 1.0),
              ("sharded", 4, 2, 8, 8, 64, 2, 2.0), ("group", 4, 2, 6, 16, 16, 3, 1.0),
              ("replica", 2, 3, 4, 8, 32, 6, 1.5), ("sharded", 4, 3, 12, 32, 16, 2, 1.0))


def test_run_fit_recovers_known_terms(tmp_path):
    rng = np.random.default_rng(3)
    truth = None
    run_dirs = []
    for i, (layout, ranks, slots, experts, d_model, d_ff, batch, cf) in enumerate(FIT_SHAPES):
        tokens = ranks * batch * 4
        counts_SLE = rng.multinomial(tokens, rng.dirichlet(np.ones(experts)), size=(5, 2))
        num_slots = ranks * slots
        phy2log_LR = np.tile(np.arange(num_slots) % experts, (2, 1))
        shape = dict(layout=layout, counts_SLE=counts_SLE, phy2log_LR=phy2log_LR, world_size=ranks, slots=slots,
                     d_model=d_model, d_ff=d_ff, batch_size=batch, capacity_factor=cf)
        probe = read_run(write_run(tmp_path / f"probe{i}", **shape), warmup_steps=0)
        if truth is None:
            truth = flop_calibration(cluster=probe.cluster, model=probe.model).with_(
                layer_forward_fixed_s=2e-3, layer_backward_fixed_s=3e-3, expert_gemm_flops=3e8,
                expert_fixed_per_gemm_s=4e-5, dense_flops=8e8, a2a_efficiency=0.002, a2a_latency_s=1e-4,
                collective_efficiency=0.004, collective_latency_s=3e-4, state_local_s_per_byte=2e-9,
                state_fixed_per_expert_s=2e-5,
                optimizer_bytes_per_s=1e9, optimizer_fixed_per_tensor_s=5e-5)
        predicted = predict_steps(run=probe, calibration=truth)
        times = {column: predicted[predicted_phase(phase)] for phase, column in {**PHASE_COLUMNS,
                                                                                **INNER_COLUMNS}.items()
                 if predicted_phase(phase) in predicted}
        times["time_plan_s"] = np.zeros(5)
        run_dirs.append(write_run(tmp_path / f"run{i}", **shape, times=times))
    fit = fit_runs(run_dirs=run_dirs, warmup_steps=1)
    fitted = ("expert_gemm_flops", "expert_fixed_per_gemm_s", "a2a_efficiency", "a2a_latency_s",
              "collective_efficiency", "collective_latency_s", "state_local_s_per_byte", "state_fixed_per_expert_s",
              "layer_forward_fixed_s",
              "dense_flops", "layer_backward_fixed_s", "optimizer_bytes_per_s", "optimizer_fixed_per_tensor_s")
    assert fit.calibration.fitted == fitted
    for name in fitted:
        assert getattr(fit.calibration, name) == pytest.approx(getattr(truth, name), rel=0.01), name
    assert np.abs(fit.residuals["residual_pct"]).max() < 1e-3


def test_calibration_transfer_terms_fall_back_to_the_link_model():
    from symi_sim.simulator.costs import allreduce_bytes, expert_state_bytes

    cluster = Cluster(name="c", num_nodes=2, gpus_per_node=2, slots_per_gpu=2)
    calibration = Calibration(cluster="c", model="m", layer_forward_fixed_s=0, layer_backward_fixed_s=0,
                              expert_gemm_flops=1e12, expert_saturation_tokens=0, expert_small_batch_exponent=1,
                              expert_fixed_per_gemm_s=0, dense_flops=1e12, a2a_efficiency=1,
                              a2a_latency_s=cluster.link_latency_s, collective_efficiency=1,
                              collective_latency_s=cluster.link_latency_s, state_local_s_per_byte=0,
                              state_fixed_per_expert_s=0,
                              optimizer_bytes_per_s=1e12, optimizer_fixed_per_tensor_s=0,
                              optimizer_state_location="host")
    moved = expert_state_bytes(np.array([[0, 1, 2, 3, 0, 1, 2, 3]]), cluster, 4, "sharded", 1e6)
    for links in (moved, allreduce_bytes(np.array([1e6, 0.0]), cluster)):
        np.testing.assert_allclose(calibration.transfer_time_s(links, cluster), links.time_L(cluster), rtol=1e-12)
        np.testing.assert_allclose(calibration.transfer_network_s(links, cluster), links.network_time_L(cluster),
                                   rtol=1e-12)
    halved = calibration.with_(collective_efficiency=0.5, collective_latency_s=0.0)
    np.testing.assert_allclose(halved.transfer_network_s(moved, cluster), 2 * moved.busiest_link_s(cluster))
