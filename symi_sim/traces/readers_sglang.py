"""Reader of SGLang's expert distribution recorder dumps -> LoadTrace.

Legend: S steps (forward passes), L layers, E logical experts, P physical expert slots, G source ranks.

Format as written by sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py (read at commit
02295fe5ac5ccff3e8829800d50450351c56fb53; _StatAccumulator.dump, _DetailAccumulator.dump, _dump_to_file): torch.save
files in SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR, written on /dump_expert_distribution_record.
  `stat` mode (also `stat_approx`): one file expert_distribution_recorder_{time}.pt from rank 0 holding a dict with
      logical_count   int tensor [S, L, E]: per buffered forward pass, the logical experts' counts summed over ranks
      rank, average_utilization_rate_over_window   (ignored)
    The buffer is circular when --expert-distribution-recorder-buffer-size is given: its rows are in slot order
    (not time order once it wrapped) and unfilled rows are zero.
  `per_pass` / `per_token` modes: one file expert_distribution_recorder_{time}_{rank}.pt per rank holding
      records   list of dicts: forward_pass_id, rank, gatherer_key, global_physical_count int tensor [L, P]
                (per_token records carry more, ignored)
      last_physical_to_logical_map   int tensor [L, P]: the logical expert of each physical slot
    Physical counts fold into logical experts through that map.
`num_layers` there is the model's layer count, dense layers included: their rows are zero at every step and are
dropped here (their ids are in meta["original_layers"]). Forward passes that route no token at all (unfilled
buffer rows, idle passes) are dropped too. Reading needs torch (`pip install 'symi[train]'`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_positive_int, is_int
from symi_sim.traces.format import LoadTrace
from symi_sim.traces.readers_common import build_trace, check_dense_size, check_ranks, drop_empty_layers, integer_array

logger = logging.getLogger(__name__)

PROVENANCE = "SGLang expert distribution recorder (--expert-distribution-recorder-mode)"


def import_sglang_expert_distribution(path: str | Path, *, top_k: int = 1, model: str = "unknown") -> LoadTrace:
    """SGLang recorder dumps -> LoadTrace (one step per recorded forward pass).

    path: a `stat` dump (.pt), a per_pass/per_token dump of one rank (.pt), or a directory of per-rank
    per_pass/per_token dumps (ranks 0..G-1 each once; every rank must hold the same forward passes).
    top_k: the model's experts per token (the dumps do not say; give it so the trace knows k x tokens).
    stat dumps have no per-rank counts; per_pass dumps keep them (the trace's source ranks). tokens_per_step is
    unknown (passes differ in size).
    """
    check_positive_int(top_k, "top_k")
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".pt")
        if not files:
            raise ValueError(f"SGLang dump directory {str(path)!r} holds no .pt files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"SGLang dump {str(path)!r} does not exist")
    dumps = [(file, load_dump(file)) for file in files]
    stat = [file for file, dump in dumps if "logical_count" in dump]
    if stat:
        if len(dumps) > 1:
            raise ValueError(f"SGLang dumps {str(path)!r}: a stat dump ({stat[0].name}) must be read on its own, "
                             f"not with {len(dumps) - 1} other file(s)")
        return _read_stat(stat[0], dumps[0][1], top_k=top_k, model=model)
    return _read_per_pass(path, dumps, top_k=top_k, model=model)


def load_dump(file: Path) -> dict[str, Any]:
    """The dict torch.save wrote to `file` (tensors and plain values only: weights_only loading)."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading SGLang dump {str(file)!r} needs torch, which is not installed "
                         "(pip install 'symi[train]')") from None
    try:
        dump = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many kinds (UnpicklingError, RuntimeError, EOFError) for a bad file
        raise ValueError(f"SGLang dump {str(file)!r} is not a readable torch.save file: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(dump, dict) or not ({"logical_count"} <= set(dump) or
                                          {"records", "last_physical_to_logical_map"} <= set(dump)):
        keys = sorted(dump) if isinstance(dump, dict) else type(dump).__name__
        raise ValueError(f"SGLang dump {str(file)!r} holds {keys}, not a recorder dump (a stat dump has "
                         "'logical_count'; a per_pass dump has 'records' and 'last_physical_to_logical_map')")
    return dump


def _read_stat(file: Path, dump: dict[str, Any], *, top_k: int, model: str) -> LoadTrace:
    where = f"SGLang stat dump {str(file)!r}"
    counts_SLE = integer_array(dump["logical_count"], f"{where}: logical_count", ndim=3)
    if 0 in counts_SLE.shape:
        raise ValueError(f"{where}: logical_count is empty (shape {list(counts_SLE.shape)})")
    routed_S = counts_SLE.sum(axis=(1, 2)) > 0
    if not routed_S.any():
        raise ValueError(f"{where}: logical_count routes no token at any forward pass")
    buffer_rows = [int(s) for s in np.flatnonzero(routed_S)]
    if not routed_S.all():
        logger.info("%s: dropping %d forward pass(es) that route no token (unfilled buffer rows)", where,
                    int((~routed_S).sum()))
    src_counts_SLEG, layers = drop_empty_layers(counts_SLE[routed_S][..., None], list(range(counts_SLE.shape[1])),
                                                where)
    meta = {"original_layers": layers, "buffer_rows": buffer_rows, "mode": "stat"}
    # summed over ranks by SGLang already: no per-rank split to keep
    return build_trace(src_counts_SLEG, step_ids=list(range(len(buffer_rows))), where=where, meta=meta,
                       keep_ranks=False, top_k=top_k, model=model, source=f"sglang-expert-distribution:{file.name}",
                       provenance=PROVENANCE)


