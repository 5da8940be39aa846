"""What a training run reports: each step's metrics row and placement record, and the run directory.

Legend: L MoE layers, E experts, G ranks, S steps, P parameters of one expert.

Rank 0 writes the run directory: config.json, metrics.csv (one row per step), placements.jsonl (the placement
each step ran with and the assignments it dropped per layer and expert), checkpoint.pt (single-device state dict,
loadable by model.GPT), trace.parquet (--record-trace: counts per step, layer, expert and source rank); with
checkpoints also checkpoints.csv and, when resumed, recovery.json (checkpointing.py).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from symi_exec.comm import BYTE_KINDS, Comm
from symi_exec.config import TrainConfig
from symi_exec.model import GPT, ModelConfig
from symi_exec.moe import ReplicatedMoE
from symi_sim.outputs import write_json
from symi_sim.placement import Placement


@dataclass
class History:
    """Every step's outputs so far, the run directory's content; checkpoints carry it, so a resumed run writes
    the whole run's files."""

    rows: list[dict[str, Any]] = field(default_factory=list)            # metrics.csv
    step_records: list[dict[str, Any]] = field(default_factory=list)    # placements.jsonl
    src_counts_SLEG: list[np.ndarray] = field(default_factory=list)     # trace.parquet: [L, E, G] per step

    def append(self, row: dict[str, Any], record: dict[str, Any], counts_LEG: np.ndarray) -> None:
        self.rows.append(row)
        self.step_records.append(record)
        self.src_counts_SLEG.append(counts_LEG)

    def to_dict(self, *, last_only: bool = False) -> dict[str, list[Any]]:
        """Copies of the lists as a checkpoint stores them (a sparse snapshot: the last step only)."""
        lists = {"rows": self.rows, "step_records": self.step_records, "src_counts_SLEG": self.src_counts_SLEG}
        return {name: value[-1:] if last_only else list(value) for name, value in lists.items()}

    @classmethod
    def from_dict(cls, history: dict[str, list[Any]]) -> History:
        return cls(history["rows"], history["step_records"], history["src_counts_SLEG"])


LEAST_PHASES = ("dense_grad", "expert_grad", "send_out")   # the loop's communication phases


def step_metrics(step: int, *, loss: torch.Tensor, lr: float, grad_norm: float, step_s: float,
                 times: dict[str, float], moe_layers: list[ReplicatedMoE], placement: Placement,
                 next_placement: Placement, tokens_per_step: int, comm: Comm) -> dict[str, Any]:
    """One metrics row, the same on every rank: loss averaged, bytes and drops summed, times (per phase, in
    the loop's order) maxed over ranks. Within the phases, call by call (each layer's): expert compute maxed over
    ranks (the slowest gates the layer), each all-to-all the least over ranks (the rank that came last waited for no
    one: the transfer), then summed; the communication phases also as their least over ranks
    (time_<phase>_least_s: without the wait for a late rank)."""
    bytes_by_kind = comm.take_bytes()
    seconds = comm.take_seconds()
    dropped_E = np.stack([moe.dropped_E for moe in moe_layers]).sum(axis=0)
    summed = torch.tensor([float(loss.detach()), float(dropped_E.sum()), *bytes_by_kind.values()],
                          dtype=torch.float64, device=comm.device)
    maxed = torch.tensor([step_s, *times.values(), *seconds["expert_forward"]], dtype=torch.float64,
                         device=comm.device)
    num_forward = len(seconds["a2a_forward"])
    least = torch.tensor([*(times[phase] for phase in LEAST_PHASES), *seconds["a2a_forward"],
                          *seconds["a2a_backward"]], dtype=torch.float64, device=comm.device)
    if comm.world_size > 1:
        dist.all_reduce(summed)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
    summed, maxed, least = summed.cpu().tolist(), maxed.cpu().tolist(), least.cpu().tolist()
    calls = least[len(LEAST_PHASES):]
    num_assignments = sum(int(moe.count_GE.sum()) for moe in moe_layers)
    imbalance_L = [float(moe.plan.routing.imbalance_L[0]) for moe in moe_layers]
    row: dict[str, Any] = {
        "step": step,
        "loss": summed[0] / comm.world_size,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_s": maxed[0],
        "tokens_per_s": tokens_per_step / maxed[0] if maxed[0] > 0 else float("nan"),
        "dropped_fraction": summed[1] / max(num_assignments, 1),
        "imbalance": float(np.mean(imbalance_L)),
        "replica_moves": int(next_placement.replica_moves(placement).sum()),
    }
    row.update({f"time_{phase}_s": value for phase, value in zip(times, maxed[1:1 + len(times)], strict=True)})
    row.update({"time_expert_forward_s": sum(maxed[1 + len(times):]), "time_a2a_forward_s": sum(calls[:num_forward]),
                "time_a2a_backward_s": sum(calls[num_forward:])})
    row.update({f"time_{phase}_least_s": value
                for phase, value in zip(LEAST_PHASES, least[:len(LEAST_PHASES)], strict=True)})
    row.update({f"bytes_{kind}": int(value) for kind, value in zip(BYTE_KINDS, summed[2:], strict=True)})
    return row


