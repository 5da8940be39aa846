"""Summary statistics of a trace: how skewed expert loads are, and how fast popularity moves.

Legend: S steps, L MoE layers, E logical experts.

Per layer (columns of layer_stats):
  skew_median        median over steps of max/mean expert load (1 = balanced; the paper's "busiest expert x mean")
  skew_overall       max/mean of the loads summed over all steps
  cv_median          median over steps of the coefficient of variation (population std / mean) of expert loads
  top2_share_median  median over steps of the share of assignments taken by the 2 busiest experts
  top2_share_max     the largest such share at any step
  tv_mean            mean over consecutive steps of the total-variation distance 0.5 * sum_e |p_s - p_{s-1}|
                     between popularity vectors p = load / layer total (0 = no movement, 1 = disjoint)
  max_step_ratio     largest max(a, b) / max(min(a, b), 1) of one expert's loads a, b at consecutive steps
                     (an empty expert counts as 1 token, so a ratio stays finite)
Steps where a layer routed nothing are left out of its per-step statistics; the step-to-step ones need 2 steps
(NaN otherwise, null in JSON).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from symi_sim.checks import is_int
from symi_sim.traces.format import LoadTrace

LAYER_COLUMNS = ("skew_median", "skew_overall", "cv_median", "top2_share_median", "top2_share_max", "tv_mean",
                 "max_step_ratio")


def layer_stats(trace: LoadTrace) -> pd.DataFrame:
    """One row per MoE layer: `layer` (plus `original_layer` when the trace records them) and LAYER_COLUMNS."""
    load_SLE = trace.counts_SLE.astype(np.float64)
    num_steps, num_layers, num_experts = load_SLE.shape
    total_SL = load_SLE.sum(axis=2)
    routed_SL = total_SL > 0
    mean_SL = np.where(routed_SL, total_SL / num_experts, np.nan)
    skew_SL = load_SLE.max(axis=2) / mean_SL
    cv_SL = load_SLE.std(axis=2) / mean_SL
    top2_SL = np.sort(load_SLE, axis=2)[:, :, -2:].sum(axis=2) / np.where(routed_SL, total_SL, np.nan)
    overall_LE = load_SLE.sum(axis=0)
    overall_mean_L = overall_LE.sum(axis=1) / num_experts
    skew_overall_L = np.divide(overall_LE.max(axis=1), overall_mean_L, out=np.full(num_layers, np.nan),
                               where=overall_mean_L > 0)

    tv_L = np.full(num_layers, np.nan)
    ratio_L = np.full(num_layers, np.nan)
    if num_steps >= 2:
        p_SLE = load_SLE / np.where(routed_SL, total_SL, 1.0)[:, :, None]
        tv_SL = 0.5 * np.abs(p_SLE[1:] - p_SLE[:-1]).sum(axis=2)
        both_SL = routed_SL[1:] & routed_SL[:-1]
        tv_L = _nan_reduce(np.nanmean, np.where(both_SL, tv_SL, np.nan))
        high = np.maximum(load_SLE[1:], load_SLE[:-1])
        low = np.maximum(np.minimum(load_SLE[1:], load_SLE[:-1]), 1.0)
        ratio_L = (high / low).max(axis=(0, 2))

    frame = pd.DataFrame({"layer": np.arange(num_layers)})
    original = trace.meta.get("original_layers")
    if isinstance(original, list) and len(original) == num_layers:
        frame["original_layer"] = original
    frame["skew_median"] = _nan_reduce(np.nanmedian, skew_SL)
    frame["skew_overall"] = skew_overall_L
    frame["cv_median"] = _nan_reduce(np.nanmedian, cv_SL)
    frame["top2_share_median"] = _nan_reduce(np.nanmedian, top2_SL)
    frame["top2_share_max"] = _nan_reduce(np.nanmax, top2_SL)
    frame["tv_mean"] = tv_L
    frame["max_step_ratio"] = ratio_L
    return frame


def trace_info(trace: LoadTrace) -> dict[str, Any]:
    """Header facts and per-layer statistics (see layer_stats), JSON-serialisable (NaN -> None)."""
    info: dict[str, Any] = {
        "steps": trace.num_steps,
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": int(trace.top_k),
        "tokens_per_step": None if trace.tokens_per_step is None else int(trace.tokens_per_step),
        "model": trace.model,
        "source": trace.source,
        "provenance": trace.provenance,
        "total_assignments": int(trace.counts_SLE.sum()),
        "source_ranks": None if trace.src_counts_SLEG is None else int(trace.src_counts_SLEG.shape[3]),
    }
    for key in ("domains", "original_layers", "step_ids"):
        if key in trace.meta:
            info[key] = trace.meta[key]
    records = layer_stats(trace).to_dict(orient="records")
    info["per_layer"] = [{k: _json_number(v) for k, v in record.items()} for record in records]
    return info


def _nan_reduce(reduce: Any, x_SL: np.ndarray) -> np.ndarray:
    """Reduce over axis 0, NaN (no warning) for columns that are all NaN."""
    out_L = np.full(x_SL.shape[1], np.nan)
    some_L = ~np.isnan(x_SL).all(axis=0)
    if some_L.any():
        out_L[some_L] = reduce(x_SL[:, some_L], axis=0)
    return out_L


def _json_number(value: Any) -> Any:
    if is_int(value):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    return value


def format_trace_info(info: dict[str, Any]) -> str:
    """The readable text of `symi trace info`: header facts, then one line per layer."""
    tokens = "unknown" if info["tokens_per_step"] is None else f"{info['tokens_per_step']:,}"
    lines = [
        f"model            {info['model']}",
        f"source           {info['source']}",
        f"shape            {info['steps']} steps x {info['layers']} layers x {info['experts']} experts",
        f"top_k            {info['top_k']}",
        f"tokens_per_step  {tokens}",
        f"assignments      {info['total_assignments']:,}",
    ]
    if info.get("source_ranks") is not None:
        lines.append(f"source ranks     {info['source_ranks']}")
    if "domains" in info:
        lines.append(f"steps = domains  {', '.join(map(str, info['domains']))}")
    if info.get("provenance"):
        lines.append(f"provenance       {info['provenance']}")
    lines.append("")
    header = ["layer", *(["orig"] if any("original_layer" in r for r in info["per_layer"]) else []),
              "skew_med", "skew_all", "cv_med", "top2_med", "top2_max", "tv_mean", "max_ratio"]
    lines.append(" ".join(f"{h:>9}" for h in header))
    for record in info["per_layer"]:
        cells = [f"{record['layer']:>9d}"]
        if "original_layer" in record:
            cells.append(f"{record['original_layer']:>9}")
        for key in LAYER_COLUMNS:
            value = record[key]
            cells.append(f"{'-':>9}" if value is None else f"{value:>9.3f}" if value < 1e5 else f"{value:>9.3g}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
