"""Sparse popularity-aware snapshots: the hot-expert rule on hand-made loads; the bytes each snapshot holds; a job
SIGKILLed mid-chain recovers every expert exactly as it was at its own last snapshot (checked against a run that
wrote a full checkpoint after every step), and with hot share 1 resumes bit-identical to an uninterrupted run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from train_jobs import finish, kill_once, read_rows, symi_train

from cli import symi
from symi_exec import checkpoint, snapshots
from symi_exec.config import TrainConfig
from symi_exec.launch import JobFailed, launch
from symi_exec.model import GPT
from symi_sim.traces.format import read_trace

STEPS = 30


# ---------------------------------------------------------------------------------------------- the rule


def test_hot_mask_covers_the_share_with_the_fewest_experts() -> None:
    unsaved_LE = np.array([[50.0, 30.0, 15.0, 5.0],     # 0.5 of 100: expert 0 alone; 0.8: experts 0 and 1
                           [10.0, 10.0, 10.0, 10.0],    # ties: the longer unsaved (age) first, then the lower id
                           [0.0, 0.0, 0.0, 0.0]])       # a layer without tokens: nothing hot
    age_LE = np.array([[1, 1, 1, 1], [1, 3, 2, 3], [4, 4, 4, 4]])
    assert snapshots.hot_mask_LE(unsaved_LE, age_LE, 0.5).tolist() == [
        [True, False, False, False], [False, True, False, True], [False] * 4]
    # 0.8: layer 0 exactly at the boundary (50 + 30 = 80 covers 0.8 of 100, no third expert); layer 1 needs 32
    # of 40, so three experts (30) are not enough
    assert snapshots.hot_mask_LE(unsaved_LE, age_LE, 0.8).tolist() == [
        [True, True, False, False], [True] * 4, [False] * 4]
    assert snapshots.hot_mask_LE(unsaved_LE, age_LE, 0.75)[1].tolist() == [False, True, True, True]
    assert snapshots.hot_mask_LE(unsaved_LE, age_LE, 1.0).all()          # 1: every expert, idle ones included
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="hot share"):
            snapshots.hot_mask_LE(unsaved_LE, age_LE, bad)


def test_tracker_accumulates_until_saved() -> None:
    tracker = snapshots.SnapshotTracker.fresh(1, 3)
    tracker.record_step(np.array([[4.0, 1.0, 0.0]]))
    tracker.mark_saved(np.array([[True, False, False]]))
    tracker.record_step(np.array([[2.0, 2.0, 1.0]]))
    assert tracker.unsaved_LE.tolist() == [[2.0, 3.0, 1.0]]
    assert tracker.age_LE.tolist() == [[1, 2, 2]]
    again = snapshots.SnapshotTracker.from_state(tracker.state())
    assert again.unsaved_LE.tolist() == tracker.unsaved_LE.tolist() and again.age_LE.tolist() == [[1, 2, 2]]


def replay_masks(counts_SLE: np.ndarray, hot_share: float, full_steps: set[int]) -> tuple[list, np.ndarray,
                                                                                             np.ndarray]:
    """The hot masks of snapshots 1..S and the final (unsaved, age), recomputed from a recorded trace."""
    unsaved_LE = np.zeros(counts_SLE.shape[1:])
    age_LE = np.zeros(counts_SLE.shape[1:], dtype=np.int64)
    masks = []
    for step, load_LE in enumerate(counts_SLE, start=1):
        unsaved_LE, age_LE = unsaved_LE + load_LE, age_LE + 1
        mask_LE = np.ones(load_LE.shape, bool) if step in full_steps else \
            snapshots.hot_mask_LE(unsaved_LE, age_LE, hot_share)
        masks.append(mask_LE)
        unsaved_LE, age_LE = np.where(mask_LE, 0.0, unsaved_LE), np.where(mask_LE, 0, age_LE)
    return masks, unsaved_LE, age_LE


# ---------------------------------------------------------------------------------------------- bytes


@pytest.mark.slow
@pytest.mark.parametrize("policy, options, overlap", [("symi", {}, False),
                                                     ("flexmoe-2", {"min_gain_ratio": 0.0}, True),
                                                     ("static", {}, True)])
def test_snapshot_bytes_are_the_hot_experts_state(tmp_path: Path, policy: str, options: dict, overlap: bool) -> None:
    """Every write's expert bytes = (hot experts) x 3 tensors (weights, two moments) x P x 4 bytes (float32), in
    all three optimizer layouts (sharded, replica, group), blocking or overlapped; the hot experts of each sparse
    snapshot are those the rule picks on the real loads."""
    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=3, top_k=2, policy=policy,
                         policy_options=options, steps=8, batch_size=2, capacity_factor=1.0, checkpoint_every=5,
                         sparse_hot_share=0.6, record_trace=True, log_interval=1000, overlap_checkpoints=overlap)
    launch(config, 2)
    cfg = config.model_config()
    expert_numel = 2 * cfg.d_model * cfg.d_ff
    with open(tmp_path / "run" / "checkpoints.csv") as f:
        writes = list(csv.DictReader(f))
    assert [(int(w["step"]), w["kind"]) for w in writes] == \
        [(0, "full"), (1, "sparse"), (2, "sparse"), (3, "sparse"), (4, "sparse"), (5, "full"), (6, "sparse"),
         (7, "sparse"), (8, "full")]
    counts_SLE = read_trace(tmp_path / "run" / "trace.parquet").counts_SLE
    masks, _, _ = replay_masks(counts_SLE, 0.6, full_steps={5, 8})
    num_all = cfg.num_layers * cfg.num_experts
    for write in writes:
        step, hot = int(write["step"]), int(write["hot_experts"])
        assert hot == (num_all if write["kind"] == "full" else int(masks[step - 1].sum())), step
        assert int(write["expert_bytes"]) == hot * 3 * expert_numel * 4
        assert int(write["bytes"]) > int(write["expert_bytes"])        # plus dense state, RNG, placement
        assert 0 < float(write["blocked_s"]) and 0 < float(write["write_s"])
    sparse = [w for w in writes if w["kind"] == "sparse"]
    assert all(int(w["hot_experts"]) < num_all for w in sparse)
    # (the full checkpoint of step 0 holds no dense AdamW moments yet)
    assert max(int(w["bytes"]) for w in sparse) < \
        min(int(w["bytes"]) for w in writes if w["kind"] == "full" and int(w["step"]) > 0)
    # every full checkpoint superseded the sparse snapshots before it
    assert sorted(d.name for d in config.checkpoint_root().glob("step-*")) == \
        ["step-00000000", "step-00000005", "step-00000008"]


# ---------------------------------------------------------------------------------------------- recovery


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["symi", "flexmoe-2:min_gain_ratio=0"])
def test_hot_share_one_resumes_bit_identical(tmp_path: Path, policy: str) -> None:
    name, _, option = policy.partition(":")
    policy_args = ["--policy", name, *(["-o", option] if option else [])]
    reference = symi_train(*policy_args, "--steps", str(STEPS), "--out", str(tmp_path / "reference"))
    ckpt = tmp_path / "ckpt"
    job = symi_train(*policy_args, "--steps", str(STEPS), "--checkpoint-every", "100", "--sparse-hot-share", "1",
                     "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "killed"))
    kill_once(job, snapshots.sparse_dir(ckpt, 5) / checkpoint.MARKER)
    assert not (tmp_path / "killed" / "COMPLETE").exists()
    assert [d.name for d in ckpt.glob("step-*")] == ["step-00000000"]       # only the chain's base is full
    finish(symi_train(*policy_args, "--steps", str(STEPS), "--checkpoint-every", "100", "--sparse-hot-share", "1",
                      "--resume", str(ckpt), "--out", str(tmp_path / "resumed")))
    finish(reference)
    recovery = json.loads((tmp_path / "resumed" / "recovery.json").read_text())
    assert recovery["sparse_snapshots"] >= 5 and recovery["step"] == recovery["sparse_snapshots"]
    assert recovery["stale_experts"] == 0 and recovery["lost_expert_assignments"] == 0
    want = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=False)
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert read_rows(tmp_path / "resumed") == read_rows(tmp_path / "reference")


@pytest.mark.slow
def test_sparse_recovery_restores_each_expert_at_its_last_snapshot(tmp_path: Path) -> None:
    """Hot share 0.5, overlapped writes: recovery gives the dense state of the last step exactly, and each expert's
    weights and moments exactly as the uninterrupted run had them after the step of that expert's last
    snapshot."""
    ref_ckpt, ckpt = tmp_path / "ref-ckpt", tmp_path / "ckpt"
    reference = symi_train("--steps", str(STEPS), "--checkpoint-every", "1", "--checkpoint-dir", str(ref_ckpt),
                           "--record-trace", "--out", str(tmp_path / "reference"))
    job = symi_train("--steps", str(STEPS), "--checkpoint-every", "100", "--sparse-hot-share", "0.5",
                     "--overlap-checkpoints", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "killed"))
    kill_once(job, snapshots.sparse_dir(ckpt, 6) / checkpoint.MARKER)
    finish(reference)
    cfg = TrainConfig(out="unused", num_experts=4, top_k=2).model_config()
    recovered = snapshots.recover(ckpt, cfg.num_layers, cfg.num_experts)
    step = recovered.step
    assert step == len(recovered.chain) >= 6

    # the hot experts of every snapshot and the final bookkeeping, recomputed from the reference's real loads
    counts_SLE = read_trace(tmp_path / "reference" / "trace.parquet").counts_SLE[:step]
    masks, unsaved_LE, age_LE = replay_masks(counts_SLE, 0.5, full_steps=set())
    for snapshot, mask_LE in zip(recovered.chain, masks, strict=True):
        head = checkpoint.load_rank(snapshot, 0)
        assert sorted(map(tuple, head["hot_keys"])) == [tuple(map(int, k)) for k in np.argwhere(mask_LE)]
    np.testing.assert_array_equal(recovered.tracker.age_LE, age_LE)
    np.testing.assert_array_equal(recovered.tracker.unsaved_LE, unsaved_LE)
    assert 0 < (age_LE > 0).sum() < age_LE.size          # some experts are stale, some current

    # dense state: the reference's after `step` steps, exactly
    ref_head = checkpoint.load_rank(checkpoint.step_dir(ref_ckpt, step), 0)
    got_head = recovered.head
    for key, value in ref_head["dense"].items():
        assert torch.equal(got_head["dense"][key], value), key
    # experts: each from the reference after its own last snapshot's step (step 0: the initial model)
    torch.manual_seed(0)
    initial_LEP = [moe.experts.flat_EP().detach() for moe in GPT(cfg, seed=0).moe_layers]
    recovered_full = recovered.experts.assemble(cfg.num_layers, cfg.num_experts)
    for layer in range(cfg.num_layers):
        for expert in range(cfg.num_experts):
            saved_at = step - int(age_LE[layer, expert])
            if saved_at == 0:
                want = {"weights": initial_LEP[layer][expert], "exp_avg": torch.zeros_like(initial_LEP[0][0]),
                        "exp_avg_sq": torch.zeros_like(initial_LEP[0][0])}
            else:
                states = [checkpoint.load_rank(checkpoint.step_dir(ref_ckpt, saved_at), r) for r in range(2)]
                full = checkpoint.assemble_expert_state(states)
                want = {name: full[name][layer][expert] for name in ("weights", "exp_avg", "exp_avg_sq")}
            for name, value in want.items():
                assert torch.equal(recovered_full[name][layer][expert], value), (layer, expert, name)

    # the job resumes from there, reports what it lost, and finishes
    finish(symi_train("--steps", str(STEPS), "--checkpoint-every", "100", "--sparse-hot-share", "0.5",
                      "--resume", str(ckpt), "--out", str(tmp_path / "resumed")))
    recovery = json.loads((tmp_path / "resumed" / "recovery.json").read_text())
    assert recovery["step"] == step and recovery["sparse_snapshots"] == step
    assert recovery["stale_experts"] == int((age_LE > 0).sum())
    assert recovery["max_staleness_steps"] == int(age_LE.max())
    assert recovery["lost_expert_assignments"] == float(unsaved_LE.sum())
    assert read_rows(tmp_path / "resumed")[:step] == read_rows(tmp_path / "reference")[:step]
    assert len(read_rows(tmp_path / "resumed")) == STEPS


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--checkpoint-every", "5", "--sparse-hot-share", "0"], "sparse hot share must be a number in (0, 1]"),
    (["--checkpoint-every", "5", "--sparse-hot-share", "1.5"], "sparse hot share must be a number in (0, 1]"),
    (["--checkpoint-every", "5", "--sparse-hot-share", "nan"], "sparse hot share must be a number in (0, 1]"),
    (["--sparse-hot-share", "0.5"], "sparse snapshots need full checkpoints"),
    (["--fail-at-step", "-1"], "fail_at_step must be an integer >= 0"),
    (["--checkpoint-every", "5", "--keep-checkpoints", "-2"], "keep_checkpoints must be an integer >= 0"),
])
def test_bad_sparse_options_fail_cleanly(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["train", "--steps", "2", "--out", str(out), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "run-checkpoints").exists()


@pytest.mark.slow
def test_failure_drill_is_one_error_line_and_a_partial_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "2", "--steps", "3", "--checkpoint-every", "1",
                                       "--fail-at-step", "2", "--out", str(out)])
    assert result.exit_code == 1
    assert "Error: rank" in result.output and "died" in result.output and "Traceback" not in result.output
    # the rows of steps 0 and 1 were written out (each checkpoint writes them out first); no COMPLETE
    assert f"; partial outputs in {out}: metrics up to step 2" in result.output
    assert not (out / "COMPLETE").exists() and len((out / "metrics.csv").read_text().splitlines()) == 3
    assert checkpoint.latest_complete(tmp_path / "run-checkpoints") == checkpoint.step_dir(tmp_path / "run-checkpoints",
                                                                                           2)


@pytest.mark.slow
def test_sparse_chain_resumes_on_fewer_ranks(tmp_path: Path) -> None:
    """A chain written by 2 ranks (each file holding its half of every hot expert) resumes on 1 rank: the expert
    state it loads is the chain's merged state, re-sharded."""
    config = TrainConfig(out=str(tmp_path / "two"), num_experts=4, slots_per_rank=3, top_k=2, steps=6, batch_size=2,
                         checkpoint_every=100, sparse_hot_share=0.5, fail_at_step=4, log_interval=1000,
                         capacity_factor=None)
    with pytest.raises(JobFailed, match="died"):
        launch(config, 2)
    ckpt = config.checkpoint_root()
    cfg = config.model_config()
    recovered = snapshots.recover(ckpt, cfg.num_layers, cfg.num_experts)
    assert recovered.step == 4 and recovered.meta["world_size"] == 2
    resumed = TrainConfig(**{**config.__dict__, "out": str(tmp_path / "one"), "resume": str(ckpt),
                             "checkpoint_dir": str(tmp_path / "one-ckpt"), "fail_at_step": None,
                             "slots_per_rank": 4})
    launch(resumed, 1)
    recovery = json.loads((tmp_path / "one" / "recovery.json").read_text())
    assert (recovery["world_size_then"], recovery["world_size_now"], recovery["step"]) == (2, 1, 4)
    # the resumed job's own chain starts with a full checkpoint of the state it loaded, in one file
    start = checkpoint.load_rank(checkpoint.step_dir(tmp_path / "one-ckpt", 4), 0)
    assert start["world_size"] == 1
    full = checkpoint.assemble_expert_state([start])
    recovered_full = recovered.experts.assemble(cfg.num_layers, cfg.num_experts)
    for name in ("weights", "exp_avg", "exp_avg_sq"):
        for layer in range(cfg.num_layers):
            assert torch.equal(full[name][layer], recovered_full[name][layer]), (name, layer)
    assert len(read_rows(tmp_path / "one")) == 6


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_newest(tmp_path: Path) -> None:
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "1", "--experts", "2", "--slots", "2", "--steps",
                                       "5", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert sorted(d.name for d in (tmp_path / "run-checkpoints").glob("step-*")) == ["step-00000004",
                                                                                      "step-00000005"]
    with open(tmp_path / "run" / "checkpoints.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2, 3, 4, 5]   # all were written
    # an incomplete older directory goes too; complete ones are counted, incomplete ones never kept instead
    root = tmp_path / "root"
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        directory = checkpoint.step_dir(root, step)
        directory.mkdir(parents=True)
        if complete:
            (directory / checkpoint.MARKER).write_text(f"{step}\n")
    removed = checkpoint.keep_latest(root, 2)
    assert sorted(d.name for d in removed) == ["step-00000001", "step-00000002"]
    assert sorted(d.name for d in root.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]
