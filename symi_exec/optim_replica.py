"""FlexMoE's coupled expert optimizer: every rank hosting an expert keeps that expert's full AdamW state, which
moves with it (the pipeline: optim.py's docstring).

Legend: L MoE layers, E experts, P parameters of one expert (flat), S slots per rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from symi_exec.comm import Segment, SegmentTable, exchange, segment_table
from symi_exec.optim import (
    ExpertInit,
    ExpertOptimizer,
    ExpertStateSource,
    PlacementCache,
    cpu_tensor,
    holder_mask,
    holder_ranks,
    replica_sync_segments,
    sync_replica_grads,
)
from symi_sim.placement import Placement


def migration_table(old_phy2log_LR: np.ndarray, new_phy2log_LR: np.ndarray, *, num_experts: int,
                    slots_per_rank: int, expert_numel: int) -> SegmentTable:
    """FlexMoE's migration as a table: per (layer, expert), per new holder rank dst that did not hold it (sorted),
    the whole expert [0, P) from sorted(old holders)[dst % len(old holders)]."""
    old_LEG = holder_mask(old_phy2log_LR, num_experts, slots_per_rank)
    new_LEG = holder_mask(new_phy2log_LR, num_experts, slots_per_rank)
    layer_N, expert_N, dst_N = np.nonzero(new_LEG & ~old_LEG)
    # the old holders flattened key by key, sorted: key k's i-th is old_rank_H[first_K[k] + i]
    num_old_K = old_LEG.sum(axis=2).reshape(-1)
    first_K = np.cumsum(num_old_K) - num_old_K
    old_rank_H = np.nonzero(old_LEG)[2]
    key_N = layer_N * num_experts + expert_N
    assert np.all(num_old_K[key_N] > 0), "every expert has an old holder"
    src_N = old_rank_H[first_K[key_N] + dst_N % np.maximum(num_old_K[key_N], 1)]
    return segment_table(src_N=src_N, dst_N=dst_N, layer_N=layer_N, expert_N=expert_N, start_N=0,
                         stop_N=expert_numel)


class ReplicaExpertOptimizer(ExpertOptimizer):
    """FlexMoE's coupled layout: every rank hosting an expert keeps its full weights and AdamW moments.

    The copies of an expert on its holder ranks see the same summed gradient and run the same update, so they
    stay bit-identical; the one on the lowest holder rank is the one counted (gradient norm) and checkpointed.
    """

    layout = "replica"

    def _init_state(self, expert_init: ExpertInit) -> None:
        # kept only until the first placement says which experts this rank hosts
        self._expert_init: ExpertInit | None = expert_init
        self.weights: dict[tuple[int, int], torch.Tensor] = {}     # (layer, expert) -> [P], hosted experts only
        self.exp_avg: dict[tuple[int, int], torch.Tensor] = {}
        self.exp_avg_sq: dict[tuple[int, int], torch.Tensor] = {}
        self.grad: dict[tuple[int, int], torch.Tensor] = {}
        self.placement: Placement | None = None
        self._sync_segments = PlacementCache()   # replica_sync_segments of the recent placements

    def _hosted(self, placement: Placement) -> set[tuple[int, int]]:
        return {(layer, int(e)) for layer, phy2log_R in enumerate(placement.phy2log_LR)
                for e in self._local_R(phy2log_R)}

    def _lead(self, placement: Placement) -> set[tuple[int, int]]:
        """Keys whose lowest holder rank is this one."""
        # the lowest holder of every (layer, expert): the first True along the ranks (argmax)
        lowest_LE = holder_mask(placement.phy2log_LR, self.num_experts, self.slots_per_rank).argmax(axis=2)
        return {key for key in self._hosted(placement) if lowest_LE[key] == self.comm.rank}

    # ------------------------------------------------------------------ gradients

    def collect_gradients(self, slot_grads_LSP: list[torch.Tensor], placement: Placement) -> None:
        """Replica gradient sync; every holder keeps the full summed gradient, averaged over ranks."""
        assert self.placement is not None and np.array_equal(placement.phy2log_LR, self.placement.phy2log_LR), \
            "gradients must come from the placement the optimizer filled the slots for"
        segments = self._sync_segments.get(placement.phy2log_LR, lambda: replica_sync_segments(
            placement.phy2log_LR, num_experts=self.num_experts, slots_per_rank=self.slots_per_rank,
            expert_numel=self.expert_numel))
        representative = sync_replica_grads(slot_grads_LSP, placement, self.comm, self.slots_per_rank,
                                            self.num_experts, accumulate_dtype=self.master_dtype, segments=segments)
        self.grad = {key: grad / self.comm.world_size for key, grad in representative.items()}

    def _counted_grads(self) -> Iterable[torch.Tensor]:
        assert self.placement is not None
        return (self.grad[key] for key in self._lead(self.placement))   # each expert once: on its lowest holder

    # ------------------------------------------------------------------ update and migration

    def _adam_tensors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        return ((weights, self.grad[key], self.exp_avg[key], self.exp_avg_sq[key])
                for key, weights in self.weights.items())

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """AdamW on every hosted expert's full copy; the gradients are used up."""
        super().step(lr, grad_scale)
        self.grad = {}

    def send_out(self, placement: Placement, slot_weights_LSP: list[torch.Tensor]) -> None:
        """Migrate the experts whose holder ranks change (weights and moments), then fill this rank's slots."""
        hosted = self._hosted(placement)
        if self.placement is None:
            assert self._expert_init is not None
            for layer, expert in sorted(hosted):   # only the experts this rank hosts
                weights = self._new_master(self._expert_init(layer, expert))
                self.weights[layer, expert] = weights
                self.exp_avg[layer, expert] = torch.zeros_like(weights)
                self.exp_avg_sq[layer, expert] = torch.zeros_like(weights)
            self._expert_init = None
        elif not np.array_equal(placement.phy2log_LR, self.placement.phy2log_LR):
            self._migrate(placement)
        for key in set(self.weights) - hosted:
            del self.weights[key], self.exp_avg[key], self.exp_avg_sq[key]
        assert set(self.weights) == hosted
        with torch.no_grad():
            for layer, phy2log_R in enumerate(placement.phy2log_LR):
                for s, expert in enumerate(self._local_R(phy2log_R)):
                    slot_weights_LSP[layer][s] = self.weights[layer, int(expert)]
        self.placement = placement

    def _migrate(self, placement: Placement) -> None:
        assert self.placement is not None
        numel = self.expert_numel
        segs = migration_table(self.placement.phy2log_LR, placement.phy2log_LR, num_experts=self.num_experts,
                               slots_per_rank=self.slots_per_rank, expert_numel=numel).segments()
        dtype = next(iter(self.weights.values())).dtype

        def read_weights(seg: Segment) -> torch.Tensor:
            return self.weights[seg.key].clone()

        def write_weights(seg: Segment, data: torch.Tensor) -> None:
            self.weights[seg.key] = data.clone()

        def read_moments(seg: Segment) -> torch.Tensor:
            return torch.cat([self.exp_avg[seg.key], self.exp_avg_sq[seg.key]])

        def write_moments(seg: Segment, data: torch.Tensor) -> None:
            self.exp_avg[seg.key] = data[:numel].clone()
            self.exp_avg_sq[seg.key] = data[numel:].clone()

        exchange(segs, self.comm, "weight_sendout", dtype, read_weights, write_weights)
        moment_segs = [Segment(seg.src, seg.dst, seg.key, 0, 2 * numel) for seg in segs]
        exchange(moment_segs, self.comm, "optimizer_state", dtype, read_moments, write_moments)

    def state_dict(self, *, clone: bool = True) -> dict[str, object]:
        """Full weights and AdamW moments of the experts whose lowest holder this rank is (each expert once)."""
        assert self.placement is not None
        return {"num_steps": self.num_steps, **self._lead_state(sorted(self._lead(self.placement)), clone=clone)}

    def hot_state_dict(self, mask_LE: np.ndarray) -> dict[str, object]:
        """Full state of the experts in `mask_LE` ([L, E] bool) whose lowest holder this rank is."""
        assert self.placement is not None
        return self._lead_state(sorted(key for key in self._lead(self.placement) if mask_LE[key]))

    def _lead_state(self, keys: list[tuple[int, int]], *, clone: bool = True) -> dict[str, object]:
        return {"layout": self.layout,
                **{name: {key: cpu_tensor(table[key], clone=clone) for key in keys}
                   for name, table in (("weights", self.weights), ("exp_avg", self.exp_avg),
                                       ("exp_avg_sq", self.exp_avg_sq))}}

    def load_state(self, source: ExpertStateSource, placement: Placement) -> None:
        """Become a holder of every expert `placement` gives this rank, its full state read from `source`; the next
        send_out with the same placement only fills the slots."""
        assert self._expert_init is not None, "load the state before the first send_out"
        for layer, expert in sorted(self._hosted(placement)):
            saved = source.read(layer, expert, 0, self.expert_numel)
            for name, table in (("weights", self.weights), ("exp_avg", self.exp_avg),
                                ("exp_avg_sq", self.exp_avg_sq)):
                table[layer, expert] = self._new_master(saved[name])
        self.num_steps = int(source.num_steps)
        self.placement = placement
        self._expert_init = None

    def _export_segments(self, layer: int) -> list[Segment]:
        assert self.placement is not None
        phy2log_R = self.placement.phy2log_LR[layer]
        return [Segment(holder_ranks(phy2log_R, expert, self.slots_per_rank)[0], 0, (layer, expert), 0,
                        self.expert_numel) for expert in range(self.num_experts)]

    def _export_read(self, seg: Segment) -> torch.Tensor:
        return self.weights[seg.key]
