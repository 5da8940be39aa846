"""Stress check (not a unit test): do spawned gloo ranks die at interpreter exit under CPU load?

    .venv/bin/python benchmarks/stress_gloo_exit.py [--runs 20] [--parallel 1] [--hogs 4] [--steps 30] [--root DIR]

Starts --hogs busy-looping processes, then runs a tiny 2-rank `symi train` (the capacity-factor study's --quick
shape, where the abort was seen) --runs times, --parallel at a time, in the checkout --root (default: this one) and
counts the runs that failed with a rank killed by SIGABRT ("terminate called without an active exception": gloo's
C++ threads outliving the interpreter's teardown), the other failures and the successes. The hogs are stopped at
the end.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("stress_gloo_exit")

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["--nproc-per-node", "2", "--experts", "4", "--slots", "4", "--capacity-factor", "1", "--log-interval",
              "1000"]


def classify(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "ok"
    if "SIGABRT" in stderr or "terminate called" in stderr:
        return "sigabrt"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=1, help="Jobs running at the same time.")
    parser.add_argument("--hogs", type=int, default=4, help="Busy-looping processes started alongside.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps per run.")
    parser.add_argument("--root", type=Path, default=ROOT, help="The checkout whose `cli` is run.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    counts = {"ok": 0, "sigabrt": 0, "other": 0}
    try:
        with tempfile.TemporaryDirectory(prefix="symi-stress-") as tmp:
            for first in range(0, args.runs, args.parallel):
                start = time.perf_counter()
                batch = range(first, min(first + args.parallel, args.runs))
                jobs = [subprocess.Popen([sys.executable, "-m", "cli", "train", *TRAIN_ARGS, "--steps", str(args.steps),
                                          "--out", str(Path(tmp) / f"run-{run}")], cwd=args.root,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                        for run in batch]
                for run, job in zip(batch, jobs, strict=True):
                    _, stderr = job.communicate(timeout=900)
                    outcome = classify(job.returncode, stderr)
                    counts[outcome] += 1
                    logger.info("run %2d: %-7s %.1f s", run, outcome, time.perf_counter() - start)
                    if outcome != "ok":
                        logger.info("%s", stderr.strip()[-1500:])
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    logger.info("%d runs: %d ok, %d SIGABRT, %d other failures", args.runs, counts["ok"], counts["sigabrt"],
                counts["other"])


if __name__ == "__main__":
    main()
