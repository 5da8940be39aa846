"""Executor benchmark: a few steps of `symi train` per policy on local ranks; throughput, drops, bytes per step.

    .venv/bin/python benchmarks/bench_exec.py [--steps 12] [--nproc 2] [--out runs/bench_exec.csv]

Prints a table and writes it as CSV. The first step (warm-up) is left out of the averages.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from symi_exec.comm import BYTE_KINDS
from symi_exec.trainer import TrainConfig, launch


def bench(policy: str, args: argparse.Namespace, root: Path) -> dict[str, object]:
    config = TrainConfig(out=str(root / policy), model=args.model, num_experts=args.experts,
                         slots_per_rank=args.slots, top_k=args.top_k, policy=policy,
                         capacity_factor=args.capacity_factor, steps=args.steps, batch_size=args.batch_size,
                         log_interval=10**6)
    launch(config, args.nproc)
    with open(Path(config.out) / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)][1:]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    result: dict[str, object] = {
        "policy": policy, "ranks": args.nproc, "model": args.model, "experts": args.experts, "slots": args.slots,
        "tokens_per_s": round(mean["tokens_per_s"]), "step_ms": round(1e3 * mean["step_s"], 1),
        "final_loss": round(rows[-1]["loss"], 4), "dropped_pct": round(100 * mean["dropped_fraction"], 2),
        "imbalance": round(mean["imbalance"], 3),
    }
    for kind in BYTE_KINDS:
        result[f"kib_{kind}"] = round(mean[f"bytes_{kind}"] / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="static,symi,symi-balanced")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="runs/bench_exec.csv")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(policy.strip(), args, Path(tmp)) for policy in args.policies.split(",")]
    columns = list(results[0])
    widths = [max(len(c), *(len(str(r[c])) for r in results)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in results:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths, strict=True)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
