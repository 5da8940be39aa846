"""Validation loss: the mean cross-entropy over fixed validation batches, through the expert-parallel model.

Legend: G ranks, B sequences per rank, T sequence length, V vocabulary, N tokens (B*T).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from symi_exec.comm import Comm
from symi_exec.config import TrainConfig
from symi_exec.data import val_batch
from symi_exec.model import GPT
from symi_exec.moe import ReplicatedMoE
from symi_sim.placement import Placement


def validation_loss(model: GPT, val_tokens: np.ndarray, placement: Placement, *, config: TrainConfig,
                    comm: Comm) -> float:
    """Mean cross-entropy (no auxiliary loss) over config.eval_batches validation batches (data.val_batch: the same
    ones at every call) of G*B sequences, every rank computing its B rows in no_grad, one all-reduce for the mean.

    The slots must hold the weights of `placement` (after the step's send-out: the next step's placement). The
    training state is left as it was: the MoE layers' per-step results (counts, dispatch plan, drops, auxiliary
    loss, the placement they ran with) and the communication counters the next metrics row reads.
    """
    moe_layers: list[ReplicatedMoE] = list(model.moe_layers)
    saved_layers = [dict(vars(moe)) for moe in moe_layers]
    saved_counters = comm.bytes_by_kind, comm.seconds_by_kind
    comm.bytes_by_kind, comm.seconds_by_kind = defaultdict(int), defaultdict(list)
    seq_len = model.config.seq_len
    try:
        for layer, moe in enumerate(moe_layers):
            moe.placement = placement.take_layers(slice(layer, layer + 1))
        total = torch.zeros((), dtype=torch.float64, device=comm.device)
        with torch.no_grad():
            for index in range(config.eval_batches):
                x_BT, y_BT = val_batch(val_tokens, index, rank=comm.rank, world_size=comm.world_size,
                                       batch_size=config.batch_size, seq_len=seq_len, seed=config.seed)
                logits_BTV, _ = model(x_BT.to(comm.device))
                logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
                if logits_NV.dtype.itemsize < 4:   # a 16-bit model's cross-entropy in float32
                    logits_NV = logits_NV.float()
                total += F.cross_entropy(logits_NV, y_BT.to(comm.device).reshape(-1)).double()
        if comm.world_size > 1:
            dist.all_reduce(total)
        return float(total) / (config.eval_batches * comm.world_size)
    finally:
        comm.bytes_by_kind, comm.seconds_by_kind = saved_counters
        for moe, saved in zip(moe_layers, saved_layers, strict=True):
            vars(moe).update(saved)
