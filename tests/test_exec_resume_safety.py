"""No silent wrong results from `symi train` checkpoints (issue 12): a run's identity in its checkpoint dir, the
locks on --out and the checkpoint dir, checksums with a fallback to the newest intact checkpoint, a stop on a
non-finite loss, settings a resume keeps (the global batch among them), clear messages, and the ETA of log lines."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from train_jobs import read_rows

from cli import symi
from symi_exec import checkpoint, run_identity, snapshots
from symi_exec.checkpointing import Checkpointer
from symi_exec.config import TrainConfig
from symi_exec.launch import JobFailed, launch
from symi_exec.loop import eta_s, format_duration

SMALL = ["train", "--nproc-per-node", "1", "--experts", "2", "--slots", "2", "--log-interval", "1000"]
BASE = dict(num_experts=4, slots_per_rank=3, top_k=2, steps=6, batch_size=2, capacity_factor=1.0, log_interval=1000)


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# ---------------------------------------------------------------------------------------------- run identity


def test_fresh_run_refuses_another_runs_checkpoints_unless_overwritten(tmp_path: Path) -> None:
    """The issue's case: seed 1 with checkpoints, its run folder deleted, seed 2 with the same --out."""
    out, root = tmp_path / "run", tmp_path / "run-checkpoints"
    first = CliRunner().invoke(symi, [*SMALL, "--steps", "2", "--checkpoint-every", "1", "--seed", "1",
                                      "--out", str(out)])
    assert first.exit_code == 0, first.output
    first_id = json.loads((root / "run.json").read_text())["run_id"]
    assert checkpoint.read_meta(checkpoint.step_dir(root, 2))["run_id"] == first_id
    for path in out.iterdir():
        path.unlink()
    out.rmdir()
    before = sorted(p.name for p in root.iterdir())

    second = CliRunner().invoke(symi, [*SMALL, "--steps", "2", "--checkpoint-every", "1", "--seed", "2",
                                       "--out", str(out)])
    assert second.exit_code == 1
    line = one_error_line(second.output)
    assert f"already holds checkpoints of run {first_id}" in line and "seed 1" in line
    assert "--overwrite-checkpoints" in line and not out.exists()
    assert sorted(p.name for p in root.iterdir()) == before

    # the flag deletes only checkpoints: a foreign file makes it refuse, deleting nothing
    (root / "notes.txt").write_text("mine\n")
    foreign = CliRunner().invoke(symi, [*SMALL, "--steps", "2", "--checkpoint-every", "1", "--seed", "2",
                                        "--overwrite-checkpoints", "--out", str(out)])
    assert foreign.exit_code == 1 and "'notes.txt', which is not a checkpoint" in one_error_line(foreign.output)
    assert sorted(p.name for p in root.iterdir()) == sorted([*before, "notes.txt"])
    (root / "notes.txt").unlink()

    third = CliRunner().invoke(symi, [*SMALL, "--steps", "3", "--checkpoint-every", "3", "--seed", "2",
                                      "--overwrite-checkpoints", "--out", str(out)])
    assert third.exit_code == 0, third.output
    run = json.loads((root / "run.json").read_text())
    assert run["run_id"] != first_id and run["settings"]["seed"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["run.json", "step-00000003"]   # the old ones are gone
    assert checkpoint.read_meta(checkpoint.step_dir(root, 3))["run_id"] == run["run_id"]
    assert json.loads((out / "config.json").read_text())["train"]["run_id"] == run["run_id"]


def test_keep_checkpoints_deletes_only_the_current_runs(tmp_path: Path) -> None:
    """Random mixes of two runs' complete and incomplete checkpoints: keep_latest(N, run) removes only older
    checkpoints of that run (and incomplete ones older than the kept), keeps its newest N and every other run's."""
    rng = random.Random(12)
    for trial in range(40):
        root = tmp_path / f"root{trial}"
        owners = {}
        created = rng.sample(range(1, 30), rng.randint(1, 10))
        for step in created:
            directory = checkpoint.step_dir(root, step)
            directory.mkdir(parents=True)
            if rng.random() < 0.8:
                owners[step] = rng.choice(["old", "new"])
                checkpoint.mark_complete(directory, {"step": step, "run_id": owners[step]})
        num_keep = rng.randint(1, 3)
        mine = sorted(s for s, owner in owners.items() if owner == "new")
        removed = checkpoint.keep_latest(root, num_keep, run_id="new")
        left = {int(d.name.removeprefix("step-")) for d in root.iterdir()}
        assert set(mine[-num_keep:]) <= left                          # the run's newest N stay
        assert {s for s, owner in owners.items() if owner == "old"} <= left   # a stranger's are never touched
        if len(mine) > num_keep:
            assert {int(d.name.removeprefix("step-")) for d in removed} == \
                {s for s in created if s < mine[-num_keep] and owners.get(s, "new") == "new"}
        else:
            assert removed == []


# ---------------------------------------------------------------------------------------------- locks


def test_second_run_on_the_same_out_or_checkpoint_dir_refuses(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with run_identity.hold_lock(out, "run folder", "pid 4242, run id other"):
        result = CliRunner().invoke(symi, [*SMALL, "--steps", "2", "--out", str(out)])
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert f"run folder '{out}' is in use by another symi train (pid 4242, run id other)" in line
    assert not out.exists() and not run_identity.lock_path(out).exists()   # released and gone

    root = tmp_path / "shared-ckpt"
    with run_identity.hold_lock(root, "checkpoint dir", "pid 4243, run id other"):
        result = CliRunner().invoke(symi, [*SMALL, "--steps", "2", "--checkpoint-every", "1", "--checkpoint-dir",
                                           str(root), "--out", str(tmp_path / "other")])
    assert result.exit_code == 1 and "checkpoint dir" in one_error_line(result.output)
    assert "(pid 4243, run id other)" in result.output and not root.exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    out, ready = tmp_path / "run", tmp_path / "holding"
    code = ("import sys; from symi_exec.run_identity import hold_lock; from pathlib import Path\n"
            f"with hold_lock({str(out)!r}, 'run folder', 'pid child'):\n"
            f"    Path({str(ready)!r}).write_text('1'); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, cwd=Path(__file__).parents[1],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        while not ready.exists():   # the child signals through the file once it holds the lock
            assert child.poll() is None, "the lock holder died"
        with pytest.raises(ValueError, match=r"in use by another symi train \(pid child\)"):
            with run_identity.hold_lock(out, "run folder", "me"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with run_identity.hold_lock(out, "run folder", "me"):   # the kernel dropped the dead holder's lock
        assert run_identity.lock_path(out).read_text() == "me"


# ---------------------------------------------------------------------------------------------- integrity


def flip(path: Path, offset: int, num_bytes: int = 64) -> None:
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) - num_bytes)
    data[offset:offset + num_bytes] = bytes(b ^ 0xFF for b in data[offset:offset + num_bytes])
    path.write_bytes(bytes(data))


def fake_checkpoint(root: Path, step: int, world_size: int = 2) -> Path:
    directory = checkpoint.prepare_dir(checkpoint.step_dir(root, step))
    checksums = [checkpoint.save_rank(directory, rank, {"x": torch.arange(1000.0) * step})[1]
                 for rank in range(world_size)]
    checkpoint.mark_complete(directory, {"step": step, "files": {checkpoint.rank_file(directory, r).name: c
                                                                 for r, c in enumerate(checksums)}})
    return directory


DAMAGES = {
    "flipped rank file": (lambda d, rng: flip(checkpoint.rank_file(d, 1), rng.randrange(4000)), "rank-00001.pt"),
    "truncated rank file": (lambda d, rng: os.truncate(checkpoint.rank_file(d, 0), rng.randrange(100)),
                            "rank-00000.pt"),
    "missing rank file": (lambda d, rng: checkpoint.rank_file(d, 1).unlink(), "rank-00001.pt is missing"),
    "invalid meta.json": (lambda d, rng: (d / "meta.json").write_text("{not json"), "meta.json"),
    "edited meta.json": (lambda d, rng: (d / "meta.json").write_text('{"step": 6, "files": {}}\n'), "meta.json"),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact(tmp_path: Path, kind: str) -> None:
    damage, named = DAMAGES[kind]
    rng = random.Random(kind)
    for trial in range(5):
        root = tmp_path / f"root{trial}"
        for step in (2, 4, 6):
            fake_checkpoint(root, step)
        assert checkpoint.latest_intact(root) == (checkpoint.step_dir(root, 6), [])
        damage(checkpoint.step_dir(root, 6), rng)
        intact, damaged = checkpoint.latest_intact(root)
        assert intact == checkpoint.step_dir(root, 4)
        assert [d for d, _ in damaged] == [checkpoint.step_dir(root, 6)] and named in damaged[0][1]
        damage(checkpoint.step_dir(root, 4), rng)
        damage(checkpoint.step_dir(root, 2), rng)
        with pytest.raises(ValueError, match=f"no intact checkpoint in '{root}': step-00000006: .*{named}"):
            snapshots.resume_point(root)


def test_checkpoint_json_and_names_give_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "meta.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match=f"'{bad}' is not valid JSON"):
        checkpoint.read_json(bad)
    # a stray folder is refused, named, wherever the checkpoint dir is read
    fake_checkpoint(tmp_path / "root", 2)
    (tmp_path / "root" / "step-abc").mkdir()
    for read in (checkpoint.latest_complete, snapshots.resume_point, lambda r: checkpoint.keep_latest(r, 1)):
        with pytest.raises(ValueError, match="holds 'step-abc', which is not a checkpoint"):
            read(tmp_path / "root")
    (tmp_path / "root" / "sparse-0001").mkdir()
    with pytest.raises(ValueError, match=r"holds 'sparse-0001', which is not a checkpoint \(sparse-NNNNNNNN"):
        snapshots.prune_sparse(tmp_path / "root", 9)
    resume = [*SMALL, "--steps", "3", "--resume", str(tmp_path / "root"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(symi, resume)
    assert "holds 'step-abc', which is not a checkpoint" in one_error_line(result.output)
    (tmp_path / "root" / "step-abc").rmdir()
    (tmp_path / "root" / "sparse-0001").rmdir()
    result = CliRunner().invoke(symi, resume)
    assert "holds no run.json" in one_error_line(result.output)
    (tmp_path / "root" / "run.json").write_text("[1, 2]")
    result = CliRunner().invoke(symi, resume)
    assert f"'{tmp_path / 'root' / 'run.json'}' does not hold a JSON object" in one_error_line(result.output)


# ---------------------------------------------------------------------------------------------- resumes, run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 uninterrupted steps, no checkpoints."""
    out = tmp_path_factory.mktemp("reference") / "run"
    launch(TrainConfig(out=str(out), **BASE), 2)
    return out


def assert_same_run(got: Path, want: Path) -> None:
    assert read_rows(got) == read_rows(want)
    final = torch.load(got / "checkpoint.pt", weights_only=False)["model"]
    for name, value in torch.load(want / "checkpoint.pt", weights_only=False)["model"].items():
        assert torch.equal(final[name], value), name
    loss = float(read_rows(got)[-1]["loss"])
    assert loss == loss and abs(loss) != float("inf")


def test_flipped_bytes_in_the_newest_checkpoint_resume_from_the_previous(
        tmp_path: Path, reference: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = TrainConfig(out=str(tmp_path / "killed"), checkpoint_every=2, fail_at_step=5, **BASE)
    with pytest.raises(JobFailed, match="died"):
        launch(config, 2)
    root = config.checkpoint_root()
    assert checkpoint.latest_complete(root) == checkpoint.step_dir(root, 4)
    flip(checkpoint.rank_file(checkpoint.step_dir(root, 4), 1), 1000)
    resumed = dataclasses.replace(config, out=str(tmp_path / "resumed"), resume=str(root), fail_at_step=None)
    with caplog.at_level(logging.WARNING):
        launch(resumed, 2)
    warning = next(r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage())
    assert "step-00000004" in warning and "rank-00001.pt does not match its checksum" in warning
    assert warning.endswith(f"resuming from {checkpoint.step_dir(root, 2)} instead")
    recovery = json.loads((tmp_path / "resumed" / "recovery.json").read_text())
    assert recovery["step"] == 2 and [d["checkpoint"] for d in recovery["damaged"]] == \
        [str(checkpoint.step_dir(root, 4))]
    assert_same_run(tmp_path / "resumed", reference)
    assert checkpoint.latest_intact(root) == (checkpoint.step_dir(root, 6), [])   # step 4 rewritten, intact


def test_a_damaged_sparse_snapshot_ends_the_chain(tmp_path: Path, reference: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "killed"), checkpoint_every=100, sparse_hot_share=1.0, fail_at_step=5,
                         **BASE)
    with pytest.raises(JobFailed, match="died"):
        launch(config, 2)
    root = config.checkpoint_root()
    # snapshot 4 completed before any rank reached step 5 (snapshot 5 may not have: the job is torn down)
    assert snapshots.sparse_dir(root, 4) in snapshots.sparse_chain(root, 0)
    flip(checkpoint.rank_file(snapshots.sparse_dir(root, 3), 0), 500)
    full, chain, damaged = snapshots.resume_point(root)
    assert (full, chain) == (checkpoint.step_dir(root, 0), [snapshots.sparse_dir(root, s) for s in (1, 2)])
    assert [d for d, _ in damaged] == [snapshots.sparse_dir(root, 3)]
    launch(dataclasses.replace(config, out=str(tmp_path / "resumed"), resume=str(root), fail_at_step=None), 2)
    recovery = json.loads((tmp_path / "resumed" / "recovery.json").read_text())
    assert (recovery["step"], recovery["sparse_snapshots"]) == (2, 2)
    assert_same_run(tmp_path / "resumed", reference)


# ---------------------------------------------------------------------------------------------- non-finite


def test_non_finite_loss_stops_every_rank_keeping_the_last_good_checkpoint(tmp_path: Path) -> None:
    out, root = tmp_path / "run", tmp_path / "run-checkpoints"
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "2", "--steps", "4", "--checkpoint-every", "1",
                                       "--lr", "1e30", "--out", str(out)])
    assert result.exit_code == 1 and not (out / "COMPLETE").exists()
    line = one_error_line(result.output)
    assert line.startswith("Error: loss is not finite at step 1 (mean loss nan")
    # step 0's row was written out with its log line: the partial run directory is kept
    assert line.endswith(f"last good checkpoint: {checkpoint.step_dir(root, 1)} (lower --lr?); partial outputs in "
                         f"{out}: metrics up to step 1")
    assert [row["step"] for row in read_rows(out)] == ["0"]
    assert checkpoint.latest_complete(root) == checkpoint.step_dir(root, 1)
    for directory in checkpoint.checkpoint_dirs(root).values():   # every checkpoint written is intact and finite
        assert checkpoint.damage(directory) is None
        for rank in range(2):
            state = checkpoint.load_rank(directory, rank)
            tensors = [state["expert_optimizer"][n][layer] for n in checkpoint.STATE_NAMES for layer in range(2)]
            assert all(bool(torch.isfinite(t).all()) for t in [*tensors, *state.get("dense", {}).values()])


def test_a_non_finite_state_is_never_saved_and_an_overflowing_lr_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    owner = SimpleNamespace(model=model, comm=SimpleNamespace(world_size=1, device=torch.device("cpu")),
                            last_complete=lambda: "step-7")
    finite = {"layout": "sharded", "weights": [torch.ones(3)], "num_steps": 2}
    Checkpointer._check_finite(owner, 8, finite)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="state is not finite after step 8 .* last good checkpoint: step-7"):
            Checkpointer._check_finite(owner, 8, {**finite, "weights": [torch.tensor([1.0, bad])]})
        with torch.no_grad():
            model.weight[0, 1] = bad
        with pytest.raises(ValueError, match="state is not finite after step 8"):
            Checkpointer._check_finite(owner, 8, finite)
        with torch.no_grad():
            model.weight[0, 1] = 0.0
    result = CliRunner().invoke(symi, [*SMALL, "--lr", "1e38", "--out", str(tmp_path / "run")])
    assert "lr 1e+38 is too large for float32" in one_error_line(result.output)
    TrainConfig(out=str(tmp_path / "run"), lr=1e38, dtype="float64").validate(2)


# ---------------------------------------------------------------------------------------------- settings


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """2 ranks x 2 sequences (global batch 4), 2 steps, checkpointed at the end; the config a resume starts from."""
    base = tmp_path_factory.mktemp("settings")
    config = TrainConfig(out=str(base / "run"), num_experts=4, slots_per_rank=2, steps=2, batch_size=2,
                         checkpoint_every=2, log_interval=1000)
    launch(config, 2)
    return dataclasses.replace(config, out=str(base / "resumed"), resume=str(config.checkpoint_root()), steps=4)


CHANGES = [("seed", 7), ("lr", 0.01), ("dtype", "float64"), ("capacity_factor", 2.0), ("capacity_factor", None),
           ("capacity_mode", "gpu"), ("policy", "static"), ("policy", "eplb"), ("top_k", 2), ("aux_loss_coef", 0.1),
           ("router_skew", 0.5), ("min_lr", 0.0), ("warmup_steps", 1), ("weight_decay", 0.0), ("grad_clip", 0.5),
           ("policy_options", {"min_gain_ratio": 0.0})]


@pytest.mark.parametrize("name, value", CHANGES)
def test_resume_refuses_a_changed_setting_unless_allowed(two_rank_checkpoint: TrainConfig, name: str,
                                                         value: object) -> None:
    if name == "policy_options":
        changed = dataclasses.replace(two_rank_checkpoint, policy="flexmoe-2", policy_options=value)
        names = ["policy", "policy_options"]
    else:
        changed = dataclasses.replace(two_rank_checkpoint, **{name: value})
        names = [name]
    with pytest.raises(ValueError) as error:
        changed.validate(2)
    message = str(error.value)
    assert "\n" not in message and message.startswith("resume would change settings recorded in")
    for field in names:
        old = json.loads(json.dumps(getattr(two_rank_checkpoint, field)))
        assert f"{field} {old!r} -> {json.loads(json.dumps(getattr(changed, field)))!r}" in message
    assert message.endswith(f"pass --allow-config-change {','.join(names)} to accept")
    dataclasses.replace(changed, allow_config_change=tuple(names)).validate(2)


def test_resume_lists_every_change_and_allows_the_run_shape_to_change(two_rank_checkpoint: TrainConfig,
                                                                      tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("some other text to train on " * 20)
    changed = dataclasses.replace(two_rank_checkpoint, seed=3, lr=0.5, data=str(data))
    with pytest.raises(ValueError, match=r"seed 0 -> 3, lr 0.003 -> 0.5, data None -> '.*data.txt'; pass "
                                         r"--allow-config-change seed,lr,data to accept"):
        changed.validate(2)
    with pytest.raises(ValueError, match="'seeds' is not a setting a resume keeps"):
        dataclasses.replace(changed, allow_config_change=("seeds",)).validate(2)
    # what may change on a resume: steps, out, ranks, slots, checkpoint options, logging
    dataclasses.replace(two_rank_checkpoint, steps=9, slots_per_rank=4, checkpoint_every=3, keep_checkpoints=1,
                        sparse_hot_share=0.5, overlap_checkpoints=True, log_interval=1,
                        checkpoint_dir=str(tmp_path / "elsewhere")).validate(1)
    # the model's shape can never change, and the message names the field with both values
    for model in ("small", "tiny"):
        shaped = dataclasses.replace(two_rank_checkpoint, model=model, model_overrides={"d_ff": 64} if
                                     model == "tiny" else {}, allow_config_change=("model", "model_overrides"))
        with pytest.raises(ValueError, match=r"holds another model: .*model.d_ff 128 -> (512|64)"):
            shaped.validate(2)


def test_resume_keeps_the_global_batch(two_rank_checkpoint: TrainConfig) -> None:
    for world_size, batch_size in ((1, 4), (2, 2), (4, 1)):
        assert run_identity.resolve(two_rank_checkpoint, world_size).batch_size == batch_size
    with pytest.raises(ValueError, match=r"global batch 4 \(recorded in .*step-00000002'\) cannot be split over 3 "
                                         r"ranks: .* --allow-config-change batch_size"):
        two_rank_checkpoint.validate(3)
    allowed = dataclasses.replace(two_rank_checkpoint, allow_config_change=("batch_size",))
    resume = run_identity.resolve(allowed, 3)
    assert resume.batch_size == 2 and resume.changes == {"global_batch": [4, 6]}


def test_resumed_run_records_the_settings_it_used(two_rank_checkpoint: TrainConfig, tmp_path: Path) -> None:
    """On 1 rank with an allowed lr change: 4 sequences per rank (the global batch), in config.json and
    recovery.json, and the change recorded in both."""
    resumed = dataclasses.replace(two_rank_checkpoint, out=str(tmp_path / "one"), lr=0.004, slots_per_rank=4,
                                  checkpoint_dir=str(tmp_path / "one-ckpt"), allow_config_change=("lr",))
    launch(resumed, 1)
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    recovery = json.loads((tmp_path / "one" / "recovery.json").read_text())
    assert (config["train"]["batch_size"], config["world_size"], config["train"]["lr"]) == (4, 1, 0.004)
    assert recovery["config_changes"] == config["resumed_from"]["config_changes"] == {"lr": [0.003, 0.004]}
    assert recovery["batch_size_now"] == 4 and config["resumed_from"]["step"] == 2
    # the new checkpoint dir holds a new identity that names the run it continued
    run = json.loads((tmp_path / "one-ckpt" / "run.json").read_text())
    old = json.loads((Path(two_rank_checkpoint.resume) / "run.json").read_text())
    assert run["resumed_from"]["run_id"] == old["run_id"] != run["run_id"]
    assert run["settings"]["global_batch"] == 4 and run["settings"]["lr"] == 0.004


# ---------------------------------------------------------------------------------------------- paths, ETA


def test_checkpoint_dir_that_is_a_file_or_inside_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"checkpoint dir '{tmp_path / 'file'}' is a file, not a folder"):
        TrainConfig(out=str(tmp_path / "run"), checkpoint_every=1, checkpoint_dir=str(tmp_path / "file")).validate(2)
    for inside in ("run", "run/ckpt", "run/a/b"):
        with pytest.raises(ValueError, match="is inside --out .* holds the run.s outputs only"):
            TrainConfig(out=str(tmp_path / "run"), checkpoint_every=1,
                        checkpoint_dir=str(tmp_path / inside)).validate(2)
    TrainConfig(out=str(tmp_path / "run"), checkpoint_every=1, checkpoint_dir=str(tmp_path / "run2")).validate(2)


def test_eta_formatting() -> None:
    assert [format_duration(s) for s in (0, 0.4, 1, 45, 59.6, 60, 72, 3599, 3600, 7500, float("nan"), -1)] == \
        ["0s", "0s", "1s", "45s", "1m00s", "1m00s", "1m12s", "59m59s", "1h00m", "2h05m", "?", "?"]
    assert eta_s([], 10) == 0.0 and eta_s([1.0, 2.0], 0) == 0.0
    assert eta_s([0.5, 0.5, 0.6], 160) == pytest.approx(160 * 1.6 / 3)
    assert eta_s([100.0] + [1.0] * 20, 10) == pytest.approx(10.0)   # the first (warm-up) steps drop out
