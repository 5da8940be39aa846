"""Reader of TensorRT-LLM's expert statistic (EXPERT_STATISTIC_PATH) -> LoadTrace.

Legend: S steps (iterations), L MoE layers, E experts, G source ranks.

Format as written by NVIDIA/TensorRT-LLM tensorrt_llm/_torch/expert_statistic.py (read at commit
0fccc5b97dd7b23c438e740b3bf4dcde607266c4; ExpertStatistic._set_iter / _maybe_add_info), enabled by
EXPERT_STATISTIC_ITER_RANGE=start-stop, written to EXPERT_STATISTIC_PATH:
  meta_info.json         rank 0: {"num_experts": E, "num_experts_per_token": K} (newer builds may add keys)
  rank{r}.safetensors    one per rank: key "{iter}_{layer}" -> int tensor [E], that rank's routed-token counts
                         per expert (torch.bincount of the selected experts, summed over the iteration's calls)
Other files there (cooccurrence_rank{r}.safetensors, rank{r}_raw.safetensors, rank{r}_numtokens.json) are not read.
`layer` is the model's layer index (dense layers have no MoE and no key); layers are renumbered 0..L-1 and the
original ids kept in meta["original_layers"]. Reading needs the safetensors package (pip install 'symi[formats]').
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import is_int
from symi_sim.traces.format import LoadTrace
from symi_sim.traces.readers_common import build_trace, check_dense_size, integer_array, rank_files

FILE_PATTERN = r"rank(\d+)\.safetensors"
KEY_PATTERN = re.compile(r"(\d+)_(\d+)")
META_FILE = "meta_info.json"


def import_trtllm_expert_statistic(path: str | Path, *, model: str = "unknown") -> LoadTrace:
    """A TensorRT-LLM expert-statistic directory -> counts per (iteration, layer, expert) summed over ranks, per-rank
    counts kept. Every rank file must hold every (iteration, layer) key of the others; top_k is the meta's
    num_experts_per_token; tokens_per_step is unknown."""
    path = Path(path)
    where = f"TensorRT-LLM expert statistic {str(path)!r}"
    if not path.is_dir():
        raise ValueError(f"{where} must be a directory (meta_info.json and rank<N>.safetensors)")
    num_experts, top_k = _read_meta(path / META_FILE)
    files = rank_files(path, FILE_PATTERN, "TensorRT-LLM expert statistic")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ValueError(f"reading {where} needs the safetensors package, which is not installed "
                         "(pip install 'symi[formats]')") from None
    per_rank: dict[int, dict[tuple[int, int], np.ndarray]] = {}
    for rank, file in sorted(files.items()):
        at = f"{where}: {file.name}"
        try:
            tensors = load_file(str(file))
        except Exception as exc:   # safetensors raises its own SafetensorError (and OSError) for a bad file
            raise ValueError(f"{at} is not a readable safetensors file: {' '.join(str(exc).split())}") from None
        records: dict[tuple[int, int], np.ndarray] = {}
        for key, values in tensors.items():
            match = KEY_PATTERN.fullmatch(key)
            if match is None:
                raise ValueError(f"{at}: key {key!r} is not '<iteration>_<layer>'")
            counts_E = integer_array(values, f"{at}: key {key!r}", ndim=1)
            if counts_E.shape != (num_experts,):
                raise ValueError(f"{at}: key {key!r} has shape {list(counts_E.shape)}, not [num_experts] = "
                                 f"[{num_experts}]")
            records[(int(match.group(1)), int(match.group(2)))] = counts_E
        if not records:
            raise ValueError(f"{at} holds no '<iteration>_<layer>' counts")
        per_rank[rank] = records
    keys = sorted(set().union(*per_rank.values()))
    iters = sorted({it for it, _ in keys})
    layers = sorted({layer for _, layer in keys})
    for it in iters:
        for layer in layers:
            if (it, layer) not in keys:
                raise ValueError(f"{where}: iteration {it} has no counts for layer {layer} on any rank")
    for rank, records in per_rank.items():
        missing = [f"{it}_{layer}" for it, layer in keys if (it, layer) not in records]
        if missing:
            raise ValueError(f"{where}: {files[rank].name} lacks key(s) {missing[:5]} that other ranks hold")
    check_dense_size(len(iters), len(layers), num_experts, len(per_rank), where)
    src_counts_SLEG = np.zeros((len(iters), len(layers), num_experts, len(per_rank)), dtype=np.int64)
    it_index = {it: i for i, it in enumerate(iters)}
    layer_index = {layer: i for i, layer in enumerate(layers)}
    for rank, records in per_rank.items():
        for (it, layer), counts_E in records.items():
            src_counts_SLEG[it_index[it], layer_index[layer], :, rank] = counts_E
    meta: dict[str, Any] = {"original_layers": layers, "ranks": sorted(per_rank),
                            "files": [files[r].name for r in sorted(files)]}
    return build_trace(src_counts_SLEG, step_ids=iters, where=where, meta=meta, top_k=top_k, model=model,
                       source=f"trtllm-expert-statistic:{path.name}",
                       provenance="TensorRT-LLM expert statistic (EXPERT_STATISTIC_ITER_RANGE, EXPERT_STATISTIC_PATH)")


def _read_meta(file: Path) -> tuple[int, int]:
    """(num_experts, num_experts_per_token) of meta_info.json."""
    where = f"TensorRT-LLM {str(file)!r}"
    if not file.is_file():
        raise ValueError(f"{where} does not exist (rank 0 writes it next to the rank<N>.safetensors files)")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where} is not readable JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    for key in ("num_experts", "num_experts_per_token"):
        if not is_int(meta.get(key)) or meta[key] < 1:
            raise ValueError(f"{where}: {key!r} must be a positive integer, got {meta.get(key)!r}")
    return int(meta["num_experts"]), int(meta["num_experts_per_token"])
