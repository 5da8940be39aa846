"""The launcher of `symi train`: limits refused before any rank starts (too many local ranks, unwritable folders, a
bad --dist-timeout), a stopped rank named within the collective timeout, SIGINT/SIGTERM to the launcher alone
stopping every rank, and a rank's errors turned into one line."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import CliRunner
from train_jobs import ROOT, TRAIN_ARGS, read_rows

from cli import symi
from symi_exec import supervise
from symi_exec.supervise import INTERRUPTED, MAX_LOCAL_RANKS, JobFailed, local_rank_limit, rank_error

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- refused up front


def test_local_rank_limit_per_gpu_per_core_and_ceiling() -> None:
    rng = random.Random(12)
    cases = [(0, 1), (0, 2), (1, 64), (8, 2), (0, 256), (0, 257), (5000, 1), (0, 10**6)]
    cases += [(rng.choice([0, rng.randint(1, 2000)]), rng.randint(1, 2000)) for _ in range(200)]
    for gpus, cores in cases:
        limit, reason = local_rank_limit(cuda_devices=gpus, cpu_cores=cores)
        expected = gpus if gpus else supervise.RANKS_PER_CPU_CORE * cores
        assert limit == min(expected, MAX_LOCAL_RANKS), (gpus, cores)
        assert str(limit) in reason or str(gpus if gpus else cores) in reason
        supervise.check_local_ranks(limit, cuda_devices=gpus, cpu_cores=cores)   # the limit itself runs
        for over in (limit + 1, 10 * limit, 10**9):
            with pytest.raises(ValueError, match=f"nproc_per_node {over} is over the limit of {limit} local ranks"):
                supervise.check_local_ranks(over, cuda_devices=gpus, cpu_cores=cores)


@pytest.mark.parametrize("nproc", ["100000", str(MAX_LOCAL_RANKS + 1), "1000000000"])
def test_too_many_local_ranks_are_refused_before_any_start(tmp_path: Path, nproc: str) -> None:
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", nproc, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"Error: nproc_per_node {nproc} is over the limit of" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "1e12"])
def test_bad_dist_timeout_is_refused(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(symi, ["train", "--dist-timeout", value, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "Error: dist_timeout_s (--dist-timeout) must be a number in (0, 604800]" in result.output
    assert list(tmp_path.iterdir()) == []


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nothing can be created in: a read-only one of the test's, or, for root (whom permissions do not
    stop), /sys or /proc."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys"), Path("/proc")):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


@pytest.mark.parametrize("where", ["out", "checkpoint-dir"])
def test_unwritable_folders_are_refused_before_any_start(tmp_path: Path, where: str) -> None:
    folder = unwritable_folder(tmp_path)
    target = folder / "deeper" / "run"
    args = ["--out", str(target)] if where == "out" else \
        ["--out", str(tmp_path / "run"), "--checkpoint-every", "1", "--checkpoint-dir", str(target)]
    try:
        result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "1", "--experts", "2", "--slots", "2", *args])
    finally:
        (tmp_path / "read-only").chmod(0o755)
    assert result.exit_code == 1
    what = "the run directory's folder" if where == "out" else "the checkpoint directory"
    assert f"Error: cannot write {what} {str(target if where != 'out' else target.parent)!r}: folder " \
           f"{str(folder)!r} is not writable" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read-only"]
    assert list((tmp_path / "read-only").iterdir()) == []


# ---------------------------------------------------------------------------------------------- a rank's errors


def trace_of(*lines: str) -> str:
    return "\n".join(["Traceback (most recent call last):", '  File "loop.py", line 1, in train', *lines])


OS_ERRORS = [
    "OSError: [Errno 28] No space left on device: '/ck/step-00000003/rank-00000.pt'",
    "PermissionError: [Errno 13] Permission denied: '/ck/step-00000003'",
    "FileNotFoundError: [Errno 2] No such file or directory: '/ck/sparse-00000004/.done-00001'",
    "NotADirectoryError: [Errno 20] Not a directory: '/ck/step-00000002'",
    "IsADirectoryError: [Errno 21] Is a directory: '/ck/x'",
    "OSError: [Errno 30] Read-only file system: '/mnt/ro/run'",
    "OSError: [Errno 122] Disk quota exceeded",
]


def test_rank_errors_become_one_line() -> None:
    rng = random.Random(4)
    for _ in range(100):
        rank, error = rng.randrange(64), rng.choice(OS_ERRORS)
        # an overlapped write raises it in a thread; the loop re-raises it as the cause of a RuntimeError
        chained = rng.random() < 0.5
        lines = [error, "", "The above exception was the direct cause of the following exception:", "",
                 "RuntimeError: a background checkpoint write failed"] if chained else [error]
        failure = rank_error(trace_of(*lines), rank, stopped=[], behind=[], timeout_s=300)
        assert isinstance(failure, JobFailed) and failure.exit_code == 1
        detail = error.split(": ", 1)[1]
        assert str(failure) == (f"rank {rank} failed on a file: {detail}; free space or fix the folder, then resume "
                                f"from the last checkpoint with --resume")
    disk_full = "RuntimeError: [enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file " \
                "data/3: file write failed"
    assert "failed on a file: [enforce fail" in str(rank_error(trace_of(disk_full), 1, stopped=[], behind=[],
                                                               timeout_s=1))
    bad = rank_error(trace_of("ValueError: placement of layer 0 leaves expert 3 without a slot"), 0, stopped=[],
                     behind=[], timeout_s=1)
    assert type(bad) is ValueError and str(bad) == "placement of layer 0 leaves expert 3 without a slot"
    bug = rank_error(trace_of("KeyError: 'x'"), 2, stopped=[], behind=[], timeout_s=1)
    assert isinstance(bug, JobFailed) and str(bug).startswith("rank 2 failed: KeyError: 'x'")


def test_a_timeout_names_the_stopped_or_the_lagging_rank() -> None:
    timeout = trace_of("RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                       "waiting 5000ms for recv operation to complete")
    assert str(rank_error(timeout, 0, stopped=[3], behind=[], timeout_s=5)) == (
        "rank 3 did not answer for 5 s (stopped, hung or on a dead node); resume from the last checkpoint with "
        "--resume")
    assert str(rank_error(timeout, 0, stopped=[], behind=[1, 2], timeout_s=7.5)).startswith(
        "ranks 1, 2 did not answer for 7.5 s")
    assert str(rank_error(timeout, 0, stopped=[0], behind=[], timeout_s=5)).startswith(
        "rank 0 waited 5 s for another rank in a collective")
    assert supervise._behind({0: (10, 7), 1: (11, 6), 2: (12, 7)}) == [1]
    assert supervise._behind({0: (10, 7), 1: (11, 7)}) == []


def test_progress_markers_round_trip(tmp_path: Path) -> None:
    for rank, step in ((0, -1), (3, 12), (0, 13)):
        supervise.write_progress(supervise.progress_path(tmp_path, rank), step)
    assert supervise.read_progress(tmp_path, 5) == {0: (os.getpid(), 13), 3: (os.getpid(), 12)}
    assert not supervise.is_stopped(os.getpid())


# ---------------------------------------------------------------------------------------------- a running job


def start_job(tmp_path: Path, *args: str) -> subprocess.Popen:
    """`symi train` in a session of its own, its store (and so its ranks' progress markers) under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    return subprocess.Popen([sys.executable, "-m", "cli", "train", *TRAIN_ARGS, "--steps", "100000", "--out",
                             str(tmp_path / "run"), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(job: subprocess.Popen, what: str, probe: Callable[[], T | None], *, timeout_s: float = 240) -> T:
    """Until probe() returns something (an event of the job: a marker written, a process state)."""
    deadline = time.monotonic() + timeout_s
    while (found := probe()) is None:
        assert job.poll() is None, f"the job ended before {what}: {job.stderr.read() if job.stderr else ''}"
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)
    return found


