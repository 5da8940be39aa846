"""Figures from result tables: policy comparison, planner replay, expert-load heatmaps (PNG).

Legend: S steps, L MoE layers, E logical experts, P policies (table rows).

Each public function validates its input (ValueError, and no file, for a bad table), builds the figure in a
`_build_*` function that returns it, and writes the PNG atomically (symi_sim.outputs.atomic_file). Figures are
made with matplotlib's object API (matplotlib.figure.Figure, rendered by Agg), never pyplot: no global figure
state, no backend switching in the caller's process, nothing ever shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from symi_sim.outputs import atomic_file

DPI = 110
COMPARISON_SIZE_IN = (10.0, 4.5)
REPLAY_SIZE_IN = (9.0, 4.0)
HEATMAP_WIDTH_IN = 8.0
HEATMAP_HEIGHT_IN = (1.2, 1.9)  # fixed part + per layer panel
DEFAULT_HEATMAP_LAYERS = 4
BASELINE_POLICY = "static"
PHASE_PREFIX, PHASE_SUFFIX = "phase_", "_s"

COMPARISON_COLUMNS = ("policy", "time_to_target_s", "mean_time_s", "dropped_fraction")
REPLAY_COLUMNS = ("policy", "imbalance", "dropped_fraction", "plan_ms_median")


def _check_table(summary: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """One row per policy, the required columns present, numbers finite and >= 0."""
    if not isinstance(summary, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(summary).__name__}")
    missing = [column for column in required if column not in summary.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(summary.columns)}")
    if summary.empty:
        raise ValueError(f"{what} is empty: nothing to plot")
    duplicated = summary["policy"][summary["policy"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{what} must have one row per policy; repeated: {duplicated}")
    for column in required:
        if column == "policy":
            continue
        values = pd.to_numeric(summary[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = summary[column].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value
            raise ValueError(
                f"{what}: column {column!r} must hold finite numbers >= 0; policy "
                f"{summary['policy'].iloc[row]!r} has {value!r}"
            )


def _check_png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png, got {str(path)!r}")
    return path


def _save(fig: Figure, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _colors(num_colors: int) -> list:
    cmap = matplotlib.colormaps["tab10" if num_colors <= 10 else "tab20"]
    return [cmap(index % cmap.N) for index in range(num_colors)]


def phase_columns(summary: pd.DataFrame) -> list[str]:
    """The `phase_<name>_s` columns of a simulator summary, in table order."""
    return [
        column for column in summary.columns
        if isinstance(column, str) and column.startswith(PHASE_PREFIX) and column.endswith(PHASE_SUFFIX)
        and len(column) > len(PHASE_PREFIX) + len(PHASE_SUFFIX)
    ]


def phase_name(column: str) -> str:
    """`phase_grad_sync_s` -> `grad sync`."""
    return column[len(PHASE_PREFIX):-len(PHASE_SUFFIX)].replace("_", " ")


def _policy_axis(ax, labels: list[str]) -> np.ndarray:
    x_P = np.arange(len(labels))
    rotate = len(labels) > 4
    ax.set_xticks(x_P, labels=labels, rotation=40 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor" if rotate else "default", fontsize=8)
    ax.set_xlabel("policy")
    return x_P


def _build_comparison(summary: pd.DataFrame) -> Figure:
    phases = phase_columns(summary)
    policies = summary["policy"].astype(str).tolist()
    time_to_target_P = summary["time_to_target_s"].to_numpy(dtype=np.float64)
    mean_time_P = summary["mean_time_s"].to_numpy(dtype=np.float64)
    dropped_P = summary["dropped_fraction"].to_numpy(dtype=np.float64)

    fig = Figure(figsize=COMPARISON_SIZE_IN, dpi=DPI, layout="constrained")
    ax_target, ax_phase = fig.subplots(1, 2)

    labels = [f"{policy} ({dropped:.0%} drop)" for policy, dropped in zip(policies, dropped_P, strict=True)]
    x_P = _policy_axis(ax_target, labels)
    bars = ax_target.bar(x_P, time_to_target_P, color=_colors(len(policies)))
    if BASELINE_POLICY in policies:
        baseline_s = time_to_target_P[policies.index(BASELINE_POLICY)]
        bar_text = [f"{baseline_s / value:.2f}x" if value > 0 else "-" for value in time_to_target_P]
        ax_target.set_title(f"Time to target loss (labels: speed-up vs {BASELINE_POLICY})", fontsize=10)
    else:
        bar_text = [f"{value:.3g} s" for value in time_to_target_P]
        ax_target.set_title("Time to target loss", fontsize=10)
    ax_target.bar_label(bars, labels=bar_text, padding=2, fontsize=8)
    ax_target.set_ylabel("time to target loss (s)")
    ax_target.margins(y=0.12)

    _policy_axis(ax_phase, policies)
    bottom_P = np.zeros(len(policies))
    handles = []
    for column, color in zip(phases, _colors(len(phases)), strict=True):
        seconds_P = summary[column].to_numpy(dtype=np.float64)
        handles.append(ax_phase.bar(x_P, seconds_P, bottom=bottom_P, color=color, label=phase_name(column)))
        bottom_P += seconds_P
    # Phases may overlap in time (communication hidden behind compute), so the stack can exceed the wall time.
    wall_marker = ax_phase.scatter(x_P, mean_time_P, marker="_", s=400, linewidths=2, color="black", zorder=3,
                                   label="iteration wall time")
    handles.append(wall_marker)
    ax_phase.set_ylabel("seconds per iteration (s)")
    ax_phase.set_title("Per-iteration time breakdown", fontsize=10)
    ax_phase.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="phase",
                    title_fontsize=8)
    fig.suptitle("Policy comparison")
    return fig


def comparison_figure(summary: pd.DataFrame, path: str | Path) -> None:
    """Two panels from the simulator summary (one row per policy; columns policy, time_to_target_s,
    mean_time_s, dropped_fraction and one or more phase_<name>_s): time to target loss per policy, labelled
    with the speed-up over `static` when it is present; and the stacked per-phase seconds per iteration."""
    path = _check_png_path(path)
    _check_table(summary, COMPARISON_COLUMNS, "simulation summary")
    phases = phase_columns(summary)
    if not phases:
        raise ValueError(
            f"simulation summary has no {PHASE_PREFIX}<name>{PHASE_SUFFIX} columns; it has {list(summary.columns)}"
        )
    _check_table(summary, ["policy", *phases], "simulation summary")
    if not (pd.to_numeric(summary["time_to_target_s"]) > 0).all():
        raise ValueError("simulation summary: time_to_target_s must be > 0 for every policy")
    _save(_build_comparison(summary), path)


def _build_replay(summary: pd.DataFrame) -> Figure:
    policies = summary["policy"].astype(str).tolist()
    plan_ms_P = summary["plan_ms_median"].to_numpy(dtype=np.float64)
    colors = _colors(len(policies))

    fig = Figure(figsize=REPLAY_SIZE_IN, dpi=DPI, layout="constrained")
    ax_imbalance, ax_dropped = fig.subplots(1, 2)
    labels = [f"{policy}\n(plan {ms:.3g} ms)" for policy, ms in zip(policies, plan_ms_P, strict=True)]

    x_P = _policy_axis(ax_imbalance, labels)
    bars = ax_imbalance.bar(x_P, summary["imbalance"].to_numpy(dtype=np.float64), color=colors)
    ax_imbalance.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax_imbalance.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="perfect balance")
    ax_imbalance.set_ylabel("GPU load imbalance (max / mean tokens)")
    ax_imbalance.set_title("GPU load imbalance", fontsize=10)
    ax_imbalance.legend(fontsize=7, loc="lower right")
    ax_imbalance.margins(y=0.12)

    _policy_axis(ax_dropped, policies)
    bars = ax_dropped.bar(x_P, 100.0 * summary["dropped_fraction"].to_numpy(dtype=np.float64), color=colors)
    ax_dropped.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
    ax_dropped.set_ylabel("dropped tokens (% of assignments)")
    ax_dropped.set_title("Dropped tokens", fontsize=10)
    ax_dropped.margins(y=0.12)
    fig.suptitle("Planner replay")
    return fig


def replay_figure(summary: pd.DataFrame, path: str | Path) -> None:
    """Two panels from the planner replay summary (columns policy, imbalance, dropped_fraction,
    plan_ms_median): mean GPU load imbalance and dropped-token fraction per policy; the median planning time
    goes into the policy labels."""
    path = _check_png_path(path)
    _check_table(summary, REPLAY_COLUMNS, "replay summary")
    _save(_build_replay(summary), path)


def _check_counts(counts_SLE: np.ndarray, layers: Sequence[int] | None) -> tuple[np.ndarray, list[int]]:
    counts_SLE = np.asarray(counts_SLE)
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
    num_layers = counts_SLE.shape[1]
    if layers is None:
        # Spread over the depth, first and last included (the first MoE layer fluctuates most).
        layers = np.unique(np.linspace(0, num_layers - 1, min(num_layers, DEFAULT_HEATMAP_LAYERS)).round())
        return counts_SLE, [int(layer) for layer in layers]
    layer_list = list(layers)
    if not layer_list:
        raise ValueError("layers is empty: give at least one layer index or None for the default")
    for layer in layer_list:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer!r} is not an index in [0, {num_layers})")
    if len(set(layer_list)) != len(layer_list):
        raise ValueError(f"layers has repeats: {layer_list}")
    return counts_SLE, [int(layer) for layer in layer_list]


def expert_share_SLE(counts_SLE: np.ndarray) -> np.ndarray:
    """[S, L, E] each expert's share of its layer's tokens at each step (0 where a step has no tokens)."""
    total_SL1 = counts_SLE.sum(axis=2, keepdims=True)
    return np.divide(counts_SLE, total_SL1, out=np.zeros_like(counts_SLE, dtype=np.float64), where=total_SL1 > 0)


def _build_heatmap(counts_SLE: np.ndarray, layers: list[int]) -> Figure:
    share_SLE = expert_share_SLE(counts_SLE)
    num_steps, _, num_experts = share_SLE.shape
    vmax = float(share_SLE[:, layers].max()) or 1.0
    height_in = HEATMAP_HEIGHT_IN[0] + HEATMAP_HEIGHT_IN[1] * len(layers)
    fig = Figure(figsize=(HEATMAP_WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    for ax, layer in zip(axes, layers, strict=True):
        image = ax.imshow(
            share_SLE[:, layer, :].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax,
            extent=(-0.5, num_steps - 0.5, num_experts - 0.5, -0.5),
        )
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_ylabel("expert")
    axes[-1].set_xlabel("training step")
    fig.colorbar(image, ax=list(axes), label="share of the layer's tokens")
    fig.suptitle("Expert load over steps")
    return fig


def load_heatmap(counts_SLE: np.ndarray, path: str | Path, layers: Sequence[int] | None = None) -> None:
    """Heatmaps of each expert's share of tokens (experts on y, steps on x), one panel per layer in
    `layers` (default: up to 4 layers spread over the depth, first and last included); counts_SLE [S, L, E]."""
    path = _check_png_path(path)
    counts_SLE, layer_list = _check_counts(counts_SLE, layers)
    _save(_build_heatmap(counts_SLE, layer_list), path)
