"""Memory benchmark: peak RSS per rank of `symi train` (CPU, gloo) as the expert count grows at fixed slots per rank.

    .venv/bin/python benchmarks/bench_memory.py [--slots 16] [--experts 16 32 64 128 256] [--out DIR] [--quick]

Every expert must have a slot, so the ranks grow with the experts: G = E / S ranks of S slots (default S = 16:
16 -> 256 experts on 1 -> 16 ranks). Then a rank's own expert memory - its S slots and its 1/G shard of every
expert's master weights, AdamW moments and gradient accumulator (S P each) - is the same for every E; what grew
with E before (every rank building every expert, the export all-gathered to every rank, a resume assembling every
expert's full state on every rank) should not. Model: preset `small` with 2 layers, d_model 256, d_ff 512 (P =
262,144 parameters per expert, 1 MiB in float32: the experts are ~95% of the model at 16 experts), top-1, symi,
1 sequence of 128 tokens per rank, float32, seed 0.

Per expert count, two jobs: `train` (build, 4 steps, full checkpoints after steps 2 and 4, the final export) and
`resume` (resume from step 4 on the same ranks, 2 more steps, a checkpoint, the export). Inside every rank: VmRSS
before the job builds anything (torch imported, process group up: the E-independent base) and VmHWM (the peak) at
the end, gathered per rank. added = peak - base: what the job added on the rank, dense part included (the dense
part is E-independent but for the router's E x d_model). Reported per job: rank 0's and the largest of the other
ranks' base, peak and added (MiB); slot_shard_mib = L (2 S P + 4 S P) x 4 B, a rank's own expert state; export_mib
= L E P x 4 B, the single-device checkpoint.pt rank 0 assembles at the end (rank 0 only); ckpt0_bytes_by_step:
rank 0's checkpoint file size at each checkpoint step (the history it carries grows per step: not this benchmark's
subject). Prints one table and writes bench_memory.csv and bench_memory.json to --out (default runs/bench_memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from report import add_out_option, out_dir, print_table, write_csv

from symi_exec import checkpoint
from symi_exec.comm import Comm
from symi_exec.config import TrainConfig
from symi_exec.loop import train

COMMON = {"model": "small", "model_overrides": {"num_layers": 2, "d_model": 256, "d_ff": 512}, "top_k": 1,
          "policy": "symi", "batch_size": 1, "seed": 0, "dtype": "float32", "log_interval": 10**6,
          "capacity_factor": 1.0}
QUICK = {"model": "tiny", "model_overrides": {}}
MIB = 2 ** 20


def proc_status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {field}")


def rank_main(rank: int, world_size: int, config: TrainConfig, store_dir: str, run_dir: str, result_dir: str) -> None:
    """One rank: join, note VmRSS, train, note VmHWM, leave."""
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=600))
    base_kib = proc_status_kib("VmRSS")
    comm = Comm(rank=rank, world_size=world_size, device=torch.device("cpu"))
    train(config, comm, Path(run_dir) if rank == 0 else None)
    dist.barrier()
    peak_kib = proc_status_kib("VmHWM")
    Path(result_dir, f"rank-{rank:05d}.json").write_text(json.dumps({"base_kib": base_kib, "peak_kib": peak_kib}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)   # as launch's spawned ranks: nothing left to run, skip gloo's teardown at interpreter exit


def run_job(config: TrainConfig, world_size: int, work: Path, name: str) -> list[dict[str, int]]:
    """Spawn the ranks of one job; their base and peak, rank by rank."""
    run_dir, result_dir = work / f"{name}-run", work / f"{name}-mem"
    run_dir.mkdir()
    result_dir.mkdir()
    with tempfile.TemporaryDirectory(prefix="symi-store-") as store_dir:
        mp.start_processes(rank_main, args=(world_size, config, store_dir, str(run_dir), str(result_dir)),
                           nprocs=world_size, join=True, start_method="spawn")
    return [json.loads((result_dir / f"rank-{rank:05d}.json").read_text()) for rank in range(world_size)]


def summarize(ranks: list[dict[str, int]]) -> dict[str, float | None]:
    def mib(kib: int) -> float:
        return round(kib * 1024 / MIB, 1)

    others = ranks[1:]
    row: dict[str, float | None] = {"rank0_base_mib": mib(ranks[0]["base_kib"]), "rank0_peak_mib":
                                    mib(ranks[0]["peak_kib"]),
                                    "rank0_added_mib": mib(ranks[0]["peak_kib"] - ranks[0]["base_kib"])}
    row["others_peak_mib"] = mib(max(r["peak_kib"] for r in others)) if others else None
    row["others_added_mib"] = mib(max(r["peak_kib"] - r["base_kib"] for r in others)) if others else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=16, help="slots per rank (ranks = experts / slots)")
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--quick", action="store_true", help="model tiny, 4 slots, 4 and 8 experts (a smoke test)")
    add_out_option(parser, "bench_memory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = {**COMMON, **(QUICK if args.quick else {})}
    slots, experts = (4, [4, 8]) if args.quick else (args.slots, args.experts)
    for num_experts in experts:
        if num_experts % slots:
            parser.error(f"--experts {num_experts} is not a multiple of --slots {slots}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for num_experts in experts:
            world_size = num_experts // slots
            work = Path(tmp, f"E{num_experts}")
            work.mkdir()
            ckpt = work / "ckpt"
            config = TrainConfig(out=str(work / "unused"), num_experts=num_experts, slots_per_rank=slots, steps=4,
                                 checkpoint_every=2, checkpoint_dir=str(ckpt), **common)
            cfg = config.model_config()
            per_job = {"train": run_job(config, world_size, work, "train")}
            sizes = {step: checkpoint.rank_file(checkpoint.step_dir(ckpt, step), 0).stat().st_size for step in (2, 4)}
            resumed = replace(config, steps=6, resume=str(ckpt), checkpoint_dir=str(work / "ckpt2"))
            per_job["resume"] = run_job(resumed, world_size, work, "resume")
            sizes[6] = checkpoint.rank_file(checkpoint.step_dir(work / "ckpt2", 6), 0).stat().st_size
            for job, ranks in per_job.items():
                rows.append({"experts": num_experts, "ranks": world_size, "slots": slots, "job": job,
                             **summarize(ranks),
                             "slot_shard_mib": round(cfg.num_layers * 6 * slots * cfg.expert_numel * 4 / MIB, 1),
                             "export_mib": round(cfg.num_layers * num_experts * cfg.expert_numel * 4 / MIB, 1),
                             "ckpt0_bytes_by_step": " ".join(f"{s}:{b}" for s, b in sorted(sizes.items()))})
            print_table(rows[-2:])   # progress: a long sweep
    print()  # noqa: T201
    print_table(rows)
    for job in ("train", "resume"):
        added = [row["others_added_mib"] for row in rows if row["job"] == job and row["others_added_mib"]]
        if added:
            print(f"{job}: other ranks' added peak from {min(added)} to {max(added)} MiB "  # noqa: T201
                  f"({100 * (max(added) / min(added) - 1):.1f}% spread)")
    target = out_dir(args.out, "bench_memory")
    write_csv(target / "bench_memory.csv", rows)
    meta = {"slots": slots, "experts": experts, "config": {k: v for k, v in asdict(config).items()
                                                           if k in COMMON or k in ("steps", "checkpoint_every")},
            "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    (target / "bench_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
