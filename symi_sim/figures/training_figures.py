"""Figures of one training run: loss against wall time and steps, dropped tokens per step, and heatmaps of each
expert's share of its layer's tokens (from a train run's trace.parquet or any trace file; the trace's metadata names
what its steps are, e.g. text domains, and its layers' ids in the original model).

Legend: S steps, L MoE layers, E logical experts.

Each figure has a `check_*` (ValueError naming the broken rule; returns the checked input) and a `draw_*` (a
matplotlib.figure.Figure; object API, never pyplot).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from symi_sim.checks import is_int
from symi_sim.figures.colours import policy_colour
from symi_sim.figures.layout import DPI, DROPPED_SIZE_IN, HEATMAP_HEIGHT_IN, HEATMAP_WIDTH_IN, LOSS_SIZE_IN
from symi_sim.figures.tables import check_step_table, numbers

if TYPE_CHECKING:
    from symi_sim.traces.format import LoadTrace

DEFAULT_HEATMAP_LAYERS = 4
LOSS_COLUMNS = ("step", "loss", "step_s")
DROPPED_COLUMNS = ("step", "dropped_fraction")
MAX_STEP_TICK_LABELS = 12  # named steps (domains) are written on the axis up to this many


def _policy_of(label: str | None) -> str | None:
    """'policy symi' (registry._run_label) -> 'symi': a train run's lines take its policy's colour."""
    return label[len("policy "):] if label and label.startswith("policy ") else None


def check_loss(metrics: pd.DataFrame) -> pd.DataFrame:
    """A train run's metrics table: columns step, loss (any finite number), step_s."""
    check_step_table(metrics, LOSS_COLUMNS, "metrics table", signed=("loss",))
    return metrics


def draw_loss(metrics: pd.DataFrame, *, label: str | None = None) -> Figure:
    """Training loss against wall time (the running sum of step_s) and against steps; `label` (e.g. the policy)
    goes into the title."""
    metrics = metrics.sort_values("step")
    step_S, loss_S = numbers(metrics, "step"), numbers(metrics, "loss")
    wall_S = np.cumsum(numbers(metrics, "step_s"))
    policy = _policy_of(label)
    colour = policy_colour(policy) if policy else None
    fig = Figure(figsize=LOSS_SIZE_IN, dpi=DPI, layout="constrained")
    ax_wall, ax_step = fig.subplots(1, 2, sharey=True)
    ax_wall.plot(wall_S, loss_S, linewidth=1.0, color=colour)
    ax_wall.set_xlabel("wall time (s, sum of step times)")
    ax_wall.set_title("Loss against wall time", fontsize=10)
    ax_step.plot(step_S, loss_S, linewidth=1.0, color=colour)
    ax_step.set_xlabel("training step")
    ax_step.set_title("Loss against steps", fontsize=10)
    ax_wall.set_ylabel("training loss (cross-entropy, nats per token)")
    for ax in (ax_wall, ax_step):
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss" + (f" ({label})" if label else ""))
    return fig


def check_dropped(metrics: pd.DataFrame) -> pd.DataFrame:
    """A train run's metrics table: columns step, dropped_fraction (in [0, 1])."""
    check_step_table(metrics, DROPPED_COLUMNS, "metrics table", at_most_one=("dropped_fraction",))
    return metrics


def draw_dropped(metrics: pd.DataFrame, *, label: str | None = None) -> Figure:
    """Dropped-token fraction (%) against step with its mean; `label` goes into the title."""
    metrics = metrics.sort_values("step")
    percent_S = 100.0 * numbers(metrics, "dropped_fraction")
    fig = Figure(figsize=DROPPED_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    policy = _policy_of(label)
    ax.plot(numbers(metrics, "step"), percent_S, linewidth=0.9, label="per step",
            color=policy_colour(policy) if policy else None)
    mean = float(percent_S.mean())
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.2f}%")
    ax.set_xlabel("training step")
    ax.set_ylabel("dropped tokens (% of assignments)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Dropped tokens over steps" + (f" ({label})" if label else ""), fontsize=10)
    return fig


@dataclass(frozen=True)
class HeatmapInput:
    """Checked heatmap input: counts [S, L, E] as float64, what the steps are (`step_axis`, and `step_names` when
    each step has a name, e.g. a text domain) and each layer's id in the original model (`layer_ids`)."""

    counts_SLE: np.ndarray
    step_axis: str = "training step"
    step_names: tuple[str, ...] | None = None
    step_ids: tuple[int, ...] | None = None
    layer_ids: tuple[int, ...] | None = None


def read_counts(path: Path) -> LoadTrace:
    """The trace file (.parquet or .csv) a heatmap is drawn from; the trace reader's ValueError names the file."""
    from symi_sim.traces.format import read_trace

    return read_trace(path)


