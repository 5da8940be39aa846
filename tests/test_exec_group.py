"""DeepSpeed's group layout in the executor (static, fastermoe): every expert's AdamW state ZeRO-1 sharded within
its replica group. On 2 and 3 gloo ranks (float64) static trains exactly like one process; the bytes each step
moves are the reduce-scatter and all-gather within each expert's holders, counted by hand from the placement, and
fewer than SYMI's on the same placement; no segment leaves a replica group; the layout refuses a placement that
changes; a SIGKILLed static job resumes bit-identical from its checkpoints and sparse snapshots.

Legend: L MoE layers, E experts, G ranks, S slots per rank, R slots, P parameters of one expert, r holder ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_exec_train import scheme_bytes, train_and_compare
from train_jobs import finish, kill_once, read_rows, symi_train

from symi_exec import checkpoint, snapshots
from symi_exec.comm import Comm
from symi_exec.config import TrainConfig
from symi_exec.optim import shard_bounds
from symi_exec.optim_group import GroupExpertOptimizer, group_segments
from symi_sim.placement import Placement
from symi_sim.policies.static import static_phy2log

ELEM_BYTES = 8   # float64
KINDS = ("bytes_replica_grad_sync", "bytes_grad_collection", "bytes_weight_sendout", "bytes_optimizer_state")


def holders_of(phy2log_R: np.ndarray, slots_per_rank: int) -> dict[int, set[int]]:
    """expert -> the ranks with a slot holding it, from one layer's phy2log."""
    holders: dict[int, set[int]] = {}
    for rank, experts in enumerate(phy2log_R.reshape(-1, slots_per_rank)):
        for expert in experts.tolist():
            holders.setdefault(expert, set()).add(rank)
    return holders


def group_bytes(phy2log_LR: np.ndarray, slots_per_rank: int, expert_numel: int) -> dict[str, int]:
    """Bytes per step of the group layout, summed over ranks: per expert with r holders, the reduce-scatter sends
    every holder the other r - 1 holders' copies of its 1/r shard ((r - 1) P in all), the all-gather every holder's
    shard to the other r - 1 ((r - 1) P in all). Nothing else."""
    moved = sum((len(ranks) - 1) * expert_numel for phy2log_R in phy2log_LR
                for ranks in holders_of(phy2log_R, slots_per_rank).values())
    return {"bytes_replica_grad_sync": moved * ELEM_BYTES, "bytes_grad_collection": 0,
            "bytes_weight_sendout": moved * ELEM_BYTES, "bytes_optimizer_state": 0}


def ran_placements(out: Path) -> list[np.ndarray]:
    """[L, R] phy2log of every step the run made."""
    return [np.array(json.loads(line)["phy2log"]) for line in (out / "placements.jsonl").read_text().splitlines()]


def static_planner(step: int, load_LE: np.ndarray, cluster, previous: Placement | None) -> Placement:
    """DeepSpeed's static placement every step, for a policy that would re-place (symi)."""
    num_layers, num_experts = load_LE.shape
    return Placement.even(static_phy2log(num_layers=num_layers, num_experts=num_experts,
                                         num_slots=cluster.num_slots), num_experts)


def check_static_run(config: TrainConfig, num_ranks: int) -> list[dict[str, float]]:
    """Static on `num_ranks` ranks equals one process; it ran the group layout on the static placement, every step
    moving exactly the hand-counted bytes. Returns the metrics rows."""
    out, rows, _ = train_and_compare(config, num_ranks=num_ranks)
    assert json.loads((out / "config.json").read_text())["expert_optimizer"] == "group"
    cfg = config.model_config()
    want_LR = static_phy2log(num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                             num_slots=num_ranks * config.slots_per_rank)
    for row, phy2log_LR in zip(rows, ran_placements(out), strict=True):
        np.testing.assert_array_equal(phy2log_LR, want_LR)
        assert row["replica_moves"] == 0
        assert {kind: row[kind] for kind in KINDS} == group_bytes(phy2log_LR, config.slots_per_rank,
                                                                   cfg.expert_numel)
    # clipping was active, so the norm (each shard counted once) scaled every update the reference scaled
    assert all(row["grad_norm"] > config.grad_clip for row in rows)
    return rows


# ---------------------------------------------------------------------------------------------- segments


