"""Dispatch benchmark: the MoE layer's per-layer bookkeeping on one rank of a large job, communication faked.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_dispatch.py [--out DIR] [--quick]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/bench_dispatch.py   # measure another version

One process plays rank 0 of --ranks ranks (default 64 ranks x 4 slots, 64 experts, top-2, 8 x 512 = 4,096 tokens
per rank, capacity factor 1.0 in slot mode, so slots drop). Rank 0 routes its own tokens through a router with a
Zipf-like bias (router skew 1.0: expert e's logit - ln(1 + e)); the other ranks' router counts are synthesised from
the same skew (a multinomial draw per rank, fixed seed), the placement is `symi`'s plan for the global counts, and
the all-gather and the all-to-alls are replaced by copies of the right sizes (so every index, split and buffer is
the real one; the bytes never leave the process). The layer is symi_exec.moe.ReplicatedMoE from whatever
`symi_exec` PYTHONPATH finds (the table names the file), so the same script measures any checkout.

Per repeat: the layer's forward (autograd on) and its backward; the forward's expert GEMMs as the layer itself
times them (Comm.timed("expert_forward")); the router alone (route_topk and the aux loss on the same tokens).
Bookkeeping = forward - expert GEMMs - router: the popularity plan, index arithmetic, gathers, scatters and the fake
copies; host_plan_cpu_ms: the numpy plan alone (plan_dispatch, and rank_dispatch where the layer has it). d_model is
small (64) so that the GEMMs do not drown it. Each is measured twice: wall time, and the CPU time
of the thread (torch on --threads threads; with 1, the default, every op runs on it), which a machine shared with
other jobs inflates far less. Medians over --repeats after --warmup. Writes bench_dispatch.csv and .json to --out
(default runs/bench_dispatch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faked import copy_rows, skew_probs
from report import add_out_option, out_dir, print_table, write_results

import symi_exec.moe as moe_impl
from symi_exec.comm import Comm
from symi_exec.model import ModelConfig, load_balance_loss, route_topk
from symi_sim.cluster import Cluster
from symi_sim.policies import get_policy


class _FakeAllToAll(torch.autograd.Function):
    """A copy of the rows into a buffer of the size the splits give (the first rows; zeros past the input's end),
    and the same backward: what an all-to-all costs a rank's memory, without the network."""

    @staticmethod
    def forward(ctx, x_MD, num_out):  # type: ignore[override]
        ctx.num_in = x_MD.shape[0]
        return copy_rows(x_MD, num_out)

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        return copy_rows(grad_MD, ctx.num_in), None


def fake_comm(count_GE: np.ndarray) -> tuple[Any, Any]:
    """Stand-ins for the layer's all-gather (rank 0's real counts, the others' synthesised) and all-to-all."""

    def all_gather_counts(count_E: torch.Tensor, comm: Comm) -> np.ndarray:
        out_GE = count_GE.copy()
        out_GE[comm.rank] = count_E.cpu().numpy()
        return out_GE

    def all_to_all(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], comm: Comm, kind: str,
                   grad_kind: str) -> torch.Tensor:
        return _FakeAllToAll.apply(x_MD, int(sum(out_splits)))

    return all_gather_counts, all_to_all


