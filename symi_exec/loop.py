"""The SYMI training loop (nanoGPT-like, explicit): `train` runs it on one rank of an initialised process group.

Legend: L MoE layers, E experts, G ranks, S slots per rank (in `_SP` names), B sequences per rank, T sequence
length, P parameters of one expert.

One step on every rank (forward and backward once per micro-batch, M = grad_accum of them, gradients accumulated):
  forward     router top-k, popularity all-gather, dispatch to the replicas of the current placement, combine
  backward    through the same all-to-alls; in the last micro-batch's, the dense gradients' all-reduce starts bucket
              by bucket as their gradients are done (dense.py)
  dense_grad  plain data parallel: the wait for the rest of those all-reduces (the mean of every non-expert gradient)
  expert_grad replica gradient sync + collection into this rank's 1/G shard of every expert (optim.py)
  optimizer   gradient clipping on the global norm; AdamW on dense parameters and on the expert shards
  plan        the policy plans the next placement from this step's global popularity (every rank, deterministic);
              a policy with a period (flexmoe-N) is asked only every N steps and the placement kept in between
  send_out    updated expert shards go to the slots of the next placement
That is SYMI's layout (policy.optimizer_layout "sharded"). The "group" policies (static, fastermoe: DeepSpeed) run
with optim_group.GroupExpertOptimizer: expert_grad is a reduce-scatter within each expert's replica group, every
holder updates its 1/r shard, and send_out is the all-gather within the group (the placement never changes). The
"replica" policies (flexmoe) run with optim_replica.ReplicaExpertOptimizer: expert_grad is the replica gradient sync
alone, every holder rank updates its full copy of the expert, and send_out migrates the weights and AdamW moments
of replicas that change rank (counted as `weight_sendout` and `optimizer_state` bytes).
After the step: its metrics row and placement record (outputs.py: streamed into the run directory, written out
every log interval), then a checkpoint when one is due (checkpointing.py). At the end rank 0 writes the run
directory's final files. A loss or gradient norm that is not finite on any rank stops every rank before the
optimizer step (the loss rides in the dense gradients' all-reduce, the gradient norm is global: all ranks agree),
so the last checkpoint written stays the last good one.
Micro-batch m of rank r is rows (m G + r) B .. (m G + r + 1) B - 1 of the step's global batch of G B M sequences
(step_batch), so any (G, M) with the same G M trains on the same tokens; the loss is the mean over micro-batches,
and the MoE layers' counts and drops are summed over them (planning, metrics row, trace).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from symi_exec.checkpointing import Checkpointer
from symi_exec.comm import Comm
from symi_exec.config import MASTER_DTYPES, Planner, TrainConfig
from symi_exec.data import get_batch, load_data, lr_at
from symi_exec.dense import DenseOptimizer
from symi_exec.evaluate import validation_loss
from symi_exec.model import GPT, TORCH_DTYPES, ModelConfig, init_expert
from symi_exec.moe import ReplicatedMoE
from symi_exec.optim import ExpertOptimizer, ShardedExpertOptimizer
from symi_exec.optim_group import GroupExpertOptimizer
from symi_exec.optim_replica import ReplicaExpertOptimizer
from symi_exec.outputs import History, run_config, step_metrics, step_record, write_run_dir
from symi_exec.trace_megatron import MegatronRouterTrace
from symi_sim.checks import check_choice
from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies import Policy, get_policy, with_context

logger = logging.getLogger(__name__)

# policy.optimizer_layout -> the expert optimizer that keeps the state that way
EXPERT_OPTIMIZERS: dict[str, type[ExpertOptimizer]] = {
    "sharded": ShardedExpertOptimizer, "group": GroupExpertOptimizer, "replica": ReplicaExpertOptimizer}

PHASES = ("forward", "backward", "dense_grad", "expert_grad", "optimizer", "plan", "send_out")


def train(config: TrainConfig, comm: Comm, out_dir: Path | None, planner: Planner | None = None) -> None:
    """Run the training loop on this rank (process group initialised); rank 0 passes the directory to write."""
    device, cfg = comm.device, config.model_config()
    cluster = executor_cluster(config, comm.world_size)
    policy = executor_policy(config)
    planner = planner if planner is not None else policy_planner(policy)

    model, dense_opt, expert_opt = build_model(config, cfg, comm, layout=policy.optimizer_layout)
    moe_layers: list[ReplicatedMoE] = list(model.moe_layers)
    slot_params = [moe.slot_weights_SP for moe in moe_layers]
    checkpointer = Checkpointer(config=config, cfg=cfg, comm=comm, model=model, dense_opt=dense_opt,
                                expert_opt=expert_opt)
    tokens_per_step = comm.world_size * config.batch_size * config.grad_accum * cfg.seq_len
    history = History(out_dir, record_trace=config.record_trace)
    router_trace = (MegatronRouterTrace(out_dir, comm) if config.trace_format == "megatron-router-trace"
                    else None)
    if config.resume is not None:
        restored = checkpointer.restore(cluster=cluster, planner=planner)
        start_step, placement, load_LE, base = restored.step, restored.placement, restored.load_LE, restored.history
    else:
        start_step, load_LE, base = 0, np.ones((cfg.num_layers, cfg.num_experts)), None
        placement = planner(-1, load_LE, cluster, None)
    history.start(run_config(config, cfg, comm, tokens_per_step=tokens_per_step, expert_layout=expert_opt.layout,
                             slot_compute=moe_layers[0].compute_mode()), base)
    placement.validate(cluster, num_layers=cfg.num_layers)
    expert_opt.send_out(placement, [p.data for p in slot_params])
    comm.take_bytes()   # the initial fill is not part of any step
    checkpointer.resume_rng()
    checkpointer.save_start(start_step, placement=placement, load_LE=load_LE, history=history)

    data = load_data(config.data_path())
    tokens = data.train
    step_times: deque[float] = deque(maxlen=ETA_WINDOW)   # bounded: the ETA needs only the last few
    for step in range(start_step, config.steps):
        comm.mark_progress(step)
        if step == config.fail_at_step:
            # the same state on disk every time: every rank's writes of the steps before are complete (rank 0's
            # with meta.json and COMPLETE) before any rank dies, and the launcher's stop cannot cut one short
            checkpointer.wait()
            if comm.world_size > 1:
                dist.barrier()
            logger.warning("failure drill: rank %d killed at the start of step %d", comm.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        times = dict.fromkeys(PHASES, 0.0)
        step_start = clock = _now(device)
        lr = lr_at(step, config)
        for layer, moe in enumerate(moe_layers):
            moe.placement = placement.take_layers(slice(layer, layer + 1))
        dense_opt.sync.zero_grads()
        for p in slot_params:
            p.grad = None
        num_micro = config.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count_LGE = dropped_LE = 0
        for micro in range(num_micro):
            x_BT, y_BT = step_batch(tokens, step, micro, config=config, comm=comm)
            _, loss = model(x_BT.to(device), y_BT.to(device))
            loss_sum += loss.detach()
            count_LGE = count_LGE + np.stack([moe.count_GE for moe in moe_layers])
            if router_trace is not None:
                router_trace.record(step, moe_layers)
            dropped_LE = dropped_LE + np.stack([moe.dropped_E for moe in moe_layers])
            lap, clock = _lap(clock, device)
            times["forward"] += lap
            if micro == num_micro - 1:
                dense_opt.sync.arm(loss_sum / num_micro)
            (loss / num_micro).backward()
            lap, clock = _lap(clock, device)
            times["backward"] += lap
        loss = loss_sum / num_micro
        for moe, count_GE, dropped_E in zip(moe_layers, count_LGE, dropped_LE, strict=True):
            # the step's totals over its micro-batches, where the metrics row and the record read them
            moe.count_GE, moe.dropped_E = count_GE, dropped_E

        dense_sq, mean_loss = dense_opt.sync.finish()
        times["dense_grad"], clock = _lap(clock, device)

        slot_grads_LSP = [p.grad if p.grad is not None else torch.zeros_like(p) for p in slot_params]
        expert_opt.collect_gradients(slot_grads_LSP, placement)
        times["expert_grad"], clock = _lap(clock, device)

        grad_norm = math.sqrt(dense_sq + float(expert_opt.grad_sq_norm()))
        _stop_unless_finite(step, mean_loss, grad_norm, comm, checkpointer)
        # torch.nn.utils.clip_grad_norm_'s rule, on the norm over all ranks' shards and the dense gradients
        grad_scale = min(config.grad_clip / (grad_norm + 1e-6), 1.0) if config.grad_clip > 0 else 1.0
        dense_opt.step(lr, grad_scale)
        expert_opt.step(lr, grad_scale)
        times["optimizer"], clock = _lap(clock, device)

        load_LE = count_LGE.sum(axis=1)
        next_placement = planner(step, load_LE.astype(np.float64), cluster, placement)
        next_placement.validate(cluster, num_layers=cfg.num_layers)
        times["plan"], clock = _lap(clock, device)

        expert_opt.send_out(next_placement, [p.data for p in slot_params])
        times["send_out"], clock = _lap(clock, device)
        step_s = _now(device) - step_start

        row = step_metrics(step, loss=loss, lr=lr, grad_norm=grad_norm, step_s=step_s, times=times,
                           moe_layers=moe_layers, placement=placement, next_placement=next_placement,
                           tokens_per_step=tokens_per_step, comm=comm)
        record = step_record(step, placement=placement, moe_layers=moe_layers, comm=comm)
        row["val_loss"] = None   # metrics.csv leaves it empty on the steps without an evaluation
        if config.eval_every and ((step + 1) % config.eval_every == 0 or step == config.steps - 1):
            row["val_loss"] = validation_loss(model, data.val, next_placement, config=config, comm=comm)
        history.append(row, record, count_LGE.transpose(0, 2, 1))
        step_times.append(row["step_s"])
        log_step = step % config.log_interval == 0 or step == config.steps - 1
        if log_step:
            history.flush()   # a crash keeps every step logged so far
            if router_trace is not None:
                router_trace.flush()
        if comm.rank == 0 and log_step:
            logger.info("step %d/%d | loss %.4f | %.0f tok/s | dropped %.2f%% | imbalance %.2f | moves %d | eta %s",
                        step + 1, config.steps, row["loss"], row["tokens_per_s"], 100 * row["dropped_fraction"],
                        row["imbalance"], row["replica_moves"],
                        format_duration(eta_s(step_times, config.steps - step - 1)))
        if comm.rank == 0 and row["val_loss"] is not None:
            logger.info("step %d/%d | val loss %.4f", step + 1, config.steps, row["val_loss"])
        placement = next_placement
        checkpointer.maybe_save(step, placement=placement, load_LE=load_LE, history=history)

    checkpointer.wait()
    export = expert_opt.export_chunks(TORCH_DTYPES[config.dtype])   # collective; rank 0 gets a few experts at a time
    if out_dir is not None:
        write_run_dir(out_dir, config=config, cfg=cfg, comm=comm, model=model, export_chunks=export, history=history,
                      tokens_per_step=tokens_per_step, final_placement=placement)
        checkpointer.write_records(out_dir)
    else:
        for _ in export:
            pass


# ---------------------------------------------------------------------------------------------- set-up


def build_model(config: TrainConfig, cfg: ModelConfig, comm: Comm, *, layout: str
                ) -> tuple[GPT, DenseOptimizer, ExpertOptimizer]:
    """This rank's expert-parallel model, the optimizer and gradient sync of its dense parameters and the expert
    optimizer of the policy's optimizer `layout` ("sharded", "group" or "replica").

    Built without any expert: the dense part (every rank the same, from torch.manual_seed(seed)) with router-only
    MoE layers swapped for the expert-parallel ones, whose slots the expert optimizer fills; the optimizer creates
    only the expert state this rank keeps, each expert from model.init_expert(seed, layer, expert). Master weights
    and moments: float32 for a bfloat16 model, the model's dtype otherwise (config.MASTER_DTYPES)."""
    check_choice(layout, "expert optimizer layout", tuple(EXPERT_OPTIMIZERS))
    dtype = TORCH_DTYPES[config.dtype]
    master_dtype = TORCH_DTYPES[MASTER_DTYPES.get(config.dtype, config.dtype)]
    torch.manual_seed(config.seed)
    model = GPT(cfg, seed=config.seed, experts=False).to(device=comm.device, dtype=dtype)
    for block in model.blocks:
        block.moe = ReplicatedMoE(block.moe.router, cfg, slots_per_rank=config.slots_per_rank, comm=comm,
                                  capacity_factor=config.capacity_factor, capacity_mode=config.capacity_mode)
    dense_named = [(n, p) for n, p in model.named_parameters() if not n.endswith("slot_weights_SP")]
    dense_opt = DenseOptimizer(dense_named, config, comm)

    def expert_init(layer: int, expert: int) -> torch.Tensor:
        return init_expert(cfg, seed=config.seed, layer=layer, expert=expert, dtype=master_dtype)

    expert_opt = EXPERT_OPTIMIZERS[layout](
        expert_init, comm, num_layers=cfg.num_layers, num_experts=cfg.num_experts, expert_numel=cfg.expert_numel,
        slots_per_rank=config.slots_per_rank, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
        weight_decay=config.weight_decay, dtype=dtype, master_dtype=master_dtype)
    return model, dense_opt, expert_opt


