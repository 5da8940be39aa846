"""What a training run reports: each step's metrics row and placement record, and the run directory.

Legend: L MoE layers, E experts, G ranks, S steps, P parameters of one expert.

Rank 0 writes the run directory as training goes: config.json at the start; metrics.csv (one row per step),
placements.jsonl (the placement each step ran with, "shares": "live" where its tokens split live, and the
assignments it dropped per layer and expert) and
(--record-trace) trace_counts.bin (int32 [S, L, E, G] counts per step, layer, expert and source rank, C order),
appended every step and written out every log interval (History.flush), whole lines only; at the end checkpoint.pt
(single-device state dict, loadable by model.GPT; streamed a few experts at a time, export.py), trace.parquet (from
trace_counts.bin, then removed) and, with checkpoints, checkpoints.csv and, when resumed, recovery.json
(checkpointing.py); the launcher (or rank 0 of a torchrun job) writes COMPLETE last, once every rank finished. A job
that fails keeps its partial directory (no COMPLETE): every row up to the last flush.

Memory and checkpoints do not grow with the steps: History holds the last step (a sparse snapshot's delta) and the
rows not yet written; a full checkpoint copies the streamed files as they are at its step (history_files).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from symi_exec.comm import BYTE_KINDS, Comm
from symi_exec.config import TrainConfig
from symi_exec.export import save_streamed
from symi_exec.model import GPT, TORCH_DTYPES, ModelConfig
from symi_exec.moe import ReplicatedMoE
from symi_exec.waits import hold_for_test
from symi_sim.outputs import RUN_COMPLETE, write_json
from symi_sim.placement import Placement, shares_json

METRICS, PLACEMENTS, TRACE_COUNTS = "metrics.csv", "placements.jsonl", "trace_counts.bin"
STREAMED = (METRICS, PLACEMENTS, TRACE_COUNTS)   # the files History appends to, in the run and checkpoint dirs
TRACE_DTYPE = np.int32


@dataclass(frozen=True)
class HistoryBase:
    """Where a resumed run's outputs start: the full checkpoint's copies of the streamed files (its steps), then
    the sparse snapshots' one-step deltas after it (History.delta's lists, one dict per snapshot)."""

    directory: Path
    deltas: list[dict[str, list[Any]]] = field(default_factory=list)


class History:
    """The run's per-step outputs, streamed into `out_dir` (rank 0; None on the other ranks: nothing is kept but
    the last step). Holds no per-step list: the last step's outputs (`delta`, a sparse snapshot's part) and the
    text of the steps not yet written (at most a log interval's)."""

    def __init__(self, out_dir: Path | None, *, record_trace: bool) -> None:
        self.out_dir, self.record_trace = out_dir, record_trace
        self.num_steps = 0                             # steps appended (restored ones included)
        self.num_written = 0                           # of them, written out to the files
        self._last: tuple[dict[str, Any], dict[str, Any], np.ndarray] | None = None
        self._pending = {name: io.BytesIO() for name in STREAMED}
        self._fieldnames: list[str] | None = None     # metrics.csv's columns, once known

    # ------------------------------------------------------------------ starting

    def start(self, resolved: dict[str, Any], base: HistoryBase | None = None) -> None:
        """Rank 0, before the first step: config.json (`resolved`), the streamed files (a resumed run's: the
        checkpoint's copies and the sparse deltas after it)."""
        if self.out_dir is None:
            return
        write_json(self.out_dir / "config.json", resolved)
        for name in self.file_names():
            source = base.directory / name if base is not None else None
            if source is not None and source.is_file():
                shutil.copyfile(source, self.out_dir / name)
            else:
                (self.out_dir / name).write_bytes(b"")
        if base is None:
            return
        with open(self.out_dir / METRICS, newline="") as f:
            header = next(csv.reader(f), None)
        self._fieldnames = header
        with open(self.out_dir / PLACEMENTS, "rb") as f:
            self.num_steps = self.num_written = sum(1 for _ in f)
        for delta in base.deltas:
            (row,), (record,) = delta["rows"], delta["step_records"]
            counts = delta["src_counts_SLEG"]
            self.append(row, record, counts[0] if counts else None)
        self.flush()

    def file_names(self) -> tuple[str, ...]:
        """The streamed files of this run (trace counts only with --record-trace)."""
        return STREAMED if self.record_trace else STREAMED[:2]

    # ------------------------------------------------------------------ every step

    def append(self, row: dict[str, Any], record: dict[str, Any], counts_LEG: np.ndarray | None) -> None:
        """One step's metrics row, placement record and [L, E, G] source counts (kept with --record-trace)."""
        if self.record_trace:
            if counts_LEG is None:
                raise ValueError("--record-trace: a step without trace counts")
            counts_LEG = np.asarray(counts_LEG, dtype=TRACE_DTYPE)
        else:
            counts_LEG = None
        self._last = (row, record, counts_LEG)
        self.num_steps += 1
        if self.out_dir is None:
            return
        text = io.StringIO()
        if self._fieldnames is None:
            self._fieldnames = list(row)
            csv.writer(text).writerow(self._fieldnames)
        csv.DictWriter(text, fieldnames=self._fieldnames).writerow(row)
        self._pending[METRICS].write(text.getvalue().encode())
        self._pending[PLACEMENTS].write((json.dumps(record) + "\n").encode())
        if counts_LEG is not None:
            self._pending[TRACE_COUNTS].write(np.ascontiguousarray(counts_LEG).tobytes())

    def flush(self) -> None:
        """Write the steps appended since the last flush: one write per file, of whole lines (a process killed
        outright leaves every file at a step boundary or before the write)."""
        if self.out_dir is None:
            return
        for name in self.file_names():
            data = self._pending[name].getvalue()
            if data:
                fd = os.open(self.out_dir / name, os.O_WRONLY | os.O_APPEND)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
            self._pending[name] = io.BytesIO()
        self.num_written = self.num_steps

    def delta(self) -> dict[str, list[Any]]:
        """The last step's outputs as a sparse snapshot stores them (one-element lists; no counts without
        --record-trace)."""
        if self._last is None:
            return {"rows": [], "step_records": [], "src_counts_SLEG": []}
        row, record, counts_LEG = self._last
        return {"rows": [row], "step_records": [record],
                "src_counts_SLEG": [] if counts_LEG is None else [counts_LEG.copy()]}

    # ------------------------------------------------------------------ checkpoints

    def file_sizes(self) -> dict[str, int]:
        """Rank 0, at a full checkpoint: every step so far written out, the streamed files' sizes (the prefix
        history_files copies while training appends on)."""
        assert self.out_dir is not None
        self.flush()
        return {name: (self.out_dir / name).stat().st_size for name in self.file_names()}

    def history_files(self, directory: Path, sizes: dict[str, int]) -> dict[str, str]:
        """Copy the first `sizes[name]` bytes of each streamed file into checkpoint `directory` (fsynced); returns
        name -> sha256 of each copy, for meta.json's checksums."""
        assert self.out_dir is not None
        return {name: copy_prefix(self.out_dir / name, directory / name, num_bytes)
                for name, num_bytes in sizes.items()}

    # ------------------------------------------------------------------ the end

    def trace_counts_SLEG(self, num_layers: int, num_experts: int, world_size: int) -> np.ndarray:
        """Rank 0, once flushed: the recorded counts, [S, L, E, G] (a read-only memory map of trace_counts.bin)."""
        assert self.out_dir is not None and self.record_trace
        path = self.out_dir / TRACE_COUNTS
        shape = (self.num_steps, num_layers, num_experts, world_size)
        expected = int(np.prod(shape)) * np.dtype(TRACE_DTYPE).itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{str(path)!r} holds {path.stat().st_size} bytes, not the {expected} of {shape} counts")
        if expected == 0:
            return np.zeros(shape, dtype=TRACE_DTYPE)
        return np.memmap(path, dtype=TRACE_DTYPE, mode="r", shape=shape)


def copy_prefix(source: Path, target: Path, num_bytes: int) -> str:
    """The first `num_bytes` of `source` into `target` (fsynced); returns their sha256."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        left = num_bytes
        while left > 0:
            block = src.read(min(left, 1 << 20))
            if not block:
                raise ValueError(f"{str(source)!r} is shorter than the {num_bytes} bytes a checkpoint copies")
            dst.write(block)
            digest.update(block)
            left -= len(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def written_steps(run_dir: Path) -> int:
    """The steps whose metrics rows a (partial) run directory holds: its whole lines after the header."""
    try:
        with open(run_dir / METRICS, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return 0
    return max(len(lines) - 2, 0)   # the header, the rows, and the empty text after the last newline


def mark_run_complete(run_dir: Path, num_steps: int) -> None:
    """COMPLETE, written last: the run directory is whole."""
    tmp = run_dir / f".{RUN_COMPLETE}.tmp"
    tmp.write_text(f"{num_steps}\n")
    os.replace(tmp, run_dir / RUN_COMPLETE)


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
    maxed = torch.tensor([step_s, *times.values(), *seconds["expert_forward"], peak_memory_mib(comm.device)],
                         dtype=torch.float64, device=comm.device)
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
    row["peak_memory_mib"] = maxed[-1]
    row.update({"time_expert_forward_s": sum(maxed[1 + len(times):-1]), "time_a2a_forward_s": sum(calls[:num_forward]),
                "time_a2a_backward_s": sum(calls[num_forward:])})
    row.update({f"time_{phase}_least_s": value
                for phase, value in zip(LEAST_PHASES, least[:len(LEAST_PHASES)], strict=True)})
    row.update({f"bytes_{kind}": int(value) for kind, value in zip(BYTE_KINDS, summed[2:], strict=True)})
    return row


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far, MiB: the CUDA caching allocator's peak allocation on a GPU, the peak
    resident set (VmHWM) on the CPU; NaN where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def step_record(step: int, *, placement: Placement, moe_layers: list[ReplicatedMoE], comm: Comm) -> dict[str, Any]:
    """The placement a step ran with and the assignments it dropped per layer and expert (summed over ranks)."""
    dropped_LE = torch.as_tensor(np.stack([moe.dropped_E for moe in moe_layers]), device=comm.device)
    if comm.world_size > 1:
        dist.all_reduce(dropped_LE)
    return {"step": step, "phy2log": placement.phy2log_LR.tolist(),
            "share": [[round(float(x), 12) for x in row] for row in placement.share_LR],
            **shares_json(placement.live_shares),
            "dropped": dropped_LE.cpu().tolist()}


def run_config(config: TrainConfig, cfg: ModelConfig, comm: Comm, *, tokens_per_step: int,
               expert_layout: str, slot_compute: str) -> dict[str, Any]:
    """config.json: the job's options, its model and where it ran (slot_compute: how its MoE layers compute their
    slots, moe.SLOT_COMPUTES resolved; "padded" computes every slot of a rank at that rank's largest slot's rows)."""
    return {"train": asdict(config), "model": cfg.to_dict(), "world_size": comm.world_size,
            "backend": dist.get_backend(), "device": str(comm.device), "data": str(config.data_path()),
            "tokens_per_step": tokens_per_step, "torch": torch.__version__, "expert_optimizer": expert_layout,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads_per_rank": torch.get_num_threads(), "slot_compute": slot_compute}


def write_run_dir(out_dir: Path, *, config: TrainConfig, cfg: ModelConfig, comm: Comm, model: GPT,
                  export_chunks: Iterable[tuple[int, torch.Tensor]], history: History, tokens_per_step: int,
                  final_placement: Placement) -> None:
    """The end of the run directory (config.json and the streamed files are there): the last rows written out,
    checkpoint.pt, streamed from `export_chunks` ((layer, [n, P] weights of its next n experts), rank 0's side of
    ExpertOptimizer.export_chunks, run to its end here) and (record_trace) trace.parquet, from trace_counts.bin,
    which goes."""
    history.flush()
    if history.num_steps != config.steps:
        raise ValueError(f"{str(out_dir / METRICS)!r} holds {history.num_steps} steps of {config.steps}")
    save_streamed(out_dir / "checkpoint.pt", dense=dense_state_dict(model), cfg=cfg, dtype=TORCH_DTYPES[config.dtype],
                  chunks=export_chunks, extra={"model_config": cfg.to_dict(), "train_config": asdict(config),
                                               "steps": config.steps, "placement": final_placement.to_json_dict()})
    hold_for_test("run-dir")   # after the export's collectives: the other ranks wait at the job's end
    if config.record_trace:
        from symi_sim.traces.format import LoadTrace, write_trace

        src_counts_SLEG = history.trace_counts_SLEG(cfg.num_layers, cfg.num_experts, comm.world_size)
        trace = LoadTrace(counts_SLE=src_counts_SLEG.sum(axis=3), top_k=cfg.top_k, tokens_per_step=tokens_per_step,
                          model=f"symi-exec-{config.model}-E{cfg.num_experts}", source="symi train",
                          provenance=f"recorded by symi train (policy {config.policy}, seed {config.seed}, data "
                                     f"{config.data_path().name}, {comm.world_size} ranks)",
                          src_counts_SLEG=np.array(src_counts_SLEG))
        write_trace(trace, out_dir / "trace.parquet")
        del src_counts_SLEG
        (out_dir / TRACE_COUNTS).unlink()


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
