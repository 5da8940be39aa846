"""What the readers of other frameworks' records share: finding per-rank files, checking that no rank is missing,
and building the LoadTrace from per-rank counts.

Legend: S steps, L MoE layers, E logical experts, G source ranks.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.traces.format import MAX_DENSE_COUNTS, MAX_TOKEN_COUNT, LoadTrace

logger = logging.getLogger(__name__)


def rank_files(path: str | Path, pattern: str, what: str) -> dict[int, Path]:
    """rank -> file of the files in directory `path` whose names fully match `pattern` (one group: the rank), or
    of the single file `path`. Ranks must be 0..G-1, each once (else ValueError naming the missing ones)."""
    path = Path(path)
    regex = re.compile(pattern)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and regex.fullmatch(p.name))
        if not files:
            raise ValueError(f"{what} directory {str(path)!r} holds no files named like {pattern!r}")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{what} {str(path)!r} does not exist")
    by_rank: dict[int, Path] = {}
    for file in files:
        match = regex.fullmatch(file.name)
        if match is None:
            raise ValueError(f"{what} file {str(file)!r}: the name must match {pattern!r} (it carries the rank)")
        rank = int(match.group(1))
        if rank in by_rank:
            raise ValueError(f"{what}: rank {rank} given twice ({str(by_rank[rank])!r} and {str(file)!r})")
        by_rank[rank] = file
    if path.is_dir():
        check_ranks(sorted(by_rank), f"{what} directory {str(path)!r}")
    return by_rank


def json_object(line: str, at: str) -> dict[str, Any]:
    """One JSON-lines record, which must be an object; a ValueError naming `at` (file and line) otherwise."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{at}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{at}: expected a JSON object, got {type(record).__name__}")
    return record


def check_ranks(ranks: list[int], where: str) -> None:
    """Ranks 0..G-1 all present (sorted `ranks`), else one ValueError naming the missing ones."""
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise ValueError(f"{where}: no records for rank(s) {missing} (has ranks {ranks})")


def check_dense_size(num_steps: int, num_layers: int, num_experts: int, num_ranks: int, where: str) -> None:
    """Refuse records that would expand to more counts than a trace may hold (a few huge ids, say)."""
    cells = num_steps * num_layers * num_experts * num_ranks
    if cells > MAX_DENSE_COUNTS:
        raise ValueError(f"{where}: {num_steps} steps x {num_layers} layers x {num_experts} experts x {num_ranks} "
                         f"ranks = {cells} counts, more than the {MAX_DENSE_COUNTS} a trace may hold")


def drop_empty_layers(src_counts_SLEG: np.ndarray, layer_names: list[Any], where: str) -> tuple[np.ndarray, list]:
    """Drop the layers with no routed token at any step (a framework's dense layers, recorded as zero rows);
    returns the counts and the names of the layers kept. ValueError when nothing is left."""
    routed_L = src_counts_SLEG.sum(axis=(0, 2, 3)) > 0
    if not routed_L.any():
        raise ValueError(f"{where}: no layer routes any token")
    if not routed_L.all():
        dropped = [name for name, keep in zip(layer_names, routed_L, strict=True) if not keep]
        logger.info("%s: dropping layer(s) %s, which route no token at any step (dense layers)", where, dropped)
    return src_counts_SLEG[:, routed_L], [name for name, keep in zip(layer_names, routed_L, strict=True) if keep]


def build_trace(src_counts_SLEG: np.ndarray, *, step_ids: list[int], where: str, meta: dict[str, Any],
                keep_ranks: bool = True, **fields: Any) -> LoadTrace:
    """LoadTrace from per-rank counts [S, L, E, G] (kept as its source ranks when `keep_ranks`); step ids kept in
    meta when they are not 0..S-1; a problem LoadTrace finds becomes one ValueError naming `where`."""
    if src_counts_SLEG.size and src_counts_SLEG.max() > MAX_TOKEN_COUNT:
        raise ValueError(f"{where}: a count of {src_counts_SLEG.max()} is more than the {MAX_TOKEN_COUNT} tokens a "
                         "trace may hold per (step, layer, expert, rank)")
    meta = dict(meta)
    if list(step_ids) != list(range(len(step_ids))):
        meta["step_ids"] = [int(s) for s in step_ids]
    try:
        return LoadTrace(counts_SLE=src_counts_SLEG.sum(axis=3),
                         src_counts_SLEG=src_counts_SLEG if keep_ranks else None, meta=meta, **fields)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def integer_array(values: Any, what: str, *, ndim: int) -> np.ndarray:
    """`values` (a list of lists, a numpy or torch array) as an int64 array of `ndim` dimensions with no negative
    entries; ValueError naming `what` otherwise."""
    if hasattr(values, "detach"):   # a torch tensor: its numpy view, without importing torch here
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except ValueError:
        raise ValueError(f"{what} is ragged (its rows differ in length)") from None
    if array.dtype == object or array.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array of integers, got "
                         f"{'a ragged or mixed list' if array.dtype == object else f'shape {array.shape}'}")
    if array.size == 0:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{what} must hold integers, got non-integer values")
    elif not np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_):
        raise ValueError(f"{what} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if (array < 0).any():
        raise ValueError(f"{what} holds a negative value ({array.min()})")
    return array
