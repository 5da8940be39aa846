"""Reader of Megatron-Core's router traces (`--moe-routing-trace-path`) -> LoadTrace.

Legend: S steps, L MoE layers, E logical experts, G source ranks, T tokens, K top-k.

Format as written by NVIDIA/Megatron-LM megatron/core/transformer/moe/router_trace.py (read at commit
059f0f5c78cddcfa10e34842607d68b745631aeb; RouterTracer._make_index_record and _flush_records_to_disk): one file
`router_trace_rank{r}.jsonl` per rank, one JSON object per line and per (step, block, layer) router call:
  step        int, the training iteration (training mode) or decode step (inference)
  stage       "pre_dispatch" (the only stage it writes)
  block       "decoder", or "mtp" with an extra "mtp_idx" (multi-token-prediction heads)
  layer       int, the index in the block's `layers` module list (decoder.layers.N.mlp.router)
  rank        int, the writing rank
  num_tokens  int T, topk int K, top_indices [T][K] expert ids (the router's top-k, before token dropping)
  (optional hs_* / logit_* fields point into sidecar .bin files; ignored here)
Training with several micro-batches per step writes one record per micro-batch: they are summed. Under pipeline
parallelism `layer` is local to the stage (each stage numbers its layers from 0), so records of different stages
would share ids: such traces are read as one stage each.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_int, is_int
from symi_sim.traces.format import LoadTrace
from symi_sim.traces.readers_common import (
    build_trace,
    check_dense_size,
    check_ranks,
    integer_array,
    json_object,
    rank_files,
)

logger = logging.getLogger(__name__)

FILE_PATTERN = r"router_trace_rank(\d+)\.jsonl"
BLOCKS = ("decoder", "mtp")
STAGE = "pre_dispatch"
REQUIRED_KEYS = ("step", "block", "layer", "rank", "num_tokens", "topk", "top_indices")


def import_megatron_router_trace(path: str | Path, *, num_experts: int | None = None, mtp: bool = False,
                                 model: str = "unknown") -> LoadTrace:
    """Megatron-Core router traces -> counts per (step, layer, expert), summed over ranks, per-rank counts kept.

    path: a directory of router_trace_rank{r}.jsonl files (ranks 0..G-1 all present) or one such file.
    num_experts: E (default: the largest expert id seen + 1; the records do not carry E).
    mtp: also keep the multi-token-prediction layers, after the decoder's (default: decoder layers only).
    Layers are the (block, layer) pairs seen, decoder layers by id then mtp layers by (mtp_idx, layer), numbered
    0..L-1; their names ("decoder.3", "mtp.0.1") are in meta["layers"]. Every step needs every layer (on some
    rank) and every rank needs every step. top_k is the records' topk (one value for all); tokens_per_step is the
    tokens of a step summed over ranks when every (step, layer) has the same, else unknown.
    """
    check_int(num_experts, "num_experts", minimum=1, optional=True)
    files = rank_files(path, FILE_PATTERN, "Megatron router trace")
    # (step, layer key, rank) -> [E'] counts (grown as ids appear); (step, layer key) -> tokens over ranks
    counts: dict[tuple[int, tuple, int], np.ndarray] = {}
    tokens: dict[tuple[int, tuple], int] = {}
    top_k: tuple[int, str] | None = None     # (K, where it was first seen)
    skipped_mtp = 0
    is_dir = Path(path).is_dir()
    for file_rank, file in sorted(files.items()):
        where = f"Megatron router trace {str(file)!r}"
        try:
            lines = file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where} cannot be read: {exc}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            at = f"{where}, line {number}"
            record = _parse_record(line, at)
            if record["rank"] != file_rank:
                raise ValueError(f"{at}: rank {record['rank']} in a file named for rank {file_rank}")
            rank = file_rank if is_dir else 0   # one file: its records are the trace's only source rank
            if record["block"] == "mtp" and not mtp:
                skipped_mtp += 1
                continue
            k = record["topk"]
            if top_k is None:
                top_k = (k, at)
            elif k != top_k[0]:
                raise ValueError(f"{at}: topk {k} differs from topk {top_k[0]} at {top_k[1]} (mixed top-k)")
            if record["top_indices"] == [] and record["num_tokens"] == 0:
                ids_TK = np.zeros((0, k), dtype=np.int64)
            else:
                ids_TK = integer_array(record["top_indices"], f"{at}: top_indices", ndim=2)
            if ids_TK.shape != (record["num_tokens"], k):
                raise ValueError(f"{at}: top_indices has shape {list(ids_TK.shape)}, not [num_tokens, topk] = "
                                 f"[{record['num_tokens']}, {k}]")
            if k > 1 and ids_TK.size:
                sorted_TK = np.sort(ids_TK, axis=1)
                same = np.flatnonzero((sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(axis=1))
                if same.size:
                    raise ValueError(f"{at}: token {same[0]} picks expert {_repeated(ids_TK[same[0]])} twice "
                                     f"(top-k experts are distinct)")
            if num_experts is not None and ids_TK.size and ids_TK.max() >= num_experts:
                raise ValueError(f"{at}: expert id {ids_TK.max()} is out of range [0, {num_experts})")
            key = (record["step"], _layer_key(record), rank)
            found = np.bincount(ids_TK.ravel(), minlength=1)
            previous = counts.get(key)
            if previous is not None:   # another micro-batch of the same step
                size = max(previous.size, found.size)
                found = np.pad(previous, (0, size - previous.size)) + np.pad(found, (0, size - found.size))
            counts[key] = found
            cell = (record["step"], key[1])
            tokens[cell] = tokens.get(cell, 0) + record["num_tokens"]
    where = f"Megatron router trace {str(path)!r}"
    if skipped_mtp:
        logger.info("%s: skipped %d mtp record(s) (mtp=False)", where, skipped_mtp)
    if not counts:
        raise ValueError(f"{where}: no {'' if mtp else 'decoder '}records")
    ranks = sorted({rank for _, _, rank in counts})
    check_ranks(ranks, where)
    steps = sorted({step for step, _, _ in counts})
    layers = sorted({layer for _, layer, _ in counts})
    for step in steps:
        for layer in layers:
            if (step, layer) not in tokens:
                raise ValueError(f"{where}: step {step} has no record for layer {_layer_name(layer)}")
    steps_of_rank = {rank: {step for step, _, r in counts if r == rank} for rank in ranks}
    for rank in ranks:
        missing = sorted(set(steps) - steps_of_rank[rank])
        if missing:
            raise ValueError(f"{where}: rank {rank} has no records for step(s) {missing[:5]}")
    seen_experts = max(found.size for found in counts.values())
    num_experts = num_experts if num_experts is not None else seen_experts
    check_dense_size(len(steps), len(layers), num_experts, len(ranks), where)
    step_index = {s: i for i, s in enumerate(steps)}
    layer_index = {layer: i for i, layer in enumerate(layers)}
    src_counts_SLEG = np.zeros((len(steps), len(layers), num_experts, len(ranks)), dtype=np.int64)
    for (step, layer, rank), found in counts.items():
        src_counts_SLEG[step_index[step], layer_index[layer], :found.size, rank] = found
    totals = set(tokens.values())
    tokens_per_step = totals.pop() if len(totals) == 1 and 0 not in totals else None
    meta: dict[str, Any] = {"layers": [_layer_name(layer) for layer in layers], "ranks": sorted(files),
                            "files": [files[r].name for r in sorted(files)]}
    name = Path(path).name or "."
    return build_trace(src_counts_SLEG, step_ids=steps, where=where, meta=meta, top_k=top_k[0],
                       tokens_per_step=tokens_per_step, model=model, source=f"megatron-router-trace:{name}",
                       provenance="Megatron-Core router trace (--moe-routing-trace-path)")


def _parse_record(line: str, at: str) -> dict[str, Any]:
    record = json_object(line, at)
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"{at}: missing key(s) {missing} (a router-trace record has {list(REQUIRED_KEYS)})")
    for key in ("step", "layer", "rank", "num_tokens"):
        if not is_int(record[key]) or record[key] < 0:
            raise ValueError(f"{at}: {key!r} must be a non-negative integer, got {record[key]!r}")
    if not is_int(record["topk"]) or record["topk"] < 1:
        raise ValueError(f"{at}: 'topk' must be a positive integer, got {record['topk']!r}")
    if record["block"] not in BLOCKS:
        raise ValueError(f"{at}: 'block' must be one of {list(BLOCKS)}, got {record['block']!r}")
    if record["block"] == "mtp" and (not is_int(record.get("mtp_idx")) or record["mtp_idx"] < 0):
        raise ValueError(f"{at}: an mtp record needs a non-negative integer 'mtp_idx', got {record.get('mtp_idx')!r}")
    if record.get("stage", STAGE) != STAGE:
        raise ValueError(f"{at}: stage {record['stage']!r} is not {STAGE!r}, the only stage this reader knows")
    return record


def _layer_key(record: dict[str, Any]) -> tuple:
    """Sort key of a record's layer: decoder layers first by id, then mtp layers by (mtp_idx, layer)."""
    if record["block"] == "decoder":
        return (0, 0, record["layer"])
    return (1, record["mtp_idx"], record["layer"])


def _layer_name(key: tuple) -> str:
    return f"decoder.{key[2]}" if key[0] == 0 else f"mtp.{key[1]}.{key[2]}"


def _repeated(row: np.ndarray) -> int:
    values, seen = np.unique(row, return_counts=True)
    return int(values[seen > 1][0])
