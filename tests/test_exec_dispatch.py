"""The executor's dispatch in one process: fair drops per source rank, a G-rank exchange played through the real index
arithmetic against the documented rule's loops, the slot-compute modes against each other, the benchmarks' smoke
runs, and on a GPU the one host sync per layer."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_exec_model import loop_dispatch, random_placement

from symi_exec.comm import Comm
from symi_exec.model import MoE, model_config
from symi_exec.moe import ReplicatedMoE, block_offsets, grouped_mm_supported, plan_dispatch, rank_dispatch, send_order
from symi_sim.placement import Placement
from symi_sim.routing import route

ROOT = Path(__file__).resolve().parent.parent


def test_issue_case_every_rank_keeps_its_share() -> None:
    """4 ranks each send 40 tokens to expert 0, whose one slot computes 64: 16 of each rank's are kept."""
    placement = Placement.even(np.array([[0, 1, 2, 3]]), 4)
    count_GE = np.array([[40, 0, 0, 0]] * 4)
    plan = plan_dispatch(count_GE, placement, slots_per_rank=1, capacity_factor=1.6)   # ceil(1.6 * 160 / 4) = 64
    assert plan.served_R.tolist() == [64, 0, 0, 0]
    assert plan.assigned_GR[:, 0].tolist() == [40, 40, 40, 40]
    assert plan.send_GR[:, 0].tolist() == [16, 16, 16, 16]
    for g in range(4):
        dispatch = rank_dispatch(plan, g, slots_per_rank=1, padded=False)
        assert dispatch.dropped_E.tolist() == [24, 0, 0, 0]
        send_M, row_A = send_order(torch.zeros(40, dtype=torch.int64), dispatch,
                                   torch.as_tensor(dispatch.sort_len_J), torch.as_tensor(dispatch.sort_delta_J))
        assert send_M.tolist() == list(range(16)) and row_A.tolist() == list(range(16)) + [16] * 24


def test_per_source_kept_counts_are_proportional_within_every_slot() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        num_ranks, slots, num_experts = int(rng.integers(2, 6)), int(rng.integers(1, 4)), int(rng.integers(2, 6))
        if num_ranks * slots < num_experts:
            continue
        placement = random_placement(rng, num_experts, num_ranks * slots)
        count_GE = rng.integers(0, 50, (num_ranks, num_experts))
        plan = plan_dispatch(count_GE, placement, slots_per_rank=slots, capacity_factor=0.6)
        assigned_R = plan.assigned_GR.sum(axis=0)
        np.testing.assert_array_equal(assigned_R, plan.routing.assigned_LR[0])
        np.testing.assert_array_equal(plan.send_GR.sum(axis=0), plan.served_R)
        ideal_GR = plan.assigned_GR * plan.served_R / np.maximum(assigned_R, 1)
        assert (np.abs(plan.send_GR - ideal_GR) < 1).all()
        # the ranks' dropped assignments add up to the simulator's per expert
        dropped_E = sum(rank_dispatch(plan, g, slots_per_rank=slots, padded=False).dropped_E for g in range(num_ranks))
        np.testing.assert_array_equal(dropped_E, plan.routing.dropped_LE[0])


def _exchange(parts_G: list[list[np.ndarray]]) -> list[np.ndarray]:
    """parts_G[g][r]: rows rank g sends rank r -> what each rank receives, by source rank (an all-to-all)."""
    return [np.concatenate([parts[r] for parts in parts_G]) for r in range(len(parts_G))]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mode,factor", [("slot", None), ("slot", 0.7), ("gpu", 0.8)])
