"""Checkpoint benchmark: full checkpoints versus sparse popularity-aware snapshots on the CPU executor.

    .venv/bin/python benchmarks/bench_checkpoint.py [--nproc 2] [--steps 30] [--fail-at 25] [--out DIR] [--quick]

Model `small` (4 MoE layers, d_model 128, d_ff 512: 64 experts of 131,072 parameters, so expert state is ~96% of
the checkpoint, as in real MoE models), 16 experts, top-2, --nproc ranks x 10 slots, 4 sequences of 128 tokens per
rank per step, capacity factor 1.0, aux-loss coefficient 1e-5 (the SYMI paper's: skewed routing), seed 0, float32.

Per checkpoint mode (none, full every 1 and 10 steps, sparse snapshots between full ones every 10 steps with hot
shares 0.5, 0.8, 1; --every sets the period, 10 by default):
  overhead   one uninterrupted run of --steps steps: median step time (first 2 steps left out), the time per step
             the training loop waits for checkpoint writes (blocked_s; overhead_pct = blocked / step time), the
             writes' own time per step, and the bytes per step (all writes of the run / steps); "+overlap" modes
             write in a background thread (--overlap-checkpoints);
  recovery   a failure drill (every rank SIGKILLed at the start of step --fail-at), then `--resume`: the step the
             job recovers to, the steps of work lost, the restore time (read the full checkpoint and the sparse
             chain, merge, load: recovery.json), the stale experts and the expert assignments whose updates were
             lost, in steps' worth (lost assignments / assignments per step), and recovery_s = restore_s + lost
             steps x step time (process relaunch not included).
Prints one table and writes bench_checkpoint.csv and bench_checkpoint.json to --out (default runs/bench_checkpoint;
the committed tables: --out benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from report import add_out_option, out_dir, print_table, write_csv

from symi_exec.config import TrainConfig
from symi_exec.launch import JobFailed, launch

ROOT = Path(__file__).resolve().parent.parent
QUICK_MODEL = {"model": "tiny", "num_experts": 8, "slots_per_rank": 5}
COMMON = {"model": "small", "num_experts": 16, "top_k": 2, "slots_per_rank": 10, "batch_size": 4,
          "capacity_factor": 1.0, "aux_loss_coef": 1e-5, "seed": 0, "log_interval": 10**6}
HOT_SHARES = (0.5, 0.8, 1.0)


def modes(every: int) -> dict[str, tuple[int, float | None, bool]]:
    """label -> (checkpoint_every, sparse_hot_share, overlapped writes)."""
    return {"none": (0, None, False), "full-1": (1, None, False), f"full-{every}": (every, None, False),
            **{f"sparse-{every}:hot={hot:g}": (every, hot, False) for hot in HOT_SHARES},
            "full-1+overlap": (1, None, True), f"sparse-{every}:hot={HOT_SHARES[0]:g}+overlap":
                (every, HOT_SHARES[0], True)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def measure(label: str, args: argparse.Namespace, root: Path, common: dict[str, Any]) -> dict[str, Any]:
    every, hot, overlap = modes(args.every)[label]
    base = TrainConfig(out=str(root / f"{label}-run"), steps=args.steps, checkpoint_every=every,
                       sparse_hot_share=hot, overlap_checkpoints=overlap,
                       checkpoint_dir=str(root / f"{label}-run-ckpt"), **common)
    launch(base, args.nproc, log_level=logging.WARNING)
    rows = read_csv(root / f"{label}-run" / "metrics.csv")
    step_s = statistics.median(float(r["step_s"]) for r in rows[2:])
    writes = read_csv(root / f"{label}-run" / "checkpoints.csv") if every else []
    cfg = base.model_config()
    assignments_per_step = args.nproc * common["batch_size"] * cfg.seq_len * cfg.top_k * cfg.num_layers
    result: dict[str, Any] = {
        "mode": label, "step_s": round(step_s, 4),
        "blocked_s_per_step": round(sum(float(w["blocked_s"]) for w in writes) / args.steps, 4),
        "write_s_per_step": round(sum(float(w["write_s"]) for w in writes) / args.steps, 4),
        "bytes_per_step_mb": round(sum(int(w["bytes"]) for w in writes) / args.steps / 1e6, 2),
        "expert_bytes_per_step_mb": round(sum(int(w["expert_bytes"]) for w in writes) / args.steps / 1e6, 2),
        "hot_experts_per_snapshot": round(statistics.mean(int(w["hot_experts"]) for w in writes
                                                          if w["kind"] == "sparse"), 1)
        if any(w["kind"] == "sparse" for w in writes) else None,
        "full_checkpoint_mb": round(max((int(w["bytes"]) for w in writes if w["kind"] == "full"), default=0) / 1e6, 1),
    }
    result["overhead_pct"] = round(100 * result["blocked_s_per_step"] / step_s, 1)
    if not every:
        return result

    drill = TrainConfig(**{**base.__dict__, "out": str(root / f"{label}-drill"),
                           "checkpoint_dir": str(root / f"{label}-drill-ckpt"), "fail_at_step": args.fail_at})
    try:
        launch(drill, args.nproc, log_level=logging.ERROR)
        raise AssertionError("the failure drill did not fail")
    except JobFailed:
        pass
    resumed = TrainConfig(**{**drill.__dict__, "out": str(root / f"{label}-resumed"), "fail_at_step": None,
                             "checkpoint_dir": None, "resume": drill.checkpoint_dir})
    launch(resumed, args.nproc, log_level=logging.WARNING)
    recovery = json.loads((root / f"{label}-resumed" / "recovery.json").read_text())
    lost_steps = args.fail_at - recovery["step"]
    result.update(recovered_to_step=recovery["step"], lost_steps=lost_steps,
                  restore_s=round(recovery["restore_s"], 3), stale_experts=recovery["stale_experts"],
                  lost_expert_updates_steps=round(recovery["lost_expert_assignments"] / assignments_per_step, 2),
                  recovery_s=round(recovery["restore_s"] + lost_steps * step_s, 3))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fail-at", type=int, default=25)
    parser.add_argument("--every", type=int, default=10, help="steps between full checkpoints")
    add_out_option(parser, "bench_checkpoint")
    parser.add_argument("--quick", action="store_true",
                        help="model tiny (8 experts), 8 steps, full every 4, failure at step 6, two modes")
    args = parser.parse_args()
    args.out = out_dir(args.out, "bench_checkpoint")
    labels = list(modes(args.every))
    common = dict(COMMON)
    if args.quick:
        common.update(QUICK_MODEL)
        args.steps, args.fail_at, args.every = 8, 6, 4
        labels = ["full-4", "sparse-4:hot=0.5"]
    if not 0 < args.fail_at < args.steps:
        parser.error(f"--fail-at must lie in (0, --steps), got {args.fail_at}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="symi-bench-ckpt-") as tmp:
        for label in labels:
            logging.info("mode %s ...", label)
            results.append(measure(label, args, Path(tmp), common))
    print_table(results)
    write_csv(args.out / "bench_checkpoint.csv", results)
    meta = {"config": common, "nproc": args.nproc, "steps": args.steps, "fail_at": args.fail_at, "every": args.every,
            "machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__}
    (args.out / "bench_checkpoint.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