class TimingComm(Comm):
    """Comm whose timed blocks also record this thread's CPU seconds (per kind, in call order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_seconds: dict[str, list[float]] = {}

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        start = time.thread_time()
        with super().timed(kind):
            yield
        self.cpu_seconds.setdefault(kind, []).append(time.thread_time() - start)


def build(args: argparse.Namespace) -> tuple[Any, torch.Tensor, TimingComm]:
    """The layer (rank 0 of args.ranks), its input [1, N, D], and its Comm; communication patched out."""
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(num_layers=1, d_model=args.d_model, num_heads=1, d_ff=4 * args.d_model, seq_len=1,
                      num_experts=args.experts, top_k=args.top_k, router_skew=args.skew)
    num_assign = args.tokens * args.top_k
    count_GE = rng.multinomial(num_assign, skew_probs(args.experts, args.skew), size=args.ranks).astype(np.int64)
    cluster = Cluster(num_nodes=args.ranks, gpus_per_node=1, slots_per_gpu=args.slots)
    placement = get_policy("symi").plan(count_GE.sum(axis=0)[None, :], cluster)
    router = torch.nn.Linear(args.d_model, args.experts, bias=False)
    torch.nn.init.normal_(router.weight, std=0.02)
    comm = TimingComm(rank=0, world_size=args.ranks, device=torch.device("cpu"))
    moe_impl._all_gather_counts, moe_impl.all_to_all = fake_comm(count_GE)
    layer = moe_impl.ReplicatedMoE(router, cfg, slots_per_rank=args.slots, comm=comm,
                                   capacity_factor=args.capacity_factor, capacity_mode="slot")
    layer.placement = placement
    with torch.no_grad():
        layer.slot_weights_SP.normal_(0.0, 0.02)
    x_BTD = torch.randn(1, args.tokens, args.d_model)
    return layer, x_BTD, comm


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Medians over the repeats, in ms, of wall and CPU (this thread's) time: forward, backward, the expert GEMMs,
    the router (route_topk and the aux loss), and bookkeeping = forward - GEMMs - router per repeat."""
    layer, x_BTD, comm = build(args)
    grad_BTD = torch.randn_like(x_BTD)
    global_count_E = torch.as_tensor(np.bincount(np.arange(args.experts), minlength=args.experts))
    samples: dict[str, list[float]] = {}
    for i in range(args.warmup + args.repeats):
        comm.take_seconds()
        comm.cpu_seconds.clear()
        layer.zero_grad(set_to_none=True)
        x_in = x_BTD.detach().requires_grad_(True)
        wall, cpu = _clocks()
        out = layer(x_in)
        forward = (time.perf_counter() - wall, time.thread_time() - cpu)
        wall, cpu = _clocks()
        out.backward(grad_BTD)
        backward = (time.perf_counter() - wall, time.thread_time() - cpu)
        expert = (sum(comm.take_seconds()["expert_forward"]), sum(comm.cpu_seconds["expert_forward"]))
        wall, cpu = _clocks()
        with torch.no_grad():
            routed = route_topk(x_BTD.reshape(-1, args.d_model), layer.router, args.top_k, args.skew)
            load_balance_loss(routed.probs_NE, global_count_E, args.tokens * args.top_k)
        router = (time.perf_counter() - wall, time.thread_time() - cpu)
        if i < args.warmup:
            continue
        for clock, j in (("wall", 0), ("cpu", 1)):
            values = {"forward": forward[j], "backward": backward[j], "expert_gemm": expert[j], "router": router[j]}
            values["bookkeeping"] = values["forward"] - values["expert_gemm"] - values["router"]
            for key, value in values.items():
                samples.setdefault(f"{key}_{clock}_ms", []).append(1e3 * value)
    # the host-side plan alone (numpy: routing, fair drops, this rank's index arithmetic), on the last counts
    host_plan_ms = []
    for _ in range(args.repeats):
        start = time.thread_time()
        plan = moe_impl.plan_dispatch(layer.count_GE, layer.placement, slots_per_rank=args.slots,
                                      capacity_factor=args.capacity_factor, capacity_mode="slot")
        if hasattr(moe_impl, "rank_dispatch"):
            moe_impl.rank_dispatch(plan, 0, slots_per_rank=args.slots, padded=True)
        host_plan_ms.append(1e3 * (time.thread_time() - start))
    plan = layer.plan
    served = int(plan.routing.served_LR.sum())
    assigned = int(plan.routing.assigned_LR.sum())
    row: dict[str, Any] = {
        "implementation": "vectorised" if hasattr(moe_impl, "rank_dispatch") else "previous",
        "ranks": args.ranks, "experts": args.experts, "slots_per_rank": args.slots, "top_k": args.top_k,
        "tokens_per_rank": args.tokens, "d_model": args.d_model, "threads": args.threads,
        "dropped_pct": round(100 * (1 - served / assigned), 2),
    }
    order = ("bookkeeping", "forward", "expert_gemm", "router", "backward")
    for clock in ("wall", "cpu"):
        for key in order:
            row[f"{key}_{clock}_ms"] = round(statistics.median(samples[f"{key}_{clock}_ms"]), 3)
    row["host_plan_cpu_ms"] = round(statistics.median(host_plan_ms), 3)
    row["repeats"] = args.repeats
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4, help="Slots per rank.")
    parser.add_argument("--tokens", type=int, default=8 * 512, help="Tokens per rank (batch x sequence).")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64, help="d_ff is 4 x d_model.")
    parser.add_argument("--skew", type=float, default=1.0, help="Router skew: expert e's logit - skew ln(1 + e).")
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one rank's share of a host).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Small job, few repeats: checks the script runs.")
    add_out_option(parser, "bench_dispatch")
    args = parser.parse_args()
    args.out = out_dir(args.out, "bench_dispatch")
    if args.quick:
        args.ranks, args.experts, args.tokens, args.repeats, args.warmup = 8, 8, 256, 3, 1
    torch.set_num_threads(args.threads)
    row = measure(args)
    print_table([row])
    print(f"layer: {Path(moe_impl.__file__).resolve()}")
    write_results(args.out, "bench_dispatch", [row], args, moe_file=str(Path(moe_impl.__file__).resolve()))


if __name__ == "__main__":
    main()
