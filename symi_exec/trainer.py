"""The SYMI training loop (nanoGPT-like, explicit), its launcher, and its outputs.

Legend: L MoE layers, E experts, G ranks, S slots per rank (in `_SP` names) or steps (in `_SLE` names),
B sequences per rank, T sequence length, P parameters of one expert.

One step on every rank:
  forward     router top-k, popularity all-gather, dispatch to the replicas of the current placement, combine
  backward    through the same all-to-alls
  dense_grad  plain data parallel: all-reduce (mean) of every non-expert gradient
  expert_grad replica gradient sync + collection into this rank's 1/G shard of every expert (optim.py)
  optimizer   gradient clipping on the global norm; AdamW on dense parameters and on the expert shards
  plan        the policy plans the next placement from this step's global popularity (every rank, deterministic);
              a policy with a period (flexmoe-N) is asked only every N steps and the placement kept in between
  send_out    updated expert shards go to the slots of the next placement
Optimizer-coupled policies (flexmoe) run with optim.ReplicaExpertOptimizer instead: expert_grad is the replica
gradient sync alone, every holder rank updates its full copy of the expert, and send_out migrates the weights and
AdamW moments of replicas that change rank (counted as `weight_sendout` and `optimizer_state` bytes).
Rank 0 writes the run directory: config.json, metrics.csv (one row per step), placements.jsonl (the placement
each step ran with and the assignments it dropped per layer and expert), checkpoint.pt (single-device state dict,
loadable by model.GPT), trace.parquet (--record-trace: counts per step, layer, expert and source rank).
With checkpoint_every K, every rank also writes its part of a resumable checkpoint every K steps and after the
last one (checkpoint.py); with sparse_hot_share F also one at step 0 and a sparse snapshot of the hot experts after
every other step (snapshots.py). `resume` continues from the latest complete checkpoint and the sparse snapshots
after it, on any number of ranks. Rank 0 then also writes checkpoints.csv (one row per write of this job: step,
kind, hot experts, bytes, expert bytes, the loop's blocked time, the write time) and, when resumed, recovery.json
(what was restored and lost). overlap_checkpoints hands the writes to a background thread (writer.py).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symi_exec import checkpoint, snapshots
from symi_exec.comm import BYTE_KINDS, Comm
from symi_exec.model import GPT, ModelConfig, model_config, param_groups
from symi_exec.moe import ReplicatedMoE
from symi_exec.optim import ReplicaExpertOptimizer, ShardedExpertOptimizer
from symi_exec.writer import SnapshotWriter
from symi_sim.cluster import Cluster
from symi_sim.outputs import atomic_dir
from symi_sim.placement import Placement
from symi_sim.policies import get_policy, with_context
from symi_sim.routing import CAPACITY_MODES

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).parent / "data" / "wikipedia_texts.txt"
PHASES = ("forward", "backward", "dense_grad", "expert_grad", "optimizer", "plan", "send_out")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# planner(step, load_LE, cluster, previous) -> the placement of the next step (a policy's plan by default)
Planner = Callable[[int, np.ndarray, Cluster, Placement | None], Placement]


class JobFailed(RuntimeError):
    """A rank of a spawned job died (killed, out of memory, a failure drill): no run directory was written."""


@dataclass(frozen=True)
class TrainConfig:
    out: str
    model: str = "tiny"
    num_experts: int = 4
    slots_per_rank: int = 2
    top_k: int = 1
    policy: str = "symi"
    policy_options: dict[str, Any] = field(default_factory=dict)
    capacity_factor: float | None = None   # None: dropless
    capacity_mode: str = "slot"
    steps: int = 20
    batch_size: int = 4                    # sequences per rank per step
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                 # 0 disables clipping
    aux_loss_coef: float = 0.01
    seed: int = 0
    data: str | None = None                # a text file (bytes are tokens); None: the shipped Wikipedia sample
    record_trace: bool = False
    dtype: str = "float32"
    log_interval: int = 10
    model_overrides: dict[str, int] = field(default_factory=dict)
    checkpoint_every: int = 0              # 0: no checkpoints; K: every K steps and after the last step
    checkpoint_dir: str | None = None      # None: the --resume directory, else "<out>-checkpoints"
    resume: str | None = None              # a checkpoint root: continue from its latest complete checkpoint
    sparse_hot_share: float | None = None  # F: between full checkpoints, a sparse snapshot of the hot experts
                                           # (covering F of the unsaved tokens) after every step (snapshots.py)
    keep_checkpoints: int = 0              # 0: keep every full checkpoint; N: only the newest N
    overlap_checkpoints: bool = False      # write checkpoints in a background thread while training goes on
    fail_at_step: int | None = None        # failure drill: every rank SIGKILLs itself when this step starts

    def checkpoint_root(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        if self.resume is not None:
            return Path(self.resume)
        out = Path(self.out)
        return out.with_name(f"{out.name}-checkpoints")

    def model_config(self) -> ModelConfig:
        return model_config(self.model, num_experts=self.num_experts, top_k=self.top_k,
                            aux_loss_coef=self.aux_loss_coef, **self.model_overrides)

    def data_path(self) -> Path:
        return Path(self.data) if self.data is not None else DEFAULT_DATA

    def validate(self, world_size: int) -> None:
        """ValueError naming the first bad option (checked before any process starts)."""
        positive = ("num_experts", "slots_per_rank", "top_k", "steps", "batch_size", "log_interval")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if world_size < 1:
            raise ValueError(f"the number of ranks must be >= 1, got {world_size}")
        if self.num_experts > world_size * self.slots_per_rank:
            raise ValueError(f"{self.num_experts} experts need at least {self.num_experts} slots, but {world_size} "
                             f"ranks x {self.slots_per_rank} slots = {world_size * self.slots_per_rank}")
        self.model_config()
        if self.capacity_factor is not None and not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"capacity factor must be a finite number > 0, got {self.capacity_factor!r}")
        if self.capacity_mode not in CAPACITY_MODES:
            raise ValueError(f"unknown capacity mode {self.capacity_mode!r}; choices: {', '.join(CAPACITY_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choices: {', '.join(DTYPES)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        policy = get_policy(self.policy, **self.policy_options)
        if policy.uses_current_load:
            raise ValueError(f"policy {self.policy!r} plans on the current step's loads; the executor cannot run it")
        path = self.data_path()
        if not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist")
        seq_len = self.model_config().seq_len
        if path.stat().st_size < seq_len + 2:
            raise ValueError(f"data file {str(path)!r} holds {path.stat().st_size} bytes, fewer than a sequence "
                             f"needs ({seq_len + 2})")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"output directory {self.out!r} already exists and is not empty")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) \
                or self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be an integer >= 0, got {self.keep_checkpoints!r}")
        if self.sparse_hot_share is not None:
            if isinstance(self.sparse_hot_share, bool) or not isinstance(self.sparse_hot_share, int | float) \
                    or not 0 < self.sparse_hot_share <= 1:
                raise ValueError(f"sparse hot share must be a number in (0, 1], got {self.sparse_hot_share!r}")
            if not self.checkpoint_every:
                raise ValueError("sparse snapshots need full checkpoints to start from: set checkpoint_every "
                                 "(--checkpoint-every K) too")
        if self.fail_at_step is not None and (isinstance(self.fail_at_step, bool)
                                              or not isinstance(self.fail_at_step, int) or self.fail_at_step < 0):
            raise ValueError(f"fail_at_step must be an integer >= 0, got {self.fail_at_step!r}")
        if self.resume is not None:
            self._validate_resume(world_size)

    def _validate_resume(self, world_size: int) -> None:
        latest = checkpoint.latest_complete(self.resume)
        if latest is None:
            raise ValueError(f"no complete checkpoint in {self.resume!r}")
        meta = checkpoint.read_meta(latest)
        if meta["model"] != self.model_config().to_dict():
            raise ValueError(f"checkpoint {str(latest)!r} holds another model: {meta['model']}")
        chain = snapshots.sparse_chain(self.resume, meta["step"])
        if chain:
            meta = checkpoint.read_meta(chain[-1])
        if meta["step"] >= self.steps:
            raise ValueError(f"checkpoint {str(latest)!r} (and its sparse snapshots) reach step {meta['step']}; "
                             f"nothing left of {self.steps} steps")
        if self.record_trace and meta["world_size"] != world_size:
            raise ValueError(f"--record-trace needs the checkpoint's world size ({meta['world_size']}), got "
                             f"{world_size}")


# ---------------------------------------------------------------------------------------------- data


def load_tokens(path: str | Path) -> np.ndarray:
    """Byte-level tokens of a file (uint8)."""
    return np.fromfile(path, dtype=np.uint8)


def get_batch(tokens: np.ndarray, step: int, *, rank: int, world_size: int, batch_size: int, seq_len: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s slice (rows rank*B .. rank*B+B-1) of step `step`'s global batch of G*B random windows.

    The global batch depends only on (seed, step), so any number of ranks, or one process taking all rows,
    sees the same tokens.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len - 1, size=world_size * batch_size)
    mine = starts[rank * batch_size:(rank + 1) * batch_size]
    window = np.stack([tokens[s:s + seq_len + 1] for s in mine]).astype(np.int64)
    return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over the run (nanoGPT's schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# ---------------------------------------------------------------------------------------------- launch


def launch(config: TrainConfig, nproc_per_node: int, planner: Planner | None = None,
           log_level: int = logging.INFO) -> Path:
    """Train with `nproc_per_node` local ranks (spawned), or as one rank of a torchrun job (RANK/WORLD_SIZE set).

    Returns the run directory. `planner` replaces the policy's plan (tests use it for arbitrary placements).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
        config.validate(world_size)
        _worker(int(os.environ["RANK"]), world_size, config, None, planner, log_level)
        return Path(config.out)
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be a positive integer, got {nproc_per_node!r}")
    config.validate(nproc_per_node)
    # Local ranks meet through a file rather than a TCP store served by rank 0: rank 0 may exit (taking a TCP
    # store down) while another rank still tears down its process group, which aborted that rank intermittently.
    with tempfile.TemporaryDirectory(prefix="symi-store-") as store_dir:
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
    store = dist.FileStore(store_path, world_size) if store_path is not None else None
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


