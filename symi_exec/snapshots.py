"""Sparse popularity-aware snapshots (the MoEtion / MoC-System idea) between full checkpoints.

Legend: L MoE layers, E experts, P parameters of one expert (flat), G ranks.

With `sparse_hot_share` F, a job writes a full checkpoint (checkpoint.py) at step 0, every K steps and at the end,
and after every other step a sparse snapshot `sparse-NNNNNNNN/` holding:
  every rank   its RNG states and, for the hot experts only, its part of their optimizer state (SYMI layout: its
               1/G shard of their master weights and AdamW moments; group layout: its 1/r shard of the hot experts
               it holds; FlexMoE layout: the full state of the hot experts whose lowest holder it is);
  rank 0       the dense parameters and their AdamW state (they change every step), the next placement, the last
               step's loads, the snapshot bookkeeping (SnapshotTracker) and the metrics rows of the step just run.
Hot experts, per layer: the fewest experts, by tokens processed since their own last snapshot, that cover F of the
layer's unsaved tokens (ties: the longer unsaved first, then the lower expert id); F = 1 takes every expert, since
AdamW moves an expert even on steps it gets no token.

Recovery from the chain full(F0), sparse(F0+1), ..., sparse(t) (contiguous, all COMPLETE and intact) gives the
state after t steps: the dense state, placement and RNG exactly; every expert from its own latest snapshot, so a
cold expert comes back stale by the steps since it was last hot (at most K - 1): a consistent state of each expert
(weights and moments of the same step), not the uninterrupted run's. The updates lost are the `unsaved` tokens of
the tracker at t, reported in the run's recovery.json. F = 1 makes recovery exact.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from symi_exec import checkpoint
from symi_exec.checkpoint import MARKER, read_meta
from symi_sim.checks import check_number

SPARSE_PREFIX = "sparse-"


def hot_mask_LE(unsaved_LE: np.ndarray, age_LE: np.ndarray, hot_share: float) -> np.ndarray:
    """[L, E] bool: per layer, the fewest experts by unsaved tokens (ties: larger age, then lower id) covering
    `hot_share` of the layer's unsaved tokens; every expert when hot_share >= 1; none in a layer with no tokens."""
    check_number(hot_share, "sparse hot share", low=0, high=1, low_open=True)
    unsaved_LE = np.asarray(unsaved_LE, dtype=np.float64)
    if hot_share >= 1:
        return np.ones(unsaved_LE.shape, dtype=bool)
    num_layers, num_experts = unsaved_LE.shape
    mask_LE = np.zeros((num_layers, num_experts), dtype=bool)
    for layer in range(num_layers):
        total = unsaved_LE[layer].sum()
        if total <= 0:
            continue
        # lexsort: the last key is the primary one
        order = np.lexsort((np.arange(num_experts), -np.asarray(age_LE[layer]), -unsaved_LE[layer]))
        covered = np.cumsum(unsaved_LE[layer, order])
        num_hot = min(int((covered < hot_share * total).sum()) + 1, num_experts)
        mask_LE[layer, order[:num_hot]] = True
    return mask_LE


