"""Reading `symi train` run directories for calibration: per-phase times and the tokens each slot computed.

Legend: L MoE layers, E experts, G ranks, S slots per rank, R slots (G x S), rows = (step, layer) pairs.

A run directory (symi_exec/outputs.py) holds config.json (the TrainConfig under "train", the model under "model",
"world_size", "tokens_per_step", "expert_optimizer"), metrics.csv (one row per step: time_<phase>_s, bytes_<kind>),
placements.jsonl (per step: phy2log [L][R], share [L][R], dropped [L][E], and "shares": "live" where the policy split
each step's tokens live, symi_sim.placement) and, after --record-trace, trace.parquet.

Times are medians over the steps after a warm-up (the first steps pay for allocation and caches); a phase is the
longest over the ranks (a late rank's wait included). Runs of this version also time parts of the phases
(INNER_COLUMNS: the forward's expert compute, the all-to-alls of the forward and of the backward, the dense
all-reduce, the planning and the whole step) and the communication phases as their shortest over the ranks
(`*_least`: the rank that arrived last waited for no one); older runs lack them (NaN here). The executor
computes only the tokens a slot serves (no padding, in either capacity mode), so a row's expert work is the served
tokens of every slot: with trace.parquet exactly what the executor computed (symi_sim.routing.route of the step's
loads through its placement, the function the executor routes with); without it estimated from the drops: in slot
mode an expert that dropped tokens filled its slots' buffers and the other served assignments spread evenly over
the other slots, otherwise all served assignments spread evenly over all slots.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from symi_sim.checks import check_choice
from symi_sim.cluster import Cluster
from symi_sim.models import ModelConfig
from symi_sim.outputs import check_complete_run
from symi_sim.placement import Placement, read_shares
from symi_sim.policies.base import OPTIMIZER_LAYOUTS
from symi_sim.routing import CAPACITY_MODES, SLOT_COMPUTE_MODES, route
from symi_sim.simulator.costs import alltoall_bytes, optimizer_params_per_gpu
from symi_sim.traces.format import read_trace

DEFAULT_WARMUP_STEPS = 3
PHASE_COLUMNS = {"forward": "time_forward_s", "backward": "time_backward_s", "optimizer": "time_optimizer_s",
                 "expert_grad": "time_expert_grad_s", "send_out": "time_send_out_s"}
BYTE_COLUMNS = {"expert_grad": ("bytes_replica_grad_sync", "bytes_grad_collection"),
                "send_out": ("bytes_weight_sendout", "bytes_optimizer_state")}
INNER_COLUMNS = {"expert_forward": "time_expert_forward_s", "a2a_forward": "time_a2a_forward_s",
                 "a2a_backward": "time_a2a_backward_s", "dense_grad": "time_dense_grad_s", "plan": "time_plan_s",
                 "step": "step_s", "dense_grad_least": "time_dense_grad_least_s",
                 "expert_grad_least": "time_expert_grad_least_s", "send_out_least": "time_send_out_least_s"}
DTYPE_BYTES = {"float32": 4, "float64": 8}


@dataclass(frozen=True)
class RunData:
    """What calibration needs of one run, over its steps after the warm-up."""

    path: Path
    model: ModelConfig            # the executor's model in the simulator's terms (FLOPs, parameters, bytes)
    cluster: Cluster
    tokens_row_GS: np.ndarray     # [rows, G, S] rows each slot's GEMMs computed (padded: the rank's largest slot's)
    link_s_row: np.ndarray        # [rows] one all-to-all's busiest link at the cluster's full bandwidth
    dense_flops_layer: float      # dense FLOPs of one rank in one layer
    state_bytes_S: np.ndarray     # [steps] optimizer state bytes of the busiest rank
    placements: list[Placement]   # [steps] the placement of every step
    next_placement: Placement     # what the last step sent its weights out to (its own placement: not recorded)
    layout: str                   # the expert optimizer's layout (policies.base.OPTIMIZER_LAYOUTS)
    cpu_share: float              # share of a core each rank's thread gets (< 1: more threads than cores; 1: GPUs)
    measured: dict[str, float]    # phase -> median seconds (PHASE_COLUMNS, INNER_COLUMNS: NaN where missing)
    phase_bytes: dict[str, float]  # expert_grad / send_out -> median bytes sent by all ranks
    exact_tokens: bool            # from trace.parquet (else estimated from the drops)


def _field(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"{where}: missing field {key!r}")
    return mapping[key]


def _read_config(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where} cannot be parsed: {exc}") from None
    train, model = _field(data, "train", where), _field(data, "model", where)
    out = {name: _field(train, name, f"{where} [train]") for name in
           ("model", "slots_per_rank", "capacity_factor", "capacity_mode", "batch_size", "dtype")}
    out.update({name: _field(model, name, f"{where} [model]") for name in
                ("num_layers", "d_model", "d_ff", "seq_len", "num_experts", "top_k", "vocab_size")})
    out.update({name: _field(data, name, where) for name in ("world_size", "tokens_per_step", "expert_optimizer")})
    out.update({name: data.get(name) for name in ("device", "cpu_cores", "threads_per_rank", "slot_compute")})
    if out["slot_compute"] is not None:   # runs before the executor recorded it computed each slot's own rows
        check_choice(out["slot_compute"], f"{where}: slot_compute", SLOT_COMPUTE_MODES)
    check_choice(out["dtype"], f"{where}: dtype", DTYPE_BYTES)
    check_choice(out["capacity_mode"], f"{where}: capacity_mode", CAPACITY_MODES)
    check_choice(out["expert_optimizer"], f"{where}: expert_optimizer", OPTIMIZER_LAYOUTS)
    return out


def executor_model(config: dict[str, Any], *, where: str) -> ModelConfig:
    """The executor's model (every block's MLP an MoE layer, GELU, tied embeddings, AdamW moments in `dtype`)."""
    dtype_bytes = DTYPE_BYTES[config["dtype"]]
    try:
        return ModelConfig(
            name=f"executor-{config['model']}", num_layers=config["num_layers"], num_moe_layers=config["num_layers"],
            d_model=config["d_model"], d_ff=config["d_ff"], expert_d_ff=config["d_ff"],
            vocab_size=config["vocab_size"], num_experts=config["num_experts"], top_k=config["top_k"],
            seq_len=config["seq_len"], global_batch=config["world_size"] * config["batch_size"],
            weight_bytes=dtype_bytes, grad_bytes=dtype_bytes, activation_bytes=dtype_bytes,
            optimizer_bytes=2 * dtype_bytes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _read_metrics(path: Path, warmup_steps: int) -> pd.DataFrame:
    where = str(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"{where} is not a readable CSV file: {str(exc).strip().splitlines()[-1]}") from None
    needed = [*PHASE_COLUMNS.values(), *(c for columns in BYTE_COLUMNS.values() for c in columns)]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}")
    for column in [*needed, *(c for c in INNER_COLUMNS.values() if c in frame.columns)]:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}, data row {row + 1}: {column} must be a finite number >= 0, got "
                             f"{_shown(frame[column].iloc[row])!r}")
        frame[column] = values
    if len(frame) <= warmup_steps:
        raise ValueError(f"{where}: {len(frame)} step(s), none left after {warmup_steps} warm-up step(s)")
    return frame


def _read_placements(path: Path, *, num_steps: int, num_layers: int, num_experts: int,
                     num_slots: int) -> list[tuple[Placement, np.ndarray]]:
    """(placement, dropped_LE) of every step."""
    where = str(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from None
    if len(lines) != num_steps:
        raise ValueError(f"{where}: {len(lines)} record(s) for {num_steps} step(s) in metrics.csv")
    out = []
    for i, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            phy2log_LR = np.asarray(_field(record, "phy2log", f"{where} line {i}"), dtype=np.int64)
            share_LR = np.asarray(_field(record, "share", f"{where} line {i}"), dtype=np.float64)
            dropped_LE = np.asarray(_field(record, "dropped", f"{where} line {i}"), dtype=np.int64)
            if phy2log_LR.shape != (num_layers, num_slots) or dropped_LE.shape != (num_layers, num_experts):
                raise ValueError(f"phy2log {phy2log_LR.shape} / dropped {dropped_LE.shape}, expected "
                                 f"{(num_layers, num_slots)} / {(num_layers, num_experts)}")
            if (dropped_LE < 0).any():
                raise ValueError("negative dropped counts")
            out.append((Placement(phy2log_LR, share_LR, num_experts, live_shares=read_shares(record)), dropped_LE))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} line {i}: {str(exc).removeprefix(f'{where} line {i}: ')}") from None
    return out


def estimated_served_LR(dropped_LE: np.ndarray, phy2log_LR: np.ndarray, *, num_assignments: int,
                        capacity_factor: float | None, capacity_mode: str) -> np.ndarray:
    """[L, R] tokens per slot estimated from the drops alone (see the module docstring)."""
    num_slots = phy2log_LR.shape[1]
    served_L = num_assignments - dropped_LE.sum(axis=1)
    if capacity_factor is None or capacity_mode != "slot":
        return np.repeat((served_L / num_slots)[:, None], num_slots, axis=1)
    capacity = math.ceil(capacity_factor * num_assignments / num_slots)
    full_LR = np.take_along_axis(dropped_LE, phy2log_LR, axis=1) > 0
    others_L = (~full_LR).sum(axis=1)
    rest_L = (served_L - capacity * full_LR.sum(axis=1)) / np.maximum(others_L, 1)
    return np.where(full_LR, float(capacity), np.clip(rest_L, 0, capacity)[:, None])


def read_run(path: str | Path, *, warmup_steps: int = DEFAULT_WARMUP_STEPS, cluster: Cluster | None = None) -> RunData:
    """One run directory's RunData; `cluster` (default: one node of world_size ranks, as `symi train` spawns
    them) must have the run's ranks and slots. ValueError naming the file, row and field of any bad input."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} does not exist")
    check_complete_run(path)
    for name in ("metrics.csv", "config.json", "placements.jsonl"):
        if not (path / name).is_file():
            raise ValueError(f"run directory {str(path)!r} has no {name}")
    config = _read_config(path / "config.json")
    where = str(path / "config.json")
    model = executor_model(config, where=where)
    world_size, slots = config["world_size"], config["slots_per_rank"]
    if cluster is None:
        cluster = Cluster(name="executor", num_nodes=1, gpus_per_node=world_size, slots_per_gpu=slots)
    elif (cluster.num_gpus, cluster.slots_per_gpu) != (world_size, slots):
        raise ValueError(f"cluster {cluster.name!r} has {cluster.num_gpus} GPUs x {cluster.slots_per_gpu} slots, "
                         f"run {str(path)!r} ran {world_size} ranks x {slots} slots")
    frame = _read_metrics(path / "metrics.csv", warmup_steps)
    num_steps, num_layers, num_experts = len(frame), model.num_moe_layers, model.num_experts
    steps = _read_placements(path / "placements.jsonl", num_steps=num_steps, num_layers=num_layers,
                             num_experts=num_experts, num_slots=cluster.num_slots)
    capacity_factor, mode = config["capacity_factor"], config["capacity_mode"]
    num_assignments = config["tokens_per_step"] * model.top_k
    counts_SLE = None
    if (path / "trace.parquet").is_file():
        counts_SLE = read_trace(path / "trace.parquet").counts_SLE
        if counts_SLE.shape != (num_steps, num_layers, num_experts):
            raise ValueError(f"{path / 'trace.parquet'}: counts of shape {counts_SLE.shape}, the run has "
                             f"{(num_steps, num_layers, num_experts)} (steps, layers, experts)")
    served, state_bytes, placements = [], [], []
    for step in range(warmup_steps, num_steps):
        placement, dropped_LE = steps[step]
        placements.append(placement)
        if counts_SLE is not None:
            served.append(route(counts_SLE[step], placement, slots_per_gpu=slots, capacity_factor=capacity_factor,
                                capacity_mode=mode).served_LR)
        else:
            served.append(estimated_served_LR(dropped_LE, placement.phy2log_LR, num_assignments=num_assignments,
                                              capacity_factor=capacity_factor, capacity_mode=mode))
        expert_params = optimizer_params_per_gpu(placement.phy2log_LR, cluster, num_experts,
                                                 config["expert_optimizer"], model.expert_params).sum()
        state_bytes.append((expert_params + model.dense_params) * model.optimizer_bytes)
    served_row_GS = np.concatenate(served).astype(np.float64).reshape(-1, cluster.num_gpus, slots)
    link_s_row = alltoall_bytes(served_row_GS.sum(axis=2), cluster, model.d_model * model.activation_bytes
                                ).network_time_L(cluster.with_(link_latency_s=0.0))
    # "padded" (the executor's slot compute where no grouped GEMM kernel exists, e.g. every CPU run): one batched
    # matmul over S blocks of the rank's largest slot's rows
    tokens_row_GS = (np.broadcast_to(served_row_GS.max(axis=2, keepdims=True), served_row_GS.shape).copy()
                     if config["slot_compute"] == "padded" else served_row_GS)
    after = frame.iloc[warmup_steps:]
    measured = {phase: float(after[column].median()) if column in after.columns else math.nan
                for phase, column in {**PHASE_COLUMNS, **INNER_COLUMNS}.items()}
    for phase in ("forward", "backward", "optimizer"):
        if measured[phase] <= 0:
            raise ValueError(f"{path / 'metrics.csv'}: the median {PHASE_COLUMNS[phase]} after the warm-up is 0")
    return RunData(
        path=path, model=model, cluster=cluster, tokens_row_GS=tokens_row_GS, link_s_row=link_s_row,
        dense_flops_layer=model.tokens_per_step / cluster.num_gpus * model.dense_flops_per_token / num_layers,
        state_bytes_S=np.array(state_bytes, dtype=np.float64),
        placements=placements, next_placement=placements[-1], layout=config["expert_optimizer"],
        cpu_share=_cpu_share(config),
        measured=measured,
        phase_bytes={phase: float(after[list(columns)].sum(axis=1).median())
                     for phase, columns in BYTE_COLUMNS.items()},
        exact_tokens=counts_SLE is not None,
    )


def _cpu_share(config: dict[str, Any]) -> float:
    """The share of a core each rank's compute thread gets: ranks x threads on fewer cores time-share them (a CPU
    run of 4 ranks on 2 cores computes at half speed); 1 on GPUs and for runs that do not say."""
    cores, threads = config.get("cpu_cores"), config.get("threads_per_rank")
    if not str(config.get("device") or "cpu").startswith("cpu") or not isinstance(cores, int) \
            or not isinstance(threads, int):
        return 1.0
    return min(1.0, cores / max(config["world_size"] * threads, 1))


def _shown(value: object) -> object:
    """A cell as the user wrote it (numpy scalars as plain Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value