# ---------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, comm: Comm, out_dir: Path | None, planner: Planner | None = None) -> None:
    """Run the training loop on this rank (process group initialised); rank 0 passes the directory to write."""
    dtype, device = DTYPES[config.dtype], comm.device
    cfg = config.model_config()
    # the policies see the job as a cluster: torchrun's LOCAL_WORLD_SIZE ranks per node, one node when spawned
    ranks_per_node = min(int(os.environ.get("LOCAL_WORLD_SIZE", comm.world_size)), comm.world_size)
    cluster = Cluster(name="executor", num_nodes=max(comm.world_size // ranks_per_node, 1),
                      gpus_per_node=ranks_per_node, slots_per_gpu=config.slots_per_rank)
    # policies that estimate costs from the expert's shape, or shape shares for a capacity mode, get the real ones
    context = {k: v for k, v in (("d_model", cfg.d_model), ("d_ff", cfg.d_ff), ("capacity_mode", config.capacity_mode))
               if k not in config.policy_options}
    policy = with_context(get_policy(config.policy, **config.policy_options), **context)
    if planner is None:
        def planner(step: int, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
            if previous is not None and (step + 1) % policy.rebalance_every:
                return previous
            return policy.plan(load_LE, cluster, previous=previous)

    # every rank builds the same single-device model, then swaps its MoE layers for the expert-parallel ones
    torch.manual_seed(config.seed)
    model = GPT(cfg).to(device=device, dtype=dtype)
    expert_weights_LEP = [moe.experts.flat_EP().detach() for moe in model.moe_layers]
    for block in model.blocks:
        block.moe = ReplicatedMoE(block.moe.router, cfg, slots_per_rank=config.slots_per_rank, comm=comm,
                                  capacity_factor=config.capacity_factor, capacity_mode=config.capacity_mode)
    moe_layers: list[ReplicatedMoE] = list(model.moe_layers)
    dense_named = [(n, p) for n, p in model.named_parameters() if not n.endswith("slot_weights_SP")]
    dense_params = [p for _, p in dense_named]
    slot_params = [moe.slot_weights_SP for moe in moe_layers]
    dense_opt = torch.optim.AdamW(param_groups(dense_named, config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=1e-8)
    optimizer_cls = ReplicaExpertOptimizer if policy.optimizer_coupled else ShardedExpertOptimizer
    expert_opt = optimizer_cls(expert_weights_LEP, comm, slots_per_rank=config.slots_per_rank, lr=config.lr,
                               betas=(config.beta1, config.beta2), eps=1e-8, weight_decay=config.weight_decay)
    del expert_weights_LEP

    rows: list[dict[str, Any]] = []
    src_counts_SLEG: list[np.ndarray] = []
    step_records: list[dict[str, Any]] = []
    start_step, rng_state, recovery = 0, None, None
    tracker = snapshots.SnapshotTracker.fresh(cfg.num_layers, cfg.num_experts)
    load_LE = np.ones((cfg.num_layers, cfg.num_experts))
    if config.resume is not None:
        start_step, placement, rng_state, history, tracker, load_LE, recovery = _restore(
            config, cfg, comm, cluster, planner, model, dense_opt, expert_opt)
        rows, step_records, src_counts_SLEG = history["rows"], history["step_records"], history["src_counts_SLEG"]
    else:
        placement = planner(-1, load_LE, cluster, None)
    placement.validate(cluster, num_layers=cfg.num_layers)
    expert_opt.send_out(placement, [p.data for p in slot_params])
    comm.take_bytes()   # the initial fill is not part of any step
    if rng_state is not None:
        _set_rng_state(rng_state)
    writer = SnapshotWriter(comm.rank, comm.world_size, overlapped=config.overlap_checkpoints)
    writes: list[dict[str, Any]] = []      # one row per checkpoint or snapshot this job wrote (checkpoints.csv)
    if config.sparse_hot_share is not None and (config.resume is None
                                                or config.checkpoint_root() != Path(config.resume)):
        # the sparse chain needs a full state to start from in its own directory
        writes.append(_save_checkpoint(
            config, cfg, comm, writer, start_step, model, dense_opt, expert_opt, placement, load_LE,
            {"rows": rows, "step_records": step_records, "src_counts_SLEG": src_counts_SLEG}))

    tokens = load_tokens(config.data_path())
    tokens_per_step = comm.world_size * config.batch_size * cfg.seq_len
    for step in range(start_step, config.steps):
        if step == config.fail_at_step:
            logger.warning("failure drill: rank %d killed at the start of step %d", comm.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        times = dict.fromkeys(PHASES, 0.0)
        step_start = clock = _now(device)
        lr = lr_at(step, config)
        for layer, moe in enumerate(moe_layers):
            moe.placement = Placement(placement.phy2log_LR[layer:layer + 1], placement.share_LR[layer:layer + 1],
                                      cfg.num_experts)
        x_BT, y_BT = get_batch(tokens, step, rank=comm.rank, world_size=comm.world_size,
                               batch_size=config.batch_size, seq_len=cfg.seq_len, seed=config.seed)
        _, loss = model(x_BT.to(device), y_BT.to(device))
        times["forward"], clock = _lap(clock, device)

        for p in model.parameters():
            p.grad = None
        loss.backward()
        times["backward"], clock = _lap(clock, device)

        dense_sq = _all_reduce_dense_grads(dense_params, comm)
        times["dense_grad"], clock = _lap(clock, device)

        slot_grads_LSP = [p.grad if p.grad is not None else torch.zeros_like(p) for p in slot_params]
        expert_opt.collect_gradients(slot_grads_LSP, placement)
        times["expert_grad"], clock = _lap(clock, device)

        grad_norm = math.sqrt(float(dense_sq) + float(expert_opt.grad_sq_norm()))
        # torch.nn.utils.clip_grad_norm_'s rule, on the norm over all ranks' shards and the dense gradients
        grad_scale = min(config.grad_clip / (grad_norm + 1e-6), 1.0) if config.grad_clip > 0 else 1.0
        for group in dense_opt.param_groups:
            group["lr"] = lr
        if grad_scale != 1.0:
            for p in dense_params:
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        dense_opt.step()
        expert_opt.step(lr, grad_scale)
        times["optimizer"], clock = _lap(clock, device)

        count_LGE = np.stack([moe.count_GE for moe in moe_layers])
        load_LE = count_LGE.sum(axis=1)
        next_placement = planner(step, load_LE.astype(np.float64), cluster, placement)
        next_placement.validate(cluster, num_layers=cfg.num_layers)
        times["plan"], clock = _lap(clock, device)

        expert_opt.send_out(next_placement, [p.data for p in slot_params])
        times["send_out"], clock = _lap(clock, device)
        step_s = _now(device) - step_start

        row = _step_metrics(step, loss, lr, grad_norm, step_s, times, moe_layers, placement, next_placement,
                            tokens_per_step, comm)
        rows.append(row)
        src_counts_SLEG.append(count_LGE.transpose(0, 2, 1))
        step_records.append(_step_record(step, placement, moe_layers, comm))
        if comm.rank == 0 and (step % config.log_interval == 0 or step == config.steps - 1):
            logger.info("step %d | loss %.4f | %.0f tok/s | dropped %.2f%% | imbalance %.2f | moves %d",
                        step, row["loss"], row["tokens_per_s"], 100 * row["dropped_fraction"], row["imbalance"],
                        row["replica_moves"])
        placement = next_placement
        tracker.record_step(load_LE)
        if config.checkpoint_every and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            writes.append(_save_checkpoint(
                config, cfg, comm, writer, step + 1, model, dense_opt, expert_opt, placement, load_LE,
                {"rows": rows, "step_records": step_records, "src_counts_SLEG": src_counts_SLEG}))
            tracker = snapshots.SnapshotTracker.fresh(cfg.num_layers, cfg.num_experts)
        elif config.sparse_hot_share is not None:
            mask_LE = snapshots.hot_mask_LE(tracker.unsaved_LE, tracker.age_LE, config.sparse_hot_share)
            tracker.mark_saved(mask_LE)
            writes.append(_save_sparse(
                config, cfg, comm, writer, step + 1, model, dense_opt, expert_opt, placement, load_LE, mask_LE, tracker,
                {"rows": rows[-1:], "step_records": step_records[-1:], "src_counts_SLEG": src_counts_SLEG[-1:]}))

    writer.wait()
    full_LEP = expert_opt.full_weights()
    if out_dir is not None:
        _write_outputs(out_dir, config, cfg, comm, model, full_LEP, rows, step_records, np.stack(src_counts_SLEG),
                       tokens_per_step, placement)
        if writes:
            with open(out_dir / "checkpoints.csv", "w", newline="") as f:
                table = csv.DictWriter(f, fieldnames=list(writes[0]))
                table.writeheader()
                table.writerows(writes)
        if recovery is not None:
            (out_dir / "recovery.json").write_text(json.dumps(recovery, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002 (the global one)
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 (the global one, which library code may draw from)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dense_state(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith("slot_weights_SP")}


def _save_checkpoint(config: TrainConfig, cfg: ModelConfig, comm: Comm, writer: SnapshotWriter, step: int,
                     model: GPT, dense_opt: torch.optim.Optimizer,
                     expert_opt: ShardedExpertOptimizer | ReplicaExpertOptimizer, placement: Placement,
                     load_LE: np.ndarray, history: dict[str, Any]) -> dict[str, Any]:
    """Every rank writes its file of full checkpoint `step` (the state after `step` steps); once complete, rank 0
    drops the sparse snapshots it supersedes. Returns the write's checkpoints.csv row (filled when done)."""
    expert_state = expert_opt.state_dict()
    return _write_snapshot(config, cfg, comm, writer, checkpoint.step_dir(config.checkpoint_root(), step), step,
                           "full", model, dense_opt, expert_state, placement, load_LE,
                           history={name: list(value) for name, value in history.items()})


def _save_sparse(config: TrainConfig, cfg: ModelConfig, comm: Comm, writer: SnapshotWriter, step: int, model: GPT,
                 dense_opt: torch.optim.Optimizer, expert_opt: ShardedExpertOptimizer | ReplicaExpertOptimizer,
                 placement: Placement, load_LE: np.ndarray, mask_LE: np.ndarray, tracker: snapshots.SnapshotTracker,
                 history_delta: dict[str, Any]) -> dict[str, Any]:
    """Every rank writes its file of sparse snapshot `step` (the hot experts of `mask_LE`); see snapshots.py."""
    return _write_snapshot(config, cfg, comm, writer, snapshots.sparse_dir(config.checkpoint_root(), step), step,
                           "sparse", model, dense_opt, expert_opt.hot_state_dict(mask_LE), placement, load_LE,
                           history_delta=history_delta, tracker=tracker.state(),
                           hot_keys=[(int(layer), int(e)) for layer, e in zip(*np.nonzero(mask_LE), strict=True)])


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def _write_snapshot(config: TrainConfig, cfg: ModelConfig, comm: Comm, writer: SnapshotWriter, directory: Path,
                    step: int, kind: str, model: GPT, dense_opt: torch.optim.Optimizer, expert_state: dict[str, Any],
                    placement: Placement, load_LE: np.ndarray, **head: Any) -> dict[str, Any]:
    """Full checkpoints and sparse snapshots alike: rank 0 prepares `directory`; every rank hands its state (rank
    0: plus the dense state, the next placement, the loads and `head`) to its writer (writer.py), rank 0 with
    the step that writes meta.json and COMPLETE once every file is in place. Returns the checkpoints.csv row:
    bytes and expert_bytes summed over ranks, blocked_s (the training loop's wait), write_s (the write itself)."""
    start = time.perf_counter()
    writer.wait()   # one write in flight: this directory is prepared only after the previous one completed
    if comm.rank == 0:
        checkpoint.prepare_dir(directory)
    if comm.world_size > 1:
        dist.barrier()
    state: dict[str, Any] = {"step": step, "rank": comm.rank, "world_size": comm.world_size, "rng": _rng_state(),
                             ("expert_optimizer" if kind == "full" else "hot_experts"): expert_state}
    if comm.rank == 0:
        # dense parameters and their optimizer are the same on every rank (data parallel): stored once; copies,
        # since the loop updates them in place while an overlapped write may still run
        state.update(dense=_dense_state(model), dense_optimizer=copy.deepcopy(dense_opt.state_dict()),
                     phy2log_LR=placement.phy2log_LR.copy(), share_LR=placement.share_LR.copy(),
                     load_LE=np.asarray(load_LE, dtype=np.float64).copy(), **head)
    num_hot = len(head["hot_keys"]) if kind == "sparse" else cfg.num_layers * cfg.num_experts
    record: dict[str, Any] = {"step": step, "kind": kind, "hot_experts": num_hot, "bytes": None,
                              "expert_bytes": None, "blocked_s": None, "write_s": None}
    finish = None
    if comm.rank == 0:
        def finish(num_bytes: int, num_expert_bytes: int) -> None:
            meta = {"step": step, "kind": kind, "world_size": comm.world_size,
                    "slots_per_rank": config.slots_per_rank, "policy": config.policy, "dtype": config.dtype,
                    "model": cfg.to_dict(), "expert_optimizer": expert_state["layout"],
                    "next_lr": lr_at(step, config), "bytes": num_bytes, "expert_bytes": num_expert_bytes,
                    "hot_experts": num_hot, "placement": placement.to_json_dict()}
            checkpoint.mark_complete(directory, meta)
            record.update(bytes=num_bytes, expert_bytes=num_expert_bytes)
            if kind == "full":
                snapshots.prune_sparse(directory.parent, step)
                if config.keep_checkpoints:
                    checkpoint.keep_latest(directory.parent, config.keep_checkpoints)
            logger.info("%s snapshot %s: %d bytes in %.3f s", kind, directory, num_bytes,
                        time.perf_counter() - start)

    writer.write(directory, state, _tensor_bytes(expert_state), finish, record)
    record["blocked_s"] = time.perf_counter() - start
    return record


def _restore(config: TrainConfig, cfg: ModelConfig, comm: Comm, cluster: Cluster, planner: Planner, model: GPT,
             dense_opt: torch.optim.Optimizer, expert_opt: ShardedExpertOptimizer | ReplicaExpertOptimizer
             ) -> tuple[int, Placement, dict[str, Any] | None, dict[str, Any], snapshots.SnapshotTracker,
                        np.ndarray, dict[str, Any]]:
    """Load the latest complete checkpoint of config.resume and the sparse snapshots after it into this rank;
    returns (the next step, its placement, this rank's RNG state to set once set-up is done (None: the
    checkpoint had no such rank), the history, the snapshot tracker, the last step's loads, the recovery record)."""
    assert config.resume is not None
    start = time.perf_counter()
    recovered = snapshots.recover(config.resume, cfg.num_layers, cfg.num_experts)
    meta, states, step, history, tracker = (recovered.meta, recovered.states, recovered.step, recovered.history,
                                            recovered.tracker)
    head = states[0]
    device, dtype = comm.device, DTYPES[config.dtype]
    missing, unexpected = model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in head["dense"].items()},
                                                strict=False)
    assert not unexpected and all(k.endswith("slot_weights_SP") for k in missing), (missing, unexpected)
    dense_opt.load_state_dict(head["dense_optimizer"])
    if meta["world_size"] == comm.world_size and meta["slots_per_rank"] == config.slots_per_rank:
        placement = Placement(head["phy2log_LR"], head["share_LR"], cfg.num_experts)
    else:
        # another cluster shape: the policy re-places from the last step's loads (SYMI: at no extra cost)
        placement = planner(step - 1, head["load_LE"], cluster, None)
        placement.validate(cluster, num_layers=cfg.num_layers)
    expert_opt.load_full_state(recovered.expert_state, placement)
    rng_state = states[comm.rank]["rng"] if comm.rank < len(states) else None
    if meta["world_size"] != comm.world_size:
        # per-source-rank counts of another world size do not stack (--record-trace refuses this case)
        history = {**history, "src_counts_SLEG": []}
    recovery = {"checkpoint": str(recovered.full_dir), "sparse_snapshots": len(recovered.chain), "step": step,
                "world_size_then": meta["world_size"], "world_size_now": comm.world_size,
                "stale_experts": int((tracker.age_LE > 0).sum()), "max_staleness_steps": int(tracker.age_LE.max()),
                "lost_expert_assignments": float(tracker.unsaved_LE.sum()),
                "restore_s": time.perf_counter() - start}
    if comm.rank == 0:
        logger.info("resumed from %s + %d sparse snapshots (step %d, %d ranks then, %d now; %d stale experts)",
                    recovered.full_dir, len(recovered.chain), step, meta["world_size"], comm.world_size,
                    recovery["stale_experts"])
    return step, placement, rng_state, history, tracker, np.asarray(head["load_LE"], dtype=np.float64), recovery


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _lap(clock: float, device: torch.device) -> tuple[float, float]:
    now = _now(device)
    return now - clock, now


def _all_reduce_dense_grads(params: list[torch.nn.Parameter], comm: Comm) -> float:
    """Mean of the dense gradients over ranks, in one flat all-reduce; returns their squared norm."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if comm.world_size > 1:
        dist.all_reduce(flat)
        flat /= comm.world_size
        comm.count("dense_grad", 2 * (comm.world_size - 1) * flat.numel() * flat.element_size() // comm.world_size)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()
    return float((flat.double() ** 2).sum())


def _step_metrics(step: int, loss: torch.Tensor, lr: float, grad_norm: float, step_s: float,
                  times: dict[str, float], moe_layers: list[ReplicatedMoE], placement: Placement,
                  next_placement: Placement, tokens_per_step: int, comm: Comm) -> dict[str, Any]:
    """One metrics row, the same on every rank: loss averaged, bytes and drops summed, times maxed over ranks."""
    bytes_by_kind = comm.take_bytes()
    dropped_E = np.stack([moe.dropped_E for moe in moe_layers]).sum(axis=0)
    summed = torch.tensor([float(loss.detach()), float(dropped_E.sum()), *bytes_by_kind.values()],
                          dtype=torch.float64, device=comm.device)
    maxed = torch.tensor([step_s, *times.values()], dtype=torch.float64, device=comm.device)
    if comm.world_size > 1:
        dist.all_reduce(summed)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    summed, maxed = summed.cpu().tolist(), maxed.cpu().tolist()
    num_assignments = sum(int(moe.count_GE.sum()) for moe in moe_layers)
    imbalance_L = [float(moe.plan.routing.imbalance_L[0]) for moe in moe_layers]
    row: dict[str, Any] = {
        "step": step,
        "loss": summed[0] / comm.world_size,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_s": maxed[0],
        "tokens_per_s": tokens_per_step / maxed[0] if maxed[0] > 0 else float("nan"),
        "dropped_fraction": summed[1] / max(num_assignments, 1),
        "imbalance": float(np.mean(imbalance_L)),
        "replica_moves": int(next_placement.replica_moves(placement).sum()),
    }
    row.update({f"time_{phase}_s": value for phase, value in zip(PHASES, maxed[1:], strict=True)})
    row.update({f"bytes_{kind}": int(value) for kind, value in zip(BYTE_KINDS, summed[2:], strict=True)})
    return row


def _step_record(step: int, placement: Placement, moe_layers: list[ReplicatedMoE], comm: Comm) -> dict[str, Any]:
    """The placement a step ran with and the assignments it dropped per layer and expert (summed over ranks)."""
    dropped_LE = torch.as_tensor(np.stack([moe.dropped_E for moe in moe_layers]), device=comm.device)
    if comm.world_size > 1:
        dist.all_reduce(dropped_LE)
    return {"step": step, "phy2log": placement.phy2log_LR.tolist(),
            "share": [[round(float(x), 12) for x in row] for row in placement.share_LR],
            "dropped": dropped_LE.cpu().tolist()}


def _write_outputs(out_dir: Path, config: TrainConfig, cfg: ModelConfig, comm: Comm, model: GPT,
                   full_LEP: list[torch.Tensor], rows: list[dict[str, Any]], step_records: list[dict[str, Any]],
                   src_counts_SLEG: np.ndarray, tokens_per_step: int, final_placement: Placement) -> None:
    resolved = {"train": asdict(config), "model": cfg.to_dict(), "world_size": comm.world_size,
                "backend": dist.get_backend(), "device": str(comm.device), "data": str(config.data_path()),
                "tokens_per_step": tokens_per_step, "torch": torch.__version__,
                "expert_optimizer": "replica" if get_policy(config.policy, **config.policy_options).optimizer_coupled
                else "sharded"}
    (out_dir / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / "placements.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in step_records)
    torch.save({"model": single_device_state_dict(model, full_LEP, cfg), "model_config": cfg.to_dict(),
                "train_config": asdict(config), "steps": config.steps,
                "placement": final_placement.to_json_dict()}, out_dir / "checkpoint.pt")
    if config.record_trace:
        from symi_sim.traces.format import LoadTrace, write_trace

        trace = LoadTrace(counts_SLE=src_counts_SLEG.sum(axis=3), top_k=cfg.top_k, tokens_per_step=tokens_per_step,
                          model=f"symi-exec-{config.model}-E{cfg.num_experts}", source="symi train",
                          provenance=f"recorded by symi train (policy {config.policy}, seed {config.seed}, data "
                                     f"{config.data_path().name}, {comm.world_size} ranks)",
                          src_counts_SLEG=src_counts_SLEG)
        write_trace(trace, out_dir / "trace.parquet")


def single_device_state_dict(model: GPT, full_LEP: list[torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict a single-device GPT(cfg) loads: dense weights plus every expert's full weights."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith("slot_weights_SP")}
    num_dff = cfg.d_model * cfg.d_ff
    for layer, flat_EP in enumerate(full_LEP):
        flat_EP = flat_EP.detach().cpu()
        state[f"blocks.{layer}.moe.experts.w_in_EDF"] = flat_EP[:, :num_dff].reshape(-1, cfg.d_model, cfg.d_ff).clone()
        state[f"blocks.{layer}.moe.experts.w_out_EFD"] = flat_EP[:, num_dff:].reshape(-1, cfg.d_ff, cfg.d_model).clone()
    return state
