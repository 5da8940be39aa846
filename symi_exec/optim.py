"""Expert optimizers. SYMI's decoupled layout: every expert's AdamW state sharded 1/G over ALL ranks, never moved;
DeepSpeed's group layout: every expert's AdamW state sharded 1/r over the r ranks holding it, on a fixed placement;
FlexMoE's coupled layout: every rank hosting an expert keeps that expert's full AdamW state, which moves with it.

Legend: L MoE layers, E experts, P parameters of one expert (flat: w_in then w_out), p this rank's shard of P,
G ranks, S slots per rank, R slots (G*S).

ShardedExpertOptimizer (SYMI; the paper's pipeline, steps 4-8, with steps 4 and 5 fused):
  grad_collection    on every rank the slots holding expert e are summed into one partial gradient; every holder
                     rank of e then sends shard r of its partial gradient to rank r, which sums what the holders
                     sent: one reduce-scatter from the holders to the 1/G owners. The paper first all-reduces e's
                     gradient among its holders (step 4) and then lets each rank pull its shard from one holder
                     (step 5): with h holders that moves 2 (h - 1) + (G - h) / G expert-sizes where the fused
                     scheme moves h (G - 1) / G, never more (equal at h = 1). The simulator charges this scheme
                     (costs.expert_state_bytes, layout "sharded"); `replica_grad_sync` stays zero.
  step               AdamW on the shards (master weights, m, v: all this rank's shards, the same on every step)
  send_out           rank r sends its updated shard r of e to every rank whose slots hold e in the NEXT placement
Every transfer is a real point-to-point segment inside one all-to-all per phase, so the counted bytes are the
bytes the scheme moves. Optimizer state never leaves its rank: the `optimizer_state` byte count stays zero.

ReplicaExpertOptimizer (optim_replica.py; FlexMoE, as the SYMI authors re-implemented it; the simulator's
"replica" layout):
  replica_grad_sync  as above; afterwards every holder rank has e's full summed gradient
  step               every holder rank runs AdamW on its full copy of e (weights, m, v): the copies stay identical
  send_out           only when the placement changes: a rank that starts hosting e receives e's weights
                     (`weight_sendout` bytes) and both AdamW moments (`optimizer_state` bytes) from
                     sorted(old holders)[rank % len(old holders)]; a rank that stops hosting e drops its copy.
                     Slots then take their expert's weights from the local copy. No gradient collection.
Several slots of one expert on one rank share one copy (state is per rank, not per slot), so moving a replica
within a rank, or to a rank that already hosts the expert, moves nothing.

GroupExpertOptimizer (optim_group.py; DeepSpeed-MoE's expert data parallelism with ZeRO-1 inside each expert's
replica group; the simulator's "group" layout, run by static and fastermoe):
  replica_grad_sync  the reduce-scatter half of the sync above: holder i of e's sorted holders gets shard i of 1/r
  step               AdamW on this rank's shard of every expert it holds
  send_out           the all-gather half (counted as `weight_sendout`): every holder gets the updated shards of
                     the other holders. Nothing goes to or comes from a rank that does not hold e; the placement
                     must never change (DeepSpeed's static replication).

All three derive from ExpertOptimizer, the interface the training loop runs any of them through.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from symi_exec.comm import Comm, ExchangeSide, Segment, SegmentTable, exchange, exchange_buffer, segment_table
from symi_exec.waits import wait_for_ranks
from symi_sim.placement import Placement

SQ_NORM_CHUNK = 1 << 22   # elements a gradient norm sums at once (global_sq_norm): two 32 MiB float64 temporaries,
#                          few enough chunks that a GPU launches a handful of kernels per large gradient


def shard_bounds(numel: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of contiguous shard `shard` of `numel` elements split `num_shards` ways (first ones larger)."""
    base, rest = divmod(numel, num_shards)
    start = shard * base + min(shard, rest)
    return start, start + base + (1 if shard < rest else 0)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One decoupled-weight-decay Adam update in place (Loshchilov & Hutter; bias-corrected moments)."""
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def cpu_tensor(x: torch.Tensor, *, clone: bool) -> torch.Tensor:
    """`x` detached on the CPU: a copy of its own (clone), or else `x` itself when it is on the CPU already."""
    x = x.detach()
    if not x.is_cpu:
        return x.cpu()   # a copy already
    return x.clone() if clone else x


def holder_ranks(phy2log_R: np.ndarray, expert: int, slots_per_rank: int) -> list[int]:
    """Sorted ranks with at least one slot holding `expert`."""
    return sorted(set((np.flatnonzero(phy2log_R == expert) // slots_per_rank).tolist()))


Key = tuple[int, int]   # (layer, expert)


def holder_mask(phy2log_LR: np.ndarray, num_experts: int, slots_per_rank: int) -> np.ndarray:
    """[L, E, G] bool: rank g has at least one slot holding expert e in layer l."""
    num_layers, num_slots = phy2log_LR.shape
    mask_LEG = np.zeros((num_layers, num_experts, num_slots // slots_per_rank), dtype=bool)
    mask_LEG[np.arange(num_layers)[:, None], phy2log_LR, np.arange(num_slots)[None, :] // slots_per_rank] = True
    return mask_LEG


def expert_holders(placement: Placement, slots_per_rank: int, num_experts: int) -> dict[Key, list[int]]:
    """Sorted holder ranks of every (layer, expert) of `placement` (layers, then experts, in order)."""
    mask_LEG = holder_mask(placement.phy2log_LR, num_experts, slots_per_rank)
    return {(layer, expert): np.flatnonzero(mask_G).tolist()
            for (layer, expert), mask_G in zip(np.ndindex(mask_LEG.shape[:2]), mask_LEG.reshape(-1, mask_LEG.shape[2]),
                                               strict=True)}


def group_shards(holders: dict[Key, list[int]], expert_numel: int
                 ) -> Iterator[tuple[Key, list[int], int, int, int]]:
    """(key, ranks, owner, start, stop) of every shard of every expert split among its holders (ZeRO within the
    replica group): the i-th of the sorted holder ranks owns shard i of len(ranks), [start, stop) of P."""
    for key, ranks in holders.items():
        for i, owner in enumerate(ranks):
            yield (key, ranks, owner, *shard_bounds(expert_numel, len(ranks), i))


def _runs(lengths_K: np.ndarray) -> np.ndarray:
    """[sum(lengths)] the position of every element within its run: 0 .. lengths[k] - 1 for each k in turn."""
    total = int(lengths_K.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths_K) - lengths_K, lengths_K)


def shard_bounds_array(numel: int, num_shards_N: np.ndarray, shard_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shard_bounds elementwise: ([N] start, [N] stop) of shard shard_N of `numel` split num_shards_N ways."""
    base_N, rest_N = np.divmod(numel, num_shards_N)
    start_N = shard_N * base_N + np.minimum(shard_N, rest_N)
    return start_N, start_N + base_N + (shard_N < rest_N)


