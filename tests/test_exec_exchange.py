"""The expert optimizers' exchanges as arrays: the segment tables against loops written from each layout's rule, a
rank's side of a table against the Segment list's partition, and SYMI's vectorised collection and send-out played
on G ranks in one process (one thread per rank, the all-to-all a real exchange of their buffers) against the
per-segment `exchange` they replace, bit for bit, and against the sums they stand for; plus the benchmark's smoke run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import symi_exec.comm as comm_module
from symi_exec.comm import Comm, Segment, exchange
from symi_exec.optim import (
    ShardedExpertOptimizer,
    group_tables,
    holder_mask,
    local_grad_sums,
    pack_shard_blocks_,
    replica_sync_segments,
    shard_bounds,
    sharded_tables,
    unpack_shard_blocks_,
)
from symi_exec.optim_replica import migration_table
from symi_sim.placement import Placement

ROOT = Path(__file__).resolve().parent.parent
RANK_COUNTS = (1, 2, 3, 5, 8)


def random_phy2log(rng: np.random.Generator, num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """[L, R]: every expert at least once per layer, the other slots anywhere."""
    return np.stack([rng.permutation(np.concatenate([np.arange(num_experts),
                                                     rng.integers(0, num_experts, num_slots - num_experts)]))
                     for _ in range(num_layers)])


def random_cases(seed: int, per_rank_count: int = 4) -> list[tuple[int, int, int, np.ndarray, int]]:
    """(G, S, E, phy2log [L, R], P) cases over RANK_COUNTS, P sometimes below G (empty shards)."""
    rng = np.random.default_rng(seed)
    cases = []
    for num_ranks in RANK_COUNTS:
        for _ in range(per_rank_count):
            slots = int(rng.integers(1, 4))
            num_experts = int(rng.integers(1, num_ranks * slots + 1))
            num_layers = int(rng.integers(1, 4))
            numel = int(rng.choice([1, 2, 7, 13, 40]))
            cases.append((num_ranks, slots, num_experts, random_phy2log(rng, num_layers, num_experts,
                                                                         num_ranks * slots), numel))
    return cases


def holders_by_loop(phy2log_R: np.ndarray, expert: int, slots: int) -> list[int]:
    return sorted({slot // slots for slot in range(len(phy2log_R)) if phy2log_R[slot] == expert})


# ---------------------------------------------------------------------------------------------- the rules, as loops


def sharded_by_loop(phy2log_LR: np.ndarray, num_experts: int, slots: int, num_ranks: int, numel: int
                    ) -> tuple[list[Segment], list[Segment]]:
    """Collection: every holder h of (layer, expert) sends rank r shard r of G; send-out: rank r sends its shard to
    every holder. Layers, experts, holders (sorted), then ranks."""
    collect, sendout = [], []
    for layer, phy2log_R in enumerate(phy2log_LR):
        for expert in range(num_experts):
            for holder in holders_by_loop(phy2log_R, expert, slots):
                for rank in range(num_ranks):
                    bounds = shard_bounds(numel, num_ranks, rank)
                    collect.append(Segment(holder, rank, (layer, expert), *bounds))
                    sendout.append(Segment(rank, holder, (layer, expert), *bounds))
    return collect, sendout


def group_by_loop(phy2log_LR: np.ndarray, num_experts: int, slots: int, numel: int
                  ) -> tuple[list[Segment], list[Segment]]:
    """Holder i of the r sorted holders owns shard i of r; reduce: every other holder sends it that shard; gather:
    it sends that shard to every holder (itself included)."""
    reduce, gather = [], []
    for layer, phy2log_R in enumerate(phy2log_LR):
        for expert in range(num_experts):
            ranks = holders_by_loop(phy2log_R, expert, slots)
            for i, owner in enumerate(ranks):
                bounds = shard_bounds(numel, len(ranks), i)
                reduce += [Segment(h, owner, (layer, expert), *bounds) for h in ranks if h != owner]
                gather += [Segment(owner, h, (layer, expert), *bounds) for h in ranks]
    return reduce, gather


def migration_by_loop(old_LR: np.ndarray, new_LR: np.ndarray, num_experts: int, slots: int, numel: int
                      ) -> list[Segment]:
    """A new holder that did not hold the expert receives it whole from sorted(old holders)[dst % count]."""
    segs = []
    for layer in range(len(old_LR)):
        for expert in range(num_experts):
            old = holders_by_loop(old_LR[layer], expert, slots)
            segs += [Segment(old[dst % len(old)], dst, (layer, expert), 0, numel)
                     for dst in holders_by_loop(new_LR[layer], expert, slots) if dst not in old]
    return segs


# ---------------------------------------------------------------------------------------------- tables


def test_holder_mask_marks_the_ranks_of_every_slot() -> None:
    phy2log_LR = np.array([[0, 0, 1, 1, 2, 0, 2, 2, 3], [3, 2, 1, 0, 0, 0, 1, 1, 1]])
    mask_LEG = holder_mask(phy2log_LR, 4, 3)
    assert mask_LEG.shape == (2, 4, 3)
    assert [np.flatnonzero(mask_LEG[0, e]).tolist() for e in range(4)] == [[0, 1], [0, 1], [1, 2], [2]]
    assert [np.flatnonzero(mask_LEG[1, e]).tolist() for e in range(4)] == [[1], [0, 2], [0], [0]]


def test_sharded_tables_equal_the_rule() -> None:
    for num_ranks, slots, num_experts, phy2log_LR, numel in random_cases(1):
        want_collect, want_sendout = sharded_by_loop(phy2log_LR, num_experts, slots, num_ranks, numel)
        collect, sendout = sharded_tables(phy2log_LR, num_experts=num_experts, slots_per_rank=slots,
                                          world_size=num_ranks, expert_numel=numel)
        assert collect.segments() == want_collect
        assert sendout.segments() == want_sendout
        # per layer: one segment per (holder, rank): G x (holders summed over experts)
        assert len(collect) == num_ranks * int(holder_mask(phy2log_LR, num_experts, slots).sum())


def test_group_and_replica_tables_equal_the_rule() -> None:
    for _, slots, num_experts, phy2log_LR, numel in random_cases(2):
        want_reduce, want_gather = group_by_loop(phy2log_LR, num_experts, slots, numel)
        reduce, gather = group_tables(phy2log_LR, num_experts=num_experts, slots_per_rank=slots, expert_numel=numel)
        assert reduce.segments() == want_reduce
        assert gather.segments() == want_gather
        sync_reduce, sync_gather = replica_sync_segments(phy2log_LR, num_experts=num_experts, slots_per_rank=slots,
                                                         expert_numel=numel)
        assert sync_reduce == want_reduce
        assert sync_gather == [seg for seg in want_gather if seg.src != seg.dst]


def test_migration_table_equals_the_rule() -> None:
    rng = np.random.default_rng(3)
    for num_ranks, slots, num_experts, old_LR, numel in random_cases(3):
        new_LR = random_phy2log(rng, old_LR.shape[0], num_experts, num_ranks * slots)
        want = migration_by_loop(old_LR, new_LR, num_experts, slots, numel)
        assert migration_table(old_LR, new_LR, num_experts=num_experts, slots_per_rank=slots,
                               expert_numel=numel).segments() == want
        assert migration_table(old_LR, old_LR, num_experts=num_experts, slots_per_rank=slots,
                               expert_numel=numel).segments() == []


def test_a_ranks_side_partitions_the_segment_list_as_exchange_does() -> None:
    """send: src == rank != dst grouped by dst in list order; recv: by src; local: list order; splits in elements."""
    for num_ranks, slots, num_experts, phy2log_LR, numel in random_cases(4, per_rank_count=2):
        for table in sharded_tables(phy2log_LR, num_experts=num_experts, slots_per_rank=slots, world_size=num_ranks,
                                    expert_numel=numel):
            segs = table.segments()
            for rank in range(num_ranks):
                side = table.side(rank, num_ranks)
                send = [s for dst in range(num_ranks) for s in segs if s.src == rank and s.dst == dst != rank]
                recv = [s for src in range(num_ranks) for s in segs if s.dst == rank and s.src == src != rank]
                assert [segs[i] for i in side.send_N] == send
                assert [segs[i] for i in side.recv_N] == recv
                assert [segs[i] for i in side.local_N] == [s for s in segs if s.src == s.dst == rank]
                assert side.in_splits == [sum(s.numel for s in send if s.dst == g) for g in range(num_ranks)]
                assert side.out_splits == [sum(s.numel for s in recv if s.src == g) for g in range(num_ranks)]
                assert side.crossing == any(s.src != s.dst for s in segs)


def test_shard_blocks_round_trip_shard_major() -> None:
    """pack: the columns of shards lo .. hi - 1, shard by shard, each [U, p_g] row-major; unpack inverts it."""
    for numel, num_shards in ((7, 3), (2, 5), (12, 4), (1, 1), (9, 2)):
        x_UP = torch.arange(3 * numel, dtype=torch.float64).view(3, numel)
        for lo in range(num_shards + 1):
            for hi in range(lo, num_shards + 1):
                bounds = [shard_bounds(numel, num_shards, g) for g in range(lo, hi)]
                want = torch.cat([x_UP[:, a:b].reshape(-1) for a, b in bounds] + [torch.zeros(0, dtype=x_UP.dtype)])
                out = torch.full_like(want, -1.0)
                pack_shard_blocks_(out, x_UP, num_shards, lo, hi)
                assert torch.equal(out, want)
                back = torch.full_like(x_UP, -1.0)
                unpack_shard_blocks_(back, want, num_shards, lo, hi)
                for a, b in bounds:
                    assert torch.equal(back[:, a:b], x_UP[:, a:b])
                untouched = torch.ones(numel, dtype=torch.bool)
                for a, b in bounds:
                    untouched[a:b] = False
                assert (back[:, untouched] == -1.0).all()


# ---------------------------------------------------------------------------------------------- G ranks, one process


class ThreadedAllToAll:
    """dist.all_to_all_single for G threads, one per rank: each deposits its buffer, and after all did, takes its
    part of everyone's (the real collective's semantics, so the real all_to_all_rows runs around it)."""

    def __init__(self, num_ranks: int) -> None:
        self.barrier = threading.Barrier(num_ranks, timeout=60)
        self.sends: list[Any] = [None] * num_ranks
        self.local = threading.local()
        self.calls = 0

    def __call__(self, out: torch.Tensor, send: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        rank = self.local.rank
        self.sends[rank] = (send.clone(), list(in_splits))
        self.barrier.wait()
        parts = [torch.split(buf, splits)[rank] for buf, splits in self.sends]
        assert [len(part) for part in parts] == list(out_splits)
        out.copy_(torch.cat(parts))
        if rank == 0:
            self.calls += 1
        self.barrier.wait()   # nobody deposits the next buffer before every rank took its parts


def run_ranks(num_ranks: int, body: Callable[[int], Any], monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], int]:
    """body(rank) on one thread per rank, the all-to-all shared between them; (results by rank, collectives)."""
    fake = ThreadedAllToAll(num_ranks)
    monkeypatch.setattr(comm_module.dist, "all_to_all_single", fake)
    results: list[Any] = [None] * num_ranks
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        fake.local.rank = rank
        try:
            results[rank] = body(rank)
        except BaseException as error:   # noqa: BLE001 - re-raised on the main thread
            errors.append(error)
            fake.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(num_ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, fake.calls


def reference_collect(opt: ShardedExpertOptimizer, slot_grads_LSP: list[torch.Tensor], placement: Placement
                      ) -> list[torch.Tensor]:
    """The per-segment collection this change replaced: Segment list, read/write callbacks, `exchange`."""
    comm = opt.comm
    partial = local_grad_sums(slot_grads_LSP, placement, comm.rank, opt.slots_per_rank, dtype=opt.master_dtype)
    segs, _ = sharded_by_loop(placement.phy2log_LR, opt.num_experts, opt.slots_per_rank, comm.world_size,
                              opt.expert_numel)
    grad_LEp = [torch.zeros_like(g) for g in opt.grad_LEp]

    def add_grad(seg: Segment, data: torch.Tensor) -> None:
        grad_LEp[seg.key[0]][seg.key[1]] += data.to(opt.master_dtype) / comm.world_size

    exchange(segs, comm, "grad_collection", slot_grads_LSP[0].dtype,
             lambda seg: partial[seg.key][seg.start:seg.stop], add_grad)
    return grad_LEp


def reference_send_out(opt: ShardedExpertOptimizer, placement: Placement, slot_weights_LSP: list[torch.Tensor]
                       ) -> None:
    """The per-segment send-out this change replaced."""
    _, segs = sharded_by_loop(placement.phy2log_LR, opt.num_experts, opt.slots_per_rank, opt.comm.world_size,
                              opt.expert_numel)
    spr, me = opt.slots_per_rank, opt.comm.rank

    def write_slots(seg: Segment, data: torch.Tensor) -> None:
        layer, expert = seg.key
        for s in np.flatnonzero(placement.phy2log_LR[layer][me * spr:(me + 1) * spr] == expert):
            slot_weights_LSP[layer][s, seg.start:seg.stop] = data

    exchange(segs, opt.comm, "weight_sendout", slot_weights_LSP[0].dtype,
             lambda seg: opt.master_LEp[seg.key[0]][seg.key[1]], write_slots)


def play_sharded(rank: int, *, num_ranks: int, weights_LEP: list[torch.Tensor], grads_GLSP: list[list[torch.Tensor]],
                 placements: list[Placement], slots: int, dtype: torch.dtype, master_dtype: torch.dtype | None,
                 vectorised: bool) -> dict[str, Any]:
    """One rank of a G-rank job: per placement, collect the gradients, move every master shard by 0.5 (step + 1),
    send out; returns the collected shards, the slots and the bytes (vectorised, or the per-segment reference)."""
    comm = Comm(rank=rank, world_size=num_ranks, device=torch.device("cpu"))
    opt = ShardedExpertOptimizer.from_weights(weights_LEP, comm, slots_per_rank=slots, lr=1e-3, dtype=dtype,
                                              master_dtype=master_dtype)
    num_layers, numel = len(weights_LEP), weights_LEP[0].shape[1]
    out: dict[str, Any] = {"grads": [], "slots": []}
    for step, placement in enumerate(placements):
        if vectorised:
            opt.collect_gradients(grads_GLSP[rank], placement)
            out["grads"].append([g.clone() for g in opt.grad_LEp])
        else:
            out["grads"].append(reference_collect(opt, grads_GLSP[rank], placement))
        with torch.no_grad():   # a change the send-out must carry: every rank moves its own shards
            for master_Ep in opt.master_LEp:
                master_Ep.add_(0.5 * (step + 1))
        slot_weights_LSP = [torch.full((slots, numel), float("nan"), dtype=dtype) for _ in range(num_layers)]
        if vectorised:
            opt.send_out(placement, slot_weights_LSP)
        else:
            reference_send_out(opt, placement, slot_weights_LSP)
        out["slots"].append(slot_weights_LSP)
    out["bytes"] = comm.take_bytes()
    return out


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
@pytest.mark.parametrize("dtype,master_dtype", [(torch.float64, None), (torch.bfloat16, torch.float32)])
def test_sharded_exchanges_on_g_ranks_equal_the_per_segment_exchange(
        num_ranks: int, dtype: torch.dtype, master_dtype: torch.dtype | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random placements (an expert up to 4 times on one rank, P below and above G): on every rank the collected
    gradient shards equal the per-segment exchange's bit for bit and the sum over all ranks' slots / G; the slots
    after send-out equal the per-segment send-out's and the master weights; the bytes and the number of
    all-to-alls are the same."""
    rng = np.random.default_rng(10 + num_ranks)
    master = master_dtype or dtype
    # bfloat16 partial sums travel rounded to 8 bits of mantissa
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 3e-2, "atol": 6e-2}
    for numel in (3, 41):
        slots, num_layers = 4, 2
        num_experts = int(rng.integers(1, num_ranks * slots + 1))
        placements = [Placement.even(random_phy2log(rng, num_layers, num_experts, num_ranks * slots), num_experts)
                      for _ in range(3)]
        job = {"num_ranks": num_ranks, "slots": slots, "placements": placements, "dtype": dtype,
               "master_dtype": master_dtype,
               "weights_LEP": [torch.randn(num_experts, numel, dtype=torch.float64).to(master)
                               for _ in range(num_layers)],
               "grads_GLSP": [[torch.randn(slots, numel, dtype=torch.float64).to(dtype) for _ in range(num_layers)]
                              for _ in range(num_ranks)]}
        new, new_calls = run_ranks(num_ranks, lambda rank, job=job: play_sharded(rank, vectorised=True, **job),
                                   monkeypatch)
        old, old_calls = run_ranks(num_ranks, lambda rank, job=job: play_sharded(rank, vectorised=False, **job),
                                   monkeypatch)
        assert new_calls == old_calls == (2 * len(placements) if num_ranks > 1 else 0)
        for rank in range(num_ranks):
            assert new[rank]["bytes"] == old[rank]["bytes"]
            start, stop = shard_bounds(numel, num_ranks, rank)
            for step, placement in enumerate(placements):
                for layer in range(num_layers):
                    assert torch.equal(new[rank]["grads"][step][layer], old[rank]["grads"][step][layer])
                    assert torch.equal(new[rank]["slots"][step][layer], old[rank]["slots"][step][layer])
                    # independently: the shard of the sum over every rank's slots of the expert, / G
                    phy2log_GS = placement.phy2log_LR[layer].reshape(num_ranks, slots)
                    for expert in range(num_experts):
                        want = sum(job["grads_GLSP"][g][layer][s].to(master)
                                   for g in range(num_ranks) for s in range(slots) if phy2log_GS[g, s] == expert)
                        torch.testing.assert_close(new[rank]["grads"][step][layer][expert],
                                                   (want / num_ranks)[start:stop], **tol)
                    updated_EP = job["weights_LEP"][layer].clone()
                    for k in range(step + 1):
                        updated_EP.add_(0.5 * (k + 1))
                    assert torch.equal(new[rank]["slots"][step][layer], updated_EP[phy2log_GS[rank]].to(dtype))