def test_g_rank_exchange_puts_every_row_where_the_rule_says(padded: bool, mode: str, factor: float | None) -> None:
    """Ids of (rank, assignment) travel the real send order, splits and buffer positions; every slot's rows are
    the loop rule's kept assignments in (rank, index) order, and the combine brings each back to its assignment."""
    rng = np.random.default_rng(11)
    for _ in range(6):
        num_ranks, slots, num_experts = int(rng.integers(2, 5)), int(rng.integers(1, 4)), 5
        if num_ranks * slots < num_experts:
            slots = 3
        placement = random_placement(rng, num_experts, num_ranks * slots)
        skew = rng.dirichlet(np.ones(num_experts) * 0.5)
        expert_GA = [rng.choice(num_experts, size=int(rng.integers(0, 40)), p=skew) for _ in range(num_ranks)]
        count_GE = np.stack([np.bincount(a, minlength=num_experts) for a in expert_GA])
        plan = plan_dispatch(count_GE, placement, slots_per_rank=slots, capacity_factor=factor, capacity_mode=mode)
        sim = route(count_GE.sum(0)[None], placement, slots_per_gpu=slots, capacity_factor=factor,
                    capacity_mode=mode)
        slot_GA, kept_GA = loop_dispatch(expert_GA, placement, sim.served_LR[0], sim.assigned_LR[0], slots)
        dispatches = [rank_dispatch(plan, g, slots_per_rank=slots, padded=padded) for g in range(num_ranks)]
        sends = []
        for g, d in enumerate(dispatches):
            send_M, row_A = send_order(torch.as_tensor(expert_GA[g]), d, torch.as_tensor(d.sort_len_J),
                                       torch.as_tensor(d.sort_delta_J))
            np.testing.assert_array_equal(row_A.numpy() < d.num_kept, kept_GA[g])
            kept = np.flatnonzero(kept_GA[g])
            np.testing.assert_array_equal(send_M.numpy()[row_A.numpy()[kept]], kept)   # row_A inverts the order
            sends.append(send_M.numpy())
        ids_G = [np.stack([np.full(s.size, g), s], axis=1) for g, s in enumerate(sends)]   # (rank, assignment)
        recv_G = _exchange([np.split(ids, np.cumsum(d.in_splits)[:-1]) for ids, d in zip(ids_G, dispatches,
                                                                                           strict=True)])
        back_parts = []
        for r, (d, recv) in enumerate(zip(dispatches, recv_G, strict=True)):
            assert recv.shape[0] == sum(d.out_splits)
            pos_M = block_offsets(recv.shape[0], torch.as_tensor(d.recv_len_B), torch.as_tensor(d.recv_delta_B))
            buffer = np.full((d.buffer_rows, 2), -1)
            buffer[pos_M.numpy()] = recv
            # the gather the layer does instead: every compute row from its receive row, padding from below 0
            fill_M = block_offsets(d.buffer_rows, torch.as_tensor(d.fill_len_C), torch.as_tensor(d.fill_delta_C))
            gathered = np.where((fill_M.numpy() >= 0)[:, None], recv[np.maximum(fill_M.numpy(), 0)] if recv.size
                                else -1, -1)
            np.testing.assert_array_equal(gathered, buffer)
            block = d.buffer_rows // slots if padded else None
            start = 0
            for s in range(slots):
                p = r * slots + s
                want = [(g, a) for g in range(num_ranks) for a in np.flatnonzero((slot_GA[g] == p) & kept_GA[g])]
                rows = buffer[s * block:(s + 1) * block] if padded else buffer[start:start + d.rows_S[s]]
                assert [tuple(row) for row in rows[:len(want)]] == want
                assert (rows[len(want):] == -1).all() and d.rows_S[s] == len(want)
                start += d.rows_S[s]
            back_parts.append(np.split(buffer[pos_M.numpy()], np.cumsum(d.out_splits)[:-1]))
        back_G = _exchange(back_parts)
        for g, (back, send) in enumerate(zip(back_G, sends, strict=True)):
            np.testing.assert_array_equal(back, np.stack([np.full(send.size, g), send], axis=1))


def _layer_pair(slot_compute: str, dtype: torch.dtype, device: str = "cpu", factor: float | None = 0.8
                ) -> tuple[ReplicatedMoE, torch.Tensor]:
    torch.manual_seed(4)
    cfg = model_config("tiny", num_experts=4, top_k=2)
    ref = MoE(cfg)
    torch.nn.init.normal_(ref.router.weight, std=0.5)
    ref = ref.to(device=device, dtype=dtype)
    placement = Placement.even(np.array([[0, 1, 2, 3, 0, 1]]), 4)
    layer = ReplicatedMoE(ref.router, cfg, slots_per_rank=6, comm=Comm(0, 1, torch.device(device)),
                          capacity_factor=factor, slot_compute=slot_compute)
    with torch.no_grad():
        layer.slot_weights_SP.normal_(0.0, 0.3)
    layer.placement = placement
    return layer, torch.randn(2, 24, cfg.d_model, dtype=dtype, device=device)


