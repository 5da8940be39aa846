"""Starting a training job: `launch` spawns local ranks (or joins a torchrun job), each runs loop.train.

The launcher checks the job's limits and folders before any rank starts, then watches its ranks (supervise.py): a
rank that dies (killed, out of memory, a failure drill), stops answering (SIGSTOP, a hang: the collective timeout
`dist_timeout_s`) or fails on a file, and SIGINT or SIGTERM to the launcher, end the job with one line (JobFailed).
The run directory is created once the checks passed; rank 0 streams its files into it as training goes
(outputs.py) and the launcher (under torchrun: rank 0) writes COMPLETE once every rank finished. A failed job keeps
the partial directory, and its line says so ("partial outputs in X: metrics up to step N"); one that failed before
any step was written out leaves none.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symi_exec.comm import Comm
from symi_exec.config import Planner, TrainConfig
from symi_exec.loop import train
from symi_exec.outputs import mark_run_complete, written_steps
from symi_exec.run_identity import claim
from symi_exec.supervise import (
    MAX_DIST_TIMEOUT_S,
    RESUME_HINT,
    JobFailed,
    check_local_ranks,
    check_ranks_per_gpu,
    check_writable,
    cpu_cores,
    progress_path,
    supervise,
    write_progress,
)
from symi_exec.waits import wait_for_ranks
from symi_sim.checks import check_number, check_positive_int

__all__ = ["JobFailed", "launch"]


def launch(config: TrainConfig, nproc_per_node: int, *, planner: Planner | None = None,
           log_level: int = logging.INFO) -> Path:
    """Train with `nproc_per_node` local ranks (spawned), or as one rank of a torchrun job (RANK/WORLD_SIZE set).

    Returns the run directory. `planner` replaces the policy's plan (tests use it for arbitrary placements).
    """
    check_number(config.dist_timeout_s, "dist_timeout_s (--dist-timeout)", low=0, high=MAX_DIST_TIMEOUT_S,
                 low_open=True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if torch.cuda.is_available():
            check_ranks_per_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                                cuda_devices=torch.cuda.device_count())
        config.validate(world_size)
        with (claim(config, world_size, leader=rank == 0) as config,
              run_directory(config.out) if rank == 0 else nullcontext()):
            try:
                _worker(rank, world_size, config, None, planner, log_level)
            except RuntimeError as exc:
                if "timed out" not in str(exc).lower():
                    raise
                # torchrun's ranks have no launcher of ours that could tell which peer went silent
                raise JobFailed(f"rank {rank} waited {config.dist_timeout_s:g} s for another rank in a collective "
                                f"(one stopped, hung or is on a dead node); {RESUME_HINT}") from None
            if rank == 0:
                mark_run_complete(Path(config.out), config.steps)   # every rank passed the end barrier
        return Path(config.out)
    check_positive_int(nproc_per_node, "nproc_per_node")
    check_local_ranks(nproc_per_node, cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                      cpu_cores=cpu_cores())
    config.validate(nproc_per_node)
    check_writable(Path(config.out).absolute().parent, "the run directory's folder")
    if config.checkpoint_every:
        check_writable(config.checkpoint_root(), "the checkpoint directory")
    # Local ranks meet through a file rather than a TCP store served by rank 0: rank 0 may exit (taking a TCP
    # store down) while another rank still tears down its process group, which aborted that rank intermittently.
    with (claim(config, nproc_per_node) as config, tempfile.TemporaryDirectory(prefix="symi-store-") as store_dir,
          run_directory(config.out)):
        context = mp.start_processes(_worker, args=(nproc_per_node, config, store_dir, planner, log_level),
                                     nprocs=nproc_per_node, join=False, start_method="spawn")
        supervise(context, store_dir=store_dir, timeout_s=config.dist_timeout_s)
        mark_run_complete(Path(config.out), config.steps)
    return Path(config.out)


@contextmanager
def run_directory(out: str | Path) -> Iterator[Path]:
    """The run directory while the job runs (created; validated empty or absent before). A job that fails
    (JobFailed, ValueError) keeps it with the steps written so far and says so in its line; one that wrote no step,
    or ends otherwise without any, leaves none (an empty folder that was there stays)."""
    out = Path(out)
    existed = out.is_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except (JobFailed, ValueError) as exc:
        num_steps = written_steps(out)
        if not num_steps:
            _remove(out, keep_folder=existed)
            raise
        where = f"partial outputs in {out}: metrics up to step {num_steps}"
        if isinstance(exc, JobFailed):
            raise JobFailed(f"{exc}; {where}", exit_code=exc.exit_code) from None
        raise ValueError(f"{exc}; {where}") from None
    except BaseException:
        if not written_steps(out):
            _remove(out, keep_folder=existed)
        raise


def _remove(out: Path, *, keep_folder: bool) -> None:
    if not keep_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _worker(rank: int, world_size: int, config: TrainConfig, store_dir: str | None, planner: Planner | None,
            log_level: int) -> None:
    """One rank: join the process group, train, leave; rank 0 writes the run directory. `store_dir` None: a
    torchrun rank (the user's process, whose logging the CLI set up: its level is lowered to `log_level` here)."""
    spawned = store_dir is not None
    if spawned:
        logging.basicConfig(level=log_level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    else:
        # the CLI configured logging at WARNING before any rank existed: the progress lines (INFO) would vanish
        root = logging.getLogger()
        level = min(log_level, root.getEffectiveLevel())
        logging.basicConfig(level=level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # torchrun (store_dir None) rendezvous through its env:// store; spawned local ranks through a shared file
    timeout = timedelta(seconds=config.dist_timeout_s)
    if spawned:
        store = dist.FileStore(os.path.join(store_dir, "store"), world_size)
    else:
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if backend == "nccl" else None)
    try:
        progress = progress_path(store_dir, rank) if spawned else None
        if progress is not None:
            write_progress(progress, -1)
        comm = Comm(rank=rank, world_size=world_size, device=device, progress_path=progress, store=store)
        train(config, comm, Path(config.out) if rank == 0 else None, planner)
        # rank 0 writes the run directory's final files, maybe for longer than the collective timeout
        wait_for_ranks(store, "end", rank=rank, world_size=world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if spawned:
        # Everything is written and the group is gone, yet the interpreter's teardown could still abort this
        # rank under load ("terminate called without an active exception", SIGABRT): gloo's C++ worker threads
        # and pending AsyncWork objects outlive destroy_process_group and meet the finalising interpreter. A
        # spawned rank has nothing left to run, so it leaves at once; a torchrun rank is the user's own process
        # and returns normally, and a failing rank raised above, for the launcher to report.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