def group_tables(phy2log_LR: np.ndarray, *, num_experts: int, slots_per_rank: int, expert_numel: int
                 ) -> tuple[SegmentTable, SegmentTable]:
    """(reduce-scatter, all-gather) of every expert's replica group (group_shards' shards), as tables: per
    (layer, expert), per owner i of the r sorted holders, per holder h: [shard i of r] from h to the owner, and from
    the owner to h. The reduce-scatter leaves out h == owner; the all-gather keeps it (no bytes)."""
    layer_H, expert_H, rank_H = np.nonzero(holder_mask(phy2log_LR, num_experts, slots_per_rank))
    count_K = np.bincount(layer_H * num_experts + expert_H, minlength=phy2log_LR.shape[0] * num_experts)
    count_H = count_K[layer_H * num_experts + expert_H]        # r of the holder's expert
    first_H = np.repeat(np.cumsum(count_K) - count_K, count_K)  # the expert's first holder row
    index_H = np.arange(len(rank_H)) - first_H                  # i: the holder's position among them
    start_H, stop_H = shard_bounds_array(expert_numel, count_H, index_H)
    # one row per (owner row, holder of the same expert), owners in order, holders sorted
    owner_X = np.repeat(np.arange(len(rank_H)), count_H)
    peer_X = first_H[owner_X] + _runs(count_H)
    columns = {"layer_N": layer_H[owner_X], "expert_N": expert_H[owner_X], "start_N": start_H[owner_X],
               "stop_N": stop_H[owner_X]}
    gather = segment_table(src_N=rank_H[owner_X], dst_N=rank_H[peer_X], **columns)
    reduce = segment_table(src_N=rank_H[peer_X], dst_N=rank_H[owner_X], **columns)
    return reduce.select(reduce.src_N != reduce.dst_N), gather


