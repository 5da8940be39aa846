"""The run directory as training goes (symi_exec/outputs.py, launch.py, waits.py): streamed metrics.csv and
placements.jsonl, a history whose memory and checkpoint size do not grow with the steps, COMPLETE and partial run
directories, progress lines under torchrun, ranks outnumbering GPUs, and no collective timeout while rank 0 writes."""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from train_jobs import ROOT, TRAIN_ARGS, read_rows

from cli import symi
from symi_exec import checkpoint, snapshots
from symi_exec.outputs import (
    METRICS,
    PLACEMENTS,
    TRACE_COUNTS,
    History,
    HistoryBase,
    copy_prefix,
    written_steps,
)
from symi_exec.supervise import check_ranks_per_gpu
from symi_exec.waits import TEST_DIR_ENV, wait_for_ranks
from symi_sim.outputs import RUN_COMPLETE, check_complete_run

L, E, G = 2, 3, 2


def fake_step(rng: np.random.Generator, step: int) -> tuple[dict, dict, np.ndarray]:
    row = {"step": step, "loss": float(rng.normal()), "lr": 1e-3 * rng.random(), "bytes_dispatch": int(rng.integers(9))}
    record = {"step": step, "phy2log": rng.integers(E, size=(L, 4)).tolist(), "dropped": [[0] * E] * L}
    return row, record, rng.integers(0, 1000, size=(L, E, G))


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path / METRICS, newline="") as f:
        return list(csv.DictReader(f))


def expected_rows(steps: list[tuple[dict, dict, np.ndarray]]) -> list[dict[str, str]]:
    return [{k: str(v) for k, v in row.items()} for row, _, _ in steps]


# ---------------------------------------------------------------------------------------------- History, no processes


@pytest.mark.parametrize("seed", range(4))
def test_rows_reach_the_files_only_at_a_flush_whole_lines(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    history = History(tmp_path, record_trace=True)
    history.start({"hello": 1})
    assert json.loads((tmp_path / "config.json").read_text()) == {"hello": 1}
    steps, flushed = [], 0
    for step in range(int(rng.integers(5, 30))):
        steps.append(fake_step(rng, step))
        history.append(*steps[-1])
        if rng.random() < 0.3:
            history.flush()
            flushed = len(steps)
        # on disk: exactly the steps up to the last flush, each a whole line
        assert written_steps(tmp_path) == flushed
        assert read_metrics(tmp_path) == expected_rows(steps[:flushed])
        assert [json.loads(line) for line in (tmp_path / PLACEMENTS).read_text().splitlines()] == \
            [record for _, record, _ in steps[:flushed]]
        counts = np.fromfile(tmp_path / TRACE_COUNTS, dtype=np.int32).reshape(-1, L, E, G)
        np.testing.assert_array_equal(counts, np.array([c for _, _, c in steps[:flushed]]).reshape(-1, L, E, G))
    history.flush()
    np.testing.assert_array_equal(history.trace_counts_SLEG(L, E, G), np.stack([c for _, _, c in steps]))


def test_history_memory_does_not_grow_with_the_steps(tmp_path: Path) -> None:
    """After a flush the object holds the same bytes at step 10 as at step 500: the last step and nothing per
    step (the steps counters' few bytes aside)."""
    history = History(tmp_path, record_trace=True)
    history.start({})
    sizes = {}
    for step in range(500):
        history.append(*fake_step(np.random.default_rng(1), step))   # same-size rows: only the count differs
        if step % 7 == 0:
            history.flush()
        if step + 1 in (10, 500):
            history.flush()
            sizes[step + 1] = len(pickle.dumps({k: v.getvalue() if hasattr(v, "getvalue") else v
                                                for k, v in vars(history).items()}))
            assert all(not buffer.getvalue() for buffer in history._pending.values())
    assert abs(sizes[500] - sizes[10]) <= 8, sizes
    assert written_steps(tmp_path) == 500


def test_a_resumed_history_is_the_checkpoints_copies_plus_the_sparse_deltas(tmp_path: Path) -> None:
    """The copies a full checkpoint takes at step k (the files' prefixes, with their sha256), then the one-step
    deltas of later sparse snapshots, then new steps: the same files as one uninterrupted history."""
    rng = np.random.default_rng(5)
    steps = [fake_step(rng, step) for step in range(12)]
    whole = History(tmp_path / "whole", record_trace=True)
    (tmp_path / "whole").mkdir()
    whole.start({})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    deltas = []
    for step, outputs in enumerate(steps):
        whole.append(*outputs)
        if step == 5:
            sizes = whole.file_sizes()
            checksums = whole.history_files(ckpt, sizes)
            for name, sha256 in checksums.items():
                assert checkpoint.sha256_file(ckpt / name) == sha256
        elif step in (6, 7):
            deltas.append(whole.delta())
    whole.flush()
    assert written_steps(ckpt) == 6 and len((ckpt / PLACEMENTS).read_text().splitlines()) == 6
    resumed = History(tmp_path / "resumed", record_trace=True)
    (tmp_path / "resumed").mkdir()
    resumed.start({}, HistoryBase(ckpt, deltas))
    assert resumed.num_steps == 8
    for outputs in steps[8:]:
        resumed.append(*outputs)
    resumed.flush()
    for name in (METRICS, PLACEMENTS, TRACE_COUNTS):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_history_without_trace_keeps_no_counts(tmp_path: Path) -> None:
    history = History(tmp_path, record_trace=False)
    history.start({})
    history.append(*fake_step(np.random.default_rng(0), 0))
    history.flush()
    assert not (tmp_path / TRACE_COUNTS).exists() and history.delta()["src_counts_SLEG"] == []
    other_ranks = History(None, record_trace=True)   # ranks other than 0 keep only the last step
    other_ranks.start({})
    other_ranks.append(*fake_step(np.random.default_rng(0), 0))
    other_ranks.flush()
    assert len(other_ranks.delta()["rows"]) == 1


def test_written_steps_counts_whole_lines_only(tmp_path: Path) -> None:
    assert written_steps(tmp_path) == 0                      # no metrics.csv
    (tmp_path / METRICS).write_text("")
    assert written_steps(tmp_path) == 0
    (tmp_path / METRICS).write_text("step,loss\n")
    assert written_steps(tmp_path) == 0
    for n in range(1, 6):
        (tmp_path / METRICS).write_text("step,loss\n" + "".join(f"{i},0.5\n" for i in range(n)))
        assert written_steps(tmp_path) == n


def test_copy_prefix_copies_exactly_the_bytes_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.bytes(3 * (1 << 20) + 17)
    (tmp_path / "src").write_bytes(data)
    for num_bytes in (0, 1, 1 << 20, len(data)):
        sha256 = copy_prefix(tmp_path / "src", tmp_path / "dst", num_bytes)
        assert (tmp_path / "dst").read_bytes() == data[:num_bytes]
        assert sha256 == checkpoint.sha256_file(tmp_path / "dst")
    with pytest.raises(ValueError, match="shorter than"):
        copy_prefix(tmp_path / "src", tmp_path / "dst", len(data) + 1)


def test_readers_that_need_a_finished_run_refuse_a_partial_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not complete \\(no COMPLETE marker\\)"):
        check_complete_run(tmp_path)
    (tmp_path / RUN_COMPLETE).write_text("3\n")
    check_complete_run(tmp_path)


# ---------------------------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize("local_world_size, gpus", [(2, 1), (8, 4), (3, 0), (9, 8)])
def test_more_ranks_than_gpus_on_a_node_is_one_line_naming_both(local_world_size: int, gpus: int) -> None:
    with pytest.raises(ValueError) as info:
        check_ranks_per_gpu(local_world_size, cuda_devices=gpus)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{local_world_size} ranks on this node (LOCAL_WORLD_SIZE) but "
                                                f"{gpus} visible GPU")


