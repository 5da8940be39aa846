"""Rank failures and checkpointing: expected (closed-form) cost of failures for each checkpoint policy.

Legend: S steps, L MoE layers, E logical experts, G GPUs. Times in seconds, MTBF in hours where named so.

Failures. Any GPU failing stops the synchronous job, so job failures arrive as a Poisson process of rate
1 / M, with M the job's MTBF: `--mtbf-hours` gives M directly; `--gpu-mtbf-hours` gives a per-GPU MTBF m and
M = m / G (G independent exponential lifetimes). "1-hour MTBF on 2,048 GPUs" is read as the job's MTBF (a
per-GPU MTBF of 1 hour would mean a job failure every 1.8 s). Everything below is an expected value, not a
random draw, so results are exact and reproducible.

Checkpoint sizes (models.ModelConfig):
  full     F = total_params x (weight_bytes + optimizer_bytes) (2 + 16 = 18 bytes/param for mixed-precision
           Adam): a snapshot every rank can restart from.
  hot      MoEtion-style sparse snapshot of one step: all dense state (dense_params x 18 bytes: attention,
           dense/shared MLPs, router and embeddings change every step) plus, per (step, MoE layer), the fewest
           most popular experts whose loads cover `hot_share` of the layer's assignments in the trace:
           H = dense_params x b + mean over steps of sum over layers n_hot x expert_params x b, b = 18.
Where checkpoints go (in memory, like Gemini and MoEtion): each GPU writes its 1/G shard to its host memory
over PCIe and a copy to a peer node's host memory over the NIC, pipelined, so the slower link bounds it:
  B = min(pcie, nics_per_node x nic / gpus_per_node) bytes/s per GPU (pcie alone on a single-node cluster).
Writing x bytes of checkpoint takes x / (G B).

Restart (SYMI). A failed rank takes its 1/G shard of every expert's optimizer state (and its share of
everything else) with it; the survivors roll back to the last consistent state from their own host memory,
the failed rank's shard is fetched from the peer copy: R = F / (G B) + restart_overhead_s (process relaunch,
communicator re-init; 0 by default). The placement itself is free: SYMI re-plans every iteration, so the
survivors' next placement simply leaves the failed rank's slots out and the weight send-out after the next
optimizer step fills them. Degraded running on G - 1 GPUs is not modelled (the step time T is kept).

Effective time ratio (useful training time / wall time). T: the policy's mean iteration time, U = iterations
to target x T (the failure-free time to target).
  full-K   Blocking checkpoint of F every K steps, C = F / (G B). First-order Young/Daly model (Young 1974,
           Daly 2006): a failure loses on average half a checkpoint period of work plus the restart,
               lost = K T / 2 + R,   ratio = (1 - lost / M) / (1 + C / (K T)),
           (wall W solves W = U + U C / (K T) + (W / M) lost). ratio 0 when lost >= M: the job never advances.
  sparse   Every step, the hot snapshot of the state after step i is copied while step i+1 runs (overlapped,
           as MoEtion does): c = H / (G B); the step stretches to T' = max(T, c). A blocking full snapshot
           every K_full steps refreshes the cold experts. A failure at a uniform time in a step recovers to
           step i if that step's copy has finished (it takes c from the start of the step), else to step i-1:
               lost = T' / 2 + c + R,   ratio = (1 - lost / M) / (T' / T + C / (K_full T)).
           The recovered state is consistent for the dense state and the hot experts; the cold experts (a
           share 1 - hot_share of the assignments, and any expert Adam's momentum still moves) come back from
           their own last snapshot, up to K_full steps stale: an accuracy cost MoEtion accepts, not time. The
           executor implements this mode (symi_exec/snapshots.py; its hot set covers hot_share of the tokens
           each expert processed since its last snapshot, so the hot set here, per step, is an approximation).
  none     No checkpoint: every failure restarts from step 0. The exact expected wall time of a job of U
           seconds of work with restarts from scratch after exponential failures is
               W = (M + R) (e^(U/M) - 1),   ratio = U / W,
           and the expected lost work per failure (progress at the failure, given it happens before the end,
           plus the restart) is lost = M + R - U / (e^(U/M) - 1).
Reported: effective_time_ratio, lost_work_s_per_failure, checkpoint_bytes_per_step (F / K, H + F / K_full, 0),
failures_per_day = 86400 / M, time_to_target_with_failures_s = U / ratio (inf when ratio is 0).
With sampled_runs > 0 also SAMPLED_COLUMNS: the same job with failures injected into sampled timelines
(failure_injection.py), a check of the closed form: it agrees where the checkpoint period is short against M and
for `none` (exact); with a period near M the first-order model is too pessimistic (e.g. deepseek-v3 on 2,048
GPUs, 1-hour MTBF, full-100: 0.43 closed form, 0.56 sampled).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from symi_sim.checks import check_non_negative_int, check_number, check_positive_int
from symi_sim.cluster import BYTES_PER_GBPS, Cluster
from symi_sim.failures.injection import Timeline, sample_wall_times
from symi_sim.models import ModelConfig

logger = logging.getLogger(__name__)

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
CHECKPOINT_MODES = ("none", "full-K", "sparse")
DEFAULT_CHECKPOINT = "full-100"
DEFAULT_SPARSE_FULL_EVERY = 100
DEFAULT_HOT_SHARE = 0.8
MAX_SAMPLED_RUNS = 100_000   # sampled job timelines: plenty for percentiles; more only costs minutes and memory
_SPEC = re.compile(r"^(none|full-(\d+)|sparse(?:-(\d+))?(?::hot=([0-9.eE+-]+))?)$")
FAILURE_COLUMNS = ("effective_time_ratio", "lost_work_s_per_failure", "checkpoint_bytes_per_step",
                   "failures_per_day", "time_to_target_with_failures_s")
SAMPLED_COLUMNS = ("sampled_effective_time_ratio", "sampled_ratio_stderr", "sampled_failures_per_run")


@dataclass(frozen=True)
class Checkpointing:
    """A checkpoint policy: mode "none", "full" (every `every_steps`) or "sparse" (hot snapshot every step, full
    snapshot every `every_steps`, hot experts covering `hot_share` of the assignments)."""

    mode: str
    every_steps: int = 0
    hot_share: float = 0.0

    @property
    def label(self) -> str:
        if self.mode == "none":
            return "none"
        if self.mode == "full":
            return f"full-{self.every_steps}"
        return f"sparse-{self.every_steps}:hot={self.hot_share:g}"


def parse_checkpoint(spec: str) -> Checkpointing:
    """`none`, `full-K` (K >= 1) or `sparse[-K_full][:hot=F]` (0 < F <= 1; defaults 100 and 0.8)."""
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"unknown checkpoint mode {spec!r}; choices: none, full-K, sparse[-K_full][:hot=F]")
    if match.group(1) == "none":
        return Checkpointing("none")
    if match.group(2) is not None:
        return Checkpointing("full", check_positive_int(int(match.group(2)), f"checkpoint {spec!r}: the interval"))
    every = DEFAULT_SPARSE_FULL_EVERY
    if match.group(3):
        every = check_positive_int(int(match.group(3)), f"checkpoint {spec!r}: the interval")
    hot_share = DEFAULT_HOT_SHARE
    if match.group(4) is not None:
        try:
            hot_share = float(match.group(4))
        except ValueError:
            raise ValueError(f"checkpoint {spec!r}: hot share must be a number in (0, 1]") from None
        check_number(hot_share, f"checkpoint {spec!r}: hot share", low=0, high=1, low_open=True)
    return Checkpointing("sparse", every, hot_share)


@dataclass(frozen=True)
class FailureModel:
    """Settings of `symi simulate --mtbf-hours / --gpu-mtbf-hours / --checkpoint` (exactly one MTBF)."""

    checkpoint: str = DEFAULT_CHECKPOINT
    mtbf_hours: float | None = None          # the job's MTBF
    gpu_mtbf_hours: float | None = None      # one GPU's MTBF (job MTBF = this / G)
    restart_overhead_s: float = 0.0
    sampled_runs: int = 0                    # > 0: also inject failures into this many sampled job timelines
    seed: int = 0                            # of the sampled failures

    def __post_init__(self) -> None:
        if (self.mtbf_hours is None) == (self.gpu_mtbf_hours is None):
            raise ValueError("give exactly one of the job's MTBF (--mtbf-hours) and one GPU's (--gpu-mtbf-hours)")
        for name in ("mtbf_hours", "gpu_mtbf_hours"):
            value = getattr(self, name)
            if value is not None:
                check_number(value, name.replace("_", " "), low=0, low_open=True)
        check_number(self.restart_overhead_s, "restart overhead", low=0)
        check_non_negative_int(self.sampled_runs, "the number of failure runs")
        if self.sampled_runs > MAX_SAMPLED_RUNS:
            raise ValueError(f"the number of failure runs (--failure-runs) is {self.sampled_runs}, more than the "
                             f"{MAX_SAMPLED_RUNS} sampled timelines a simulation may inject")
        parse_checkpoint(self.checkpoint)

    @property
    def columns(self) -> tuple[str, ...]:
        return FAILURE_COLUMNS + (SAMPLED_COLUMNS if self.sampled_runs else ())

    def job_mtbf_s(self, num_gpus: int) -> float:
        if self.mtbf_hours is not None:
            return float(self.mtbf_hours) * SECONDS_PER_HOUR
        return float(self.gpu_mtbf_hours) * SECONDS_PER_HOUR / num_gpus

    def describe(self, cluster: Cluster) -> dict[str, Any]:
        """What config.json records."""
        return {"checkpoint": parse_checkpoint(self.checkpoint).label, "mtbf_hours": self.mtbf_hours,
                "gpu_mtbf_hours": self.gpu_mtbf_hours, "job_mtbf_s": self.job_mtbf_s(cluster.num_gpus),
                "restart_overhead_s": self.restart_overhead_s, "sampled_runs": self.sampled_runs,
                "seed": self.seed,
                "checkpoint_bandwidth_bytes_per_s_per_gpu": checkpoint_bandwidth_bytes_per_s(cluster),
                "model": "expected value: Young/Daly first order (full, sparse), restart from scratch (none)"
                         + ("; checked by injected failures on sampled timelines" if self.sampled_runs else "")}


def checkpoint_bandwidth_bytes_per_s(cluster: Cluster) -> float:
    """B: per-GPU rate of writing checkpoint shards (host memory over PCIe, a peer node's over the NIC)."""
    pcie = cluster.pcie_gbps * BYTES_PER_GBPS
    if cluster.num_nodes == 1:
        return pcie
    return min(pcie, cluster.nics_per_node * cluster.nic_gbps * BYTES_PER_GBPS / cluster.gpus_per_node)


def state_bytes_per_param(model: ModelConfig) -> int:
    return model.weight_bytes + model.optimizer_bytes


def full_checkpoint_bytes(model: ModelConfig) -> float:
    """F: every weight and all optimizer state."""
    return float(model.total_params * state_bytes_per_param(model))


def hot_experts_SL(counts_SLE: np.ndarray, hot_share: float) -> np.ndarray:
    """[S, L] the fewest most popular experts whose loads cover `hot_share` of each (step, layer) (0 if idle)."""
    check_number(hot_share, "hot share", low=0, high=1, low_open=True)
    counts_SLE = np.asarray(counts_SLE, dtype=np.float64)
    if counts_SLE.ndim != 3:
        raise ValueError(f"counts must be [steps, layers, experts], got shape {counts_SLE.shape}")
    covered_SLE = np.cumsum(-np.sort(-counts_SLE, axis=2), axis=2)
    total_SL = covered_SLE[..., -1]
    needed_SL = (covered_SLE < hot_share * total_SL[..., None]).sum(axis=2) + 1
    return np.where(total_SL > 0, np.minimum(needed_SL, counts_SLE.shape[2]), 0)


def hot_snapshot_bytes(model: ModelConfig, counts_SLE: np.ndarray, hot_share: float) -> float:
    """H: dense state plus the hot experts' state, mean over the steps of `counts_SLE`."""
    per_param = state_bytes_per_param(model)
    hot_experts = float(hot_experts_SL(counts_SLE, hot_share).sum(axis=1).mean())
    return float(model.dense_params * per_param + hot_experts * model.expert_params * per_param)


def failure_costs(*, step_time_s: float, iterations_to_target: float, model: ModelConfig, cluster: Cluster,
                  counts_SLE: np.ndarray, failures: FailureModel) -> dict[str, float]:
    """The FAILURE_COLUMNS of one policy (see the module docstring for the formulas)."""
    check_number(step_time_s, "step time", low=0, low_open=True)
    if iterations_to_target != math.inf:   # inf: no token survives, the target is never reached
        check_number(iterations_to_target, "iterations to target", low=0)
    checkpoint = parse_checkpoint(failures.checkpoint)
    num_gpus = cluster.num_gpus
    mtbf_s = failures.job_mtbf_s(num_gpus)
    bandwidth = checkpoint_bandwidth_bytes_per_s(cluster)
    full_bytes = full_checkpoint_bytes(model)
    full_s = full_bytes / (num_gpus * bandwidth)
    restart_s = full_s + failures.restart_overhead_s
    useful_s = iterations_to_target * step_time_s
    stretched_s = hot_s = 0.0
    if checkpoint.mode == "none":
        bytes_per_step = 0.0
        ratio, lost_s = _restart_from_scratch(useful_s, mtbf_s, restart_s)
    elif checkpoint.mode == "full":
        bytes_per_step = full_bytes / checkpoint.every_steps
        lost_s = checkpoint.every_steps * step_time_s / 2 + restart_s
        ratio = (1 - lost_s / mtbf_s) / (1 + full_s / (checkpoint.every_steps * step_time_s))
    else:
        hot_bytes = hot_snapshot_bytes(model, counts_SLE, checkpoint.hot_share)
        bytes_per_step = hot_bytes + full_bytes / checkpoint.every_steps
        hot_s = hot_bytes / (num_gpus * bandwidth)
        stretched_s = max(step_time_s, hot_s)
        lost_s = stretched_s / 2 + hot_s + restart_s
        ratio = (1 - lost_s / mtbf_s) / (stretched_s / step_time_s + full_s / (checkpoint.every_steps * step_time_s))
    ratio = max(ratio, 0.0)
    with np.errstate(divide="ignore"):
        time_with_failures_s = float(np.divide(useful_s, ratio)) if useful_s > 0 else 0.0
    costs = {"effective_time_ratio": ratio, "lost_work_s_per_failure": lost_s,
             "checkpoint_bytes_per_step": bytes_per_step, "failures_per_day": SECONDS_PER_DAY / mtbf_s,
             "time_to_target_with_failures_s": time_with_failures_s}
    if failures.sampled_runs:
        timeline = Timeline(mode=checkpoint.mode, num_steps=math.ceil(iterations_to_target),
                            step_s=stretched_s if checkpoint.mode == "sparse" else step_time_s,
                            every_steps=checkpoint.every_steps, full_s=full_s,
                            hot_s=hot_s if checkpoint.mode == "sparse" else 0.0, restart_s=restart_s, mtbf_s=mtbf_s)
        costs.update(_sampled(timeline, timeline.num_steps * step_time_s, failures))
    return costs


def _sampled(timeline: Timeline, useful_s: float, failures: FailureModel) -> dict[str, float]:
    """SAMPLED_COLUMNS: useful time over the mean wall time of the sampled runs, its standard error (delta
    method), and the mean number of failures per run."""
    wall_R, failures_R = sample_wall_times(timeline, num_runs=failures.sampled_runs, seed=failures.seed)
    if useful_s == 0:
        return {"sampled_effective_time_ratio": 1.0, "sampled_ratio_stderr": 0.0, "sampled_failures_per_run": 0.0}
    mean_wall = float(wall_R.mean())
    if not math.isfinite(mean_wall):
        ratio, stderr = 0.0, 0.0
    else:
        ratio = useful_s / mean_wall
        stderr = ratio * float(wall_R.std(ddof=1)) / math.sqrt(len(wall_R)) / mean_wall if len(wall_R) > 1 else 0.0
    return {"sampled_effective_time_ratio": ratio, "sampled_ratio_stderr": stderr,
            "sampled_failures_per_run": float(failures_R.mean())}


def _restart_from_scratch(useful_s: float, mtbf_s: float, restart_s: float) -> tuple[float, float]:
    """(ratio, lost work per failure) of a job restarted from step 0 at every failure (exact expectations)."""
    if useful_s == 0:
        return 1.0, mtbf_s + restart_s
    exponent = useful_s / mtbf_s
    if exponent > 700:  # e^700 overflows a float: the job (in expectation) never finishes
        return 0.0, mtbf_s + restart_s
    failures = math.expm1(exponent)
    return useful_s / ((mtbf_s + restart_s) * failures), mtbf_s + restart_s - useful_s / failures


def add_failure_columns(summary: Any, *, model: ModelConfig, cluster: Cluster, counts_SLE: np.ndarray,
                        failures: FailureModel) -> Any:
    """`summary` (one row per policy, with mean_time_s and iterations_to_target) with FAILURE_COLUMNS added."""
    rows = [failure_costs(step_time_s=float(row.mean_time_s), iterations_to_target=float(row.iterations_to_target),
                          model=model, cluster=cluster, counts_SLE=counts_SLE, failures=failures)
            for row in summary.itertuples(index=False)]
    summary = summary.copy()
    for column in failures.columns:
        summary[column] = [row[column] for row in rows]
    return summary