def test_group_segments_stay_within_each_replica_group() -> None:
    """One layer on 3 ranks x 3 slots, P = 7 (shards of 4 and 3): experts 0 and 1 on ranks {0, 1} (expert 0 twice
    on rank 0), expert 2 on {1, 2} (twice on rank 2), expert 3 on rank 2 only."""
    phy2log_LR = np.array([[0, 0, 1, 1, 2, 0, 2, 2, 3]])
    reduce_segs, gather_segs = group_segments(Placement.even(phy2log_LR, 4), slots_per_rank=3, expert_numel=7)
    holders = holders_of(phy2log_LR[0], 3)
    for seg in reduce_segs + gather_segs:
        assert seg.src in holders[seg.key[1]] and seg.dst in holders[seg.key[1]], seg
    assert all(seg.src != seg.dst for seg in reduce_segs)
    # the owner of shard i is the i-th sorted holder; each shard is reduced into and gathered from its owner
    for seg in reduce_segs + gather_segs:
        ranks = sorted(holders[seg.key[1]])
        owner = seg.dst if seg in reduce_segs else seg.src
        assert (seg.start, seg.stop) == shard_bounds(7, len(ranks), ranks.index(owner))

    def sent_per_rank(segs: list) -> list[int]:
        return [sum(seg.numel for seg in segs if seg.src == rank != seg.dst) for rank in range(3)]

    # reduce-scatter: a holder sends P - (its shard) per expert: rank 0 3 + 3, rank 1 4 + 4 + 3, rank 2 4
    assert sent_per_rank(reduce_segs) == [6, 11, 4]
    # all-gather: a holder sends its shard to the r - 1 others: rank 0 4 + 4, rank 1 3 + 3 + 4, rank 2 3
    assert sent_per_rank(gather_segs) == [8, 10, 3]
    # and keeps it (a copy into its own slots, never sent): one per (expert, holder)
    assert sorted((seg.key[1], seg.src) for seg in gather_segs if seg.src == seg.dst) == \
        [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]


def test_group_layout_refuses_a_changed_placement() -> None:
    """DeepSpeed's replication is static: the group layout cannot re-place, and says so (one rank, in process)."""
    comm = Comm(rank=0, world_size=1, device=torch.device("cpu"))
    weights_LEP = [torch.arange(12, dtype=torch.float64).reshape(2, 6)]
    opt = GroupExpertOptimizer.from_weights(weights_LEP, comm, slots_per_rank=2, lr=1e-2)
    slots_LSP = [torch.zeros(2, 6, dtype=torch.float64)]
    first = Placement.even(np.array([[0, 1]]), 2)
    opt.send_out(first, slots_LSP)
    assert torch.equal(slots_LSP[0], weights_LEP[0])
    opt.collect_gradients([torch.ones(2, 6, dtype=torch.float64)], first)
    opt.step(1e-2)
    opt.send_out(first, slots_LSP)   # the same placement again: fine
    with pytest.raises(ValueError, match="layout 'group'.*cannot re-place experts.*layers \\[0\\]"):
        opt.send_out(Placement.even(np.array([[1, 0]]), 2), slots_LSP)
    with pytest.raises(ValueError, match="layout 'group'"):
        opt.collect_gradients([torch.ones(2, 6, dtype=torch.float64)], Placement.even(np.array([[0, 0]]), 2))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_static_group_layout_matches_single_process_on_2_ranks(tmp_path: Path) -> None:
    # 2 ranks x 2 slots, 3 experts: slots hold 0 1 | 2 0, so expert 0's group is both ranks, 1 and 2 are alone
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=3, slots_per_rank=2, top_k=2, policy="static",
                         steps=3, batch_size=2, dtype="float64", seed=1, lr=1e-2, grad_clip=0.5,
                         capacity_factor=None)
    rows = check_static_run(config, 2)
    assert all(row["bytes_replica_grad_sync"] == 2 * 16384 * ELEM_BYTES for row in rows)   # expert 0, 2 layers


