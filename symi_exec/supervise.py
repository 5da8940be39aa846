"""The launcher's side of a spawned job: limits checked before it starts, its ranks watched while it runs, and every
way it can end turned into one line.

Each spawned rank writes `progress-RRRRR` (its pid and the step it started; -1 once it joined the process group)
into the job's store directory (a `symi-store-*` folder under the temporary directory). While the ranks run, the
launcher
  - ends the job when a rank has been stopped (SIGSTOP, state T in /proc/PID/stat) for the collective timeout, and
    names it; the other ranks' collectives time out at about the same time, and a timeout they raise names the
    stopped rank too (or, when none is stopped: the ranks whose progress is behind the others');
  - on SIGINT or SIGTERM stops every rank (SIGTERM, then SIGKILL after GRACE_S) and says so (exit 128 + signal);
  - turns a rank's ValueError into a ValueError, its OSError (a full or read-only disk) into one line, and its
    death (killed, out of memory, a failure drill) into one line.
Limits: the stopped-rank check reads /proc (Linux); elsewhere only the ranks' collective timeout ends the job. A
torchrun job has no launcher of ours: its ranks' timeouts end it with one line, which cannot name the silent rank.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from symi_sim.outputs import write_probe

logger = logging.getLogger(__name__)

POLL_S = 0.1           # how often the launcher looks at its ranks
GRACE_S = 10.0         # a rank sent SIGTERM gets this long to exit before SIGKILL
MAX_LOCAL_RANKS = 1024
RANKS_PER_CPU_CORE = 4
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
RESUME_HINT = "resume from the last checkpoint with --resume"
INTERRUPTED = f"interrupted; ranks stopped; {RESUME_HINT}"
PROGRESS_PREFIX = "progress-"

# the last line of a rank's traceback for an OSError (PermissionError, FileNotFoundError, ...: "[Errno N] ..."), or
# torch's own file writer failing (it reports a full disk as a RuntimeError)
_OS_ERROR = re.compile(r"^(?:\w+\.)*(\w*Error): (\[Errno \d+\] .*)$")
_TORCH_IO_ERROR = re.compile(r"^RuntimeError: (.*(?:PytorchStreamWriter failed|cannot be opened).*)$")
_TIMEOUT = re.compile(r"(?i)timed? ?out")


class JobFailed(RuntimeError):
    """A spawned job ended without its run directory: a rank died, stopped answering, failed on a file, or the
    launcher was interrupted. `exit_code` is the CLI's exit status (128 + the signal when interrupted)."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------- before the start


def local_rank_limit(*, cuda_devices: int, cpu_cores: int) -> tuple[int, str]:
    """The most local ranks this machine runs, and why: one per visible GPU (NCCL), else RANKS_PER_CPU_CORE per CPU
    core (gloo); never more than MAX_LOCAL_RANKS."""
    if cuda_devices > 0:
        limit, reason = cuda_devices, f"one per visible GPU, {cuda_devices} here (NCCL)"
    else:
        limit, reason = RANKS_PER_CPU_CORE * max(cpu_cores, 1), \
            f"{RANKS_PER_CPU_CORE} per CPU core, {max(cpu_cores, 1)} cores here (gloo)"
    if limit > MAX_LOCAL_RANKS:
        return MAX_LOCAL_RANKS, f"the ceiling of {MAX_LOCAL_RANKS} local ranks"
    return limit, reason


def check_local_ranks(nproc_per_node: int, *, cuda_devices: int, cpu_cores: int) -> None:
    """ValueError when `nproc_per_node` is over local_rank_limit (checked before any rank starts)."""
    limit, reason = local_rank_limit(cuda_devices=cuda_devices, cpu_cores=cpu_cores)
    if nproc_per_node > limit:
        raise ValueError(f"nproc_per_node {nproc_per_node} is over the limit of {limit} local ranks ({reason})")


def check_ranks_per_gpu(local_world_size: int, *, cuda_devices: int) -> None:
    """ValueError when a torchrun node runs more ranks (LOCAL_WORLD_SIZE) than it has visible GPUs: two ranks would
    map to one GPU, which NCCL refuses deep inside its first collective (checked before init_process_group)."""
    if local_world_size > cuda_devices:
        raise ValueError(f"{local_world_size} ranks on this node (LOCAL_WORLD_SIZE) but {cuda_devices} visible "
                         f"GPU{'s' if cuda_devices != 1 else ''}: NCCL needs one GPU per rank; start torchrun with "
                         f"--nproc-per-node {cuda_devices} or fewer, or make more GPUs visible (CUDA_VISIBLE_DEVICES)")


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_writable(path: str | Path, what: str) -> None:
    """ValueError naming `path` when nothing can be created there: the nearest folder of it (or above it) that
    exists must take a new entry (outputs.write_probe). Catches read-only and permission-denied folders, root
    included."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f"cannot write {what} {str(path)!r}: {str(existing)!r} is not a folder")
    failure = write_probe(existing)
    if failure is not None:
        raise ValueError(f"cannot write {what} {str(path)!r}: folder {str(existing)!r} is not writable "
                         f"({failure.strerror})")


# ---------------------------------------------------------------------------------------------- progress markers


def progress_path(store_dir: str | Path, rank: int) -> Path:
    return Path(store_dir) / f"{PROGRESS_PREFIX}{rank:05d}"


def write_progress(path: Path, step: int) -> None:
    """`pid step` into `path`, atomically (the launcher and tests read it while the rank runs)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{os.getpid()} {step}\n")
    os.replace(tmp, path)