def sharded_tables(phy2log_LR: np.ndarray, *, num_experts: int, slots_per_rank: int, world_size: int,
                   expert_numel: int) -> tuple[SegmentTable, SegmentTable]:
    """SYMI's (collection, send-out) under one placement, as tables. Collection: per (layer, expert), per holder h
    (sorted), per rank r: shard r of G of h's partial gradient from h to r. Send-out: per (layer, expert), per
    holder h, per rank r: rank r's shard of the updated weights from r to h."""
    layer_H, expert_H, rank_H = np.nonzero(holder_mask(phy2log_LR, num_experts, slots_per_rank))
    ranks_G = np.arange(world_size)
    start_G, stop_G = shard_bounds_array(expert_numel, np.full(world_size, world_size), ranks_G)
    num_holders = len(rank_H)
    columns = {"layer_N": np.repeat(layer_H, world_size), "expert_N": np.repeat(expert_H, world_size),
               "start_N": np.tile(start_G, num_holders), "stop_N": np.tile(stop_G, num_holders)}
    holder_N, rank_N = np.repeat(rank_H, world_size), np.tile(ranks_G, num_holders)
    return (segment_table(src_N=holder_N, dst_N=rank_N, **columns),
            segment_table(src_N=rank_N, dst_N=holder_N, **columns))


class PlacementCache:
    """What one rank derived from a placement, for the last `size` placements (a run re-plans every step: the
    send-out's placement is the next step's collection's)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: dict[tuple[tuple[int, ...], bytes], Any] = {}

    def get(self, phy2log_LR: np.ndarray, build: Callable[[], Any]) -> Any:
        key = (phy2log_LR.shape, np.ascontiguousarray(phy2log_LR, dtype=np.int64).tobytes())
        if key not in self._entries:
            while len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = build()
        return self._entries[key]


def local_grad_sums(slot_grads_LSP: list[torch.Tensor], placement: Placement, rank: int, slots_per_rank: int, *,
                    dtype: torch.dtype | None = None) -> dict[Key, torch.Tensor]:
    """(layer, expert) -> [P]: the gradients of `rank`'s slots holding the expert, summed in `dtype` (default:
    the gradients'; hosted experts only)."""
    sums: dict[Key, torch.Tensor] = {}
    for layer, phy2log_R in enumerate(placement.phy2log_LR):
        local_R = phy2log_R[rank * slots_per_rank:(rank + 1) * slots_per_rank]
        grads_SP = slot_grads_LSP[layer] if dtype is None else slot_grads_LSP[layer].to(dtype)
        for expert in np.unique(local_R).tolist():
            sums[layer, expert] = grads_SP[np.flatnonzero(local_R == expert)].sum(dim=0)
    return sums


def replica_sync_segments(phy2log_LR: np.ndarray, *, num_experts: int, slots_per_rank: int, expert_numel: int
                          ) -> tuple[list[Segment], list[Segment]]:
    """(reduce-scatter, all-gather) segments of the replica gradient sync: group_tables without the all-gather's
    copies of an owner to itself."""
    reduce, gather = group_tables(phy2log_LR, num_experts=num_experts, slots_per_rank=slots_per_rank,
                                  expert_numel=expert_numel)
    return reduce.segments(), gather.select(gather.src_N != gather.dst_N).segments()


def sync_replica_grads(slot_grads_LSP: list[torch.Tensor], placement: Placement, comm: Comm, slots_per_rank: int,
                       num_experts: int, *, accumulate_dtype: torch.dtype | None = None,
                       segments: tuple[list[Segment], list[Segment]] | None = None) -> dict[Key, torch.Tensor]:
    """The replica gradient sync: every holder rank of (layer, expert) ends with the expert's gradient summed over
    all its slots on all ranks (travelling in the slots' dtype, summed in `accumulate_dtype`, default the same).
    `segments`: replica_sync_segments of `placement` (computed when not given). Returns [P] per (layer, expert)
    this rank hosts."""
    expert_numel = slot_grads_LSP[0].shape[1]
    dtype = slot_grads_LSP[0].dtype
    representative = local_grad_sums(slot_grads_LSP, placement, comm.rank, slots_per_rank, dtype=accumulate_dtype)
    if segments is None:
        segments = replica_sync_segments(placement.phy2log_LR, num_experts=num_experts,
                                         slots_per_rank=slots_per_rank, expert_numel=expert_numel)
    reduce_segs, gather_segs = segments

    def read_rep(seg: Segment) -> torch.Tensor:
        return representative[seg.key][seg.start:seg.stop].clone()

    def add_rep(seg: Segment, data: torch.Tensor) -> None:
        representative[seg.key][seg.start:seg.stop] += data

    def copy_rep(seg: Segment, data: torch.Tensor) -> None:
        representative[seg.key][seg.start:seg.stop] = data

    exchange(reduce_segs, comm, "replica_grad_sync", dtype, read_rep, add_rep)
    exchange(gather_segs, comm, "replica_grad_sync", dtype, read_rep, copy_rep)
    return representative


ExpertInit = Callable[[int, int], torch.Tensor]   # (layer, expert) -> [P] the expert's full initial weights