@pytest.mark.parametrize("local_world_size, gpus", [(1, 1), (4, 8), (8, 8)])
def test_ranks_within_the_gpus_pass(local_world_size: int, gpus: int) -> None:
    check_ranks_per_gpu(local_world_size, cuda_devices=gpus)


def test_wait_for_ranks_returns_only_once_every_rank_arrived() -> None:
    import torch.distributed as dist

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=1))   # the wait itself has no deadline: it outlasts the store's timeout
    world_size = 3
    done = [threading.Event() for _ in range(world_size)]

    def rank(r: int) -> None:
        wait_for_ranks(store, "x", rank=r, world_size=world_size)
        done[r].set()

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world_size - 1)]
    for thread in threads:
        thread.start()
    while int(store.add("symi-wait/x", 0)) < world_size - 1:   # both waiters registered
        time.sleep(0.01)
    assert not any(event.is_set() for event in done)
    rank(world_size - 1)
    for thread in threads:
        thread.join(timeout=60)
    assert all(event.is_set() for event in done)


# ---------------------------------------------------------------------------------------------- jobs


@pytest.mark.slow
def test_checkpoints_do_not_grow_with_the_steps_and_a_resume_writes_the_whole_run(tmp_path: Path) -> None:
    """Rank 0's file of checkpoint 40 is the size of checkpoint 10's (the history is files beside it, each the
    run's files as they were at the step); a run killed after a sparse chain resumes into the uninterrupted run's
    metrics.csv, placements.jsonl and trace."""
    common = [*TRAIN_ARGS, "--policy", "symi", "--record-trace", "--log-interval", "7"]
    reference = tmp_path / "reference"
    result = CliRunner().invoke(symi, ["train", *common, "--steps", "40", "--checkpoint-every", "10",
                                       "--out", str(reference)])
    assert result.exit_code == 0, result.output
    root = tmp_path / "reference-checkpoints"
    sizes = {step: checkpoint.rank_file(checkpoint.step_dir(root, step), 0).stat().st_size for step in (10, 40)}
    assert abs(sizes[40] - sizes[10]) <= 16, sizes
    assert (reference / RUN_COMPLETE).read_text() == "40\n" and not (reference / TRACE_COUNTS).exists()
    whole = (reference / METRICS).read_bytes()
    for step in (10, 20, 30, 40):
        directory = checkpoint.step_dir(root, step)
        assert checkpoint.damage(directory) is None
        assert written_steps(directory) == step and whole.startswith((directory / METRICS).read_bytes())
        assert (directory / TRACE_COUNTS).stat().st_size == step * 2 * 4 * 2 * 4   # [L=2, E=4, G=2] int32
    # killed at step 25: full checkpoint 20, sparse snapshots 21..25 (their one-step deltas)
    killed = tmp_path / "killed"
    result = CliRunner().invoke(symi, ["train", *common, "--steps", "40", "--checkpoint-every", "20",
                                       "--sparse-hot-share", "1", "--fail-at-step", "25", "--out", str(killed)])
    assert result.exit_code == 1 and f"partial outputs in {killed}: metrics up to step 22" in result.output
    assert len(snapshots.sparse_chain(tmp_path / "killed-checkpoints", 20)) == 5
    resumed = tmp_path / "resumed"
    result = CliRunner().invoke(symi, ["train", *common, "--steps", "40", "--resume",
                                       str(tmp_path / "killed-checkpoints"), "--out", str(resumed)])
    assert result.exit_code == 0, result.output
    assert read_rows(resumed) == read_rows(reference)
    assert (resumed / PLACEMENTS).read_bytes() == (reference / PLACEMENTS).read_bytes()
    from symi_sim.traces.format import read_trace

    got, want = read_trace(resumed / "trace.parquet"), read_trace(reference / "trace.parquet")
    np.testing.assert_array_equal(got.src_counts_SLEG, want.src_counts_SLEG)


