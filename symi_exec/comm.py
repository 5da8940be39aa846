"""Communication for the executor: bytes counted by kind, a differentiable all-to-all, planned segment exchanges.

Legend: M rows (tokens) in a buffer, D features, G ranks, N segments of a table.

Byte counts are what this rank SENDS to other ranks (payload only; nothing a rank keeps for itself):
  popularity            all-gather of the per-rank [E] router counts (every MoE layer, every step)
  dispatch / combine    forward all-to-all of token features to the slots and back
  dispatch_grad / combine_grad   the same all-to-alls in backward
  dense_grad            data-parallel all-reduce of the dense gradients (ring model: 2 (G-1)/G of the buffer)
  replica_grad_sync     all-reduce of an expert's gradient among the ranks holding it (group layout: its
                        reduce-scatter half only)
  grad_collection       every rank fetching its 1/G shard of every expert's gradient from one holder
  weight_sendout        updated weight shards sent to the slots of the next placement (group layout: the
                        all-gather among the holders)
  optimizer_state       optimizer state moved between ranks (SYMI: never)

Seconds are what this rank spent, per kind (SECOND_KINDS) and call, inside the phases the loop times as a whole:
  a2a_forward / a2a_backward   the token all-to-alls (dispatch and combine) of the forward / of the backward
  expert_forward               the forward's slot compute (the experts' GEMMs of this rank), one call per layer
Every rank makes the same calls in the same order, so the step's metrics can reduce them call by call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from symi_exec.supervise import write_progress

BYTE_KINDS = (
    "popularity", "dispatch", "combine", "dispatch_grad", "combine_grad", "dense_grad",
    "replica_grad_sync", "grad_collection", "weight_sendout", "optimizer_state",
)
SECOND_KINDS = ("a2a_forward", "a2a_backward", "expert_forward")


@dataclass
class Comm:
    """This rank's view of the process group, plus its sent-bytes counter."""

    rank: int
    world_size: int
    device: torch.device
    bytes_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds_by_kind: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    progress_path: Path | None = None   # a spawned rank's progress marker, read by its launcher (supervise.py)
    store: Any = None                   # the job's rendezvous store: waits without the collective timeout (waits.py)

    def mark_progress(self, step: int) -> None:
        """Tell the launcher this rank started `step`: it names a silent rank by it (spawned ranks only)."""
        if self.progress_path is not None:
            write_progress(self.progress_path, step)

    def count(self, kind: str, num_bytes: int) -> None:
        assert kind in BYTE_KINDS, kind
        self.bytes_by_kind[kind] += int(num_bytes)

    def take_bytes(self) -> dict[str, int]:
        """Bytes sent per kind since the last call (every kind present, zeros included)."""
        out = {kind: int(self.bytes_by_kind.get(kind, 0)) for kind in BYTE_KINDS}
        self.bytes_by_kind = defaultdict(int)
        return out

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Add the seconds the block takes to `kind` (on a GPU, once its kernels finished)."""
        assert kind in SECOND_KINDS, kind
        self._synchronize()
        start = time.perf_counter()
        yield
        self._synchronize()
        self.seconds_by_kind[kind].append(time.perf_counter() - start)

    def take_seconds(self) -> dict[str, list[float]]:
        """Seconds of every timed call per kind since the last call, in call order (every kind present)."""
        out = {kind: list(self.seconds_by_kind.get(kind, [])) for kind in SECOND_KINDS}
        self.seconds_by_kind = defaultdict(list)
        return out

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def all_to_all_rows(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], comm: Comm, kind: str
                    ) -> torch.Tensor:
    """Send in_splits[g] consecutive rows to rank g, receive out_splits[g] rows from rank g (not differentiable)."""
    out = x_MD.new_empty((sum(out_splits), *x_MD.shape[1:]))
    row_bytes = x_MD[0:1].numel() * x_MD.element_size() if x_MD.dim() > 1 else x_MD.element_size()
    comm.count(kind, (sum(in_splits) - in_splits[comm.rank]) * row_bytes)
    if comm.world_size == 1:
        out.copy_(x_MD)
    else:
        dist.all_to_all_single(out, x_MD.contiguous(), out_splits, in_splits)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_rows whose backward is the reverse all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x_MD, out_splits, in_splits, comm, kind, grad_kind):  # type: ignore[override]
        ctx.splits = (out_splits, in_splits)
        ctx.comm = comm
        ctx.grad_kind = grad_kind
        with comm.timed("a2a_forward"):
            return all_to_all_rows(x_MD, out_splits, in_splits, comm, kind)

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        with ctx.comm.timed("a2a_backward"):
            grad_in = all_to_all_rows(grad_MD.contiguous(), in_splits, out_splits, ctx.comm, ctx.grad_kind)
        return grad_in, None, None, None, None, None


def all_to_all(x_MD: torch.Tensor, out_splits: list[int], in_splits: list[int], comm: Comm, kind: str,
               grad_kind: str) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows; bytes counted under `kind` forward and `grad_kind` backward."""
    return _AllToAll.apply(x_MD, list(out_splits), list(in_splits), comm, kind, grad_kind)


