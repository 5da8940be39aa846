"""Figures that compare policies: the simulator's comparison (time to target, per-phase time), the planner replay's
imbalance and dropped tokens, per-step CDFs and the iteration-time timeline.

Bars are ranked, best first: each panel by the value it shows (lower is better for every one of them: time, load
imbalance, dropped share, iteration time).

Legend: P policies (rows of a summary).

Each figure has a `check_*` (ValueError naming the broken rule; returns the table) and a `draw_*` (a
matplotlib.figure.Figure from a checked table; object API, never pyplot). A policy's bars and lines take its
colour from symi_sim.figures.colours, the same in every figure, and its lines a line style and marker of their
own; the phases of a stack take their own colours (colours.phase_colour).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from symi_sim.figures.colours import phase_colour, policy_colour, policy_styles
from symi_sim.figures.layout import CDF_SIZE_IN, COMPARISON_SIZE_IN, DPI, REPLAY_SIZE_IN, TIMELINE_SIZE_IN
from symi_sim.figures.tables import best_first, check_policy_table, check_step_table, numbers, per_policy

BASELINE_POLICY = "static"
PHASE_PREFIX, PHASE_SUFFIX = "phase_", "_s"

COMPARISON_COLUMNS = ("policy", "time_to_target_s", "mean_time_s", "dropped_fraction")
REPLAY_COLUMNS = ("policy", "imbalance", "dropped_fraction", "plan_ms_median")
REPLAY_SHAPE_COLUMNS = ("num_experts", "num_slots")  # optional: the note on configurations with no spare slot
MARKERS_PER_LINE = 8
CDF_COLUMNS = ("policy", "step", "imbalance", "dropped_fraction")
TIMELINE_COLUMNS = ("policy", "step", "time_s")


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


def ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, fraction of values <= each): the points of an empirical CDF."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    return x, np.arange(1, x.size + 1) / x.size


def _ranked(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """`table`'s rows ranked by `column`, lowest (best) first."""
    return table.iloc[best_first(numbers(table, column), table["policy"].astype(str).tolist())]


def replication_note(summary: pd.DataFrame) -> str | None:
    """A line saying that the configuration leaves no slot to replicate an expert (experts >= slots), from the
    replay summary's num_experts and num_slots columns; None when it has room or does not say."""
    if not all(column in summary.columns for column in REPLAY_SHAPE_COLUMNS):
        return None
    experts, slots = (int(pd.to_numeric(summary[column]).max()) for column in REPLAY_SHAPE_COLUMNS)
    if experts < slots:
        return None
    return (f"{experts} experts on {slots} slots: no slot is spare, so no policy can replicate an expert (they can "
            f"only move experts between GPUs); the dropped share cannot differ much between policies")