@pytest.mark.slow
def test_a_killed_job_keeps_every_row_up_to_the_last_log_interval(tmp_path: Path) -> None:
    """Log interval 3, ranks SIGKILLed at the start of step 5: rows 0-3 were written out (with the log lines of
    steps 0 and 3), row 4 was not; the directory has no COMPLETE and the error line says what it holds."""
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["train", *TRAIN_ARGS, "--steps", "8", "--log-interval", "3",
                                       "--fail-at-step", "5", "--out", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "died" in lines[0]
    assert lines[0].endswith(f"; partial outputs in {out}: metrics up to step 4")
    assert not (out / RUN_COMPLETE).exists()
    assert [row["step"] for row in read_rows(out)] == ["0", "1", "2", "3"]
    assert (out / METRICS).read_text().endswith("\n")
    assert [json.loads(line)["step"] for line in (out / PLACEMENTS).read_text().splitlines()] == [0, 1, 2, 3]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    from symi_sim.simulator.run_dirs import read_run

    with pytest.raises(ValueError, match="is not complete"):
        read_run(out, warmup_steps=0)
    # the directory is not reused: a new run needs another --out
    again = CliRunner().invoke(symi, ["train", *TRAIN_ARGS, "--steps", "2", "--out", str(out)])
    assert again.exit_code == 1 and "already exists and is not empty" in again.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_progress_lines_show_under_torchrun(tmp_path: Path) -> None:
    """`symi train` as torchrun starts it (its environment, world size 1): rank 0's INFO progress lines reach
    stderr although the CLI configured logging at WARNING, and the run directory is complete."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cli", "train", "--experts", "4", "--slots", "4", "--top-k", "2",
                           "--batch-size", "2", "--steps", "3", "--log-interval", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (1, 2, 3):
        assert f"INFO symi_exec.loop: step {step}/3 | loss" in proc.stderr
    assert (out / RUN_COMPLETE).is_file() and written_steps(out) == 3


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [["--checkpoint-every", "1"], []], ids=["blocking-checkpoint", "end-of-run"])
def test_rank_0_writing_longer_than_the_collective_timeout_trips_no_watchdog(tmp_path: Path,
                                                                             checkpoints: list[str]) -> None:
    """--dist-timeout 3: rank 0's first write (the blocking checkpoint after step 0, or the run directory at the
    end) holds until the test releases it, which it does only once rank 1 has waited for it for longer than the
    timeout; the job finishes normally."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    timeout_s = 3.0
    env = {**os.environ, TEST_DIR_ENV: str(hooks), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "cli", "train", *TRAIN_ARGS, "--steps", "2", "--dist-timeout",
                            str(timeout_s), *checkpoints, "--out", str(out)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # rank 1's wait for rank 0's write: the second meeting of the checkpointer (the first precedes the
        # write), or the end of the job
        waiting, name = hooks / "waiting-00001", "checkpoint-2" if checkpoints else "end"
        while not (waiting.is_file() and waiting.read_text().strip() == name and any(hooks.glob("holding-*"))):
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.01)
        seen = time.monotonic()
        # the property under test is a duration: rank 1 waits past the collective timeout
        while time.monotonic() - seen < timeout_s + 1.5:
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.05)
        holding = sorted(p.name for p in hooks.glob("holding-*"))
        (hooks / "release").write_text("")
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-3000:]
    assert holding == (["holding-step-00000001"] if checkpoints else ["holding-run-dir"])
    assert (out / RUN_COMPLETE).is_file() and written_steps(out) == 2