@dataclass
class SnapshotTracker:
    """Per expert: tokens processed since its last snapshot (`unsaved_LE`) and steps since it (`age_LE`)."""

    unsaved_LE: np.ndarray
    age_LE: np.ndarray

    @classmethod
    def fresh(cls, num_layers: int, num_experts: int) -> SnapshotTracker:
        return cls(np.zeros((num_layers, num_experts)), np.zeros((num_layers, num_experts), dtype=np.int64))

    def record_step(self, load_LE: np.ndarray) -> None:
        """After an optimizer step on `load_LE` assignments: every expert changed, nothing saved yet."""
        self.unsaved_LE = self.unsaved_LE + np.asarray(load_LE, dtype=np.float64)
        self.age_LE = self.age_LE + 1

    def mark_saved(self, mask_LE: np.ndarray) -> None:
        self.unsaved_LE = np.where(mask_LE, 0.0, self.unsaved_LE)
        self.age_LE = np.where(mask_LE, 0, self.age_LE)

    def state(self) -> dict[str, Any]:
        return {"unsaved_LE": self.unsaved_LE.copy(), "age_LE": self.age_LE.copy()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SnapshotTracker:
        return cls(np.asarray(state["unsaved_LE"], dtype=np.float64).copy(), np.asarray(state["age_LE"]).copy())


def sparse_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{SPARSE_PREFIX}{step:08d}"


def sparse_chain(root: str | Path, full_step: int) -> list[Path]:
    """The complete sparse snapshots full_step+1, full_step+2, ... under `root`, up to the first gap."""
    chain: list[Path] = []
    step = full_step + 1
    while (sparse_dir(root, step) / MARKER).is_file():
        chain.append(sparse_dir(root, step))
        step += 1
    return chain


def intact_chain(root: str | Path, full_step: int) -> tuple[list[Path], tuple[Path, str] | None]:
    """sparse_chain, ended before its first damaged snapshot (checkpoint.damage); that one and what is wrong with
    it (None: every snapshot of the chain is intact)."""
    chain = sparse_chain(root, full_step)
    for i, directory in enumerate(chain):
        reason = checkpoint.damage(directory)
        if reason is not None:
            return chain[:i], (directory, reason)
    return chain, None


def prune_sparse(root: str | Path, up_to_step: int) -> int:
    """Remove the sparse snapshots of steps <= up_to_step (a newer full checkpoint holds everything); returns how
    many were removed."""
    removed = 0
    for step, directory in checkpoint.checkpoint_dirs(root, SPARSE_PREFIX).items():
        if step <= up_to_step:
            shutil.rmtree(directory)
            removed += 1
    return removed


@dataclass
class RecoveredState:
    """What a resume reads: the latest full checkpoint and the sparse chain after it, merged; expert state is read
    slice by slice (`experts`), never assembled."""

    full_dir: Path
    chain: list[Path]
    damaged: list[tuple[Path, str]]  # newer complete checkpoints / the snapshot that ended the chain, and why
    meta: dict[str, Any]            # the last snapshot's meta.json
    head: dict[str, Any]            # the last snapshot's rank-0 file (dense state, placement, loads)
    rng: dict[str, Any] | None      # this rank's RNG states in the last snapshot (None: it had no such rank)
    experts: checkpoint.ExpertStateReader   # every expert from its newest save (optim.ExpertStateSource)
    history_deltas: list[dict[str, list[Any]]]   # the chain's metrics row, step record (and trace counts) each
    tracker: SnapshotTracker

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def resume_point(root: str | Path) -> tuple[Path, list[Path], list[tuple[Path, str]]]:
    """Where a resume from `root` starts: the newest intact full checkpoint, the intact sparse chain after it, and
    the damaged checkpoints or snapshot passed over (each with what is wrong); ValueError when nothing is intact."""
    full_dir, damaged = checkpoint.latest_intact(root)
    if full_dir is None:
        if damaged:
            raise ValueError(f"no intact checkpoint in {str(root)!r}: "
                             + "; ".join(f"{d.name}: {reason}" for d, reason in damaged))
        raise ValueError(f"no complete checkpoint in {str(root)!r}")
    chain, broken = intact_chain(root, int(read_meta(full_dir)["step"]))
    return full_dir, chain, damaged + ([broken] if broken else [])


def recover(root: str | Path, num_layers: int, num_experts: int, *, rank: int = 0) -> RecoveredState:
    """Merge the newest intact full checkpoint under `root` with the intact sparse snapshots after it, as rank
    `rank` reads it: rank 0's files (dense state, history) and, as the expert state is read, the files holding
    this rank's part (checkpoint.ExpertStateReader: memory-mapped, this rank's own first)."""
    full_dir, chain, damaged = resume_point(root)
    meta = read_meta(full_dir)
    files = checkpoint.RankFiles(full_dir, meta["world_size"])
    head = files.get(0)
    model = meta["model"]
    experts = checkpoint.ExpertStateReader(files, layout=meta["expert_optimizer"], rank=rank,
                                           expert_numel=2 * int(model["d_model"]) * int(model["d_ff"]))
    history_deltas = []   # the steps up to full_dir's are files in it (outputs.History)
    tracker = SnapshotTracker.fresh(num_layers, num_experts)
    for directory in chain:
        meta = read_meta(directory)
        files = checkpoint.RankFiles(directory, meta["world_size"])
        head = files.get(0)
        experts.add_sparse(files, [tuple(key) for key in head["hot_keys"]])
        history_deltas.append(head["history_delta"])
        tracker = SnapshotTracker.from_state(head["tracker"])
    assert experts.num_steps == meta["step"], (experts.num_steps, meta["step"])
    # a copy: a tensor loaded memory-mapped keeps its whole rank file mapped, and every page a resume read of it
    # would stay in this rank's RSS for the rest of the job (measured: 96 MiB, the rank's expert shard state)
    rng = copy.deepcopy(files.get(rank)["rng"]) if rank < files.world_size else None
    return RecoveredState(full_dir, chain, damaged, meta, head, rng, experts, history_deltas, tracker)
