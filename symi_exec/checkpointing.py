"""The training loop's checkpoints: one Checkpointer per rank writes full checkpoints and sparse snapshots of the
run's state and restores a resumed run from them.

Legend: L MoE layers, E experts.

With checkpoint_every K, every rank writes its part of a resumable checkpoint every K steps and after the last
one (checkpoint.py); with sparse_hot_share F also one at step 0 and a sparse snapshot of the hot experts after
every other step (snapshots.py). `resume` continues from the latest complete checkpoint and the sparse snapshots
after it, on any number of ranks. Rank 0 then also writes checkpoints.csv (one row per write of this job: step,
kind, hot experts, bytes, expert bytes, the loop's blocked time, the write time) and, when resumed, recovery.json
(what was restored and lost, the damaged checkpoints passed over, the settings changed). overlap_checkpoints hands
the writes to a background thread (writer.py). No rank writes a checkpoint whose state is not finite on every rank.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from symi_exec import checkpoint, run_identity, snapshots
from symi_exec.comm import Comm
from symi_exec.config import Planner, TrainConfig
from symi_exec.data import lr_at
from symi_exec.model import GPT, TORCH_DTYPES, ModelConfig
from symi_exec.optim import ExpertOptimizer
from symi_exec.outputs import History, HistoryBase, dense_state_dict
from symi_exec.waits import wait_for_ranks
from symi_exec.writer import SnapshotWriter
from symi_sim.cluster import Cluster
from symi_sim.outputs import write_json
from symi_sim.placement import Placement

logger = logging.getLogger(__name__)


@dataclass
class Restored:
    """Where a resumed run continues: the next step, its placement, the last step's loads, where its outputs so far
    are (the full checkpoint's copies of the streamed files and the sparse deltas after it)."""

    step: int
    placement: Placement
    load_LE: np.ndarray
    history: HistoryBase


class Checkpointer:
    """This rank's checkpoint state: the writer, the sparse snapshots' tracker, the rows of checkpoints.csv and
    the recovery record, over the model and optimizers it saves and restores."""

    def __init__(self, *, config: TrainConfig, cfg: ModelConfig, comm: Comm, model: GPT,
                 dense_opt: torch.optim.Optimizer, expert_opt: ExpertOptimizer) -> None:
        self.config, self.cfg, self.comm = config, cfg, comm
        self.model, self.dense_opt, self.expert_opt = model, dense_opt, expert_opt
        self.root = config.checkpoint_root()
        self.writer = SnapshotWriter(comm.rank, comm.world_size, overlapped=config.overlap_checkpoints)
        self.tracker = snapshots.SnapshotTracker.fresh(cfg.num_layers, cfg.num_experts)
        self.writes: list[dict[str, Any]] = []        # checkpoints.csv: one row per write of this job
        self.recovery: dict[str, Any] | None = None    # recovery.json, when resumed
        self.last_written: Path | None = None          # the newest checkpoint or snapshot this job handed over
        self._rng_state: dict[str, Any] | None = None  # read by restore, applied by resume_rng
        self._num_waits = 0                            # wait_for_ranks names: every rank counts the same

    # ------------------------------------------------------------------ saving

    def save_start(self, step: int, *, placement: Placement, load_LE: np.ndarray, history: History) -> None:
        """Before the first step: the sparse chain needs a full state to start from in its own directory."""
        config = self.config
        if config.sparse_hot_share is not None and (config.resume is None or self.root != Path(config.resume)):
            self.save_full(step, placement=placement, load_LE=load_LE, history=history)

    def maybe_save(self, step: int, *, placement: Placement, load_LE: np.ndarray, history: History) -> None:
        """After step `step` ran with loads `load_LE` (`placement`: the next one): full checkpoint `step + 1`
        every K steps and after the last step, else (sparse_hot_share) a sparse snapshot."""
        config, done = self.config, step + 1
        self.tracker.record_step(load_LE)
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
            self.save_full(done, placement=placement, load_LE=load_LE, history=history)
            self.tracker = snapshots.SnapshotTracker.fresh(self.cfg.num_layers, self.cfg.num_experts)
        elif config.sparse_hot_share is not None:
            self.save_sparse(done, placement=placement, load_LE=load_LE, history=history)

    def save_full(self, step: int, *, placement: Placement, load_LE: np.ndarray, history: History) -> None:
        """Every rank writes its file of full checkpoint `step` (the state after `step` steps); once complete,
        rank 0 drops the sparse snapshots it supersedes."""
        # a blocking write saves the live tensors (nothing changes them until it returns); an overlapped one copies
        expert_state = self.expert_opt.state_dict(clone=self.writer.overlapped)
        self._write(checkpoint.step_dir(self.root, step), step, "full", expert_state, placement, load_LE,
                    history=history)

    def save_sparse(self, step: int, *, placement: Placement, load_LE: np.ndarray, history: History) -> None:
        """Every rank writes its file of sparse snapshot `step`: the hot experts the tracker picks (snapshots.py)."""
        mask_LE = snapshots.hot_mask_LE(self.tracker.unsaved_LE, self.tracker.age_LE, self.config.sparse_hot_share)
        self.tracker.mark_saved(mask_LE)
        self._write(snapshots.sparse_dir(self.root, step), step, "sparse", self.expert_opt.hot_state_dict(mask_LE),
                    placement, load_LE, history_delta=history.delta(), tracker=self.tracker.state(),
                    hot_keys=[(int(layer), int(e)) for layer, e in zip(*np.nonzero(mask_LE), strict=True)])

    def _write(self, directory: Path, step: int, kind: str, expert_state: dict[str, Any], placement: Placement,
               load_LE: np.ndarray, history: History | None = None, **head: Any) -> None:
        """Full checkpoints and sparse snapshots alike: rank 0 prepares `directory`; every rank hands its state
        (rank 0: plus the dense state, the next placement, the loads and `head`) to its writer (writer.py), rank 0
        with the step that writes meta.json and COMPLETE once every file is in place (a full checkpoint's: after
        copying the run's streamed files as they are at this step, `history`, whose checksums meta.json lists
        with the rank files'). Adds the checkpoints.csv row: bytes and expert_bytes summed over ranks, blocked_s
        (the loop's wait), write_s (the write itself)."""
        config, cfg, comm = self.config, self.cfg, self.comm
        start = time.perf_counter()
        self.wait()   # one write in flight: this directory is prepared only after the previous one completed
        self._check_finite(step, expert_state)
        if comm.rank == 0:
            checkpoint.prepare_dir(directory)
        if comm.world_size > 1:
            dist.barrier()
        state: dict[str, Any] = {"step": step, "rank": comm.rank, "world_size": comm.world_size,
                                 "rng": _rng_state(),
                                 ("expert_optimizer" if kind == "full" else "hot_experts"): expert_state}
        if comm.rank == 0:
            # dense parameters and their optimizer are the same on every rank (data parallel): stored once;
            # copies, since the loop updates them in place while an overlapped write may still run
            state.update(dense=dense_state_dict(self.model), dense_optimizer=copy.deepcopy(self.dense_opt.state_dict()),
                         phy2log_LR=placement.phy2log_LR.copy(), share_LR=placement.share_LR.copy(),
                         live_shares=placement.live_shares,
                         load_LE=np.asarray(load_LE, dtype=np.float64).copy(), **head)
        num_hot = len(head["hot_keys"]) if kind == "sparse" else cfg.num_layers * cfg.num_experts
        record: dict[str, Any] = {"step": step, "kind": kind, "hot_experts": num_hot, "bytes": None,
                                  "expert_bytes": None, "blocked_s": None, "write_s": None}
        finish = None
        if comm.rank == 0:
            sizes = history.file_sizes() if history is not None else {}

            def finish(num_bytes: int, num_expert_bytes: int, checksums: list[str]) -> None:
                files = {checkpoint.rank_file(directory, rank).name: sha256 for rank, sha256 in enumerate(checksums)}
                if history is not None:
                    files.update(history.history_files(directory, sizes))
                meta = {"step": step, "kind": kind, "run_id": config.run_id,
                        "settings": run_identity.settings(config, comm.world_size), "world_size": comm.world_size,
                        "slots_per_rank": config.slots_per_rank, "policy": config.policy, "dtype": config.dtype,
                        "model": cfg.to_dict(), "expert_optimizer": expert_state["layout"],
                        "next_lr": lr_at(step, config), "bytes": num_bytes, "expert_bytes": num_expert_bytes,
                        "hot_experts": num_hot, "placement": placement.to_json_dict(),
                        "trace_counts": config.record_trace, "files": files}
                checkpoint.mark_complete(directory, meta)
                record.update(bytes=num_bytes, expert_bytes=num_expert_bytes)
                if kind == "full":
                    snapshots.prune_sparse(directory.parent, step)
                    if config.keep_checkpoints:
                        checkpoint.keep_latest(directory.parent, config.keep_checkpoints, run_id=config.run_id)
                logger.info("%s snapshot %s: %d bytes in %.3f s", kind, directory, num_bytes,
                            time.perf_counter() - start)

        self.writer.write(directory, state, _tensor_bytes(expert_state), finish, record)
        if not self.writer.overlapped:
            self._meet()   # rank 0 writes the most: the next step's collectives start once it is done
        self.last_written = directory
        record["blocked_s"] = time.perf_counter() - start
        self.writes.append(record)   # write_s (and on rank 0 the bytes) filled in once the write is done

    def _check_finite(self, step: int, expert_state: dict[str, Any]) -> None:
        """ValueError on every rank (one all-reduce: all agree) when any rank's state to save is not finite."""
        bad = not (_all_finite(expert_state) and all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))
        flag = torch.tensor([float(bad)], device=self.comm.device)
        if self.comm.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise ValueError(f"the model's state is not finite after step {step} (lower --lr?): training stopped "
                             f"on every rank without saving it; last good checkpoint: {self.last_complete()}")

    def last_complete(self) -> str:
        """The newest checkpoint or snapshot this job wrote, for messages (its write has completed)."""
        return str(self.last_written) if self.last_written is not None else "none written by this job"

    def wait(self) -> None:
        """Until the write in flight is done on every rank (every rank calls this at the same point; no deadline:
        rank 0's write, the largest, may take longer than the collective timeout)."""
        self.writer.wait()
        self._meet()

    def _meet(self) -> None:
        self._num_waits += 1
        wait_for_ranks(self.comm.store, f"checkpoint-{self._num_waits}", rank=self.comm.rank,
                       world_size=self.comm.world_size)

    def write_records(self, out_dir: Path) -> None:
        """checkpoints.csv (when this job wrote any) and recovery.json (when resumed) into the run directory."""
        if self.writes:
            with open(out_dir / "checkpoints.csv", "w", newline="") as f:
                table = csv.DictWriter(f, fieldnames=list(self.writes[0]))
                table.writeheader()
                table.writerows(self.writes)
        if self.recovery is not None:
            write_json(out_dir / "recovery.json", self.recovery)
            # config.json (written before) says which settings the resume changed and where it continued from
            resolved = json.loads((out_dir / "config.json").read_text())
            resolved["resumed_from"] = {k: self.recovery[k] for k in ("checkpoint", "step", "config_changes")}
            write_json(out_dir / "config.json", resolved)

    # ------------------------------------------------------------------ restoring

    def restore(self, *, cluster: Cluster, planner: Planner) -> Restored:
        """Load the latest complete checkpoint of config.resume and the sparse snapshots after it into this rank
        (model, optimizers, tracker; the RNG state waits for resume_rng)."""
        config, cfg, comm = self.config, self.cfg, self.comm
        assert config.resume is not None
        start = time.perf_counter()
        recovered = snapshots.recover(config.resume, cfg.num_layers, cfg.num_experts, rank=comm.rank)
        meta, head, step = recovered.meta, recovered.head, recovered.step
        changes = {k: v for k, v in run_identity.settings(config, comm.world_size).items()
                   if meta["settings"].get(k) != v}
        device, dtype = comm.device, TORCH_DTYPES[config.dtype]
        missing, unexpected = self.model.load_state_dict(
            {k: v.to(device=device, dtype=dtype) for k, v in head["dense"].items()}, strict=False)
        assert not unexpected and all(k.endswith("slot_weights_SP") for k in missing), (missing, unexpected)
        # a copy: the loaded tensors are memory-mapped from the checkpoint file
        self.dense_opt.load_state_dict(copy.deepcopy(head["dense_optimizer"]))
        if (meta["world_size"], meta["slots_per_rank"], meta["settings"]["policy"],
                meta["settings"]["policy_options"]) == (comm.world_size, config.slots_per_rank, config.policy,
                                                        json.loads(json.dumps(config.policy_options))):
            # checkpoints written before live shares existed lack the flag: planned shares
            placement = Placement(head["phy2log_LR"], head["share_LR"], cfg.num_experts,
                                  live_shares=bool(head.get("live_shares", False)))
        else:
            # another cluster shape or policy: the policy re-places from the last step's loads (SYMI: at no extra
            # cost)
            placement = planner(step - 1, head["load_LE"], cluster, None)
            placement.validate(cluster, num_layers=cfg.num_layers)
        self.expert_opt.load_state(recovered.experts, placement)   # reads only this rank's part
        self._rng_state = recovered.rng
        history = HistoryBase(recovered.full_dir, recovered.history_deltas)
        if comm.world_size > 1:
            dist.barrier()   # every rank has read the resume point (and passed over the damaged ones after it)
        if comm.rank == 0 and run_identity.continues_in_place(config):
            run_identity.drop_newer(self.root, step)
        self.tracker = tracker = recovered.tracker
        self.last_written = recovered.chain[-1] if recovered.chain else recovered.full_dir
        self.recovery = {"checkpoint": str(recovered.full_dir), "sparse_snapshots": len(recovered.chain),
                         "step": step, "world_size_then": meta["world_size"], "world_size_now": comm.world_size,
                         "batch_size_now": config.batch_size,
                         "damaged": [{"checkpoint": str(d), "reason": reason} for d, reason in recovered.damaged],
                         "config_changes": {k: [meta["settings"].get(k), v] for k, v in changes.items()},
                         "stale_experts": int((tracker.age_LE > 0).sum()),
                         "max_staleness_steps": int(tracker.age_LE.max()),
                         "lost_expert_assignments": float(tracker.unsaved_LE.sum()),
                         "restore_s": time.perf_counter() - start}
        if comm.rank == 0:
            logger.info("resumed from %s + %d sparse snapshots (step %d, %d ranks then, %d now with %d sequences "
                        "each; %d stale experts)", recovered.full_dir, len(recovered.chain), step, meta["world_size"],
                        comm.world_size, config.batch_size, self.recovery["stale_experts"])
        return Restored(step, placement, np.asarray(head["load_LE"], dtype=np.float64), history)

    def resume_rng(self) -> None:
        """Continue this rank's random streams from the checkpoint (a rank the checkpoint had not: fresh ones)."""
        if self._rng_state is not None:
            _set_rng_state(self._rng_state)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002 (the global one)
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 (the global one, which library code may draw from)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _all_finite(state: Any) -> bool:
    """Every floating-point tensor in a nested state (dicts, lists, tuples) finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, list | tuple):
        return all(_all_finite(v) for v in state)
    return not isinstance(state, float) or math.isfinite(state)


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(v) for v in state)
    return 0
