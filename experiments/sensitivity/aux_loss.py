"""The auxiliary-loss-coefficient axis of the sensitivity study: real training records the routing at each
coefficient, the simulator (experiments/sensitivity/study.py) replays each recording at the paper's configuration.

The aux-loss coefficient changes the routing itself, so unlike the other axes it cannot be varied in the simulator:
for every coefficient the executor's `tiny` model is trained (symi_exec.launch.launch, 4 local gloo ranks on CPU)
with the router counts recorded (record_trace), under policy `static` with no capacity limit (dropless), so that the
recorded routing is the model's own, shaped by no policy and no drops. The recording has the shape of the shipped
traces/recorded-tiny-e16-top1.parquet (2 MoE layers, 16 experts, top-1, 4 ranks x 4 slots, 4 sequences of 64
bytes per rank per step, seed 0, the shipped Wikipedia sample); only the coefficient, the step count and the
capacity limit differ. Every run sees the same batches.

Imported by study.py; torch is imported only where training happens.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.harness import say
from symi_sim.traces.format import LoadTrace, read_trace
from symi_sim.traces.stats import layer_stats

AXIS = "aux_loss_coef"
LABEL = "aux-loss coefficient (log scale)\n(in brackets: skew = busiest / mean expert load)"
COEFS = (1e-5, 1e-3, 1e-2, 1e-1)
QUICK_COEFS = (1e-5, 1e-1)
STEPS = 300
QUICK_STEPS = 20
NPROC = 4
TRAIN = {"model": "tiny", "num_experts": 16, "slots_per_rank": 4, "top_k": 1, "policy": "static",
         "capacity_factor": None, "batch_size": 4, "seed": 0, "log_interval": 10**6}


def run_name(coef: float) -> str:
    return f"aux-{coef:g}"


def record(coef: float, steps: int, out: Path) -> dict[str, Any]:
    """Train `steps` steps at aux-loss coefficient `coef` with the routing recorded; keep trace.parquet and
    metrics.csv in out/<run_name(coef)>/. Returns the run's facts (directory, wall time, final loss)."""
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch  # torch: imported only where training happens

    keep = out / run_name(coef)
    keep.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="symi-aux-") as tmp:
        run_dir = Path(tmp) / "run"
        launch(TrainConfig(out=str(run_dir), steps=steps, aux_loss_coef=coef, record_trace=True, **TRAIN), NPROC,
               log_level=logging.WARNING)
        for name in ("trace.parquet", "metrics.csv"):
            shutil.copy2(run_dir / name, keep / name)
    wall_s = time.perf_counter() - start
    return {"coef": coef, "dir": keep, "steps": steps, "train_wall_s": round(wall_s, 1)}


def trace_skew(trace: LoadTrace) -> float:
    """Busiest expert / mean expert load, median over steps, averaged over the trace's layers
    (trace_stats.layer_stats' skew_median)."""
    return float(np.nanmean(layer_stats(trace)["skew_median"]))


def record_all(coefs: tuple[float, ...], steps: int, out: Path) -> list[dict[str, Any]]:
    """One recording per coefficient (out/<run_name>/trace.parquet), with each trace's skew."""
    runs = []
    for index, coef in enumerate(coefs):
        run = record(coef, steps, out)
        trace = read_trace(run["dir"] / "trace.parquet")
        run["skew"] = round(trace_skew(trace), 4)
        run["per_layer_skew"] = [round(float(v), 4) for v in layer_stats(trace)["skew_median"]]
        runs.append(run)
        say(f"{AXIS} [{index + 1}/{len(coefs)}] {coef:g}: trained {steps} steps in {run['train_wall_s']:.0f} s, "
            f"skew (busiest / mean expert) {run['skew']:.2f}")
    return runs
