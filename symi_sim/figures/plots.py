"""Figures from result tables: policy comparison, planner replay, expert-load heatmaps, per-step CDFs and
timelines, training loss and dropped tokens (PNG); `plot_run` draws them for a whole run directory (`symi plot`).

Legend: S steps, L MoE layers, E logical experts, P policies (table rows).

Each public function validates its input (ValueError, and no file, for a bad table), builds the figure in a
`_build_*` function that returns it, and writes the PNG atomically (symi_sim.outputs.atomic_file). Figures are
made with matplotlib's object API (matplotlib.figure.Figure, rendered by Agg), never pyplot: no global figure
state, no backend switching in the caller's process, nothing ever shown.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from symi_sim.outputs import atomic_file

logger = logging.getLogger(__name__)

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


def _check_frame(table: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """A non-empty DataFrame with the required columns."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{what} is empty: nothing to plot")


def _check_table(summary: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """One row per policy, the required columns present, numbers finite and >= 0."""
    _check_frame(summary, required, what)
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
    _save(_checked_comparison(summary), path)


def _checked_comparison(summary: pd.DataFrame) -> Figure:
    _check_table(summary, COMPARISON_COLUMNS, "simulation summary")
    phases = phase_columns(summary)
    if not phases:
        raise ValueError(
            f"simulation summary has no {PHASE_PREFIX}<name>{PHASE_SUFFIX} columns; it has {list(summary.columns)}"
        )
    _check_table(summary, ["policy", *phases], "simulation summary")
    if not (pd.to_numeric(summary["time_to_target_s"]) > 0).all():
        raise ValueError("simulation summary: time_to_target_s must be > 0 for every policy")
    return _build_comparison(summary)


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
    _save(_checked_replay(summary), path)


def _checked_replay(summary: pd.DataFrame) -> Figure:
    _check_table(summary, REPLAY_COLUMNS, "replay summary")
    return _build_replay(summary)


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


# ---------------------------------------------------------------- per-step figures and run directories

CDF_SIZE_IN = (10.0, 4.0)
TIMELINE_SIZE_IN = (9.0, 4.0)
LOSS_SIZE_IN = (10.0, 4.0)
DROPPED_SIZE_IN = (9.0, 4.0)

CDF_COLUMNS = ("policy", "step", "imbalance", "dropped_fraction")
TIMELINE_COLUMNS = ("policy", "step", "time_s")
LOSS_COLUMNS = ("step", "loss", "step_s")
DROPPED_COLUMNS = ("step", "dropped_fraction")

# What `symi plot` can draw for each kind of input, in drawing order.
RUN_FIGURES = {
    "simulate": ("comparison", "cdf", "timeline"),
    "replay": ("replay", "cdf"),
    "train": ("loss", "heatmap", "dropped"),
    "trace": ("heatmap",),
}
FIGURE_KINDS = ("comparison", "cdf", "timeline", "replay", "loss", "heatmap", "dropped")
# The file that tells each kind of run directory apart (simulate's write_run, replay's write_replay, train).
RUN_MARKERS = {"simulate": "iterations.parquet", "replay": "steps.csv", "train": "metrics.csv"}


def _check_rows(table: pd.DataFrame, required: Sequence[str], what: str, *, signed: Sequence[str] = (),
                at_most_one: Sequence[str] = ()) -> None:
    """A per-step table: the required columns present, not empty, numbers finite and >= 0 (or any finite number
    for the `signed` columns, <= 1 too for the `at_most_one` ones), `step` whole numbers, at most one row per
    (policy, step)."""
    _check_frame(table, required, what)
    for column in required:
        if column == "policy":
            continue
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(values)
        if column not in signed:
            ok &= values >= 0
        if column in at_most_one:
            ok &= values <= 1
        if column == "step":
            ok &= values == np.round(values)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            value = table[column].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value
            rule = ("whole numbers >= 0" if column == "step" else "finite numbers" if column in signed
                    else "finite numbers in [0, 1]" if column in at_most_one else "finite numbers >= 0")
            where = f"policy {table['policy'].iloc[row]!r}, " if "policy" in table.columns else ""
            raise ValueError(f"{what}: column {column!r} must hold {rule}; {where}row {row + 1} has {value!r}")
    if "step" in required:
        keys = ["policy", "step"] if "policy" in table.columns else ["step"]
        repeated = table.loc[table.duplicated(keys), keys]
        if not repeated.empty:
            values = [repeated[key].iloc[0] for key in keys]
            first = ", ".join(f"{key} {value.item() if isinstance(value, np.generic) else value!r}"
                              for key, value in zip(keys, values, strict=True))
            raise ValueError(f"{what} has more than one row for {first}")


def _per_policy(table: pd.DataFrame, column: str) -> dict[str, np.ndarray]:
    """{policy: values of `column`} in table order (policies in order of first appearance)."""
    return {str(name): pd.to_numeric(group[column]).to_numpy(dtype=np.float64)
            for name, group in table.groupby("policy", sort=False)}


def ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, fraction of values <= each): the points of an empirical CDF."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    return x, np.arange(1, x.size + 1) / x.size


