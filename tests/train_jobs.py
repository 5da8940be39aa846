"""`symi train` as a subprocess the kill-and-resume tests can SIGKILL, and metrics rows without the timings."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# deterministic, with drops (capacity 1.0) and, under symi (the default policy), a placement that changes every step
TRAIN_ARGS = ["--nproc-per-node", "2", "--experts", "4", "--slots", "3", "--top-k", "2", "--batch-size", "2",
              "--capacity-factor", "1.0", "--log-interval", "1000"]
TIMING = ("step_s", "tokens_per_s", "peak_memory_mib")   # measured, not computed


def symi_train(*args: str) -> subprocess.Popen:
    # a session of its own, so the test can kill the whole job (launcher and its spawned ranks) at once
    return subprocess.Popen([sys.executable, "-m", "cli", "train", *TRAIN_ARGS, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def kill_once(job: subprocess.Popen, marker: Path, *, timeout_s: float = 240) -> None:
    """SIGKILL the whole job as soon as `marker` exists."""
    deadline = time.monotonic() + timeout_s
    while not marker.is_file():
        assert job.poll() is None, job.stderr.read() if job.stderr else ""
        assert time.monotonic() < deadline, f"{marker} did not appear"
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING and not k.startswith("time_")}
                for row in csv.DictReader(f)]


def fail_on_a_file(rank: int, folder: str) -> None:
    """A spawned rank for the supervisor's tests: rank 1 makes a folder under a file (NotADirectoryError), rank 0
    waits for a message that never comes, until the supervisor stops it."""
    if rank == 1:
        os.makedirs(os.path.join(folder, "in-the-way", "step-00000002"))
    else:
        signal.pause()