@dataclass(frozen=True)
class Segment:
    """Elements [start, stop) of the flat vector `key` (e.g. (layer, expert)) go from rank src to rank dst."""

    src: int
    dst: int
    key: tuple[int, ...]
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def exchange(segments: Sequence[Segment], comm: Comm, kind: str, dtype: torch.dtype,
             read: Callable[[Segment], torch.Tensor], write: Callable[[Segment, torch.Tensor], None]) -> None:
    """Move every segment from its src to its dst in one all-to-all.

    Every rank must pass the same segment list (it is computed from the placement, which all ranks share).
    `read(seg)` runs on seg.src and returns seg.numel elements; `write(seg, data)` runs on seg.dst.
    A segment whose src is its dst never leaves the rank. Reads all happen before any write.
    """
    me = comm.rank
    # every rank holds the same list: when no segment crosses ranks, all of them skip the (empty) all-to-all
    crossing = any(seg.src != seg.dst for seg in segments)
    outgoing: list[list[Segment]] = [[] for _ in range(comm.world_size)]
    incoming: list[list[Segment]] = [[] for _ in range(comm.world_size)]
    local: list[Segment] = []
    for seg in segments:
        if seg.src == me and seg.dst == me:
            local.append(seg)
        elif seg.src == me:
            outgoing[seg.dst].append(seg)
        elif seg.dst == me:
            incoming[seg.src].append(seg)
    local_data = [read(seg) for seg in local]
    send_parts = [read(seg).reshape(-1) for dst_segs in outgoing for seg in dst_segs]
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=dtype, device=comm.device)
    in_splits = [sum(seg.numel for seg in dst_segs) for dst_segs in outgoing]
    out_splits = [sum(seg.numel for seg in src_segs) for src_segs in incoming]
    if comm.world_size > 1 and crossing:
        recv = all_to_all_rows(send.to(dtype), out_splits, in_splits, comm, kind)
    else:
        recv = send
    for seg, data in zip(local, local_data, strict=True):
        write(seg, data)
    offset = 0
    for src_segs in incoming:
        for seg in src_segs:
            write(seg, recv[offset:offset + seg.numel])
            offset += seg.numel