def test_sharded_collection_sums_a_ranks_slots_in_slot_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank, four slots of one expert holding 1e16, 1, -1e16, 1: slot order gives ((1e16 + 1) - 1e16) + 1 = 1
    (1e16 + 1 rounds to 1e16 in float64), not 2."""
    comm = Comm(rank=0, world_size=1, device=torch.device("cpu"))
    opt = ShardedExpertOptimizer.from_weights([torch.zeros(1, 1, dtype=torch.float64)], comm, slots_per_rank=4,
                                              lr=1e-3)
    grads = [torch.tensor([[1e16], [1.0], [-1e16], [1.0]], dtype=torch.float64)]
    opt.collect_gradients(grads, Placement.even(np.zeros((1, 4), dtype=np.int64), 1))
    assert opt.grad_LEp[0].tolist() == [[1.0]]


# ---------------------------------------------------------------------------------------------- benchmark


def test_bench_exchange_quick_run_writes_its_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_exchange.py"), "--quick", "--out", "out"],
                   check=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "out" / "bench_exchange.json").is_file()
    with open(tmp_path / "out" / "bench_exchange.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    for key in ("collect_wall_ms", "sendout_wall_ms", "per_layer_wall_ms", "per_layer_cpu_ms"):
        assert float(row[key]) > 0, key
    assert int(row["ranks"]) == 8 and row["implementation"] == "tables"
