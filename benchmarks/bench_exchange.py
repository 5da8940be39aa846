"""Expert traffic benchmark: SYMI's gradient collection and weight send-out on one rank of a large job, communication
faked.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_exchange.py [--out DIR] [--quick]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/bench_exchange.py   # measure another version

One process plays rank 0 of --ranks ranks (default 64 ranks x 4 slots, 64 experts, the tiny model's expert size
P = 2 x 64 x 128 = 16,384, float32, 2 MoE layers): symi_exec.optim.ShardedExpertOptimizer from whatever `symi_exec`
PYTHONPATH finds (the table names the file), so the same script measures any checkout. The placements are `symi`'s
plans for --placements different skewed popularities (each a Zipf-like draw over a random expert order), taken in
turn as a run re-plans every step: each repeat collects the gradients under one placement and sends out the weights
to the next one (so the send-out always meets a placement it has not seen, the collection the one the previous
send-out saw). The all-to-all (symi_exec.comm.all_to_all_rows) is replaced by a copy into a buffer of the size the
splits give (bytes still counted), so every index, split and buffer is the real one and nothing leaves the process.

Per repeat: collect_gradients and send_out, each in wall time and in CPU time of this thread (torch on --threads
threads; with 1, the default, every op runs on it). per_layer = (collect + send_out) / layers. Medians over
--repeats after --warmup. Writes bench_exchange.csv and .json to --out (default runs/bench_exchange).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faked import copy_rows, skew_probs
from report import add_out_option, out_dir, print_table, write_results

import symi_exec.comm as comm_module
import symi_exec.optim as optim_impl
from symi_exec.comm import Comm
from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies import get_policy


def fake_all_to_all_rows(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], comm: Comm, kind: str
                         ) -> torch.Tensor:
    """all_to_all_rows without the network: the bytes counted as the real one counts them, and a buffer of the
    received size holding a copy of the sent rows (zeros past their end)."""
    row_bytes = x_MD[0:1].numel() * x_MD.element_size() if x_MD.dim() > 1 else x_MD.element_size()
    comm.count(kind, (sum(in_splits) - in_splits[comm.rank]) * row_bytes)
    return copy_rows(x_MD, sum(out_splits))


def placements(args: argparse.Namespace) -> list[Placement]:
    """`symi`'s plans for args.placements skewed popularities ([L, E] each, a random expert order per layer)."""
    rng = np.random.default_rng(args.seed)
    cluster = Cluster(num_nodes=args.ranks, gpus_per_node=1, slots_per_gpu=args.slots)
    probs_E = skew_probs(args.experts, args.skew)
    out = []
    for _ in range(args.placements):
        count_LE = np.stack([rng.multinomial(args.tokens, rng.permutation(probs_E))
                             for _ in range(args.layers)])
        out.append(get_policy("symi").plan(count_LE, cluster))
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Medians over the repeats, in ms, of wall and CPU (this thread's) time of collect_gradients and send_out."""
    comm_module.all_to_all_rows = fake_all_to_all_rows
    torch.manual_seed(args.seed)
    numel = 2 * args.d_model * args.d_ff
    dtype = getattr(torch, args.dtype)
    comm = Comm(rank=0, world_size=args.ranks, device=torch.device("cpu"))
    weights_LEP = [torch.randn(args.experts, numel, dtype=dtype) for _ in range(args.layers)]
    opt = optim_impl.ShardedExpertOptimizer.from_weights(weights_LEP, comm, slots_per_rank=args.slots, lr=1e-3)
    del weights_LEP
    grads_LSP = [torch.randn(args.slots, numel, dtype=dtype) for _ in range(args.layers)]
    slots_LSP = [torch.zeros(args.slots, numel, dtype=dtype) for _ in range(args.layers)]
    plans = placements(args)
    opt.send_out(plans[0], slots_LSP)
    samples: dict[str, list[float]] = {}
    for i in range(args.warmup + args.repeats):
        placement, next_placement = plans[i % len(plans)], plans[(i + 1) % len(plans)]
        clocks = {}
        for phase, call in (("collect", lambda p=placement: opt.collect_gradients(grads_LSP, p)),
                            ("sendout", lambda p=next_placement: opt.send_out(p, slots_LSP))):
            wall, cpu = time.perf_counter(), time.thread_time()
            call()
            clocks[phase] = (time.perf_counter() - wall, time.thread_time() - cpu)
        if i < args.warmup:
            continue
        for clock, j in (("wall", 0), ("cpu", 1)):
            values = {phase: clocks[phase][j] for phase in ("collect", "sendout")}
            values["per_layer"] = (values["collect"] + values["sendout"]) / args.layers
            for key, value in values.items():
                samples.setdefault(f"{key}_{clock}_ms", []).append(1e3 * value)
    sent = comm.take_bytes()
    row: dict[str, Any] = {
        "implementation": "tables" if hasattr(optim_impl, "sharded_tables") else "segments",
        "ranks": args.ranks, "experts": args.experts, "slots_per_rank": args.slots, "layers": args.layers,
        "expert_numel": numel, "dtype": args.dtype, "threads": args.threads,
    }
    for clock in ("wall", "cpu"):
        for key in ("per_layer", "collect", "sendout"):
            row[f"{key}_{clock}_ms"] = round(statistics.median(samples[f"{key}_{clock}_ms"]), 3)
    runs = args.warmup + args.repeats
    row["grad_collection_mib_per_step"] = round(sent["grad_collection"] / runs / 2 ** 20, 3)
    row["weight_sendout_mib_per_step"] = round(sent["weight_sendout"] / runs / 2 ** 20, 3)
    row["repeats"] = args.repeats
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4, help="Slots per rank.")
    parser.add_argument("--layers", type=int, default=2, help="MoE layers (times are also given per layer).")
    parser.add_argument("--d-model", type=int, default=64, help="The expert is d_model x d_ff twice (tiny: 64).")
    parser.add_argument("--d-ff", type=int, default=128, help="(tiny: 128)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--tokens", type=int, default=64 * 8192, help="Assignments per layer the plans are for.")
    parser.add_argument("--skew", type=float, default=1.0, help="Popularity of the e-th expert: (1 + e)^-skew.")
    parser.add_argument("--placements", type=int, default=4, help="Different placements taken in turn.")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one rank's share of a host).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Small job, few repeats: checks the script runs.")
    add_out_option(parser, "bench_exchange")
    args = parser.parse_args()
    args.out = out_dir(args.out, "bench_exchange")
    if args.quick:
        args.ranks, args.experts, args.d_model, args.d_ff, args.repeats, args.warmup = 8, 8, 8, 16, 3, 1
    torch.set_num_threads(args.threads)
    row = measure(args)
    print_table([row])
    print(f"optimizer: {Path(optim_impl.__file__).resolve()}")
    write_results(args.out, "bench_exchange", [row], args, optim_file=str(Path(optim_impl.__file__).resolve()))


if __name__ == "__main__":
    main()
