"""Starting a training job: `launch` spawns local ranks (or joins a torchrun job), each runs loop.train.

A rank that dies (killed, out of memory, a failure drill) fails the job with JobFailed and no run directory;
rank 0 writes the run directory atomically once training finished on every rank.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symi_exec.comm import Comm
from symi_exec.config import Planner, TrainConfig
from symi_exec.loop import train
from symi_exec.run_identity import claim
from symi_sim.checks import check_positive_int
from symi_sim.outputs import atomic_dir


class JobFailed(RuntimeError):
    """A rank of a spawned job died (killed, out of memory, a failure drill): no run directory was written."""


def launch(config: TrainConfig, nproc_per_node: int, *, planner: Planner | None = None,
           log_level: int = logging.INFO) -> Path:
    """Train with `nproc_per_node` local ranks (spawned), or as one rank of a torchrun job (RANK/WORLD_SIZE set).

    Returns the run directory. `planner` replaces the policy's plan (tests use it for arbitrary placements).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
        config.validate(world_size)
        with claim(config, world_size, leader=os.environ["RANK"] == "0") as config:
            _worker(int(os.environ["RANK"]), world_size, config, None, planner, log_level)
        return Path(config.out)
    check_positive_int(nproc_per_node, "nproc_per_node")
    config.validate(nproc_per_node)
    # Local ranks meet through a file rather than a TCP store served by rank 0: rank 0 may exit (taking a TCP
    # store down) while another rank still tears down its process group, which aborted that rank intermittently.
    with claim(config, nproc_per_node) as config, tempfile.TemporaryDirectory(prefix="symi-store-") as store_dir:
        _spawn(config, nproc_per_node, os.path.join(store_dir, "store"), planner, log_level)
    return Path(config.out)


def _spawn(config: TrainConfig, nproc_per_node: int, store_path: str, planner: Planner | None,
           log_level: int) -> None:
    try:
        mp.spawn(_worker, args=(nproc_per_node, config, store_path, planner, log_level), nprocs=nproc_per_node,
                 join=True)
    except mp.ProcessExitedException as exc:
        raise JobFailed(f"rank {exc.error_index} died ({exc}); resume from the last checkpoint with --resume") \
            from None
    except mp.ProcessRaisedException as exc:
        # a bad input found only once training runs (e.g. a placement the executor cannot run) stays a ValueError
        last_line = str(exc).strip().splitlines()[-1]
        if last_line.startswith("ValueError: "):
            raise ValueError(last_line.removeprefix("ValueError: ")) from None
        raise


def _worker(rank: int, world_size: int, config: TrainConfig, store_path: str | None, planner: Planner | None,
            log_level: int) -> None:
    """One rank: join the process group, train, leave. `store_path` None: a torchrun rank (the user's process)."""
    spawned = store_path is not None
    logging.basicConfig(level=log_level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # torchrun (store_path None) rendezvous through its env:// store; spawned local ranks through a shared file
    store = dist.FileStore(store_path, world_size) if spawned else None
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            device_id=device if backend == "nccl" else None)
    try:
        comm = Comm(rank=rank, world_size=world_size, device=device)
        if rank == 0:
            with atomic_dir(config.out) as tmp:
                train(config, comm, tmp, planner)
        else:
            train(config, comm, None, planner)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if spawned:
        # Everything is written and the group is gone, yet the interpreter's teardown could still abort this
        # rank under load ("terminate called without an active exception", SIGABRT): gloo's C++ worker threads
        # and pending AsyncWork objects outlive destroy_process_group and meet the finalising interpreter. A
        # spawned rank has nothing left to run, so it leaves at once; a torchrun rank is the user's own process
        # and returns normally, and a failing rank raised above, for mp.spawn to report.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