@pytest.mark.parametrize("mode,dtype", [("padded", torch.float64), ("grouped", torch.float32)])
def test_slot_compute_modes_match_the_per_slot_loop(mode: str, dtype: torch.dtype) -> None:
    """The padded batched matmul and torch._grouped_mm (CPU: float32) against one matmul pair per slot."""
    outs, grads = [], []
    for slot_compute in ("loop", mode):
        layer, x = _layer_pair(slot_compute, dtype)
        out = layer(x)
        out.square().sum().backward()
        assert layer.dropped_E.sum() > 0 and layer.plan.served_R.min() < layer.plan.served_R.max()
        outs.append(out.detach())
        grads.append(layer.slot_weights_SP.grad.clone())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=tol)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=tol)


def test_slot_compute_is_checked_and_auto_resolves() -> None:
    with pytest.raises(ValueError, match="unknown slot compute 'fast'; choices: auto, grouped, padded, loop"):
        _layer_pair("fast", torch.float32)
    layer, _ = _layer_pair("auto", torch.float32)
    assert layer.compute_mode() == "padded"   # no grouped kernel on a CPU
    assert not grouped_mm_supported(torch.device("cpu"), torch.bfloat16, 64, 128)


@pytest.mark.parametrize("slot_compute,dtype", [("padded", torch.float64), ("loop", torch.float64),
                                                 ("grouped", torch.float32)])
def test_a_rank_with_no_rows_gives_empty_output_and_zero_slot_gradients(slot_compute: str, dtype: torch.dtype
                                                                         ) -> None:
    layer, x = _layer_pair(slot_compute, dtype)
    out = layer(x[:, :0].clone().requires_grad_(True))   # as in a model: the input carries a gradient
    assert out.shape == (2, 0, x.shape[2]) and layer.count_GE.sum() == 0 and layer.kept_A.numel() == 0
    layer.comm.take_seconds()
    out.sum().backward()
    assert layer.slot_weights_SP.grad is not None and not layer.slot_weights_SP.grad.any()
    # both all-to-alls' backward ran: a rank that receives nothing still joins the backward collectives
    assert len(layer.comm.take_seconds()["a2a_backward"]) == 2


def _bench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=True,
                          timeout=300)


def test_bench_dispatch_quick_run_writes_its_table(tmp_path: Path) -> None:
    _bench([str(ROOT / "benchmarks" / "bench_dispatch.py"), "--quick", "--out", "out"], cwd=tmp_path)
    with open(tmp_path / "out" / "bench_dispatch.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["implementation"] == "vectorised" and rows[0]["ranks"] == "8"
    assert float(rows[0]["dropped_pct"]) > 0 and float(rows[0]["forward_wall_ms"]) > 0
    assert float(rows[0]["bookkeeping_cpu_ms"]) > 0
    assert (tmp_path / "out" / "bench_dispatch.json").is_file()


def test_bench_moe_gpu_cpu_smoke_covers_the_slot_computes(tmp_path: Path) -> None:
    _bench([str(ROOT / "benchmarks" / "bench_moe_gpu.py"), "--device", "cpu", "--smoke", "--results", "out"],
           cwd=tmp_path)
    with open(tmp_path / "out" / "bench_moe_gpu.csv") as f:
        rows = list(csv.DictReader(f))
    variants = {(row["dtype"], row["variant"]) for row in rows}
    for dtype in ("bfloat16", "float32"):
        for variant in ("dense", "moe_ref", "moe_grouped", "moe_padded", "moe_loop"):
            assert (dtype, variant) in variants
    for row in rows:
        if row["variant"].startswith("moe_") and row["variant"] != "moe_ref":
            assert float(row["fwd_bwd_ms"]) > 0
            # dropless, so every replicated variant computes the reference layer's function
            assert float(row["max_abs_diff"]) < (0.05 if row["dtype"] == "bfloat16" else 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_syncs_the_host_once_per_layer_beyond_its_timer() -> None:
    """The counts' all-gather is the layer's one synchronising call; Comm.timed's two synchronize calls around the
    expert GEMMs are the timer's own."""
    layer, x = _layer_pair("auto", torch.bfloat16, device="cuda")
    layer(x)   # warm up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1 + 2, [str(w.message) for w in syncs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_and_padded_agree_in_bf16() -> None:
    outs, grads = [], []
    for slot_compute in ("loop", "padded", "auto"):
        layer, x = _layer_pair(slot_compute, torch.bfloat16, device="cuda")
        out = layer(x)
        out.float().square().sum().backward()
        outs.append(out.detach().float())
        grads.append(layer.slot_weights_SP.grad.float())
    for out, grad in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(out, outs[0], rtol=0.02, atol=0.02)
        torch.testing.assert_close(grad, grads[0], rtol=0.05, atol=0.05)