def _read_per_pass(path: Path, dumps: list[tuple[Path, dict[str, Any]]], *, top_k: int,
                   model: str) -> LoadTrace:
    where = f"SGLang per_pass dumps {str(path)!r}"
    # (forward pass, rank) -> [L, E] logical counts
    counts: dict[tuple[int, int], np.ndarray] = {}
    shape: tuple[tuple[int, int], str] | None = None    # ([L, P], file) of the first map
    num_experts = 0
    for file, dump in dumps:
        at = f"SGLang dump {str(file)!r}"
        phy2log_LP = integer_array(dump["last_physical_to_logical_map"], f"{at}: last_physical_to_logical_map",
                                   ndim=2)
        if 0 in phy2log_LP.shape:
            raise ValueError(f"{at}: last_physical_to_logical_map is empty")
        if shape is None:
            shape = (phy2log_LP.shape, file.name)
        elif phy2log_LP.shape != shape[0]:
            raise ValueError(f"{at}: last_physical_to_logical_map has shape {list(phy2log_LP.shape)}, "
                             f"{shape[1]} {list(shape[0])}")
        num_layers, num_physical = phy2log_LP.shape
        num_experts = max(num_experts, int(phy2log_LP.max()) + 1)
        records = dump["records"]
        if not isinstance(records, list) or not records:
            raise ValueError(f"{at}: 'records' must be a non-empty list of per-pass records")
        for i, record in enumerate(records):
            rat = f"{at}, record {i}"
            if not isinstance(record, dict) or not {"forward_pass_id", "rank", "global_physical_count"} <= set(record):
                raise ValueError(f"{rat}: a record needs forward_pass_id, rank and global_physical_count")
            for key in ("forward_pass_id", "rank"):
                if not is_int(record[key]) or record[key] < 0:
                    raise ValueError(f"{rat}: {key!r} must be a non-negative integer, got {record[key]!r}")
            count_LP = integer_array(record["global_physical_count"], f"{rat}: global_physical_count", ndim=2)
            if count_LP.shape != (num_layers, num_physical):
                raise ValueError(f"{rat}: global_physical_count has shape {list(count_LP.shape)}, not the map's "
                                 f"[{num_layers}, {num_physical}]")
            key = (int(record["forward_pass_id"]), int(record["rank"]))
            if key in counts:
                raise ValueError(f"{rat}: forward pass {key[0]} of rank {key[1]} given twice")
            counts[key] = _fold_physical(count_LP, phy2log_LP)
    ranks = sorted({rank for _, rank in counts})
    check_ranks(ranks, where)
    passes = sorted({fp for fp, _ in counts})
    for rank in ranks:
        missing = [fp for fp in passes if (fp, rank) not in counts]
        if missing:
            raise ValueError(f"{where}: rank {rank} has no record for forward pass(es) {missing[:5]}")
    num_layers = shape[0][0]
    check_dense_size(len(passes), num_layers, num_experts, len(ranks), where)
    src_counts_SLEG = np.zeros((len(passes), num_layers, num_experts, len(ranks)), dtype=np.int64)
    index = {fp: i for i, fp in enumerate(passes)}
    for (fp, rank), count_LE in counts.items():
        src_counts_SLEG[index[fp], :, :count_LE.shape[1], rank] = count_LE
    routed_S = src_counts_SLEG.sum(axis=(1, 2, 3)) > 0
    if not routed_S.any():
        raise ValueError(f"{where}: no forward pass routes any token")
    if not routed_S.all():
        logger.info("%s: dropping %d forward pass(es) that route no token", where, int((~routed_S).sum()))
    src_counts_SLEG, layers = drop_empty_layers(src_counts_SLEG[routed_S], list(range(num_layers)), where)
    meta = {"original_layers": layers, "ranks": ranks, "mode": "per_pass",
            "files": [file.name for file, _ in dumps]}
    return build_trace(src_counts_SLEG, step_ids=[fp for fp, keep in zip(passes, routed_S, strict=True) if keep],
                       where=where, meta=meta, top_k=top_k, model=model,
                       source=f"sglang-expert-distribution:{path.name}", provenance=PROVENANCE)


def _fold_physical(count_LP: np.ndarray, phy2log_LP: np.ndarray) -> np.ndarray:
    """[L, E] logical counts: each physical slot's count added to its logical expert."""
    count_LE = np.zeros((count_LP.shape[0], int(phy2log_LP.max()) + 1), dtype=np.int64)
    np.add.at(count_LE, (np.arange(count_LP.shape[0])[:, None], phy2log_LP), count_LP)
    return count_LE