def _meta_list(meta: dict[str, Any], key: str, length: int) -> list | None:
    """meta[key] as a list of `length` items, or None: older trace files store lists as their text
    ("['arxiv', 'book']"); metadata is decoration here, so anything else is ignored."""
    value = meta.get(key)
    if isinstance(value, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(value)
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    if isinstance(value, (list, tuple)) and len(value) == length:
        return list(value)
    return None


def _whole_numbers(values: list | None) -> tuple[int, ...] | None:
    if values is None or not all(is_int(value) for value in values):
        return None
    return tuple(int(value) for value in values)


def check_heatmap(data: LoadTrace | np.ndarray | HeatmapInput) -> HeatmapInput:
    """A trace (its counts and metadata: `domains` name the steps, `original_layers` the layers, `step_ids` the
    steps' ids) or bare counts [S, L, E]: numeric, 3-D, not empty, finite and >= 0."""
    if isinstance(data, HeatmapInput):
        return data
    meta = getattr(data, "meta", None)
    counts_SLE = np.asarray(data.counts_SLE if meta is not None else data)
    if counts_SLE.ndim != 3:
        raise ValueError(f"counts_SLE must be 3-D [steps, layers, experts], got shape {counts_SLE.shape}")
    if 0 in counts_SLE.shape:
        raise ValueError(f"counts_SLE is empty: shape {counts_SLE.shape}")
    if not np.issubdtype(counts_SLE.dtype, np.number) or np.issubdtype(counts_SLE.dtype, np.complexfloating):
        raise ValueError(f"counts_SLE must be numeric, got dtype {counts_SLE.dtype}")
    counts_SLE = counts_SLE.astype(np.float64)
    bad = ~(np.isfinite(counts_SLE) & (counts_SLE >= 0))
    if bad.any():
        step, layer, expert = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"counts_SLE must be finite and >= 0; step {step} layer {layer} expert {expert} has "
            f"{counts_SLE[step, layer, expert]!r}"
        )
    if not isinstance(meta, dict):
        return HeatmapInput(counts_SLE)
    num_steps, num_layers, _ = counts_SLE.shape
    domains = _meta_list(meta, "domains", num_steps)
    return HeatmapInput(
        counts_SLE,
        step_axis="text domain (one step per domain)" if domains else "training step",
        step_names=tuple(str(domain) for domain in domains) if domains else None,
        step_ids=_whole_numbers(_meta_list(meta, "step_ids", num_steps)),
        layer_ids=_whole_numbers(_meta_list(meta, "original_layers", num_layers)),
    )


def heatmap_layers(num_layers: int, layers: Sequence[int] | None) -> list[int]:
    """The layers to draw: `layers` checked against [0, num_layers), or by default up to 4 spread over the depth,
    first and last included."""
    if layers is None:
        # Spread over the depth, first and last included (the first MoE layer fluctuates most).
        spread = np.unique(np.linspace(0, num_layers - 1, min(num_layers, DEFAULT_HEATMAP_LAYERS)).round())
        return [int(layer) for layer in spread]
    layer_list = list(layers)
    if not layer_list:
        raise ValueError("layers is empty: give at least one layer index or None for the default")
    for layer in layer_list:
        if not is_int(layer) or not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer!r} is not an index in [0, {num_layers})")
    if len(set(layer_list)) != len(layer_list):
        raise ValueError(f"layers has repeats: {layer_list}")
    return [int(layer) for layer in layer_list]


def expert_share_SLE(counts_SLE: np.ndarray) -> np.ndarray:
    """[S, L, E] each expert's share of its layer's tokens at each step (0 where a step has no tokens)."""
    total_SL1 = counts_SLE.sum(axis=2, keepdims=True)
    return np.divide(counts_SLE, total_SL1, out=np.zeros_like(counts_SLE, dtype=np.float64), where=total_SL1 > 0)


def draw_heatmap(data: HeatmapInput | np.ndarray, *, layers: Sequence[int] | None = None) -> Figure:
    """Heatmaps of each expert's share of tokens (experts on y, steps on x), one panel per layer in `layers`
    (positions in the trace, checked here; default: see heatmap_layers), titled with the layer's id in the original
    model when the trace names it; the x axis names the steps (text domains) when the trace does."""
    data = check_heatmap(data)
    layer_list = heatmap_layers(data.counts_SLE.shape[1], layers)
    share_SLE = expert_share_SLE(data.counts_SLE)
    num_steps, _, num_experts = share_SLE.shape
    vmax = float(share_SLE[:, layer_list].max()) or 1.0
    height_in = HEATMAP_HEIGHT_IN[0] + HEATMAP_HEIGHT_IN[1] * len(layer_list)
    fig = Figure(figsize=(HEATMAP_WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(layer_list), 1, sharex=True, squeeze=False)[:, 0]
    for ax, layer in zip(axes, layer_list, strict=True):
        image = ax.imshow(
            share_SLE[:, layer, :].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax,
            extent=(-0.5, num_steps - 0.5, num_experts - 0.5, -0.5),
        )
        title = f"layer {layer}" if data.layer_ids is None else f"layer {data.layer_ids[layer]} of the model"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("expert")
    if data.step_names is not None and num_steps <= MAX_STEP_TICK_LABELS:
        axes[-1].set_xticks(np.arange(num_steps), labels=list(data.step_names))
    elif data.step_ids is not None:
        ids = data.step_ids
        axes[-1].xaxis.set_major_formatter(FuncFormatter(
            lambda value, _pos: str(ids[int(round(value))]) if 0 <= round(value) < len(ids) else ""))
    axes[-1].set_xlabel(data.step_axis)
    fig.colorbar(image, ax=list(axes), label="share of the layer's tokens")
    fig.suptitle("Expert load per domain" if data.step_names is not None else "Expert load over steps")
    return fig