def read_progress(store_dir: str | Path, world_size: int) -> dict[int, tuple[int, int]]:
    """rank -> (pid, step it started) for the ranks that wrote a marker."""
    out = {}
    for rank in range(world_size):
        try:
            pid, step = progress_path(store_dir, rank).read_text().split()
        except (OSError, ValueError):
            continue
        out[rank] = (int(pid), int(step))
    return out


def is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal (SIGSTOP, SIGTSTP); False where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"


# ---------------------------------------------------------------------------------------------- while it runs


def supervise(context: Any, *, store_dir: str | Path, timeout_s: float) -> None:
    """Wait for the ranks of `context` (torch.multiprocessing's ProcessContext) to finish; on any failure, stop all
    of them and raise one line (JobFailed, or the rank's ValueError)."""
    processes = context.processes
    pending = {p.sentinel: rank for rank, p in enumerate(processes)}
    stopped_since: dict[int, float] = {}
    failed: int | None = None
    silent: list[int] = []
    with _signals_recorded() as signalled:
        try:
            while pending and failed is None and not silent and not signalled:
                now = time.monotonic()
                for rank, process in enumerate(processes):
                    if process.is_alive() and is_stopped(process.pid):
                        stopped_since.setdefault(rank, now)
                    else:
                        stopped_since.pop(rank, None)
                silent = sorted(rank for rank, since in stopped_since.items() if now - since >= timeout_s)
                for sentinel in wait(list(pending), timeout=POLL_S):
                    rank = pending.pop(sentinel)
                    processes[rank].join()
                    if processes[rank].exitcode != 0 and failed is None:
                        failed = rank
        finally:
            stop_all(processes)
    if signalled:
        raise JobFailed(INTERRUPTED, exit_code=128 + signalled[0])
    if silent:
        raise JobFailed(silent_line(silent, timeout_s))
    if failed is not None:
        trace = _read_trace(context.error_files[failed])
        if trace is None:
            exitcode = processes[failed].exitcode
            how = f"signal {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit code {exitcode}"
            raise JobFailed(f"rank {failed} died (process {failed} terminated with {how}); {RESUME_HINT}")
        behind = _behind(read_progress(store_dir, len(processes)))
        raise rank_error(trace, failed, stopped=sorted(stopped_since), behind=behind, timeout_s=timeout_s)


def silent_line(ranks: list[int], timeout_s: float) -> str:
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
    return f"{who} did not answer for {timeout_s:g} s (stopped, hung or on a dead node); {RESUME_HINT}"


def rank_error(trace: str, rank: int, *, stopped: list[int], behind: list[int], timeout_s: float) -> Exception:
    """One line for the traceback text `trace` that rank `rank` raised: its ValueError as a ValueError, an OSError
    or a collective timeout as JobFailed naming the silent rank; anything else (a bug) as JobFailed with the
    last line, its traceback logged."""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith("ValueError: "):
        # a bad input found only once training runs (e.g. a placement the executor cannot run)
        return ValueError(last.removeprefix("ValueError: "))
    for line in reversed(lines):
        match = _OS_ERROR.match(line) or _TORCH_IO_ERROR.match(line)
        if match:
            detail = match.group(match.lastindex or 0)
            return JobFailed(f"rank {rank} failed on a file: {detail}; free space or fix the folder, then "
                             f"{RESUME_HINT}")
    if _TIMEOUT.search(last):
        silent = [r for r in stopped if r != rank] or [r for r in behind if r != rank]
        if silent:
            return JobFailed(silent_line(silent, timeout_s))
        return JobFailed(f"rank {rank} waited {timeout_s:g} s for another rank in a collective (one stopped, hung "
                         f"or is on a dead node); {RESUME_HINT}")
    logger.info("rank %d raised:\n%s", rank, trace)
    return JobFailed(f"rank {rank} failed: {last} (symi -v shows its traceback)")


def _behind(progress: dict[int, tuple[int, int]]) -> list[int]:
    """The ranks whose progress step is the lowest, when not every rank is there."""
    steps = {rank: step for rank, (_, step) in progress.items()}
    if not steps or min(steps.values()) == max(steps.values()):
        return []
    return sorted(rank for rank, step in steps.items() if step == min(steps.values()))


def _read_trace(error_file: str) -> str | None:
    try:
        with open(error_file, "rb") as f:
            return str(pickle.load(f))
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def stop_all(processes: list[Any]) -> None:
    """SIGTERM (and SIGCONT, so that a stopped rank acts on it) to every live process, SIGKILL to those still
    there after GRACE_S; returns once every one is gone."""
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.terminate()
        try:
            os.kill(process.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_S
    for process in alive:
        process.join(max(deadline - time.monotonic(), 0.0))
    for process in alive:
        if process.is_alive():
            logger.warning("rank process %d did not exit on SIGTERM; SIGKILL", process.pid)
            process.kill()
        process.join()


@contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """SIGINT and SIGTERM appended to the yielded list instead of their usual action (main thread only: signal
    handlers can be set nowhere else)."""
    signalled: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield signalled
        return
    previous = {signum: signal.signal(signum, lambda signum, _frame: signalled.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signalled
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
