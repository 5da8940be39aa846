"""Memory benchmark: the expert part of the peak RSS per rank of `symi train` (CPU, gloo), experts grow at fixed slots.

    .venv/bin/python benchmarks/bench_memory.py [--slots 16] [--experts 16 32 64 128 256] [--repeats 3]
        [--jobs train resume] [--min-d-ff 1] [--out DIR] [--quick]

Every expert must have a slot, so the ranks grow with the experts: G = E / S ranks of S slots (default S = 16:
16 -> 256 experts on 1 -> 16 ranks). A rank's own expert state - its S slots with their gradients and its 1/G shard
of every expert's master weights, two AdamW moments and gradient accumulator - is then own = L (2 S P + 4 E P / G)
x 4 B = 6 L S P x 4 B at every E (float32); the old design added 2 L E P x 4 B more per rank (every expert built,
then all-gathered at the export; rank 0 a third copy in the state dict it saved), which grows with E.

What else a rank's peak holds also changes with G (gloo's buffers per peer, the processes beside it, the allocator),
so the expert part is isolated by a difference: each job runs twice at identical G, batch and dense part (d_model,
layers, router), once with the real expert width (d_ff 512: P = 2 d_model d_ff = 262,144, 1 MiB in float32) and once
with a minimal one (--min-d-ff, default 1: P = 512); expert part = peak(real) - peak(minimal), per rank, median over
--repeats runs of each. Predicted: own x (1 - P_min / P). Model: preset `small` with 2 layers, d_model 256, top-1,
symi, 1 sequence of 128 tokens per rank, float32, seed 0.

The ranks run with glibc's allocator pinned (MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_=131072, set here unless
already set; why: in main) so that RSS tracks the bytes a rank holds: every tensor of 128 KiB or more is a mapping of
its own, returned when freed. The peak is then what the program holds at its fullest moment: the own state plus the
largest transient, independent of E: the float64 squared norm of a layer's gradient shards (2 E P / G x 8 B = 64
MiB) and, at G > 1, the gradient collection's buffers (at most 2 U P x 4 B = 64 MiB for the U <= L S experts a rank
hosts: its partial sums, its packed send buffer and its own shard of them, for a moment) tie.

Jobs: `train` (build, 4 steps, full checkpoints after steps 2 and 4, the final export) and `resume` (resume from
step 4 on the same ranks, 2 more steps, a checkpoint, the export). Inside every rank: VmHWM (the peak RSS) at the
end, and VmRSS before the job builds anything (torch imported, process group up), gathered per rank. Reported per E
and job (MiB): rank 0's expert part and the largest of the other ranks', next to the predicted own expert state and
the old design's predicted expert part (own + 2 L E P x 4 B); the real width's peaks (rank 0, largest other) for
scale. Prints one table and writes bench_memory.csv and bench_memory.json (every run's per-rank numbers) to --out
(default runs/bench_memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from report import add_out_option, out_dir, print_table, write_csv

from symi_exec.comm import Comm
from symi_exec.config import TrainConfig
from symi_exec.loop import train

COMMON = {"model": "small", "model_overrides": {"num_layers": 2, "d_model": 256, "d_ff": 512}, "top_k": 1,
          "policy": "symi", "batch_size": 1, "seed": 0, "dtype": "float32", "log_interval": 10**6,
          "capacity_factor": 1.0}
QUICK = {"model": "tiny", "model_overrides": {}}
JOBS = ("train", "resume")
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


def median_peaks_kib(runs: list[list[dict[str, int]]]) -> list[float]:
    """Per rank, the median over repeated runs of the peak (KiB)."""
    return [float(statistics.median(run[rank]["peak_kib"] for run in runs)) for rank in range(len(runs[0]))]


def run_width(config: TrainConfig, world_size: int, work: Path, jobs: list[str]) -> dict[str, list[dict[str, int]]]:
    """One run of each job at `config`'s expert width (resume: from train's checkpoint after step 4)."""
    work.mkdir(parents=True)
    ckpt = work / "ckpt"
    trained = replace(config, checkpoint_dir=str(ckpt))
    out = {"train": run_job(trained, world_size, work, "train")}
    if "resume" in jobs:
        resumed = replace(trained, steps=6, resume=str(ckpt), checkpoint_dir=str(work / "ckpt2"))
        out["resume"] = run_job(resumed, world_size, work, "resume")
    shutil.rmtree(work)   # checkpoints of every expert: the disk of a long sweep
    return {job: out[job] for job in jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=16, help="slots per rank (ranks = experts / slots)")
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job and width (medians)")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--min-d-ff", type=int, default=1, help="the minimal expert width (d_ff)")
    parser.add_argument("--quick", action="store_true", help="model tiny, 4 slots, 4 and 8 experts (a smoke test)")
    add_out_option(parser, "bench_memory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = {**COMMON, **(QUICK if args.quick else {})}
    slots, experts = (4, [4, 8]) if args.quick else (args.slots, args.experts)
    for num_experts in experts:
        if num_experts % slots:
            parser.error(f"--experts {num_experts} is not a multiple of --slots {slots}")
    if args.repeats < 1 or args.min_d_ff < 1:
        parser.error("--repeats and --min-d-ff must be positive")
    # glibc's allocator, so that a rank's RSS tracks what it holds (the spawned ranks inherit these; glibc reads
    # them when a process starts). One malloc arena: glibc otherwise gives each of gloo's and torch's threads an
    # arena of its own as they race, so a rank's peak RSS varied by 100+ MiB from run to run for the same work
    # (measured: the expert part spread 39% over 16 -> 256 experts with the default, 2-10% with one arena).
    os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    # A fixed mmap threshold (glibc's initial 128 KiB; setting it turns off the dynamic one): by default the first
    # free of a large mmapped block raises the threshold to its size (up to 32 MiB), after which the 1-32 MiB tensors
    # come from the heap, whose freed space the process keeps while anything above it lives - so the peak depended on
    # the order of allocations, not on what was held (measured, one run of 64 experts, 4 ranks doing the same work:
    # peaks 744-822 MiB with the default, 696-699 MiB with the fixed threshold).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for num_experts in experts:
            world_size = num_experts // slots
            real = TrainConfig(out=str(Path(tmp, "unused")), num_experts=num_experts, slots_per_rank=slots, steps=4,
                               checkpoint_every=2, **common)
            cfg = real.model_config()
            minimal = replace(real, model_overrides={**real.model_overrides, "d_ff": args.min_d_ff})
            numel_min = minimal.model_config().expert_numel
            if numel_min >= cfg.expert_numel:
                parser.error(f"--min-d-ff {args.min_d_ff} is not below the real d_ff {cfg.d_ff}")
            runs: dict[tuple[str, str], list[list[dict[str, int]]]] = {}
            for repeat in range(args.repeats):   # the widths alternate: a drift in the machine's load hits both
                for width, config in (("real", real), ("minimal", minimal)):
                    got = run_width(config, world_size, Path(tmp, f"E{num_experts}-{width}-{repeat}"), args.jobs)
                    for job, ranks in got.items():
                        runs.setdefault((job, width), []).append(ranks)
                        raw.append({"experts": num_experts, "job": job, "width": width, "repeat": repeat,
                                    "ranks": ranks})
            own = cfg.num_layers * 6 * slots * cfg.expert_numel * 4
            predicted = own * (1 - numel_min / cfg.expert_numel)
            old = predicted + 2 * cfg.num_layers * num_experts * (cfg.expert_numel - numel_min) * 4
            for job in args.jobs:
                peak_real, peak_min = median_peaks_kib(runs[job, "real"]), median_peaks_kib(runs[job, "minimal"])
                part = [(r - m) * 1024 / MIB for r, m in zip(peak_real, peak_min, strict=True)]
                rows.append({"experts": num_experts, "ranks": world_size, "slots": slots, "job": job,
                             "rank0_part_mib": round(part[0], 1),
                             "others_part_mib": round(max(part[1:]), 1) if world_size > 1 else None,
                             "others_part_min_mib": round(min(part[1:]), 1) if world_size > 1 else None,
                             "predicted_mib": round(predicted / MIB, 1), "old_design_mib": round(old / MIB, 1),
                             "rank0_peak_mib": round(peak_real[0] / 1024, 1),
                             "others_peak_mib": round(max(peak_real[1:]) / 1024, 1) if world_size > 1 else None})
            print_table(rows[-len(args.jobs):])   # progress: a long sweep
    elapsed_s = time.monotonic() - start
    print()  # noqa: T201
    print_table(rows)
    for job in args.jobs:
        for column in ("rank0_part_mib", "others_part_mib"):
            parts = [row[column] for row in rows if row["job"] == job and row[column] is not None]
            if parts and min(parts) > 0:
                print(f"{job}: {column} from {min(parts)} to {max(parts)} MiB "  # noqa: T201
                      f"({100 * (max(parts) / min(parts) - 1):.1f}% spread)")
    print(f"{len(raw)} runs in {elapsed_s / 60:.1f} min")  # noqa: T201
    target = out_dir(args.out, "bench_memory")
    write_csv(target / "bench_memory.csv", rows)
    meta = {"slots": slots, "experts": experts, "repeats": args.repeats, "jobs": args.jobs,
            "min_d_ff": args.min_d_ff, "elapsed_s": round(elapsed_s, 1),
            "malloc": {k: os.environ[k] for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")},
            "config": {k: v for k, v in asdict(real).items() if k in COMMON or k in ("steps", "checkpoint_every")},
            "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    (target / "bench_memory.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": raw}, indent=1) + "\n")


if __name__ == "__main__":
    main()