@pytest.mark.slow
def test_static_group_layout_on_3_ranks_matches_single_process_and_moves_less_than_symi(tmp_path: Path) -> None:
    """3 ranks x 3 slots, 4 experts: slots hold 0 1 2 | 3 0 1 | 2 3 0, so expert 0's group is all 3 ranks (shards
    of 5462, 5461, 5461 of P = 16384) and experts 1, 2, 3 have groups of 2 that leave one rank out. SYMI on the
    same placement (symi's optimizer, the static plan forced) trains the same model and moves more bytes."""
    common = dict(num_experts=4, slots_per_rank=3, top_k=2, steps=3, batch_size=2, dtype="float64", seed=3,
                  lr=1e-2, grad_clip=0.5, capacity_factor=None)
    static_rows = check_static_run(TrainConfig(out=str(tmp_path / "static"), policy="static", **common), 3)
    out, symi_rows, _ = train_and_compare(TrainConfig(out=str(tmp_path / "symi"), policy="symi", **common),
                                          static_planner, num_ranks=3)
    assert json.loads((out / "config.json").read_text())["expert_optimizer"] == "sharded"
    phy2log_LR = ran_placements(out)[0]
    want = scheme_bytes(phy2log_LR, phy2log_LR, 3, 3, 16384, ELEM_BYTES)   # the SYMI tests' own hand count
    assert all({kind: row[kind] for kind in want} == want for row in symi_rows)

    # per layer, P = 16384 elements of 8 bytes, 2 layers; expert 0 on all 3 ranks, experts 1-3 on 2 each:
    #   group: reduce-scatter (r - 1) P per expert = (2 + 1 + 1 + 1) P, all-gather the same: 10 P
    #   symi:  every holding sends all but its own 1/3 shard (5462, 5461, 5461 elements on ranks 0, 1, 2) to the
    #          other owners, and receives as much back in the send-out: 9 holdings x ~2/3 P = 6 P each way
    p_bytes = 2 * 16384 * ELEM_BYTES
    group = {"bytes_replica_grad_sync": 5 * p_bytes, "bytes_grad_collection": 0,
             "bytes_weight_sendout": 5 * p_bytes, "bytes_optimizer_state": 0}
    holdings = [sum(int(r in set(np.flatnonzero(phy2log_R == e) // 3)) for e in range(4)) for phy2log_R in phy2log_LR
                for r in range(3)]   # experts held per (layer, rank)
    moved = ELEM_BYTES * sum(n * (16384 - shard) for n, shard in zip(holdings, [5462, 5461, 5461] * 2, strict=True))
    symi = {"bytes_replica_grad_sync": 0, "bytes_grad_collection": moved, "bytes_weight_sendout": moved,
            "bytes_optimizer_state": 0}
    assert sum(holdings) == 2 * 9
    for static_row, symi_row in zip(static_rows, symi_rows, strict=True):
        assert {kind: static_row[kind] for kind in KINDS} == group
        assert {kind: symi_row[kind] for kind in KINDS} == symi
        assert sum(group.values()) == 2_621_440 < sum(symi.values())   # SYMI's layout moves more than DeepSpeed's
        assert static_row["loss"] == pytest.approx(symi_row["loss"], rel=1e-12)


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_static_killed_job_resumes_bit_identical(tmp_path: Path) -> None:
    """train_jobs' job under static (2 ranks x 3 slots, 4 experts: groups {0, 1} for experts 0 and 1, experts 2
    and 3 alone): full checkpoints every 4 steps and sparse snapshots of every expert in between; killed once
    sparse snapshot 6 is complete, resumed from full checkpoint 4 and the chain after it, it ends bit-identical."""
    steps, policy = "12", ["--policy", "static"]
    reference = symi_train(*policy, "--steps", steps, "--out", str(tmp_path / "reference"))
    ckpt = tmp_path / "ckpt"
    checkpoints = ["--checkpoint-every", "4", "--sparse-hot-share", "1"]
    job = symi_train(*policy, "--steps", steps, *checkpoints, "--checkpoint-dir", str(ckpt),
                     "--out", str(tmp_path / "killed"))
    kill_once(job, snapshots.sparse_dir(ckpt, 6) / checkpoint.MARKER)
    assert not (tmp_path / "killed" / "COMPLETE").exists()
    latest = checkpoint.latest_complete(ckpt)
    assert latest is not None and checkpoint.read_meta(latest)["expert_optimizer"] == "group"
    # each expert element stored once: expert 0 of layer 0 in halves on ranks 0 and 1, expert 2 whole on rank 0
    parts = [checkpoint.load_rank(latest, rank)["expert_optimizer"] for rank in range(2)]
    assert (parts[0]["bounds"][0, 0], parts[1]["bounds"][0, 0]) == ((0, 8192), (8192, 16384))
    assert parts[0]["bounds"][0, 2] == (0, 16384) and (0, 2) not in parts[1]["bounds"]

    finish(symi_train(*policy, "--steps", steps, *checkpoints, "--resume", str(ckpt), "--out",
                      str(tmp_path / "resumed")))
    finish(reference)
    recovery = json.loads((tmp_path / "resumed" / "recovery.json").read_text())
    assert recovery["step"] >= 6 and recovery["stale_experts"] == 0
    want = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=False)
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert set(got["model"]) == set(want["model"])
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    assert read_rows(tmp_path / "resumed") == read_rows(tmp_path / "reference")
