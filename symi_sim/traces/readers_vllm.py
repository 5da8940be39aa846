"""Reader of vLLM's routed experts (per-token expert ids) -> LoadTrace.

Legend: S steps, L layers, E experts, T tokens, K top-k.

Format as vLLM returns it, vllm-project/vllm vllm/model_executor/layers/fused_moe/routed_experts_capturer.py (read at
commit 00bd1493b3e82d6c13c68ee8a0e1c5a96707e190; RoutedExpertsCapturer.init_buffer / capture,
RoutedExpertsReader.get_routed_experts): with routed-experts capture on, each request's routed experts are an int32
array [tokens, num_hidden_layers, num_experts_per_tok] of expert ids. Saved by the user with numpy: one .npy per
request, several arrays in one .npz, or a directory of .npy files (read in name order). The buffer is zeroed and
only MoE layers are captured, so a dense layer reads as all zeros: layers whose ids are 0 for every token are
dropped (their ids kept in meta["original_layers"]). Requests are concatenated and cut into steps of
`tokens_per_step` tokens (a last, shorter remainder is dropped and counted in meta["dropped_tokens"]).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_int, check_positive_int
from symi_sim.traces.format import LoadTrace
from symi_sim.traces.readers_common import build_trace, check_dense_size, integer_array

logger = logging.getLogger(__name__)


def import_vllm_routed_experts(path: str | Path, *, tokens_per_step: int | None = None,
                               num_experts: int | None = None, model: str = "unknown") -> LoadTrace:
    """vLLM routed-expert arrays [T, L, K] -> a trace of T // tokens_per_step steps, top_k K.

    path: a .npy file, a .npz file (its arrays in stored order) or a directory of .npy files (name order).
    tokens_per_step: tokens per step (required: the arrays have no step boundaries).
    num_experts: E (default: the largest id seen + 1).
    """
    if tokens_per_step is None:
        raise ValueError("vllm-routed-experts needs tokens_per_step (--tokens-per-step): the arrays carry no steps")
    check_positive_int(tokens_per_step, "tokens_per_step")
    check_int(num_experts, "num_experts", minimum=1, optional=True)
    path = Path(path)
    where = f"vLLM routed experts {str(path)!r}"
    arrays = _load_arrays(path, where)
    shape: tuple[tuple[int, int], str] | None = None
    for name, ids_TLK in arrays:
        if shape is None:
            shape = (ids_TLK.shape[1:], name)
        elif ids_TLK.shape[1:] != shape[0]:
            raise ValueError(f"{where}: {name} has [layers, top_k] = {list(ids_TLK.shape[1:])}, {shape[1]} has "
                             f"{list(shape[0])} (mixed layers or top-k)")
    ids_TLK = np.concatenate([ids for _, ids in arrays])
    num_tokens, num_layers, top_k = ids_TLK.shape
    routed_L = (ids_TLK != 0).any(axis=(0, 2))
    if not routed_L.any():
        raise ValueError(f"{where}: every id is 0 in every layer (nothing captured)")
    if not routed_L.all():
        logger.info("%s: dropping layer(s) %s, all zeros (dense layers, not captured)", where,
                    np.flatnonzero(~routed_L).tolist())
    ids_TLK = ids_TLK[:, routed_L]
    if top_k > 1:
        sorted_TLK = np.sort(ids_TLK, axis=2)
        same = np.argwhere((sorted_TLK[:, :, 1:] == sorted_TLK[:, :, :-1]).any(axis=2))
        if same.size:
            t, layer = same[0]
            raise ValueError(f"{where}: token {t} picks the same expert twice in layer "
                             f"{np.flatnonzero(routed_L)[layer]} (top-k experts are distinct)")
    seen = int(ids_TLK.max()) + 1
    if num_experts is not None and seen > num_experts:
        raise ValueError(f"{where}: expert id {seen - 1} is out of range [0, {num_experts})")
    num_experts = num_experts if num_experts is not None else seen
    num_steps = num_tokens // tokens_per_step
    if num_steps == 0:
        raise ValueError(f"{where}: {num_tokens} tokens, fewer than one step of tokens_per_step {tokens_per_step}")
    dropped = num_tokens - num_steps * tokens_per_step
    if dropped:
        logger.info("%s: dropping the last %d tokens (less than a step)", where, dropped)
    kept_L = int(routed_L.sum())
    check_dense_size(num_steps, kept_L, num_experts, 1, where)
    ids_SLK = ids_TLK[: num_steps * tokens_per_step].reshape(num_steps, tokens_per_step, kept_L, top_k)
    flat = ((np.arange(num_steps)[:, None, None, None] * kept_L + np.arange(kept_L)[None, None, :, None])
            * num_experts + ids_SLK)
    counts_SLE = np.bincount(flat.ravel(), minlength=num_steps * kept_L * num_experts).reshape(
        num_steps, kept_L, num_experts)
    meta: dict[str, Any] = {"original_layers": np.flatnonzero(routed_L).tolist(), "dropped_tokens": dropped,
                            "arrays": [name for name, _ in arrays]}
    return build_trace(counts_SLE[..., None], step_ids=list(range(num_steps)), where=where, meta=meta,
                       keep_ranks=False, top_k=top_k, tokens_per_step=tokens_per_step, model=model,
                       source=f"vllm-routed-experts:{path.name}", provenance="vLLM routed experts capture")


def _load_arrays(path: Path, where: str) -> list[tuple[str, np.ndarray]]:
    """(name, [T, L, K] int64 ids) of every array at `path`, in order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".npy")
        if not files:
            raise ValueError(f"{where}: the directory holds no .npy files")
        raw = [(file.name, _load(file, where)) for file in files]
    elif path.is_file() and path.suffix in (".npy", ".npz"):
        loaded = _load(path, where)
        if isinstance(loaded, np.ndarray):
            raw = [(path.name, loaded)]
        else:
            with loaded:
                raw = [(f"{path.name}:{name}", loaded[name]) for name in loaded.files]
            if not raw:
                raise ValueError(f"{where}: the .npz holds no arrays")
    elif path.is_file():
        raise ValueError(f"{where}: expected a .npy or .npz file, or a directory of .npy files")
    else:
        raise ValueError(f"{where} does not exist")
    arrays = []
    for name, values in raw:
        ids_TLK = integer_array(values, f"{where}: {name}", ndim=3)
        if 0 in ids_TLK.shape[1:]:
            raise ValueError(f"{where}: {name} has shape {list(ids_TLK.shape)}; expected [tokens, layers, top_k]")
        arrays.append((name, ids_TLK))
    return arrays


def _load(file: Path, where: str) -> Any:
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where}: {file.name} is not a readable numpy file: {' '.join(str(exc).split())}") from None
