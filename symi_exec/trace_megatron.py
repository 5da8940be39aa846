"""`symi train --record-trace --trace-format megatron-router-trace`: the run's routing also as Megatron-Core router
traces, so that tools built for Megatron's traces read ours.

Legend: L MoE layers, G ranks, N tokens of one rank's micro-batch, K top-k.

Rank 0 writes <run>/router_trace/router_trace_rank{g}.jsonl, one file per rank g, one JSON line per (step, layer,
micro-batch) in the record layout of NVIDIA/Megatron-LM megatron/core/transformer/moe/router_trace.py (commit
059f0f5c78cddcfa10e34842607d68b745631aeb, RouterTracer._make_index_record): step, stage "pre_dispatch", block
"decoder", layer (our block index: every block of the GPT is an MoE block, as decoder.layers.N), rank, num_tokens,
topk, top_indices [N][K] (the router's top-k expert ids before capacity drops, the same choices trace.parquet
counts). Megatron in training mode also writes one record per micro-batch. The ranks' ids reach rank 0 through one
all-gather per micro-batch (outside the byte accounting: recording, not training traffic); rank 0 appends the lines
when the run's other files are written out (every log interval, and at the end).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.distributed as dist

from symi_exec.comm import Comm
from symi_exec.moe import ReplicatedMoE

DIRECTORY = "router_trace"


class MegatronRouterTrace:
    """Rank 0's router_trace/ files (None `out_dir` on the other ranks: they only take part in the gather)."""

    def __init__(self, out_dir: Path | None, comm: Comm) -> None:
        self.comm = comm
        self.directory = None if out_dir is None else out_dir / DIRECTORY
        self._pending = [io.StringIO() for _ in range(comm.world_size)]
        if self.directory is not None:
            self.directory.mkdir(exist_ok=True)
            for rank in range(comm.world_size):
                self.path(rank).write_text("")

    def path(self, rank: int) -> Path:
        assert self.directory is not None
        return self.directory / f"router_trace_rank{rank}.jsonl"

    def record(self, step: int, moe_layers: list[ReplicatedMoE]) -> None:
        """Every rank, after a micro-batch's forward: the layers' top-k ids of every rank, as lines on rank 0."""
        expert_LNK = torch.stack([moe.expert_NK for moe in moe_layers]).to(torch.int32).contiguous()
        if self.comm.world_size > 1:
            parts = [torch.empty_like(expert_LNK) for _ in range(self.comm.world_size)]
            dist.all_gather(parts, expert_LNK)
        else:
            parts = [expert_LNK]
        if self.directory is None:
            return
        for rank, part_LNK in enumerate(parts):
            for layer, ids_NK in enumerate(part_LNK.cpu().tolist()):
                record = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": rank,
                          "num_tokens": len(ids_NK), "topk": len(ids_NK[0]), "top_indices": ids_NK}
                self._pending[rank].write(json.dumps(record) + "\n")

    def flush(self) -> None:
        """Rank 0: append the lines recorded since the last flush (whole lines)."""
        if self.directory is None:
            return
        for rank, pending in enumerate(self._pending):
            text = pending.getvalue()
            if text:
                with open(self.path(rank), "a") as f:
                    f.write(text)
            self._pending[rank] = io.StringIO()
