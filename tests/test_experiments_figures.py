"""The studies' figures (issue 12), drawn from small tables: bars ranked best first, every logarithmic axis labelled
as such, and the capacity-factor steps panel cut to its values so that close step counts stay apart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from experiments.capacity_factor.study import steps_axis_limits, survival_steps_figure
from experiments.harness import LOG_SCALE, phase_colours
from experiments.paper_comparison.study import comparison_figure, speedup_figure
from experiments.scale_out.study import phases_figure, time_to_target_figure
from experiments.sensitivity import aux_loss
from experiments.sensitivity.study import sensitivity_figure
from experiments.sim_validation.study import figure as sim_validation_figure
from symi_sim.figures.colours import phase_colour, policy_colour

POLICIES = ["static", "flexmoe-10", "flexmoe-50", "symi", "symi-balanced"]


def _summary(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    count = len(POLICIES)
    return pd.DataFrame({"policy": POLICIES, "time_to_target_s": rng.uniform(50, 300, count),
                         "mean_time_s": rng.uniform(0.1, 0.5, count), "speedup_vs_static": rng.uniform(0.8, 1.5, count),
                         "reduction_vs_static": rng.uniform(-0.2, 0.4, count),
                         "reduction_vs_flexmoe": rng.uniform(-0.2, 0.4, count),
                         "phase_a2a_forward_s": rng.uniform(0, 0.1, count),
                         "phase_expert_forward_s": rng.uniform(0, 0.1, count)})


def _tick_labels(ax) -> list[str]:
    return [label.get_text() for label in ax.get_xticklabels()]


def _stack_tops(ax) -> list[float]:
    tops: dict[int, float] = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), patch.get_y() + patch.get_height())
    return [tops[x] for x in sorted(tops)]


@pytest.mark.parametrize("seed", range(5))
def test_study_bars_are_ranked_best_first(seed: int) -> None:
    summary = _summary(seed)
    ax_target, ax_phase = comparison_figure(summary.assign(trace="t"), "t").axes[:2]
    heights = [patch.get_height() for patch in ax_target.patches]
    assert heights == sorted(heights) and len(heights) == len(POLICIES)
    assert _tick_labels(ax_target) == summary.sort_values("time_to_target_s")["policy"].tolist()
    # the phase panel by iteration wall time, fastest first
    assert _tick_labels(ax_phase) == summary.sort_values("mean_time_s")["policy"].tolist()

    ax = speedup_figure(summary.assign(trace="t")).axes[0]
    ranked = summary[summary["policy"] != "static"].sort_values("reduction_vs_static", ascending=False)
    assert _tick_labels(ax) == ranked["policy"].tolist()
    vs_static = [patch.get_height() for patch in ax.patches if to_rgba(patch.get_facecolor()) ==
                 to_rgba(policy_colour("static"))]
    assert vs_static == pytest.approx(sorted(vs_static, reverse=True))

    table = pd.concat([summary.assign(point=f"p{gpus}", num_gpus=gpus) for gpus in (16, 64)])
    for ax in phases_figure(table).axes[:2]:
        tops = _stack_tops(ax)
        assert _tick_labels(ax) == summary.sort_values("mean_time_s")["policy"].tolist()
        assert len(tops) == len(POLICIES)


def test_phases_take_the_same_colour_in_every_study() -> None:
    summary = _summary(0)
    colours = {column: to_rgba(phase_colour(column)) for column in ("phase_a2a_forward_s", "phase_expert_forward_s")}
    assert phase_colours(list(colours)) == {column: phase_colour(column) for column in colours}
    for ax in (comparison_figure(summary.assign(trace="t"), "t").axes[1],
               phases_figure(summary.assign(point="p", num_gpus=16)).axes[0]):
        legend = {handle.get_label(): to_rgba(handle.patches[0].get_facecolor())
                  for handle in ax.containers}
        assert legend == {"a2a forward": colours["phase_a2a_forward_s"],
                          "expert forward": colours["phase_expert_forward_s"]}


def _log_axes_say_so(fig: Figure) -> int:
    checked = 0
    for ax in fig.axes:
        for scale, label in ((ax.get_xscale(), ax.get_xlabel()), (ax.get_yscale(), ax.get_ylabel())):
            if scale == "log" and ax.get_visible():
                assert "(log scale)" in label, label
                checked += 1
    return checked


def test_every_logarithmic_axis_is_labelled_as_such() -> None:
    assert LOG_SCALE == " (log scale)"
    summary = _summary(1)
    time_table = pd.concat([summary.assign(family="f", num_gpus=gpus) for gpus in (16, 64, 256)])
    assert _log_axes_say_so(time_to_target_figure(time_table)) == 3  # GPUs twice, time to target once

    validation = pd.DataFrame({"policy": ["static", "symi"], "half": ["calibration", "held-out"],
                               **{f"{name}_{kind}_ms": [10.0, 20.0] for name in
                                  ("step", "expert_compute", "all_to_all", "expert_state")
                                  for kind in ("measured", "predicted")}})
    assert _log_axes_say_so(sim_validation_figure(validation)) == 4

    rows = [{"axis": axis, "value": value, "trace": "synthetic", "trace_skew": 2.0, "policy": policy,
             "time_to_target_s": 100.0 + value, "survival": 0.5, "speedup_vs_static": 1.0}
            for axis, values in (("slots", (2, 4)), (aux_loss.AXIS, (1e-5, 1e-2))) for value in values
            for policy in ("static", "symi")]
    assert _log_axes_say_so(sensitivity_figure(pd.DataFrame(rows))) == 3  # the aux-loss column's 3 panels


def _cf_rows(steps: dict[tuple[str, float], int | None]) -> list[dict]:
    return [{"policy": policy, "capacity_factor": cf, "survival": 0.5 + 0.1 * cf, "steps_to_target": value}
            for (policy, cf), value in steps.items()]


def test_capacity_factor_steps_panel_shows_close_values_apart() -> None:
    steps = {("static", 1.0): 274, ("symi", 1.0): 250, ("static", 2.0): 262, ("symi", 2.0): None}
    ax_steps = survival_steps_figure(_cf_rows(steps), ["static", "symi"], 2.8).axes[1]
    lo, hi = ax_steps.get_ylim()
    assert 200 < lo < 250 < 274 < hi
    # 250 against 274: a difference of at least a quarter of the axis, not 9% of a bar
    assert (274 - 250) / (hi - lo) > 0.25
    tops = sorted(patch.get_y() + patch.get_height() for patch in ax_steps.patches)
    assert tops == pytest.approx([lo, 250, 262, 274])  # the unreached run: no bar, only its label
    assert "not reached" in [text.get_text() for text in ax_steps.texts]
    assert f"axis from {lo:g}" in ax_steps.get_ylabel()


def test_steps_axis_limits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = [int(v) for v in rng.integers(1, 1000, rng.integers(1, 6))]
        lo, hi = steps_axis_limits([*values, None])
        assert 0 <= lo < min(values) <= max(values) < hi
        assert lo == 0 or lo >= 0.5 * max(values)  # cut only where the values are close
        assert (max(values) - lo) / (hi - lo) <= 0.9  # room above the tallest bar for its label
    assert steps_axis_limits([None]) == (0.0, 1.0)
    assert steps_axis_limits([10, 400])[0] == 0.0
