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
times them (Comm.timed("expert_forward")); the router alone (route_topk on the same tokens). Bookkeeping = forward
- expert GEMMs - router: the popularity plan, index arithmetic, gathers, scatters and fake copies. d_model is small
(64) so that the GEMMs do not drown it. Medians over --repeats after --warmup; torch on --threads threads (1: a
rank's view of a shared host). Writes bench_dispatch.csv and .json to --out (default runs/bench_dispatch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import add_out_option, out_dir, print_table, write_csv

import symi_exec.moe as moe_impl
from symi_exec.comm import Comm
from symi_exec.model import ModelConfig, route_topk
from symi_sim.cluster import Cluster
from symi_sim.policies import get_policy


def skew_probs(num_experts: int, skew: float) -> np.ndarray:
    """[E] the router's bias alone as probabilities: (1 + e)^-skew, normalised."""
    weights_E = (1.0 + np.arange(num_experts)) ** -skew
    return weights_E / weights_E.sum()


def fake_comm(count_GE: np.ndarray) -> tuple[Any, Any]:
    """Stand-ins for the layer's all-gather (rank 0's real counts, the others' synthesised) and all-to-all (the
    input's rows copied, cycled, to the size the splits give: differentiable, no process group)."""

    def all_gather_counts(count_E: torch.Tensor, comm: Comm) -> np.ndarray:
        out_GE = count_GE.copy()
        out_GE[comm.rank] = count_E.cpu().numpy()
        return out_GE

    def all_to_all(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], comm: Comm, kind: str,
                   grad_kind: str) -> torch.Tensor:
        num_out = int(sum(out_splits))
        if x_MD.shape[0] == 0:
            return x_MD.new_zeros(num_out, *x_MD.shape[1:])
        index = torch.arange(num_out, device=x_MD.device) % x_MD.shape[0]
        return x_MD.index_select(0, index)

    return all_gather_counts, all_to_all


def build(args: argparse.Namespace) -> tuple[Any, torch.Tensor, Comm]:
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
    comm = Comm(rank=0, world_size=args.ranks, device=torch.device("cpu"))
    moe_impl._all_gather_counts, moe_impl.all_to_all = fake_comm(count_GE)
    layer = moe_impl.ReplicatedMoE(router, cfg, slots_per_rank=args.slots, comm=comm,
                                   capacity_factor=args.capacity_factor, capacity_mode="slot")
    layer.placement = placement
    with torch.no_grad():
        layer.slot_weights_SP.normal_(0.0, 0.02)
    x_BTD = torch.randn(1, args.tokens, args.d_model)
    return layer, x_BTD, comm


def measure(args: argparse.Namespace) -> dict[str, Any]:
    layer, x_BTD, comm = build(args)
    grad_BTD = torch.randn_like(x_BTD)
    samples: dict[str, list[float]] = {"forward": [], "backward": [], "expert": [], "router": []}
    for i in range(args.warmup + args.repeats):
        comm.take_seconds()
        layer.zero_grad(set_to_none=True)
        x_in = x_BTD.detach().requires_grad_(True)
        start = time.perf_counter()
        out = layer(x_in)
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        out.backward(grad_BTD)
        backward_s = time.perf_counter() - start
        expert_s = sum(comm.take_seconds()["expert_forward"])
        start = time.perf_counter()
        with torch.no_grad():
            route_topk(x_BTD.reshape(-1, args.d_model), layer.router, args.top_k, args.skew)
        router_s = time.perf_counter() - start
        if i >= args.warmup:
            for key, value in zip(samples, (forward_s, backward_s, expert_s, router_s), strict=True):
                samples[key].append(1e3 * value)
    med = {key: statistics.median(values) for key, values in samples.items()}
    bookkeeping_R = [f - e - r for f, e, r in zip(samples["forward"], samples["expert"], samples["router"],
                                                  strict=True)]
    plan = layer.plan
    served = int(plan.routing.served_LR.sum())
    assigned = int(plan.routing.assigned_LR.sum())
    return {
        "implementation": "vectorised" if hasattr(moe_impl, "rank_dispatch") else "previous",
        "ranks": args.ranks, "experts": args.experts, "slots_per_rank": args.slots, "top_k": args.top_k,
        "tokens_per_rank": args.tokens, "d_model": args.d_model, "threads": args.threads,
        "dropped_pct": round(100 * (1 - served / assigned), 2),
        "bookkeeping_ms": round(statistics.median(bookkeeping_R), 3),
        "forward_ms": round(med["forward"], 3), "expert_gemm_ms": round(med["expert"], 3),
        "router_ms": round(med["router"], 3), "backward_ms": round(med["backward"], 3),
        "repeats": args.repeats,
    }


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
    write_csv(args.out / "bench_dispatch.csv", [row])
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "moe_file": str(Path(moe_impl.__file__).resolve()),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / "bench_dispatch.json").write_text(json.dumps({"meta": meta, "results": [row]}, indent=1) + "\n")
    print(f"wrote {args.out / 'bench_dispatch.csv'} and {args.out / 'bench_dispatch.json'}")


if __name__ == "__main__":
    main()
