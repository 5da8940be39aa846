"""DeepSpeed's group expert optimizer: every expert's AdamW state is ZeRO-1 sharded within its replica group, the
sorted ranks holding it, on a placement that never changes (the pipeline: optim.py's docstring).

Legend: L MoE layers, E experts, P parameters of one expert (flat), p this rank's shard of an expert's P, G ranks,
S slots per rank, r holder ranks of one expert.

Per expert held by r ranks, holder i (of the sorted holders) owns shard i of P split r ways (optim.shard_bounds).
One step:
  collect_gradients  the expert's slots on one rank sum locally; a reduce-scatter among the r holders leaves
                     holder i with shard i of the summed gradient (`replica_grad_sync`: P - p sent per holder)
  step               AdamW on the shard (master weights, m, v: p elements each)
  send_out           an all-gather among the r holders gives every holder the full updated weights, copied into
                     its slots (`weight_sendout`: (r - 1) p sent per holder)
So an expert's group moves 2 (r - 1) P elements a step, and nothing to or from a rank outside the group: no
gradient collection, no optimizer state. The layout cannot re-place: a placement that differs from the first one
is a ValueError.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from symi_exec.comm import Segment, exchange
from symi_exec.optim import (
    ExpertInit,
    ExpertOptimizer,
    ExpertStateSource,
    Key,
    cpu_tensor,
    group_shards,
    group_tables,
    holder_ranks,
    local_grad_sums,
)
from symi_sim.placement import Placement

STATE_NAMES = ("weights", "exp_avg", "exp_avg_sq")


def group_segments(placement: Placement, *, slots_per_rank: int, expert_numel: int
                   ) -> tuple[list[Segment], list[Segment]]:
    """(reduce-scatter, all-gather) segments of every expert's replica group under `placement` (optim.group_tables,
    built with array operations); the same list on every rank. The all-gather includes each owner's copy to itself
    (it never leaves the rank, no bytes)."""
    reduce, gather = group_tables(placement.phy2log_LR, num_experts=placement.num_experts,
                                  slots_per_rank=slots_per_rank, expert_numel=expert_numel)
    return reduce.segments(), gather.segments()


class GroupExpertOptimizer(ExpertOptimizer):
    """DeepSpeed's layout: this rank's 1/r shard (master weights, AdamW moments) of every expert it holds."""

    layout = "group"

    def _init_state(self, expert_init: ExpertInit) -> None:
        # kept only until the first placement says which experts, and which shard of each, this rank holds
        self._expert_init: ExpertInit | None = expert_init
        self.placement: Placement | None = None
        self.bounds: dict[Key, tuple[int, int]] = {}    # [start, stop) of this rank's shard of each held expert
        self.state: dict[str, dict[Key, torch.Tensor]] = {name: {} for name in STATE_NAMES}   # [p] each
        self.grad: dict[Key, torch.Tensor] = {}
        self._reduce_segs: list[Segment] = []
        self._gather_segs: list[Segment] = []

    def _take_placement(self, placement: Placement) -> None:
        """Fix the placement: the segments of both collectives and this rank's shard of every held expert."""
        self.placement = placement
        self._reduce_segs, self._gather_segs = group_segments(placement, slots_per_rank=self.slots_per_rank,
                                                              expert_numel=self.expert_numel)
        self.bounds = {seg.key: (seg.start, seg.stop) for seg in self._gather_segs if seg.src == self.comm.rank}

    def _check_same(self, placement: Placement) -> None:
        assert self.placement is not None
        if not np.array_equal(placement.phy2log_LR, self.placement.phy2log_LR):
            changed = np.flatnonzero((placement.phy2log_LR != self.placement.phy2log_LR).any(axis=1)).tolist()
            raise ValueError(f"expert optimizer layout 'group' (DeepSpeed's static replication, policies static and "
                             f"fastermoe) cannot re-place experts, but the placement changed in layers {changed}; "
                             f"run a policy that keeps it fixed")

    # ------------------------------------------------------------------ gradients

    def collect_gradients(self, slot_grads_LSP: list[torch.Tensor], placement: Placement) -> None:
        """Local slot sums, then the reduce-scatter within each replica group; this rank keeps its shards of the
        summed gradients, averaged over ranks (the per-rank losses are local means). The sums travel in the slots'
        dtype and accumulate in the master dtype."""
        self._check_same(placement)
        comm = self.comm
        representative = local_grad_sums(slot_grads_LSP, placement, comm.rank, self.slots_per_rank,
                                         dtype=self.master_dtype)

        def read_rep(seg: Segment) -> torch.Tensor:
            return representative[seg.key][seg.start:seg.stop].clone()

        def add_rep(seg: Segment, data: torch.Tensor) -> None:
            representative[seg.key][seg.start:seg.stop] += data

        exchange(self._reduce_segs, comm, "replica_grad_sync", slot_grads_LSP[0].dtype, read_rep, add_rep)
        self.grad = {key: representative[key][start:stop] / comm.world_size
                     for key, (start, stop) in self.bounds.items()}

    def _counted_grads(self) -> Iterable[torch.Tensor]:
        return self.grad.values()   # shards: every element lives on one holder

    # ------------------------------------------------------------------ update and send-out

    def _adam_tensors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        weights, exp_avg, exp_avg_sq = (self.state[name] for name in STATE_NAMES)
        return ((weights[key], self.grad[key], exp_avg[key], exp_avg_sq[key]) for key in self.bounds)

    def send_out(self, placement: Placement, slot_weights_LSP: list[torch.Tensor]) -> None:
        """The all-gather within each replica group: this rank's slots get their experts' updated weights. The
        first call fixes the placement (and, unless load_state came first, creates the initial shards)."""
        if self.placement is None:
            assert self._expert_init is not None
            self._take_placement(placement)
            for (layer, expert), (start, stop) in self.bounds.items():   # only the experts this rank holds
                shard = self._new_master(self._expert_init(layer, expert)[start:stop])
                self.state["weights"][layer, expert] = shard
                self.state["exp_avg"][layer, expert] = torch.zeros_like(shard)
                self.state["exp_avg_sq"][layer, expert] = torch.zeros_like(shard)
            self._expert_init = None
        self._check_same(placement)

        def read_master(seg: Segment) -> torch.Tensor:
            return self.state["weights"][seg.key]

        def write_slots(seg: Segment, data: torch.Tensor) -> None:
            layer, expert = seg.key
            with torch.no_grad():
                for s in np.flatnonzero(self._local_R(placement.phy2log_LR[layer]) == expert):
                    slot_weights_LSP[layer][s, seg.start:seg.stop] = data

        exchange(self._gather_segs, self.comm, "weight_sendout", slot_weights_LSP[0].dtype, read_master, write_slots)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, *, clone: bool = True) -> dict[str, object]:
        """This rank's shards of the experts it holds (checkpoint.ExpertStateReader reads them back)."""
        return {"num_steps": self.num_steps, **self._shard_state(sorted(self.bounds), clone=clone)}

    def hot_state_dict(self, mask_LE: np.ndarray) -> dict[str, object]:
        """This rank's shards of the experts in `mask_LE` ([L, E] bool) it holds."""
        return self._shard_state(sorted(key for key in self.bounds if mask_LE[key]))

    def _shard_state(self, keys: list[Key], *, clone: bool = True) -> dict[str, object]:
        return {"layout": self.layout, "numel": self.expert_numel, "bounds": {key: self.bounds[key] for key in keys},
                **{name: {key: cpu_tensor(self.state[name][key], clone=clone) for key in keys}
                   for name in STATE_NAMES}}

    def load_state(self, source: ExpertStateSource, placement: Placement) -> None:
        """Read this rank's shards, under `placement`, of the experts it holds from `source` (a re-shard when the
        checkpoint came from another cluster). The next send_out fills the slots."""
        assert self._expert_init is not None, "load the state before the first send_out"
        self._take_placement(placement)
        for (layer, expert), (start, stop) in self.bounds.items():
            saved = source.read(layer, expert, start, stop)
            for name in STATE_NAMES:
                self.state[name][layer, expert] = self._new_master(saved[name])
        self.num_steps = int(source.num_steps)
        self._expert_init = None

    def _export_segments(self, layer: int) -> list[Segment]:
        assert self.placement is not None
        phy2log_R = self.placement.phy2log_LR[layer]
        holders = {(layer, expert): holder_ranks(phy2log_R, expert, self.slots_per_rank)
                   for expert in range(self.num_experts)}
        return [Segment(owner, 0, key, start, stop)
                for key, _, owner, start, stop in group_shards(holders, self.expert_numel)]

    def _export_read(self, seg: Segment) -> torch.Tensor:
        return self.state["weights"][seg.key]
