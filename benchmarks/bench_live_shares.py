"""Live-split benchmark: time per `symi_sim.live_shares.live_split` call, beside the linear program's, and how close.

    .venv/bin/python benchmarks/bench_live_shares.py [--repeats 200] [--draws 20] [--lp-draws 2] [--traffic-every 2]
        [--out DIR]

Shapes (one call splits all layers of one step):
  paper     12 layers x 16 experts on 16 GPUs x 4 slots; loads: --draws steps of the shipped synthetic-drift trace,
            evenly spaced over its 1,000 (the split's work grows as the drift spreads the load over more experts)
  deepseek  58 layers x 256 experts on 64 GPUs x 5 slots (h100-8x8); loads: 4096 tokens x top-8 per layer and
            step, multinomial over a seeded Zipf-like popularity (exponent 1, experts shuffled per layer) that every
            step perturbs by a log-normal factor (sigma 0.3), so the step before predicts the step imperfectly
The placement is symi-balanced's, planned on the step (draw) before, as in a next-step replay. Modes: dropless,
gpu (capacity factor 1.0: every GPU serves ceil(A / G)), slot (factor 1.0: every slot ceil(A / R)).
Reported per shape and mode: the median and p90 time of one live_split call over --repeats calls on --draws steps,
and the max flows per call (what the time counts: scipy's wrapper costs ~0.1 ms per flow whatever the size);
the same instances solved as the linear program (scipy.optimize.linprog, HiGHS, one LP per layer: min T over real
splits; the time is the sum over the layers); the busiest GPU's load over the LP optimum, max over layers and draws
(1.000 = the optimum; integer splits can sit one token above it); the mean imbalance (max / mean tokens per GPU) of
planned shares and of the live split. Also the median time of scipy's max flow on a 3-node graph (the fixed cost of
every flow of the split: the machine's speed at the time).
Traffic (the executor's shape: one call per layer; recorded-tiny-e16-top1, 16 experts, on 4 ranks x 8 slots, every
--traffic-every-th step, each rank's recorded counts as the sources), dropless and gpu mode at factor 1.0: the share of
the tokens sent off the rank that routed them under planned shares, the live split without and with the sources
(`live_split(source_LEG=...)`), and the linear program's least at the live peak (dropless); the median time of one
call without and with the sources. Prints the tables and writes bench_live_shares.csv / .json (the floor in its
meta) and bench_live_shares_traffic.csv / .json to --out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from report import add_out_option, out_dir, print_table, write_results
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from symi_sim import live_shares
from symi_sim.cluster import Cluster, load_cluster
from symi_sim.live_reference import lp_least_remote, lp_min_max
from symi_sim.live_shares import live_split
from symi_sim.placement import Placement
from symi_sim.policies import get_policy
from symi_sim.routing import buffer_capacity_L, remote_tokens_L, route
from symi_sim.traces.format import read_trace

ROOT = Path(__file__).resolve().parent.parent
WARMUP_CALLS = 20
MODES = (("dropless", None, "gpu"), ("gpu", 1.0, "gpu"), ("slot", 1.0, "slot"))


def deepseek_steps(num_steps: int, seed: int = 0) -> list[np.ndarray]:
    """[58, 256] token counts per step (see the module docstring)."""
    rng = np.random.default_rng(seed)
    popularity_LE = 1.0 / rng.permuted(np.tile(np.arange(1, 257), (58, 1)), axis=1)
    steps = []
    for _ in range(num_steps):
        noisy_LE = popularity_LE * rng.lognormal(0.0, 0.3, popularity_LE.shape)
        noisy_LE /= noisy_LE.sum(axis=1, keepdims=True)
        steps.append(np.stack([rng.multinomial(4096 * 8, p_E) for p_E in noisy_LE]))
    return steps


def lp_min_max_L(load_LE: np.ndarray, phy2log_LR: np.ndarray, slots_per_gpu: int) -> tuple[np.ndarray, float]:
    """([L] the LP's least busiest-GPU load per layer (dropless), seconds over all layers' LPs)."""
    start = time.perf_counter()
    best_L = np.array([lp_min_max(load_E, phy2log_R, slots_per_gpu) for load_E, phy2log_R in zip(load_LE, phy2log_LR,
                                                                                                   strict=True)])
    return best_L, time.perf_counter() - start


def scipy_floor_ms(repeats: int) -> float:
    """Median ms of one scipy max flow on a 3-node graph: the fixed cost every max flow of the split pays (validation
    and conversions in scipy's wrapper), a measure of this machine's speed at the time of the run."""
    graph = csr_matrix((np.array([5, 3], dtype=np.int32), np.array([1, 2], dtype=np.int32),
                        np.array([0, 1, 2, 2], dtype=np.int32)), shape=(3, 3))
    times_s = []
    for _ in range(WARMUP_CALLS + repeats):
        start = time.perf_counter()
        maximum_flow(graph, 0, 2, method="dinic")
        times_s.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times_s[WARMUP_CALLS:])), 3)


def count_max_flows(split: Callable[[], object]) -> int:
    """How many max flows one call of `split` runs (the live split's network, counted around its one flow method)."""
    count = 0
    max_flow = live_shares._Network.max_flow

    def counted(net: object, *args: object, **kwargs: object) -> object:
        nonlocal count
        count += 1
        return max_flow(net, *args, **kwargs)

    live_shares._Network.max_flow = counted
    try:
        split()
    finally:
        live_shares._Network.max_flow = max_flow
    return count


def bench_shape(shape: str, cluster: Cluster, pairs: list[tuple[np.ndarray, np.ndarray]], *, repeats: int,
                lp_draws: int) -> list[dict]:
    """pairs: (the loads a placement is planned on, the next step's loads it serves), one per draw."""
    policy = get_policy("symi-balanced")
    slots = cluster.slots_per_gpu
    steps = []   # (load served, planned placement, live placement)
    for previous_LE, load_LE in pairs:
        planned = policy.plan(previous_LE, cluster)
        live = Placement(planned.phy2log_LR, planned.share_LR, planned.num_experts, live_shares=True)
        steps.append((load_LE.astype(np.int64), planned, live))
    lp = [lp_min_max_L(load_LE, live.phy2log_LR, slots) for load_LE, _, live in steps[:lp_draws]]
    rows = []
    for mode, factor, capacity_mode in MODES:
        buffers = cluster.num_slots if capacity_mode == "slot" else cluster.num_gpus
        calls = [partial(live_split, load_LE, live, slots_per_gpu=slots, capacity_mode=capacity_mode,
                         capacity_L=None if factor is None else buffer_capacity_L(load_LE, load_LE.sum(axis=1), factor,
                                                                                   buffers))
                 for load_LE, _, live in steps]
        times_s = []
        for i in range(WARMUP_CALLS + repeats):   # untimed first calls: imports, caches, the CPU's clock
            start = time.perf_counter()
            calls[i % len(calls)]()
            times_s.append(time.perf_counter() - start)
        times_s = times_s[WARMUP_CALLS:]
        flows = [count_max_flows(call) for call in calls]
        planned_imb, live_imb, gap = [], [], []
        for i, (load_LE, planned, live) in enumerate(steps):
            kwargs = {"slots_per_gpu": slots, "capacity_factor": factor, "capacity_mode": capacity_mode}
            live_routing = route(load_LE, live, **kwargs)
            planned_imb.append(route(load_LE, planned, **kwargs).imbalance_L.mean())
            live_imb.append(live_routing.imbalance_L.mean())
            if mode == "dropless" and i < lp_draws:
                gap.append((live_routing.gpu_load_LG.max(axis=1) / np.maximum(lp[i][0], 1e-9)).max())
        rows.append({"shape": shape, "layers": steps[0][0].shape[0], "experts": steps[0][0].shape[1],
                     "slots": cluster.num_slots, "mode": mode,
                     "live_median_ms": round(1e3 * float(np.median(times_s)), 2),
                     "live_p90_ms": round(1e3 * float(np.percentile(times_s, 90)), 2),
                     "max_flows_per_call": round(float(np.mean(flows)), 2),
                     "lp_ms": round(1e3 * float(np.median([s for _, s in lp])), 1) if mode == "dropless" else None,
                     "max_over_lp": round(float(max(gap)), 4) if gap else None,
                     "imbalance_planned": round(float(np.mean(planned_imb)), 3),
                     "imbalance_live": round(float(np.mean(live_imb)), 3)})
        print_table(rows[-1:])   # progress
    return rows


def bench_traffic(trace_name: str, cluster: Cluster, *, every: int) -> list[dict]:
    """The executor's shape: one call per layer, every rank's counts known (the trace's recorded per-rank counts).
    Per mode, the share of the tokens sent off their rank (planned shares; the live split without and with the
    sources; the LP's least at the live peak, dropless only) and the time of one live split without and with them."""
    trace = read_trace(ROOT / "traces" / f"{trace_name}.parquet")
    if trace.src_counts_SLEG is None or trace.src_counts_SLEG.shape[-1] != cluster.num_gpus:
        raise ValueError(f"{trace_name} has no per-rank counts for {cluster.num_gpus} ranks")
    policy = get_policy("symi-balanced")
    slots = cluster.slots_per_gpu
    rows = []
    for mode, factor, capacity_mode in MODES[:2]:
        remote = {"planned": 0, "live": 0, "sources": 0, "least": 0.0}
        times_s: dict[str, list[float]] = {"live": [], "sources": []}
        tokens = 0
        for step in range(1, trace.num_steps, every):
            planned = policy.plan(trace.counts_SLE[step - 1].astype(np.float64), cluster)
            for layer in range(trace.num_layers):
                one = planned.take_layers(slice(layer, layer + 1))
                live = Placement(one.phy2log_LR, one.share_LR, one.num_experts, live_shares=True)
                load_1E = trace.counts_SLE[step, layer][None, :].astype(np.int64)
                source_1EG = trace.src_counts_SLEG[step, layer][None].astype(np.int64)
                capacity_1 = None if factor is None else buffer_capacity_L(load_1E, load_1E.sum(axis=1), factor,
                                                                          cluster.num_gpus)
                split = {"planned": route(load_1E, one, slots_per_gpu=slots, capacity_factor=factor,
                                          capacity_mode=capacity_mode).assigned_LR[0]}
                for name, sources in (("live", None), ("sources", source_1EG)):
                    start = time.perf_counter()
                    split[name] = live_split(load_1E, live, slots_per_gpu=slots, capacity_mode=capacity_mode,
                                             capacity_L=capacity_1, source_LEG=sources)[0]
                    times_s[name].append(time.perf_counter() - start)
                for name, assigned_R in split.items():
                    remote[name] += int(remote_tokens_L(assigned_R[None], source_1EG, one.phy2log_LR, slots)[0])
                if factor is None:
                    peak = int(split["sources"].reshape(-1, slots).sum(axis=1).max())
                    remote["least"] += lp_least_remote(load_1E[0].astype(np.float64), source_1EG[0],
                                                       one.phy2log_LR[0], slots, peak)
                tokens += int(load_1E.sum())
        rows.append({"shape": f"executor: {trace_name}, 1 layer x {trace.num_experts} experts, "
                              f"{cluster.num_gpus} ranks x {slots} slots", "mode": mode,
                     "remote_planned": round(remote["planned"] / tokens, 4),
                     "remote_live": round(remote["live"] / tokens, 4),
                     "remote_live_sources": round(remote["sources"] / tokens, 4),
                     "remote_lp_least": round(remote["least"] / tokens, 4) if factor is None else None,
                     "live_median_ms": round(1e3 * float(np.median(times_s["live"][WARMUP_CALLS:])), 3),
                     "live_sources_median_ms": round(1e3 * float(np.median(times_s["sources"][WARMUP_CALLS:])), 3)})
        print_table(rows[-1:])   # progress
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per shape and mode")
    parser.add_argument("--draws", type=int, default=20, help="steps (draws) per shape")
    parser.add_argument("--lp-draws", type=int, default=2, help="steps solved as linear programs too")
    parser.add_argument("--traffic-every", type=int, default=2,
                        help="traffic rows: every N-th step of the recorded trace (each layer one call)")
    add_out_option(parser, "bench_live_shares")
    args = parser.parse_args()
    if args.repeats < 1 or args.draws < 1 or args.traffic_every < 1 or not 0 <= args.lp_draws <= args.draws:
        parser.error("--repeats, --draws and --traffic-every must be positive, --lp-draws between 0 and --draws")
    drift = read_trace(ROOT / "traces" / "synthetic-drift.parquet")
    spread = np.linspace(0, drift.num_steps - 2, args.draws).round().astype(int)
    deepseek = deepseek_steps(args.draws + 1)
    shapes = {"paper": (load_cluster("paper-a100-16"), [(drift.counts_SLE[s], drift.counts_SLE[s + 1])
                                                        for s in spread]),
              "deepseek": (load_cluster("h100-8x8"), list(zip(deepseek[:-1], deepseek[1:], strict=True)))}
    rows = []
    for shape, (cluster, pairs) in shapes.items():
        rows.extend(bench_shape(shape, cluster, pairs, repeats=args.repeats, lp_draws=args.lp_draws))
    traffic = bench_traffic("recorded-tiny-e16-top1", Cluster(name="1x4x8", num_nodes=1, gpus_per_node=4,
                                                              slots_per_gpu=8), every=args.traffic_every)
    floor_ms = scipy_floor_ms(args.repeats)
    print()  # noqa: T201
    print_table(rows)
    print_table(traffic)
    print(f"scipy max flow on a 3-node graph (the fixed cost of each flow): {floor_ms} ms")  # noqa: T201
    target = out_dir(args.out, "bench_live_shares")
    target.mkdir(parents=True, exist_ok=True)
    write_results(target, "bench_live_shares", rows, args, scipy_floor_ms=floor_ms)
    write_results(target, "bench_live_shares_traffic", traffic, args, scipy_floor_ms=floor_ms)


if __name__ == "__main__":
    main()