@dataclass(frozen=True)
class SegmentTable:
    """A segment list as parallel int64 arrays [N], in list order: elements [start_N, stop_N) of the flat vector of
    (layer_N, expert_N) go from rank src_N to rank dst_N. Built from the placement with array operations, so the
    same table on every rank; `segments()` is the equivalent list of Segment (tests, the callback `exchange`)."""

    src_N: np.ndarray
    dst_N: np.ndarray
    layer_N: np.ndarray
    expert_N: np.ndarray
    start_N: np.ndarray
    stop_N: np.ndarray

    def __len__(self) -> int:
        return len(self.src_N)

    @property
    def numel_N(self) -> np.ndarray:
        return self.stop_N - self.start_N

    def segments(self) -> list[Segment]:
        """The table as Segment objects (key (layer, expert)), in table order."""
        return [Segment(int(src), int(dst), (int(layer), int(expert)), int(start), int(stop))
                for src, dst, layer, expert, start, stop in zip(self.src_N, self.dst_N, self.layer_N, self.expert_N,
                                                                self.start_N, self.stop_N, strict=True)]

    def select(self, rows_N: np.ndarray) -> SegmentTable:
        """The rows `rows_N` (indices or a boolean mask) of the table, in that order."""
        return SegmentTable(*(column[rows_N] for column in (self.src_N, self.dst_N, self.layer_N, self.expert_N,
                                                            self.start_N, self.stop_N)))

    def side(self, rank: int, world_size: int) -> ExchangeSide:
        """`rank`'s part of the table's exchange, in the order `exchange` moves it."""
        src_N, dst_N, numel_N = self.src_N, self.dst_N, self.numel_N
        local = np.flatnonzero((src_N == rank) & (dst_N == rank))
        send = np.flatnonzero((src_N == rank) & (dst_N != rank))
        send = send[np.argsort(dst_N[send], kind="stable")]
        recv = np.flatnonzero((dst_N == rank) & (src_N != rank))
        recv = recv[np.argsort(src_N[recv], kind="stable")]
        in_splits = np.bincount(dst_N[send], weights=numel_N[send], minlength=world_size).astype(np.int64)
        out_splits = np.bincount(src_N[recv], weights=numel_N[recv], minlength=world_size).astype(np.int64)
        return ExchangeSide(send_N=send, recv_N=recv, local_N=local, in_splits=in_splits.tolist(),
                            out_splits=out_splits.tolist(), crossing=bool(np.any(src_N != dst_N)))


def segment_table(*, src_N: np.ndarray, dst_N: np.ndarray, layer_N: np.ndarray, expert_N: np.ndarray,
                  start_N: np.ndarray, stop_N: np.ndarray) -> SegmentTable:
    """A SegmentTable from array-likes (cast to int64, broadcast to one length)."""
    columns = np.broadcast_arrays(*(np.asarray(c, dtype=np.int64) for c in (src_N, dst_N, layer_N, expert_N,
                                                                           start_N, stop_N)))
    return SegmentTable(*(np.ascontiguousarray(c) for c in columns))


@dataclass(frozen=True)
class ExchangeSide:
    """One rank's part of a SegmentTable's exchange: rows of the table it sends (src == rank != dst, by dst, table
    order within one dst: the send buffer's order), receives (dst == rank != src, by src: the receive buffer's
    order) and keeps (src == dst == rank, table order); elements per peer rank; whether any segment crosses ranks
    (the same answer on every rank: when none does, every rank skips the all-to-all)."""

    send_N: np.ndarray
    recv_N: np.ndarray
    local_N: np.ndarray
    in_splits: list[int]    # elements this rank sends to each rank
    out_splits: list[int]   # elements this rank receives from each rank
    crossing: bool


def exchange_buffer(send: torch.Tensor, side: ExchangeSide, comm: Comm, kind: str, dtype: torch.dtype
                    ) -> torch.Tensor:
    """The all-to-all of a packed table exchange: `send` [sum(in_splits)] (this rank's outgoing segments in
    side.send_N's order) travels in `dtype`; returns [sum(out_splits)] in side.recv_N's order. The same collective
    `exchange` makes for the table's segments (bytes counted under `kind`)."""
    assert send.numel() == sum(side.in_splits), (send.numel(), sum(side.in_splits))
    if comm.world_size > 1 and side.crossing:
        return all_to_all_rows(send.to(dtype), side.out_splits, side.in_splits, comm, kind)
    return send
