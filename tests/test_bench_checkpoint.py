"""The checkpoint benchmark's --quick run: its table holds the hand-countable bytes and the recovery points that
the failure drill implies (full every 4 steps, failure when step 6 starts)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

# runs a study or benchmark (training ranks) as a subprocess: `make test-fast` leaves this module out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_table(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "benchmarks/bench_checkpoint.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, timeout=600)
    with open(tmp_path / "bench_checkpoint.csv") as f:
        rows = {row["mode"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"full-4", "sparse-4:hot=0.5"}
    meta = json.loads((tmp_path / "bench_checkpoint.json").read_text())["meta"]
    assert (meta["steps"], meta["every"], meta["fail_at"], meta["config"]["model"]) == (8, 4, 6, "tiny")

    # tiny: 2 layers x 8 experts of 2 x 64 x 128 parameters, 3 float32 tensors each (weights, two moments);
    # full-4 over 8 steps writes full checkpoints after steps 4 and 8
    full_expert_bytes = 2 * 8 * (2 * 64 * 128) * 3 * 4
    full, sparse = rows["full-4"], rows["sparse-4:hot=0.5"]
    assert float(full["expert_bytes_per_step_mb"]) == round(2 * full_expert_bytes / 8 / 1e6, 2)
    assert (int(full["recovered_to_step"]), int(full["lost_steps"])) == (4, 2)
    assert full["stale_experts"] == "0"
    # sparse: full checkpoints at 0, 4 and 8 plus six snapshots of fewer than all 16 experts; no step lost
    assert 0 < float(sparse["hot_experts_per_snapshot"]) < 16
    assert 3 * full_expert_bytes / 8 / 1e6 < float(sparse["expert_bytes_per_step_mb"]) < 9 * full_expert_bytes / 8 / 1e6
    assert (int(sparse["recovered_to_step"]), int(sparse["lost_steps"])) == (6, 0)
    assert float(sparse["restore_s"]) > 0 and float(sparse["recovery_s"]) == float(sparse["restore_s"])