def progress_at_least(tmp_path: Path, step: int) -> Callable[[], dict[int, tuple[int, int]] | None]:
    def probe() -> dict[int, tuple[int, int]] | None:
        for store in (tmp_path / "tmp").glob("symi-store-*"):
            progress = supervise.read_progress(store, 2)
            if len(progress) == 2 and min(s for _, s in progress.values()) >= step:
                return progress
        return None
    return probe


def gone(pid: int) -> bool:
    """No such process any more (or only a zombie no parent of ours waits for)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def end(job: subprocess.Popen, pids: list[int]) -> None:
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_naming_it(tmp_path: Path) -> None:
    job = start_job(tmp_path, "--dist-timeout", "5")
    pids: list[int] = []
    try:
        progress = wait_for(job, "both ranks at step 1", progress_at_least(tmp_path, 1))
        pids = [pid for pid, _ in progress.values()]
        os.kill(progress[1][0], signal.SIGSTOP)
        _, err = job.communicate(timeout=240)
    finally:
        end(job, pids)
    assert job.returncode == 1, err[-3000:]
    # step 0's row was written out with its log line (log interval 1000): the partial run directory stays
    assert err.strip().splitlines()[-1] == ("Error: rank 1 did not answer for 5 s (stopped, hung or on a dead node); "
                                            "resume from the last checkpoint with --resume; partial outputs in "
                                            f"{tmp_path / 'run'}: metrics up to step 1"), err[-3000:]
    assert "Traceback" not in err
    assert all(gone(pid) for pid in pids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]   # no hidden folder either
    assert not (tmp_path / "run" / "COMPLETE").exists() and [r["step"] for r in read_rows(tmp_path / "run")] == ["0"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_alone_stops_every_rank(tmp_path: Path, signum: int) -> None:
    job = start_job(tmp_path, "--checkpoint-every", "1")
    pids: list[int] = []
    try:
        progress = wait_for(job, "both ranks at step 1", progress_at_least(tmp_path, 1))
        pids = [pid for pid, _ in progress.values()]
        os.kill(job.pid, signum)
        _, err = job.communicate(timeout=240)
    finally:
        end(job, pids)
    assert job.returncode == 128 + signum, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"Error: {re.escape(INTERRUPTED)}; partial outputs in {re.escape(str(tmp_path / 'run'))}: "
                        rf"metrics up to step (\d+)", last), last
    num_steps = int(last.rpartition(" ")[2])
    assert "Traceback" not in err and "Aborted" not in err
    assert all(gone(pid) for pid in pids)
    # the checkpoints stay (a complete one at least), the partial run directory (each checkpoint wrote its rows out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-checkpoints", "tmp"]
    assert [r["step"] for r in read_rows(tmp_path / "run")] == [str(s) for s in range(num_steps)]
    assert not list((tmp_path / "tmp").glob("symi-store-*"))
    assert any((d / "COMPLETE").is_file() for d in (tmp_path / "run-checkpoints").iterdir())


def test_an_os_error_inside_a_rank_is_one_line(tmp_path: Path) -> None:
    """Real spawned ranks, one of which fails on a file after the start (a file where it makes a folder): the
    supervisor stops the other and the rank's NotADirectoryError reaches the user as one line naming the path.
    (A training's own checkpoint folder cannot be blocked this way: the run refuses a checkpoint dir that holds
    anything before it starts.)"""
    import torch.multiprocessing as mp
    from train_jobs import fail_on_a_file

    (tmp_path / "in-the-way").write_text("a file\n")
    context = mp.start_processes(fail_on_a_file, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    with pytest.raises(JobFailed) as failed:
        supervise.supervise(context, store_dir=tmp_path, timeout_s=60)
    line = str(failed.value)
    assert "\n" not in line and line.startswith("rank 1 failed on a file: [Errno 20] Not a directory"), line
    assert str(tmp_path / "in-the-way" / "step-00000002") in line and failed.value.exit_code == 1
    assert all(not p.is_alive() for p in context.processes)


@pytest.mark.slow
def test_failure_drill_waits_for_every_write_before_it(tmp_path: Path) -> None:
    """Overlapped writes: the snapshot of the step before the drill is still in flight when the drill step starts;
    the drill completes it on every rank before any rank dies, so the chain always reaches the drill's step."""
    from symi_exec import checkpoint, snapshots
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch

    config = TrainConfig(out=str(tmp_path / "run"), num_experts=4, slots_per_rank=3, top_k=2, steps=8, batch_size=2,
                         checkpoint_every=100, sparse_hot_share=0.5, overlap_checkpoints=True, fail_at_step=3,
                         log_interval=1000)
    with pytest.raises(JobFailed, match="died"):
        launch(config, 2)
    root = config.checkpoint_root()
    assert (snapshots.sparse_dir(root, 3) / checkpoint.MARKER).is_file()
    cfg = config.model_config()
    assert snapshots.recover(root, cfg.num_layers, cfg.num_experts).step == 3
    # the partial run directory: step 0's row, written out with its log line (log interval 1000), no COMPLETE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-checkpoints"]
    assert not (tmp_path / "run" / "COMPLETE").exists()
    assert [row["step"] for row in read_rows(tmp_path / "run")] == ["0"]