def _policy_axis(ax, labels: list[str]) -> np.ndarray:
    x_P = np.arange(len(labels))
    rotate = len(labels) > 4
    ax.set_xticks(x_P, labels=labels, rotation=40 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor" if rotate else "default", fontsize=8)
    ax.set_xlabel("policy")
    return x_P


def check_comparison(summary: pd.DataFrame) -> pd.DataFrame:
    """The simulator summary: one row per policy; columns policy, time_to_target_s (> 0), mean_time_s,
    dropped_fraction and one or more phase_<name>_s."""
    check_policy_table(summary, COMPARISON_COLUMNS, "simulation summary")
    phases = phase_columns(summary)
    if not phases:
        raise ValueError(
            f"simulation summary has no {PHASE_PREFIX}<name>{PHASE_SUFFIX} columns; it has {list(summary.columns)}"
        )
    check_policy_table(summary, ["policy", *phases], "simulation summary")
    if not (pd.to_numeric(summary["time_to_target_s"]) > 0).all():
        raise ValueError("simulation summary: time_to_target_s must be > 0 for every policy")
    return summary


def draw_comparison(summary: pd.DataFrame) -> Figure:
    """Two panels: time to target loss per policy, labelled with the speed-up over `static` when it is present;
    and the stacked per-phase seconds per iteration, with the iteration wall time."""
    phases = phase_columns(summary)
    baseline_s = None
    if BASELINE_POLICY in summary["policy"].astype(str).tolist():
        baseline_s = float(numbers(summary[summary["policy"].astype(str) == BASELINE_POLICY], "time_to_target_s")[0])
    by_target = _ranked(summary, "time_to_target_s")
    policies = by_target["policy"].astype(str).tolist()
    time_to_target_P = numbers(by_target, "time_to_target_s")
    dropped_P = numbers(by_target, "dropped_fraction")

    fig = Figure(figsize=COMPARISON_SIZE_IN, dpi=DPI, layout="constrained")
    ax_target, ax_phase = fig.subplots(1, 2)

    labels = [f"{policy} ({dropped:.0%} drop)" for policy, dropped in zip(policies, dropped_P, strict=True)]
    x_P = _policy_axis(ax_target, labels)
    bars = ax_target.bar(x_P, time_to_target_P, color=[policy_colour(policy) for policy in policies])
    if baseline_s is not None:
        bar_text = [f"{baseline_s / value:.2f}x" if value > 0 else "-" for value in time_to_target_P]
        ax_target.set_title(f"Time to target loss, best first (labels: speed-up vs {BASELINE_POLICY})", fontsize=10)
    else:
        bar_text = [f"{value:.3g} s" for value in time_to_target_P]
        ax_target.set_title("Time to target loss, best first", fontsize=10)
    ax_target.bar_label(bars, labels=bar_text, padding=2, fontsize=8)
    ax_target.set_ylabel("time to target loss (s)")
    ax_target.margins(y=0.12)

    by_wall = _ranked(summary, "mean_time_s")
    mean_time_P = numbers(by_wall, "mean_time_s")
    _policy_axis(ax_phase, by_wall["policy"].astype(str).tolist())
    bottom_P = np.zeros(len(by_wall))
    handles = []
    for column in phases:
        seconds_P = numbers(by_wall, column)
        handles.append(ax_phase.bar(x_P, seconds_P, bottom=bottom_P, color=phase_colour(column),
                                    label=phase_name(column)))
        bottom_P += seconds_P
    # Phases may overlap in time (communication hidden behind compute), so the stack can exceed the wall time.
    wall_marker = ax_phase.scatter(x_P, mean_time_P, marker="_", s=400, linewidths=2, color="black", zorder=3,
                                   label="iteration wall time")
    handles.append(wall_marker)
    ax_phase.set_ylabel("seconds per iteration (s)")
    ax_phase.set_title("Per-iteration time breakdown, fastest first", fontsize=10)
    ax_phase.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="phase",
                    title_fontsize=8)
    fig.suptitle("Policy comparison")
    return fig


def check_replay(summary: pd.DataFrame) -> pd.DataFrame:
    """The planner replay summary: one row per policy; columns policy, imbalance, dropped_fraction,
    plan_ms_median."""
    check_policy_table(summary, REPLAY_COLUMNS, "replay summary")
    return summary