class ExpertStateSource(Protocol):
    """Saved expert state a resume reads from (checkpoint.ExpertStateReader: the rank files, memory-mapped, and the
    sparse snapshots after them; checkpoint.FullStateSource: an assembled full state)."""

    num_steps: int

    def read(self, layer: int, expert: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Elements [start, stop) of the expert's weights, exp_avg and exp_avg_sq ([stop - start] each)."""
        ...


class ExpertOptimizer(ABC):
    """What the layouts share: the hyperparameters, the step count, AdamW over (weights, gradient, moments)
    tensors, the global gradient norm, this rank's slots of a placement and the export to rank 0. The training loop
    runs any of them.

    Precision: the slots (and so the gradients and weights that travel) are in `dtype`, the model's; the master
    weights, both AdamW moments and the gradients they accumulate are in `master_dtype` (float32 for a bfloat16
    model; by default `dtype`). Each layout creates from `expert_init` only the state this rank keeps."""

    layout: str   # "sharded", "group" or "replica": the checkpoint layout (state_dict), run config.json's name

    def __init__(self, expert_init: ExpertInit, comm: Comm, *, num_layers: int, num_experts: int, expert_numel: int,
                 slots_per_rank: int, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, dtype: torch.dtype = torch.float32,
                 master_dtype: torch.dtype | None = None) -> None:
        """expert_init(layer, expert): [P] the expert's initial weights, the same on every rank (model.init_expert);
        called once per expert this rank keeps a part of, each result dropped after its part is taken."""
        self.comm = comm
        self.slots_per_rank = slots_per_rank
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.num_layers, self.num_experts, self.expert_numel = num_layers, num_experts, expert_numel
        self.dtype = dtype
        self.master_dtype = master_dtype if master_dtype is not None else dtype
        self.num_steps = 0
        self._init_state(expert_init)

    @classmethod
    def from_weights(cls, expert_weights_LEP: list[torch.Tensor], comm: Comm, **options: Any) -> ExpertOptimizer:
        """An optimizer initialised from given full weights ([L] x [E, P], identical on all ranks; tests, tools);
        `dtype` defaults to theirs."""
        num_experts, expert_numel = expert_weights_LEP[0].shape
        options.setdefault("dtype", expert_weights_LEP[0].dtype)
        return cls(lambda layer, expert: expert_weights_LEP[layer][expert], comm, num_layers=len(expert_weights_LEP),
                   num_experts=num_experts, expert_numel=expert_numel, **options)

    def _new_master(self, initial: torch.Tensor) -> torch.Tensor:
        """A copy of (a slice of) initial weights in the master dtype on this rank's device."""
        return initial.detach().to(device=self.comm.device, dtype=self.master_dtype).clone()

    @abstractmethod
    def _init_state(self, expert_init: ExpertInit) -> None:
        """This rank's initial expert state (or what it needs to create it once the placement is known)."""

    def _local_R(self, phy2log_R: np.ndarray) -> np.ndarray:
        """The experts of this rank's slots in one layer's placement."""
        spr, me = self.slots_per_rank, self.comm.rank
        return phy2log_R[me * spr:(me + 1) * spr]

    @abstractmethod
    def _adam_tensors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(weights, gradient, exp_avg, exp_avg_sq) of every tensor this rank updates."""

    @abstractmethod
    def _counted_grads(self) -> Iterable[torch.Tensor]:
        """This rank's part of the expert gradients, each element counted on exactly one rank."""

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of the expert gradients over ALL ranks (an all-reduce of one number)."""
        return global_sq_norm(self._counted_grads(), self.comm)

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """AdamW with learning rate `lr`, gradients multiplied by `grad_scale` (clipping)."""
        self.num_steps += 1
        beta1, beta2 = self.betas
        for weights, grad, exp_avg, exp_avg_sq in self._adam_tensors():
            adamw_update_(weights, grad * grad_scale if grad_scale != 1.0 else grad, exp_avg, exp_avg_sq,
                          step=self.num_steps, lr=lr, beta1=beta1, beta2=beta2, eps=self.eps,
                          weight_decay=self.weight_decay)

    @abstractmethod
    def collect_gradients(self, slot_grads_LSP: list[torch.Tensor], placement: Placement) -> None:
        """Take this rank's slot gradients under `placement` (the one the step ran with), averaged over ranks."""

    @abstractmethod
    def send_out(self, placement: Placement, slot_weights_LSP: list[torch.Tensor]) -> None:
        """Fill this rank's slots with the current weights of the experts `placement` gives them."""

    @abstractmethod
    def state_dict(self, *, clone: bool = True) -> dict[str, object]:
        """This rank's part of every expert's state (checkpoint.ExpertStateReader reads the parts back): copies
        (clone, for a write that overlaps training), or else the live tensors themselves on the CPU (a blocking
        write: the copy would be a transient the size of the whole state)."""

    @abstractmethod
    def hot_state_dict(self, mask_LE: np.ndarray) -> dict[str, object]:
        """This rank's part of the state of the experts in `mask_LE` ([L, E] bool) (snapshots.py)."""

    @abstractmethod
    def load_state(self, source: ExpertStateSource, placement: Placement) -> None:
        """Read this rank's part of the saved state under `placement` from `source` (only that part: a re-shard
        when the checkpoint came from another world size or placement)."""

    @abstractmethod
    def _export_segments(self, layer: int) -> list[Segment]:
        """One segment per piece of every expert of `layer` stored on exactly one rank, each to rank 0 (the same
        list on every rank)."""

    @abstractmethod
    def _export_read(self, seg: Segment) -> torch.Tensor:
        """The master weights of an export segment this rank stores."""

    def export_chunks(self, dtype: torch.dtype | None = None, *, experts_per_chunk: int | None = None
                      ) -> Iterator[tuple[int, torch.Tensor | None]]:
        """Every expert's full weights in `dtype` (default: the slots'), for the run's single-device checkpoint.pt,
        a few experts at a time: yields (layer, chunk_nP) per chunk of n <= `experts_per_chunk` (default: the slots
        per rank) consecutive experts of a layer, layer by layer, experts ascending; chunk_nP [n, P] on rank 0, None
        on the other ranks. A collective: every rank runs it to its end. Rank 0 receives each stored piece once and
        holds one chunk at a time (its slots' size: independent of the expert count), the other ranks send only
        the pieces they store. Before each chunk the ranks meet on the job's store (waits.wait_for_ranks, no
        deadline), so rank 0 may write the previous one for longer than the collective timeout. Bytes are counted
        under `weight_sendout` after the last step's row (they appear in no row)."""
        dtype = dtype if dtype is not None else self.dtype
        per_chunk = experts_per_chunk if experts_per_chunk is not None else self.slots_per_rank
        if per_chunk < 1:
            raise ValueError(f"experts per export chunk must be positive, got {per_chunk}")
        rank0 = self.comm.rank == 0
        for layer in range(self.num_layers):
            layer_segs = self._export_segments(layer)
            for first in range(0, self.num_experts, per_chunk):
                stop = min(first + per_chunk, self.num_experts)
                wait_for_ranks(self.comm.store, f"export-{layer}-{first}", rank=self.comm.rank,
                               world_size=self.comm.world_size)
                chunk_nP = (torch.empty(stop - first, self.expert_numel, dtype=dtype, device=self.comm.device)
                            if rank0 else None)

                def write(seg: Segment, data: torch.Tensor, chunk_nP: torch.Tensor | None = chunk_nP,
                          first: int = first) -> None:
                    assert chunk_nP is not None
                    chunk_nP[seg.key[1] - first, seg.start:seg.stop] = data

                segs = [seg for seg in layer_segs if first <= seg.key[1] < stop]
                if rank0:
                    covered = sum(seg.numel for seg in segs)
                    assert covered == (stop - first) * self.expert_numel, (layer, first, covered)
                exchange(segs, self.comm, "weight_sendout", dtype, self._export_read, write)
                yield layer, chunk_nP
                del chunk_nP, write   # the next chunk's buffer is allocated with this one gone

    def gather_weights(self, dtype: torch.dtype | None = None) -> list[torch.Tensor] | None:
        """Rank 0: [L] x [E, P] every expert's full weights (export_chunks, all kept); other ranks: None."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        for layer, chunk_nP in self.export_chunks(dtype):
            if chunk_nP is not None:
                parts[layer].append(chunk_nP)
        return [torch.cat(chunks) for chunks in parts] if self.comm.rank == 0 else None


def _shard_runs(numel: int, num_shards: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(first shard, number of shards, shard size): shards lo .. hi - 1 of shard_bounds' split in runs of one size."""
    base, rest = divmod(numel, num_shards)
    runs = [(lo, min(hi, rest) - lo, base + 1), (max(lo, rest), hi - max(lo, rest), base)]
    return [run for run in runs if run[1] > 0]


def pack_shard_blocks_(out: torch.Tensor, x_UP: torch.Tensor, num_shards: int, lo: int, hi: int) -> None:
    """out [U (stop of shard hi - 1 - start of shard lo)] = shards lo .. hi - 1 of x_UP's rows, shard-major: the
    block of shard g is x_UP[:, start_g:stop_g] ([U, p_g], row-major). Casts to out's dtype."""
    num_rows, numel = x_UP.shape
    offset = 0
    for first, count, size in _shard_runs(numel, num_shards, lo, hi):
        start = shard_bounds(numel, num_shards, first)[0]
        block_numel = num_rows * count * size
        out[offset:offset + block_numel].view(count, num_rows, size).copy_(
            x_UP[:, start:start + count * size].view(num_rows, count, size).transpose(0, 1))
        offset += block_numel
    assert offset == out.numel(), (offset, out.numel())


def unpack_shard_blocks_(x_UP: torch.Tensor, data: torch.Tensor, num_shards: int, lo: int, hi: int) -> None:
    """The inverse of pack_shard_blocks_: x_UP's columns of shards lo .. hi - 1 = the shard-major blocks `data`."""
    num_rows, numel = x_UP.shape
    offset = 0
    for first, count, size in _shard_runs(numel, num_shards, lo, hi):
        start = shard_bounds(numel, num_shards, first)[0]
        block_numel = num_rows * count * size
        x_UP[:, start:start + count * size].view(num_rows, count, size).copy_(
            data[offset:offset + block_numel].view(count, num_rows, size).transpose(0, 1))
        offset += block_numel
    assert offset == data.numel(), (offset, data.numel())


@dataclass(frozen=True)
class ShardedSide:
    """One rank's part of SYMI's collection and send-out under one placement (sharded_tables), as device indices.
    Legend: U the (layer, expert) pairs this rank hosts, K = L E."""

    keys_U: torch.Tensor            # [U] layer * E + expert of the experts this rank hosts, (layer, expert) order
    slot_rows_LS: list[torch.Tensor]   # [L] x [S] the row of keys_U each of this rank's slots holds
    collect: ExchangeSide
    collect_recv_keys: torch.Tensor   # [n] layer * E + expert of each received gradient shard, receive order
    sendout: ExchangeSide
    sendout_send_keys: torch.Tensor   # [n] layer * E + expert of each sent weight shard, send order


def sharded_side(phy2log_LR: np.ndarray, *, num_experts: int, slots_per_rank: int, world_size: int,
                 expert_numel: int, rank: int, device: torch.device) -> ShardedSide:
    """`rank`'s ShardedSide of a placement. Its packing relies on the tables' shape, checked here: in the
    collection every holder sends every other rank that rank's shard of each expert it hosts (so the send buffer is
    the hosted partial sums' shards, rank-major), in the send-out every rank sends every holder its own shard (so
    the receive buffer is the hosted experts' shards, rank-major)."""
    collect, sendout = sharded_tables(phy2log_LR, num_experts=num_experts, slots_per_rank=slots_per_rank,
                                      world_size=world_size, expert_numel=expert_numel)
    collect_side, sendout_side = collect.side(rank, world_size), sendout.side(rank, world_size)
    num_layers = phy2log_LR.shape[0]
    local_LS = phy2log_LR[:, rank * slots_per_rank:(rank + 1) * slots_per_rank]
    key_LS = np.arange(num_layers)[:, None] * num_experts + local_LS
    keys_U = np.unique(key_LS)
    row_K = np.full(num_layers * num_experts, -1, dtype=np.int64)
    row_K[keys_U] = np.arange(len(keys_U))

    def keys(table: SegmentTable, rows_N: np.ndarray) -> np.ndarray:
        return table.layer_N[rows_N] * num_experts + table.expert_N[rows_N]

    shard_G = np.diff(shard_bounds_array(expert_numel, np.full(world_size, world_size), np.arange(world_size)),
                      axis=0)[0]
    others_G = np.where(np.arange(world_size) == rank, 0, len(keys_U) * shard_G).tolist()
    num_others = world_size - 1
    assert collect_side.in_splits == others_G and sendout_side.out_splits == others_G
    assert np.array_equal(keys(collect, collect_side.local_N), keys_U)
    assert np.array_equal(keys(sendout, sendout_side.local_N), keys_U)
    assert np.array_equal(keys(collect, collect_side.send_N), np.tile(keys_U, num_others))
    assert np.array_equal(keys(sendout, sendout_side.recv_N), np.tile(keys_U, num_others))

    def as_index(index: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(index, dtype=torch.int64, device=device)

    return ShardedSide(keys_U=as_index(keys_U), slot_rows_LS=[as_index(row_K[key_S]) for key_S in key_LS],
                       collect=collect_side, collect_recv_keys=as_index(keys(collect, collect_side.recv_N)),
                       sendout=sendout_side, sendout_send_keys=as_index(keys(sendout, sendout_side.send_N)))


class ShardedExpertOptimizer(ExpertOptimizer):
    """Every expert's master weights and AdamW moments for this rank's shard; the gradient and weight traffic.

    The traffic follows sharded_tables; both phases pack, move and unpack with a few tensor ops whatever the
    number of experts (ShardedSide, cached for the last two placements: the send-out's is the next collection's)."""

    layout = "sharded"

    def _init_state(self, expert_init: ExpertInit) -> None:
        # one expert at a time: O(L E P / G) kept, O(P) transient; one [L, E, p] tensor per kind (the exchanges
        # index its flat [L E, p] view), handed out per layer as views
        self.start, self.stop = self._bounds(self.comm.rank)
        shape = (self.num_layers, self.num_experts, self.stop - self.start)
        self._master_LEp = torch.empty(shape, dtype=self.master_dtype, device=self.comm.device)
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                self._master_LEp[layer, expert] = expert_init(layer, expert)[self.start:self.stop]
        self._exp_avg_LEp, self._exp_avg_sq_LEp, self._grad_LEp = (torch.zeros_like(self._master_LEp)
                                                                   for _ in range(3))
        self.master_LEp = list(self._master_LEp.unbind(0))
        self.exp_avg_LEp = list(self._exp_avg_LEp.unbind(0))
        self.exp_avg_sq_LEp = list(self._exp_avg_sq_LEp.unbind(0))
        self.grad_LEp = list(self._grad_LEp.unbind(0))
        self._sides = PlacementCache()

    def _bounds(self, rank: int) -> tuple[int, int]:
        return shard_bounds(self.expert_numel, self.comm.world_size, rank)

    def _side(self, placement: Placement) -> ShardedSide:
        return self._sides.get(placement.phy2log_LR, lambda: sharded_side(
            placement.phy2log_LR, num_experts=self.num_experts, slots_per_rank=self.slots_per_rank,
            world_size=self.comm.world_size, expert_numel=self.expert_numel, rank=self.comm.rank,
            device=self.comm.device))

    # ------------------------------------------------------------------ gradients

    def collect_gradients(self, slot_grads_LSP: list[torch.Tensor], placement: Placement) -> None:
        """Gradient collection into this rank's shards (grad_LEp), averaged over ranks: every holder of an expert
        sends each rank that rank's shard of its partial gradient, and the rank sums them.

        slot_grads_LSP: this rank's slot gradients per layer under `placement` (the one the step ran with); the
        per-rank losses are local means, so the summed gradient is divided by the number of ranks. The partial
        sums travel in the slots' dtype and are accumulated in the master dtype: this rank's own partial first,
        then the other holders' in rank order (the sums are sequential, so every rank's result is reproducible).
        """
        comm, side = self.comm, self._side(placement)
        num_ranks, me, dtype = comm.world_size, comm.rank, slot_grads_LSP[0].dtype
        num_hosted, shard = len(side.keys_U), self.stop - self.start
        # [U, P] this rank's slot gradients summed per hosted expert (slots in order)
        partial_UP = torch.zeros(num_hosted, self.expert_numel, dtype=self.master_dtype, device=comm.device)
        for grads_SP, slot_rows_S in zip(slot_grads_LSP, side.slot_rows_LS, strict=True):
            partial_UP.index_put_((slot_rows_S,), grads_SP.to(self.master_dtype), accumulate=True)
        send = torch.empty(num_hosted * (self.expert_numel - shard), dtype=dtype, device=comm.device)
        num_before = num_hosted * self.start   # the shards of the ranks before this one
        pack_shard_blocks_(send[:num_before], partial_UP, num_ranks, 0, me)
        pack_shard_blocks_(send[num_before:], partial_UP, num_ranks, me + 1, num_ranks)
        # only this rank's shard of the partial sums is needed after packing: the rest goes before the exchange
        # allocates its receive buffer (the transient stays at most 2 U P, not U P (3 - 2/G))
        own_Up = partial_UP[:, self.start:self.stop].clone() if num_ranks > 1 else partial_UP
        del partial_UP
        recv = exchange_buffer(send, side.collect, comm, "grad_collection", dtype)
        del send
        grad_Kp = self._grad_LEp.view(self.num_layers * self.num_experts, shard).zero_()
        # this rank's partial first, then the other holders' in receive order: the two index_put_ calls add in the
        # order one call over both would (accumulate=True adds repeated rows in order on the CPU and, sort-based, on
        # CUDA too; index_add_ there is atomic: a run would not reproduce itself); divided in place, not copied
        grad_Kp.index_put_((side.keys_U,), own_Up.div_(num_ranks), accumulate=True)
        del own_Up
        recv_Np = recv.view(len(side.collect_recv_keys), shard).to(self.master_dtype)
        del recv
        grad_Kp.index_put_((side.collect_recv_keys,), recv_Np.div_(num_ranks), accumulate=True)

    def _counted_grads(self) -> Iterable[torch.Tensor]:
        return self.grad_LEp   # shards: every element lives on one rank

    # ------------------------------------------------------------------ update and send-out

    def _adam_tensors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        return zip(self.master_LEp, self.grad_LEp, self.exp_avg_LEp, self.exp_avg_sq_LEp, strict=True)

    def send_out(self, placement: Placement, slot_weights_LSP: list[torch.Tensor]) -> None:
        """Fill every rank's slots with the current weights of the experts `placement` gives them (the master
        shards cast to the slots' dtype): every rank sends its shard of each expert to the expert's holders, and a
        holder assembles the expert ([U, P]) and copies it into each of its slots holding it."""
        comm, side = self.comm, self._side(placement)
        num_ranks, me, dtype = comm.world_size, comm.rank, slot_weights_LSP[0].dtype
        num_hosted, shard = len(side.keys_U), self.stop - self.start
        master_Kp = self._master_LEp.view(self.num_layers * self.num_experts, shard)
        send = master_Kp.index_select(0, side.sendout_send_keys).to(dtype).view(-1)
        recv = exchange_buffer(send, side.sendout, comm, "weight_sendout", dtype)
        del send   # freed before the assembled experts are allocated
        full_UP = torch.empty(num_hosted, self.expert_numel, dtype=dtype, device=comm.device)
        num_before = num_hosted * self.start
        unpack_shard_blocks_(full_UP, recv[:num_before], num_ranks, 0, me)
        unpack_shard_blocks_(full_UP, recv[num_before:], num_ranks, me + 1, num_ranks)
        del recv
        if num_ranks == 1 and dtype == self.master_dtype:   # the shard is the whole expert: no temporary copy
            torch.index_select(master_Kp, 0, side.keys_U, out=full_UP)
        else:
            full_UP[:, self.start:self.stop] = master_Kp.index_select(0, side.keys_U)
        with torch.no_grad():
            for weights_SP, slot_rows_S in zip(slot_weights_LSP, side.slot_rows_LS, strict=True):
                torch.index_select(full_UP, 0, slot_rows_S, out=weights_SP)

    def state_dict(self, *, clone: bool = True) -> dict[str, object]:
        """This rank's shard of every expert: master weights and AdamW moments (master dtype)."""
        return {"layout": self.layout, "num_steps": self.num_steps, "start": self.start, "stop": self.stop,
                **{name: [cpu_tensor(x, clone=clone) for x in table]
                   for name, table in (("weights", self.master_LEp), ("exp_avg", self.exp_avg_LEp),
                                       ("exp_avg_sq", self.exp_avg_sq_LEp))}}

    def hot_state_dict(self, mask_LE: np.ndarray) -> dict[str, object]:
        """This rank's shard of the experts in `mask_LE` ([L, E] bool) only (checkpoint.ExpertStateReader reads
        them back)."""
        keys = [(int(layer), int(expert)) for layer, expert in zip(*np.nonzero(mask_LE), strict=True)]
        return {"layout": self.layout, "keys": keys,
                **{name: torch.stack([table[layer][expert] for layer, expert in keys]).cpu()   # stack: a copy
                   if keys else torch.zeros(0, self.stop - self.start, dtype=self.master_dtype)
                   for name, table in (("weights", self.master_LEp), ("exp_avg", self.exp_avg_LEp),
                                       ("exp_avg_sq", self.exp_avg_sq_LEp))}}

    def load_state(self, source: ExpertStateSource, placement: Placement) -> None:
        """Read this rank's shard [start, stop) of every expert from `source` (the saved shards overlapping it).
        `placement` is unused (the layout ignores it)."""
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                saved = source.read(layer, expert, self.start, self.stop)
                for name, table in (("weights", self.master_LEp), ("exp_avg", self.exp_avg_LEp),
                                    ("exp_avg_sq", self.exp_avg_sq_LEp)):
                    table[layer][expert] = saved[name]
        self.num_steps = int(source.num_steps)

    def _export_segments(self, layer: int) -> list[Segment]:
        return [Segment(rank, 0, (layer, expert), *self._bounds(rank))
                for expert in range(self.num_experts) for rank in range(self.comm.world_size)]

    def _export_read(self, seg: Segment) -> torch.Tensor:
        layer, expert = seg.key
        return self.master_LEp[layer][expert]


def global_sq_norm(grads: Iterable[torch.Tensor], comm: Comm) -> torch.Tensor:
    """Sum over all ranks of this rank's squared gradient norms (float64; one all-reduce of one number).

    Summed SQ_NORM_CHUNK elements at a time: the float64 copy and its square are temporaries of a chunk, not of a
    whole gradient (which would be twice and four times its float32 bytes at the peak)."""
    sq = torch.zeros((), dtype=torch.float64, device=comm.device)
    for grad in grads:
        for chunk in grad.reshape(-1).split(SQ_NORM_CHUNK):
            sq += chunk.double().square().sum()
    if comm.world_size > 1:
        dist.all_reduce(sq)
    return sq
