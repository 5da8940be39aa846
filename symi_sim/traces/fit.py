"""Reconcile a trace with the simulated model: adopt its shape, rescale its tokens, tile its layers.

Legend: S steps, L MoE layers, E logical experts, G source ranks.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from symi_sim.checks import check_positive_int
from symi_sim.models import ModelConfig
from symi_sim.traces.format import LoadTrace

logger = logging.getLogger(__name__)


def fit_trace(model: ModelConfig, trace: LoadTrace, *,
              adopt_trace_shape: bool = False) -> tuple[ModelConfig, LoadTrace]:
    """Reconcile a model with a trace; return the model and trace to simulate.

    The trace decides the number of experts, MoE layers and top-k. When the model disagrees this is an error,
    unless `adopt_trace_shape`: then the model takes the trace's experts, top-k and MoE layers (and grows its
    blocks if the trace has more MoE layers than the model has blocks).

    When the trace's tokens per step differ from the model's batch (seq_len x global_batch), the loads are
    rescaled to the model's tokens keeping each (step, layer)'s popularity: counts x model_tokens /
    trace_tokens, rounded to whole tokens by largest remainders so that each (step, layer) keeps exactly its
    scaled total. A trace without tokens_per_step is taken to route every token (its per-(step, layer) total
    / top_k is that step's tokens). Per-source-rank counts do not survive a rescale (sources become uniform).
    """
    mismatches = []
    if model.num_experts != trace.num_experts:
        mismatches.append(f"{model.num_experts} experts vs the trace's {trace.num_experts}")
    if model.num_moe_layers != trace.num_layers:
        mismatches.append(f"{model.num_moe_layers} MoE layers vs the trace's {trace.num_layers}")
    if model.top_k != trace.top_k:
        mismatches.append(f"top-{model.top_k} vs the trace's top-{trace.top_k}")
    if mismatches:
        if not adopt_trace_shape:
            raise ValueError(
                f"model {model.name!r} does not match the trace: {'; '.join(mismatches)} (pass --fit-model-to-trace "
                "to take the trace's experts, MoE layers and top-k)"
            )
        model = model.with_(num_experts=trace.num_experts, top_k=trace.top_k, num_moe_layers=trace.num_layers,
                            num_layers=max(model.num_layers, trace.num_layers),
                            num_expert_groups=math.gcd(model.num_expert_groups, trace.num_experts))
    return model, rescale_trace(trace, model.tokens_per_step)


def rescale_trace(trace: LoadTrace, tokens_per_step: int) -> LoadTrace:
    """`trace` with its loads scaled to `tokens_per_step` tokens per step (see fit_trace); unchanged if equal."""
    if trace.tokens_per_step == tokens_per_step:
        return trace
    counts_SLE = trace.counts_SLE
    total_SL = counts_SLE.sum(axis=2)
    if trace.tokens_per_step is not None:
        scale_SL = np.full(total_SL.shape, tokens_per_step / trace.tokens_per_step)
    else:
        if (total_SL == 0).any():
            s, layer = np.argwhere(total_SL == 0)[0]
            raise ValueError(f"trace without tokens_per_step routes no token at step {s} layer {layer}: cannot rescale")
        scale_SL = trace.top_k * tokens_per_step / total_SL
    exact_SLE = counts_SLE * scale_SL[..., None]
    target_SL = np.rint(total_SL * scale_SL).astype(np.int64)
    base_SLE = np.floor(exact_SLE + 1e-9).astype(np.int64)
    leftover_SL = target_SL - base_SLE.sum(axis=2)
    # largest fractional parts get the leftover tokens (ties: lower expert id)
    order_SLE = np.argsort(-(exact_SLE - base_SLE), axis=2, kind="stable")
    rank_SLE = np.empty_like(order_SLE)
    np.put_along_axis(rank_SLE, order_SLE, np.arange(counts_SLE.shape[2])[None, None, :], axis=2)
    scaled_SLE = base_SLE + (rank_SLE < leftover_SL[..., None])
    logger.info("rescaled trace loads from %s to %d tokens per step", trace.tokens_per_step, tokens_per_step)
    return LoadTrace(counts_SLE=scaled_SLE, top_k=trace.top_k, tokens_per_step=tokens_per_step, model=trace.model,
                     source=trace.source, provenance=trace.provenance, meta=dict(trace.meta))


def tile_layers(trace: LoadTrace, num_layers: int) -> LoadTrace:
    """`trace` with `num_layers` MoE layers: layer l replays the trace's layer l % trace.num_layers.

    For a trace recorded from a shallower model than the one simulated; the tiled layers are correlated copies.
    """
    check_positive_int(num_layers, "number of layers to tile to")
    layers_L = np.arange(num_layers) % trace.num_layers
    src = None if trace.src_counts_SLEG is None else trace.src_counts_SLEG[:, layers_L]
    return LoadTrace(counts_SLE=trace.counts_SLE[:, layers_L, :], top_k=trace.top_k,
                     tokens_per_step=trace.tokens_per_step, model=trace.model, source=trace.source,
                     provenance=f"{trace.provenance} [layers tiled to {num_layers}: layer l = recorded layer l % "
                                f"{trace.num_layers}]",
                     src_counts_SLEG=src, meta={**trace.meta, "tiled_from_layers": trace.num_layers})
