"""`symi train` with live shares (symi-balanced:shares=live): every MoE layer splits its tokens from the all-gathered
counts by the live rule. On 2 and 4 gloo ranks (float64): dropless training equals the single-process model; with
drops, the dropped assignments equal the simulator's route() of the recorded counts (per rank: the split prefers
keeping tokens on their rank) through the live placement, per step, layer and expert, and training equals a
single-process reference that drops the same assignments; the bytes of every step are those of planned shares
except the tokens' own all-to-alls, which move exactly the rows the live split sends to other ranks (no extra
collective); checkpoints resume with live shares, bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dispatch_rule import locality_counts
from test_exec_equivalence_ranks import placement_keep_rules
from test_exec_train import assert_same_parameters, read_metrics, train_and_compare, train_single_process
from train_jobs import read_rows

from symi_exec import checkpoint
from symi_exec.config import TrainConfig
from symi_exec.launch import launch
from symi_sim.placement import Placement
from symi_sim.routing import route
from symi_sim.simulator.run_dirs import read_run
from symi_sim.traces.format import read_trace

# spawns training ranks: `make test-fast` (pytest -m "not slow") leaves this module out
pytestmark = pytest.mark.slow

LIVE = "symi-balanced:shares=live"
TOKEN_KINDS = ("dispatch", "combine", "dispatch_grad", "combine_grad")
OTHER_KINDS = ("popularity", "dense_grad", "replica_grad_sync", "grad_collection", "weight_sendout",
               "optimizer_state")


def _config(out: Path, **fields: object) -> TrainConfig:
    base = dict(out=str(out), num_experts=5, slots_per_rank=3, top_k=2, policy=LIVE, steps=3, batch_size=1,
                dtype="float64", seed=1, lr=1e-2, router_skew=1.5, record_trace=True)
    return TrainConfig(**{**base, **fields})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "placements.jsonl").read_text().splitlines()]


def _placement(record: dict, num_experts: int, live: bool) -> Placement:
    return Placement(np.array(record["phy2log"]), np.array(record["share"]), num_experts, live_shares=live)


def remote_rows(count_GE: np.ndarray, phy2log_R: np.ndarray, assigned_R: np.ndarray, slots_per_rank: int) -> int:
    """Assignments a dropless layer sends to another rank: the locality-first split of tests/dispatch_rule.py (plain
    loops), the rows of split[g][p] whose source g is not slot p's rank."""
    split = locality_counts(count_GE.tolist(), phy2log_R.tolist(), assigned_R.tolist(), slots_per_rank)
    return sum(n for g, row in enumerate(split) for p, n in enumerate(row) if g != p // slots_per_rank)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_dropless_live_training_matches_single_process_and_adds_no_collective(tmp_path: Path,
                                                                              num_ranks: int) -> None:
    config = _config(tmp_path / "live", capacity_factor=None)
    out, rows, _ = train_and_compare(config, num_ranks=num_ranks)
    records = _records(out)
    assert [r.get("shares") for r in records] == ["live"] * config.steps
    assert all(p.live_shares for p in read_run(out, warmup_steps=1).placements)
    trace = read_trace(out / "trace.parquet")
    slots = config.slots_per_rank

    planned_config = _config(tmp_path / "planned", capacity_factor=None, policy="symi-balanced")
    launch(planned_config, num_ranks)
    planned_rows = read_metrics(Path(planned_config.out))
    # the same trajectory (dropless: the model does not depend on the split), so the same counts and replicas
    np.testing.assert_array_equal(read_trace(Path(planned_config.out) / "trace.parquet").src_counts_SLEG,
                                  trace.src_counts_SLEG)
    assert [r["phy2log"] for r in _records(Path(planned_config.out))] == [r["phy2log"] for r in records]
    row_bytes = config.model_config().d_model * 8   # float64 activations
    differs = 0
    remote_by_split = {"sources": 0, "no sources": 0}
    for step, record in enumerate(records):
        # no extra collective: the counts' all-gather and all the weight and gradient traffic are unchanged
        for kind in OTHER_KINDS:
            assert rows[step][f"bytes_{kind}"] == planned_rows[step][f"bytes_{kind}"], (step, kind)
        assert rows[step]["bytes_popularity"] > 0
        # the tokens' all-to-alls move what each split sends to other ranks, counted here by hand
        for live, step_rows in ((True, rows[step]), (False, planned_rows[step])):
            placement = _placement(record, config.num_experts, live)
            # the executor's split knows each rank's counts (the same all-gather), and prefers keeping tokens local
            routing = route(trace.counts_SLE[step], placement, slots_per_gpu=slots, capacity_factor=None,
                            source_LEG=trace.src_counts_SLEG[step])
            remote = sum(remote_rows(trace.src_counts_SLEG[step, layer].T, placement.phy2log_LR[layer],
                                     routing.assigned_LR[layer], slots) for layer in range(trace.num_layers))
            for kind in TOKEN_KINDS:
                assert step_rows[f"bytes_{kind}"] == remote * row_bytes, (step, live, kind)
            if live:
                live_assigned = routing.assigned_LR
                blind = route(trace.counts_SLE[step], placement, slots_per_gpu=slots, capacity_factor=None)
                np.testing.assert_array_equal(blind.gpu_load_LG.max(axis=1), routing.gpu_load_LG.max(axis=1))
                remote_by_split["sources"] += remote
                remote_by_split["no sources"] += sum(
                    remote_rows(trace.src_counts_SLEG[step, layer].T, placement.phy2log_LR[layer],
                                blind.assigned_LR[layer], slots) for layer in range(trace.num_layers))
            else:
                differs += int((live_assigned != routing.assigned_LR).any())
    assert differs > 0   # the live split really differed from the planned shares
    # as balanced as the split that ignores the sources, sending no more tokens to other ranks here (the strict gain
    # and its distance from the least-traffic optimum: tests/test_live_shares.py)
    assert remote_by_split["sources"] <= remote_by_split["no sources"], remote_by_split