def draw_replay(summary: pd.DataFrame) -> Figure:
    """Two panels, each ranked best first: mean GPU load imbalance and dropped-token fraction per policy; the median
    planning time goes into the policy labels. A note says when the configuration leaves no slot to replicate."""
    fig = Figure(figsize=REPLAY_SIZE_IN, dpi=DPI, layout="constrained")
    ax_imbalance, ax_dropped = fig.subplots(1, 2)

    by_imbalance = _ranked(summary, "imbalance")
    policies = by_imbalance["policy"].astype(str).tolist()
    labels = [f"{policy}\n(plan {ms:.3g} ms)"
              for policy, ms in zip(policies, numbers(by_imbalance, "plan_ms_median"), strict=True)]
    x_P = _policy_axis(ax_imbalance, labels)
    bars = ax_imbalance.bar(x_P, numbers(by_imbalance, "imbalance"), color=[policy_colour(p) for p in policies])
    ax_imbalance.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax_imbalance.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="perfect balance")
    ax_imbalance.set_ylabel("GPU load imbalance (max / mean tokens)")
    ax_imbalance.set_title("GPU load imbalance, best first", fontsize=10)
    ax_imbalance.legend(fontsize=7, loc="lower right")
    ax_imbalance.margins(y=0.12)

    by_dropped = _ranked(summary, "dropped_fraction")
    policies = by_dropped["policy"].astype(str).tolist()
    _policy_axis(ax_dropped, policies)
    bars = ax_dropped.bar(x_P, 100.0 * numbers(by_dropped, "dropped_fraction"),
                          color=[policy_colour(p) for p in policies])
    ax_dropped.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
    ax_dropped.set_ylabel("dropped tokens (% of assignments)")
    ax_dropped.set_title("Dropped tokens, best first", fontsize=10)
    ax_dropped.margins(y=0.12)
    note = replication_note(summary)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, style="italic", wrap=True)
        fig.get_layout_engine().set(rect=(0.0, 0.07, 1.0, 0.93))
    fig.suptitle("Planner replay")
    return fig


def check_cdf(steps: pd.DataFrame) -> pd.DataFrame:
    """A per-step table, one row per policy and step (the simulator's iterations.parquet or the replay's
    steps.csv): columns policy, step, imbalance, dropped_fraction (in [0, 1])."""
    check_step_table(steps, CDF_COLUMNS, "per-step table", at_most_one=("dropped_fraction",))
    return steps


def draw_cdf(steps: pd.DataFrame) -> Figure:
    """Two panels: per policy, the empirical CDF over iterations of the GPU load imbalance and of the
    dropped-token fraction."""
    imbalance = per_policy(steps, "imbalance")
    dropped = per_policy(steps, "dropped_fraction")
    fig = Figure(figsize=CDF_SIZE_IN, dpi=DPI, layout="constrained")
    ax_imbalance, ax_dropped = fig.subplots(1, 2)
    styles = policy_styles(list(imbalance))
    drawn: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index, (name, values) in enumerate(imbalance.items()):
        # Lines that coincide (every policy dropping the same share) must all show: each later line is drawn
        # thinner, with smaller markers, on top of the earlier ones, and the legend names the one it repeats.
        every = max(1, values.size // MARKERS_PER_LINE)
        shrink = index / max(len(styles) - 1, 1)
        style = {**styles[name], "linewidth": 3.0 - 2.0 * shrink, "markersize": 10.0 - 6.0 * shrink,
                 "markevery": (index * every // len(styles) % every, every)}
        ax_imbalance.step(*ecdf(values), where="post", label=name, **style)
        x, y = ecdf(100.0 * dropped[name])
        same = next((earlier for earlier, (x0, y0) in drawn.items()
                     if x0.shape == x.shape and np.array_equal(x0, x) and np.array_equal(y0, y)), None)
        drawn[name] = (x, y)
        ax_dropped.step(x, y, where="post", label=name if same is None else f"{name} (dropped = {same})", **style)
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


def check_timeline(iterations: pd.DataFrame) -> pd.DataFrame:
    """The simulator's iterations table: columns policy, step, time_s."""
    check_step_table(iterations, TIMELINE_COLUMNS, "iterations table")
    return iterations


def draw_timeline(iterations: pd.DataFrame) -> Figure:
    """Iteration time against step, one line per policy."""
    fig = Figure(figsize=TIMELINE_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    styles = policy_styles(iterations["policy"].astype(str).unique().tolist())
    for name, group in iterations.groupby("policy", sort=False):
        group = group.sort_values("step")
        every = max(1, len(group) // MARKERS_PER_LINE)
        ax.plot(numbers(group, "step"), numbers(group, "time_s"), linewidth=0.9, markersize=3, markevery=every,
                label=name, **styles[str(name)])
    ax.set_xlabel("training step")
    ax.set_ylabel("iteration time (s)")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.set_title("Iteration time over steps", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="policy", title_fontsize=8)
    return fig