def executor_cluster(config: TrainConfig, world_size: int) -> Cluster:
    """The job as the policies see it: torchrun's LOCAL_WORLD_SIZE ranks per node, one node when spawned."""
    ranks_per_node = min(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), world_size)
    return Cluster(name="executor", num_nodes=max(world_size // ranks_per_node, 1), gpus_per_node=ranks_per_node,
                   slots_per_gpu=config.slots_per_rank)


def executor_policy(config: TrainConfig) -> Policy:
    """The configured policy; one that estimates costs from the expert's shape and bytes, or shapes shares for a
    capacity, gets the real ones (unless its options set them): the same facts the simulator gives it."""
    cfg = config.model_config()
    value_bytes = TORCH_DTYPES[config.dtype].itemsize
    master_bytes = TORCH_DTYPES[MASTER_DTYPES[config.dtype]].itemsize
    facts = {"d_model": cfg.d_model, "d_ff": cfg.d_ff, "capacity_mode": config.capacity_mode,
             "capacity_factor": config.capacity_factor, "weight_bytes": value_bytes, "activation_bytes": value_bytes,
             "optimizer_bytes": 3 * master_bytes}   # AdamW: master weights, m and v (float32 under bfloat16)
    context = {k: v for k, v in facts.items() if k not in config.policy_options}
    return with_context(get_policy(config.policy, **config.policy_options), **context)


def policy_planner(policy: Policy) -> Planner:
    """The policy's plan, asked only every `rebalance_every` steps (the placement kept in between)."""
    def planner(step: int, load_LE: np.ndarray, cluster: Cluster, previous: Placement | None) -> Placement:
        if previous is not None and (step + 1) % policy.rebalance_every:
            return previous
        return policy.plan(load_LE, cluster, previous=previous)

    return planner


# ---------------------------------------------------------------------------------------------- step helpers


def step_batch(tokens: np.ndarray, step: int, micro: int, *, config: TrainConfig, comm: Comm
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] inputs and targets of this rank's micro-batch `micro`: rows (micro G + rank) B .. + B - 1 of the
    step's global batch of G B M sequences (get_batch's), the same global batch for every (G, M) of one G M."""
    return get_batch(tokens, step, rank=micro * comm.world_size + comm.rank,
                     world_size=comm.world_size * config.grad_accum, batch_size=config.batch_size,
                     seq_len=config.model_config().seq_len, seed=config.seed)


ETA_WINDOW = 20   # the ETA extrapolates the mean of the last steps' times (the first, warm-up ones drop out)


def eta_s(step_times: Sequence[float], steps_left: int) -> float:
    """Seconds to run `steps_left` more steps at the mean of the last ETA_WINDOW measured step times."""
    recent = list(step_times)[-ETA_WINDOW:]
    return steps_left * sum(recent) / len(recent) if recent and steps_left > 0 else 0.0


def format_duration(seconds: float) -> str:
    """A duration for a log line, to the second: 45s, 1m12s, 2h05m ("?" when it is not a finite number)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _stop_unless_finite(step: int, mean_loss: float, grad_norm: float, comm: Comm,
                        checkpointer: Checkpointer) -> None:
    """ValueError on every rank when the loss or gradient norm is not finite on any rank. Both arrive the same on
    every rank: `mean_loss` is the mean over ranks (finite only if every rank's is: it rode in the dense gradients'
    all-reduce), `grad_norm` the global one."""
    if math.isfinite(mean_loss) and math.isfinite(grad_norm):
        return
    checkpointer.wait()   # a write in flight holds an earlier, finite state: let it complete
    raise ValueError(f"loss is not finite at step {step} (mean loss {mean_loss:g}, gradient norm "
                     f"{grad_norm:g}): training stopped on every rank before the optimizer step; last good "
                     f"checkpoint: {checkpointer.last_complete()} (lower --lr?)")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _lap(clock: float, device: torch.device) -> tuple[float, float]:
    now = _now(device)
    return now - clock, now