def step_record(step: int, *, placement: Placement, moe_layers: list[ReplicatedMoE], comm: Comm) -> dict[str, Any]:
    """The placement a step ran with and the assignments it dropped per layer and expert (summed over ranks)."""
    dropped_LE = torch.as_tensor(np.stack([moe.dropped_E for moe in moe_layers]), device=comm.device)
    if comm.world_size > 1:
        dist.all_reduce(dropped_LE)
    return {"step": step, "phy2log": placement.phy2log_LR.tolist(),
            "share": [[round(float(x), 12) for x in row] for row in placement.share_LR],
            "dropped": dropped_LE.cpu().tolist()}


def write_run_dir(out_dir: Path, *, config: TrainConfig, cfg: ModelConfig, comm: Comm, model: GPT,
                  full_LEP: list[torch.Tensor], history: History, tokens_per_step: int, final_placement: Placement,
                  expert_layout: str) -> None:
    """config.json, metrics.csv, placements.jsonl, checkpoint.pt and (record_trace) trace.parquet."""
    resolved = {"train": asdict(config), "model": cfg.to_dict(), "world_size": comm.world_size,
                "backend": dist.get_backend(), "device": str(comm.device), "data": str(config.data_path()),
                "tokens_per_step": tokens_per_step, "torch": torch.__version__, "expert_optimizer": expert_layout,
                "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "threads_per_rank": torch.get_num_threads()}
    write_json(out_dir / "config.json", resolved)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history.rows[0]))
        writer.writeheader()
        writer.writerows(history.rows)
    with open(out_dir / "placements.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history.step_records)
    torch.save({"model": single_device_state_dict(model, full_LEP, cfg), "model_config": cfg.to_dict(),
                "train_config": asdict(config), "steps": config.steps,
                "placement": final_placement.to_json_dict()}, out_dir / "checkpoint.pt")
    if config.record_trace:
        from symi_sim.traces.format import LoadTrace, write_trace

        src_counts_SLEG = np.stack(history.src_counts_SLEG)
        trace = LoadTrace(counts_SLE=src_counts_SLEG.sum(axis=3), top_k=cfg.top_k, tokens_per_step=tokens_per_step,
                          model=f"symi-exec-{config.model}-E{cfg.num_experts}", source="symi train",
                          provenance=f"recorded by symi train (policy {config.policy}, seed {config.seed}, data "
                                     f"{config.data_path().name}, {comm.world_size} ranks)",
                          src_counts_SLEG=src_counts_SLEG)
        write_trace(trace, out_dir / "trace.parquet")


def dense_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """CPU copies of the model's dense (non-expert) weights: every rank holds the same ones (data parallel)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith("slot_weights_SP")}


def single_device_state_dict(model: GPT, full_LEP: list[torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict a single-device GPT(cfg) loads: dense weights plus every expert's full weights."""
    state = dense_state_dict(model)
    num_dff = cfg.d_model * cfg.d_ff
    for layer, flat_EP in enumerate(full_LEP):
        flat_EP = flat_EP.detach().cpu()
        state[f"blocks.{layer}.moe.experts.w_in_EDF"] = flat_EP[:, :num_dff].reshape(-1, cfg.d_model, cfg.d_ff).clone()
        state[f"blocks.{layer}.moe.experts.w_out_EFD"] = flat_EP[:, num_dff:].reshape(-1, cfg.d_ff, cfg.d_model).clone()
    return state
