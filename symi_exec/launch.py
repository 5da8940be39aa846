"""Starting a training job: `launch` spawns local ranks (or joins a torchrun job), each runs loop.train.

The launcher checks the job's limits and folders before any rank starts, then watches its ranks (supervise.py): a
rank that dies (killed, out of memory, a failure drill), stops answering (SIGSTOP, a hang: the collective timeout
`dist_timeout_s`) or fails on a file, and SIGINT or SIGTERM to the launcher, end the job with one line (JobFailed)
and no run directory. Rank 0 writes the run directory into a temporary folder of the launcher's, which the launcher
renames into place once every rank finished (and removes otherwise).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symi_exec.comm import Comm
from symi_exec.config import Planner, TrainConfig
from symi_exec.loop import train
from symi_exec.run_identity import claim
from symi_exec.supervise import (
    MAX_DIST_TIMEOUT_S,
    RESUME_HINT,
    JobFailed,
    check_local_ranks,
    check_writable,
    cpu_cores,
    progress_path,
    supervise,
    write_progress,
)
from symi_sim.checks import check_number, check_positive_int
from symi_sim.outputs import atomic_dir

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
        config.validate(world_size)
        with claim(config, world_size, leader=rank == 0) as config:
            try:
                _worker(rank, world_size, config, None, None, planner, log_level)
            except RuntimeError as exc:
                if "timed out" not in str(exc).lower():
                    raise
                # torchrun's ranks have no launcher of ours that could tell which peer went silent
                raise JobFailed(f"rank {rank} waited {config.dist_timeout_s:g} s for another rank in a collective "
                                f"(one stopped, hung or is on a dead node); {RESUME_HINT}") from None
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
          atomic_dir(config.out) as out_tmp):
        context = mp.start_processes(_worker, args=(nproc_per_node, config, store_dir, out_tmp, planner, log_level),
                                     nprocs=nproc_per_node, join=False, start_method="spawn")
        supervise(context, store_dir=store_dir, timeout_s=config.dist_timeout_s)
    return Path(config.out)


def _worker(rank: int, world_size: int, config: TrainConfig, store_dir: str | None, out_tmp: Path | None,
            planner: Planner | None, log_level: int) -> None:
    """One rank: join the process group, train, leave. `store_dir` None: a torchrun rank (the user's process), whose
    rank 0 writes the run directory itself; a spawned rank 0 writes into the launcher's `out_tmp`."""
    spawned = store_dir is not None
    logging.basicConfig(level=log_level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # torchrun (store_dir None) rendezvous through its env:// store; spawned local ranks through a shared file
    store = dist.FileStore(os.path.join(store_dir, "store"), world_size) if spawned else None
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=config.dist_timeout_s),
                            device_id=device if backend == "nccl" else None)
    try:
        progress = progress_path(store_dir, rank) if spawned else None
        if progress is not None:
            write_progress(progress, -1)
        comm = Comm(rank=rank, world_size=world_size, device=device, progress_path=progress)
        if rank == 0 and not spawned:
            with atomic_dir(config.out) as tmp:
                train(config, comm, tmp, planner)
        else:
            train(config, comm, out_tmp if rank == 0 else None, planner)
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
