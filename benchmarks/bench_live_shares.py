"""Live-split benchmark: time per `symi_sim.live_shares.live_split` call, beside the linear program's, and how close.

    .venv/bin/python benchmarks/bench_live_shares.py [--repeats 200] [--draws 5] [--lp-draws 2] [--out DIR]

Shapes (one call splits all layers of one step):
  paper     12 layers x 16 experts on 16 GPUs x 4 slots; loads: steps of the shipped synthetic-drift trace
  deepseek  58 layers x 256 experts on 64 GPUs x 5 slots (h100-8x8); loads: 4096 tokens x top-8 per layer and
            step, multinomial over a seeded Zipf-like popularity (exponent 1, experts shuffled per layer) that every
            step perturbs by a log-normal factor (sigma 0.3), so the step before predicts the step imperfectly
The placement is symi-balanced's, planned on the step (draw) before, as in a next-step replay. Modes: dropless,
gpu (capacity factor 1.0: every GPU serves ceil(A / G)), slot (factor 1.0: every slot ceil(A / R)).
Reported per shape and mode: the median and p90 time of one live_split call over --repeats calls on --draws steps;
the same instances solved as the linear program (scipy.optimize.linprog, HiGHS, one LP per layer: min T over real
splits; the time is the sum over the layers); the busiest GPU's load over the LP optimum, max over layers and draws
(1.000 = the optimum; integer splits can sit one token above it); the mean imbalance (max / mean tokens per GPU) of
planned shares and of the live split. Also the median time of scipy's max flow on a 3-node graph (the fixed cost of
every flow of the split: the machine's speed at the time). Prints the table and writes bench_live_shares.csv / .json
(the floor in its meta) to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from report import add_out_option, out_dir, print_table, write_results
from scipy.optimize import linprog
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from symi_sim.cluster import Cluster, load_cluster
from symi_sim.live_shares import live_split
from symi_sim.placement import Placement
from symi_sim.policies import get_policy
from symi_sim.routing import buffer_capacity_L, route
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
    """([L] the LP's least busiest-GPU load per layer (dropless), seconds in linprog over all layers)."""
    num_layers, num_slots = phy2log_LR.shape
    num_gpus = num_slots // slots_per_gpu
    best_L = np.empty(num_layers)
    spent_s = 0.0
    a_ub = np.zeros((num_gpus, num_slots + 1))
    a_ub[np.arange(num_slots) // slots_per_gpu, np.arange(num_slots)] = 1.0
    a_ub[:, -1] = -1.0
    cost = np.zeros(num_slots + 1)
    cost[-1] = 1.0
    for layer in range(num_layers):
        a_eq = np.zeros((load_LE.shape[1], num_slots + 1))
        a_eq[phy2log_LR[layer], np.arange(num_slots)] = 1.0
        start = time.perf_counter()
        result = linprog(cost, A_ub=a_ub, b_ub=np.zeros(num_gpus), A_eq=a_eq, b_eq=load_LE[layer], method="highs")
        spent_s += time.perf_counter() - start
        best_L[layer] = result.fun
    return best_L, spent_s


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


def bench_shape(shape: str, cluster: Cluster, loads: list[np.ndarray], *, repeats: int,
                lp_draws: int) -> list[dict]:
    policy = get_policy("symi-balanced")
    slots = cluster.slots_per_gpu
    steps = []   # (load served, planned placement, live placement)
    for previous_LE, load_LE in zip(loads[:-1], loads[1:], strict=True):
        planned = policy.plan(previous_LE, cluster)
        live = Placement(planned.phy2log_LR, planned.share_LR, planned.num_experts, live_shares=True)
        steps.append((load_LE.astype(np.int64), planned, live))
    lp = [lp_min_max_L(load_LE, live.phy2log_LR, slots) for load_LE, _, live in steps[:lp_draws]]
    rows = []
    for mode, factor, capacity_mode in MODES:
        times_s = []
        for i in range(WARMUP_CALLS + repeats):   # untimed first calls: imports, caches, the CPU's clock
            load_LE, _, live = steps[i % len(steps)]
            buffers = cluster.num_slots if capacity_mode == "slot" else cluster.num_gpus
            capacity_L = None if factor is None else buffer_capacity_L(load_LE, load_LE.sum(axis=1), factor, buffers)
            start = time.perf_counter()
            live_split(load_LE, live, slots_per_gpu=slots, capacity_mode=capacity_mode, capacity_L=capacity_L)
            times_s.append(time.perf_counter() - start)
        times_s = times_s[WARMUP_CALLS:]
        planned_imb, live_imb, gap = [], [], []
        for i, (load_LE, planned, live) in enumerate(steps):
            kwargs = {"slots_per_gpu": slots, "capacity_factor": factor, "capacity_mode": capacity_mode}
            live_routing = route(load_LE, live, **kwargs)
            planned_imb.append(route(load_LE, planned, **kwargs).imbalance_L.mean())
            live_imb.append(live_routing.imbalance_L.mean())
            if mode == "dropless" and i < lp_draws:
                gap.append((live_routing.gpu_load_LG.max(axis=1) / np.maximum(lp[i][0], 1e-9)).max())
        rows.append({"shape": shape, "layers": loads[0].shape[0], "experts": loads[0].shape[1],
                     "slots": cluster.num_slots, "mode": mode,
                     "live_median_ms": round(1e3 * float(np.median(times_s)), 2),
                     "live_p90_ms": round(1e3 * float(np.percentile(times_s, 90)), 2),
                     "lp_ms": round(1e3 * float(np.median([s for _, s in lp])), 1) if mode == "dropless" else None,
                     "max_over_lp": round(float(max(gap)), 4) if gap else None,
                     "imbalance_planned": round(float(np.mean(planned_imb)), 3),
                     "imbalance_live": round(float(np.mean(live_imb)), 3)})
        print_table(rows[-1:])   # progress
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per shape and mode")
    parser.add_argument("--draws", type=int, default=5, help="steps (draws) per shape")
    parser.add_argument("--lp-draws", type=int, default=2, help="steps solved as linear programs too")
    add_out_option(parser, "bench_live_shares")
    args = parser.parse_args()
    if args.repeats < 1 or args.draws < 1 or not 0 <= args.lp_draws <= args.draws:
        parser.error("--repeats and --draws must be positive, --lp-draws between 0 and --draws")
    drift = read_trace(ROOT / "traces" / "synthetic-drift.parquet")
    shapes = {"paper": (load_cluster("paper-a100-16"), [drift.counts_SLE[s] for s in range(args.draws + 1)]),
              "deepseek": (load_cluster("h100-8x8"), deepseek_steps(args.draws + 1))}
    rows = []
    for shape, (cluster, loads) in shapes.items():
        rows.extend(bench_shape(shape, cluster, loads, repeats=args.repeats, lp_draws=args.lp_draws))
    floor_ms = scipy_floor_ms(args.repeats)
    print()  # noqa: T201
    print_table(rows)
    print(f"scipy max flow on a 3-node graph (the fixed cost of each flow): {floor_ms} ms")  # noqa: T201
    target = out_dir(args.out, "bench_live_shares")
    target.mkdir(parents=True, exist_ok=True)
    write_results(target, "bench_live_shares", rows, args, scipy_floor_ms=floor_ms)


if __name__ == "__main__":
    main()