# slot mode: an expert that overflows all its replicas splits evenly either way, so a milder skew leaves some to
# split live; in gpu mode the live split serves more than the planned shares under a strong skew
@pytest.mark.parametrize("num_ranks,mode,factor,skew", [(2, "slot", 0.9, 0.5), (2, "gpu", 0.8, 1.5),
                                                        (4, "slot", 0.9, 0.5), (4, "gpu", 0.8, 1.5)])
def test_live_drops_equal_the_simulators_and_training_matches_the_dropping_reference(
        tmp_path: Path, num_ranks: int, mode: str, factor: float, skew: float) -> None:
    config = _config(tmp_path / "run", capacity_factor=factor, capacity_mode=mode, seed=2, router_skew=skew)
    launch(config, num_ranks)
    out = Path(config.out)
    records, rows = _records(out), read_metrics(out)
    trace = read_trace(out / "trace.parquet")
    assignments_L = np.full(trace.num_layers, trace.top_k * trace.tokens_per_step)
    total_dropped = differs = 0
    for step, record in enumerate(records):
        assert record["shares"] == "live"
        predicted = route(trace.counts_SLE[step], _placement(record, config.num_experts, True),
                          slots_per_gpu=config.slots_per_rank, capacity_factor=factor, capacity_mode=mode,
                          num_assignments_L=assignments_L, source_LEG=trace.src_counts_SLEG[step])
        np.testing.assert_array_equal(np.array(record["dropped"]), predicted.dropped_LE)
        assert rows[step]["dropped_fraction"] == pytest.approx(predicted.dropped_fraction, abs=1e-12)
        total_dropped += predicted.dropped_LE.sum()
        planned = route(trace.counts_SLE[step], _placement(record, config.num_experts, False),
                        slots_per_gpu=config.slots_per_rank, capacity_factor=factor, capacity_mode=mode,
                        num_assignments_L=assignments_L)
        differs += int((planned.assigned_LR != predicted.assigned_LR).any())
        assert (predicted.dropped_LE.sum(axis=1) <= planned.dropped_LE.sum(axis=1)).all()   # fewest drops first
    assert total_dropped > 0 and differs > 0
    # the parameters and losses of a single process that drops the assignments the live split drops
    reference, losses, _ = train_single_process(config, num_ranks,
                                                keep_rules=placement_keep_rules(config, num_ranks, records))
    assert_same_parameters(out, reference, config.seed)
    assert [row["loss"] for row in rows] == pytest.approx(losses, rel=1e-12)


def test_live_checkpoint_resumes_bit_identical_with_live_shares(tmp_path: Path) -> None:
    config = _config(tmp_path / "full", policy="symi-balanced", policy_options={"shares": "live"}, steps=4,
                     capacity_factor=0.8, capacity_mode="gpu", checkpoint_every=2, log_interval=1000,
                     record_trace=False)
    launch(config, 2)
    ckpt = config.checkpoint_root()
    (checkpoint.step_dir(ckpt, 4) / checkpoint.MARKER).unlink()   # as if the job died writing step 4
    assert checkpoint.latest_complete(ckpt) == checkpoint.step_dir(ckpt, 2)
    resumed = TrainConfig(**{**config.__dict__, "out": str(tmp_path / "resumed"), "resume": str(ckpt)})
    launch(resumed, 2)
    want = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    assert read_rows(tmp_path / "resumed") == read_rows(tmp_path / "full")
    # the steps after the resume ran (and recorded) live shares: the restored placement kept the flag
    assert _records(tmp_path / "resumed") == _records(tmp_path / "full")
    assert all(r["shares"] == "live" for r in _records(tmp_path / "resumed"))
    assert got["placement"].get("shares") == "live"