def _build_cdf(steps: pd.DataFrame) -> Figure:
    imbalance = _per_policy(steps, "imbalance")
    dropped = _per_policy(steps, "dropped_fraction")
    colors = _colors(len(imbalance))
    fig = Figure(figsize=CDF_SIZE_IN, dpi=DPI, layout="constrained")
    ax_imbalance, ax_dropped = fig.subplots(1, 2)
    for (name, values), color in zip(imbalance.items(), colors, strict=True):
        ax_imbalance.step(*ecdf(values), where="post", color=color, label=name)
        x, y = ecdf(100.0 * dropped[name])
        ax_dropped.step(x, y, where="post", color=color, label=name)
    ax_imbalance.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_imbalance.set_xlabel("GPU load imbalance (max / mean tokens)")
    ax_imbalance.set_title("Per-iteration GPU load imbalance", fontsize=10)
    ax_dropped.set_xlabel("dropped tokens (% of assignments)")
    ax_dropped.set_title("Per-iteration dropped tokens", fontsize=10)
    for ax in (ax_imbalance, ax_dropped):
        ax.set_ylabel("fraction of iterations (CDF)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    ax_dropped.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="policy", title_fontsize=8)
    fig.suptitle("Distribution over iterations")
    return fig


def _checked_cdf(steps: pd.DataFrame) -> Figure:
    _check_rows(steps, CDF_COLUMNS, "per-step table", at_most_one=("dropped_fraction",))
    return _build_cdf(steps)


def cdf_figure(steps: pd.DataFrame, path: str | Path) -> None:
    """Two panels from a per-step table (one row per policy and step: the simulator's iterations.parquet or the
    replay's steps.csv; columns policy, step, imbalance, dropped_fraction): per policy, the empirical CDF over
    iterations of the GPU load imbalance and of the dropped-token fraction."""
    path = _check_png_path(path)
    _save(_checked_cdf(steps), path)


def _build_timeline(iterations: pd.DataFrame) -> Figure:
    fig = Figure(figsize=TIMELINE_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    groups = list(iterations.groupby("policy", sort=False))
    for (name, group), color in zip(groups, _colors(len(groups)), strict=True):
        group = group.sort_values("step")
        ax.plot(pd.to_numeric(group["step"]).to_numpy(dtype=np.float64),
                pd.to_numeric(group["time_s"]).to_numpy(dtype=np.float64), color=color, linewidth=0.9, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("iteration time (s)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.set_title("Iteration time over steps", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="policy", title_fontsize=8)
    return fig


def _checked_timeline(iterations: pd.DataFrame) -> Figure:
    _check_rows(iterations, TIMELINE_COLUMNS, "iterations table")
    return _build_timeline(iterations)


def timeline_figure(iterations: pd.DataFrame, path: str | Path) -> None:
    """Iteration time against step, one line per policy, from the simulator's iterations table (columns
    policy, step, time_s)."""
    path = _check_png_path(path)
    _save(_checked_timeline(iterations), path)


def _numbers(table: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(table[column]).to_numpy(dtype=np.float64)


def _build_loss(metrics: pd.DataFrame, label: str | None = None) -> Figure:
    metrics = metrics.sort_values("step")
    step_S, loss_S = _numbers(metrics, "step"), _numbers(metrics, "loss")
    wall_S = np.cumsum(_numbers(metrics, "step_s"))
    fig = Figure(figsize=LOSS_SIZE_IN, dpi=DPI, layout="constrained")
    ax_wall, ax_step = fig.subplots(1, 2, sharey=True)
    ax_wall.plot(wall_S, loss_S, linewidth=1.0)
    ax_wall.set_xlabel("wall time (s, sum of step times)")
    ax_wall.set_title("Loss against wall time", fontsize=10)
    ax_step.plot(step_S, loss_S, linewidth=1.0)
    ax_step.set_xlabel("training step")
    ax_step.set_title("Loss against steps", fontsize=10)
    ax_wall.set_ylabel("training loss (cross-entropy, nats per token)")
    for ax in (ax_wall, ax_step):
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss" + (f" ({label})" if label else ""))
    return fig


def _checked_loss(metrics: pd.DataFrame, label: str | None = None) -> Figure:
    _check_rows(metrics, LOSS_COLUMNS, "metrics table", signed=("loss",))
    return _build_loss(metrics, label)


def loss_figure(metrics: pd.DataFrame, path: str | Path, *, label: str | None = None) -> None:
    """Training loss against wall time (the running sum of step_s) and against steps, from a train run's
    metrics table (columns step, loss, step_s); `label` (e.g. the policy) goes into the title."""
    path = _check_png_path(path)
    _save(_checked_loss(metrics, label), path)


def _build_dropped(metrics: pd.DataFrame, label: str | None = None) -> Figure:
    metrics = metrics.sort_values("step")
    percent_S = 100.0 * _numbers(metrics, "dropped_fraction")
    fig = Figure(figsize=DROPPED_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot(_numbers(metrics, "step"), percent_S, linewidth=0.9, label="per step")
    mean = float(percent_S.mean())
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.2f}%")
    ax.set_xlabel("training step")
    ax.set_ylabel("dropped tokens (% of assignments)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Dropped tokens over steps" + (f" ({label})" if label else ""), fontsize=10)
    return fig


def _checked_dropped(metrics: pd.DataFrame, label: str | None = None) -> Figure:
    _check_rows(metrics, DROPPED_COLUMNS, "metrics table", at_most_one=("dropped_fraction",))
    return _build_dropped(metrics, label)


def dropped_figure(metrics: pd.DataFrame, path: str | Path, *, label: str | None = None) -> None:
    """Dropped-token fraction (%) against step with its mean, from a train run's metrics table (columns step,
    dropped_fraction); `label` goes into the title."""
    path = _check_png_path(path)
    _save(_checked_dropped(metrics, label), path)


def detect_run(path: str | Path) -> str:
    """What `path` is: "simulate", "replay" or "train" (a run directory, told apart by the file only that kind
    writes: iterations.parquet, steps.csv, metrics.csv) or "trace" (a .parquet/.csv file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() in (".parquet", ".csv"):
            return "trace"
        raise ValueError(f"{str(path)!r} is a file but not a trace (.parquet or .csv); give a run directory or a trace")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is neither a directory nor a file")
    found = [kind for kind, marker in RUN_MARKERS.items() if (path / marker).is_file()]
    if len(found) == 1:
        return found[0]
    expected = ", ".join(f"{marker} ({kind})" for kind, marker in RUN_MARKERS.items())
    if not found:
        raise ValueError(f"{str(path)!r} is not a symi run directory: it has none of {expected}")
    raise ValueError(f"{str(path)!r} is ambiguous: it has " + " and ".join(RUN_MARKERS[kind] for kind in found))


def run_figure_kinds(path: str | Path) -> tuple[str, list[str]]:
    """(kind of `path`, the figures that apply to it): a train run's heatmap only with trace.parquet."""
    run_kind = detect_run(path)
    kinds = list(RUN_FIGURES[run_kind])
    if run_kind == "train" and not (Path(path) / "trace.parquet").is_file():
        kinds.remove("heatmap")
    return run_kind, kinds


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table; one ValueError naming the file when it is missing or unreadable."""
    import pyarrow as pa

    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        message = " ".join(str(exc).split())  # one line: parser messages may hold newlines
        raise ValueError(f"{str(path)!r} is not a readable table: {message}") from None


def _train_label(run_dir: Path) -> str | None:
    """'policy symi' from a train run's config.json, or None (the label is decoration: never an error)."""
    import json

    try:
        config = json.loads((run_dir / "config.json").read_text())
        return f"policy {config['train']['policy']}"
    except (OSError, ValueError, KeyError, TypeError):
        logger.debug("no policy label from %s", run_dir / "config.json")
        return None


def _figure_for(kind: str, run_kind: str, path: Path) -> Figure:
    """Validate the input `kind` needs and build its figure (ValueError naming the file when it is bad)."""
    if kind == "heatmap":
        from symi_sim.traces.format import read_trace

        trace_path = path if run_kind == "trace" else path / "trace.parquet"
        return _build_heatmap(*_check_counts(read_trace(trace_path).counts_SLE, None))
    table_file = {("comparison", "simulate"): "summary.csv", ("replay", "replay"): "summary.csv",
                  ("cdf", "simulate"): "iterations.parquet", ("cdf", "replay"): "steps.csv",
                  ("timeline", "simulate"): "iterations.parquet", ("loss", "train"): "metrics.csv",
                  ("dropped", "train"): "metrics.csv"}[kind, run_kind]
    table_path = path / table_file
    table = _read_table(table_path)
    try:
        if kind == "comparison":
            return _checked_comparison(table)
        if kind == "replay":
            return _checked_replay(table)
        if kind == "cdf":
            return _checked_cdf(table)
        if kind == "timeline":
            return _checked_timeline(table)
        label = _train_label(path)
        return _checked_loss(table, label) if kind == "loss" else _checked_dropped(table, label)
    except ValueError as exc:
        raise ValueError(f"{str(table_path)!r}: {exc}") from None


def _free_png(out_dir: Path, stem: str, taken: set[Path]) -> Path:
    """out_dir/stem.png, or stem-2.png, stem-3.png, ... : the first name neither on disk nor `taken`."""
    candidate, number = out_dir / f"{stem}.png", 1
    while candidate.exists() or candidate in taken:
        number += 1
        candidate = out_dir / f"{stem}-{number}.png"
    return candidate


def plot_run(path: str | Path, *, kinds: Sequence[str] | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a run directory (simulate, plan --replay, train) or of a trace file; return the PNGs.

    kinds: some of RUN_FIGURES[kind of path] (default: all that apply; a train run's heatmap needs trace.parquet).
    out_dir: default the run directory (a trace's own directory). A figure goes to `<kind>.png` (a trace's to
    `<trace stem>-heatmap.png`), or `-2`, `-3`, ... before `.png` when that name is taken: nothing is ever
    overwritten. Every input is read and every figure built before the first file is written; a bad input is
    one ValueError and no file.
    """
    path = Path(path)
    run_kind, applicable = run_figure_kinds(path)
    if kinds is None:
        chosen = applicable
    else:
        chosen = list(dict.fromkeys(kinds))
        if not chosen:
            raise ValueError("no figure kind given")
        unknown = [kind for kind in chosen if kind not in FIGURE_KINDS]
        if unknown:
            raise ValueError(f"unknown figure kind(s) {unknown}; choices: {', '.join(FIGURE_KINDS)}")
        for kind in chosen:
            if kind not in applicable:
                why = (" (this train run has no trace.parquet: train with --record-trace)"
                       if kind == "heatmap" and run_kind == "train" else "")
                raise ValueError(f"figure {kind!r} does not apply to {run_kind} {str(path)!r}{why}; it takes: "
                                 f"{', '.join(applicable)}")
    target = Path(out_dir) if out_dir is not None else (path.parent if run_kind == "trace" else path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output directory {str(target)!r} exists and is not a directory")
    figures = {kind: _figure_for(kind, run_kind, path) for kind in chosen}
    written: list[Path] = []
    png = target
    try:
        for kind, fig in figures.items():
            stem = f"{path.stem}-{kind}" if run_kind == "trace" else kind
            png = _free_png(target, stem, set(written))
            _save(fig, png)
            written.append(png)
            logger.info("wrote %s", png)
    except BaseException as exc:
        for done in written:
            done.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # an unwritable --out: one error line, like any bad input
            raise ValueError(f"cannot write {str(png)!r}: {exc}") from None
        raise
    return written
