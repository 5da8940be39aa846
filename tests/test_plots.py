import inspect
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from symi_sim.figures import policy_figures, registry, training_figures
from symi_sim.figures.colours import policy_colour
from symi_sim.figures.registry import save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _comparison_table() -> pd.DataFrame:
    return pd.DataFrame({
        "policy": ["static", "symi", "symi-balanced"],
        "time_to_target_s": [300.0, 240.0, 200.0],
        "mean_time_s": [0.50, 0.45, 0.42],
        "dropped_fraction": [0.55, 0.30, 0.02],
        "phase_dispatch_s": [0.10, 0.10, 0.09],
        "phase_expert_compute_s": [0.20, 0.15, 0.13],
        "phase_grad_sync_s": [0.10, 0.12, 0.12],
        "other": [1, 2, 3],
    })


def _replay_table() -> pd.DataFrame:
    return pd.DataFrame({
        "policy": ["static", "symi", "eplb"],
        "imbalance": [1.0, 2.3, 1.2],
        "dropped_fraction": [0.55, 0.30, 0.25],
        "plan_ms_median": [0.01, 0.4, 30.0],
    })



def test_phase_columns_and_names():
    table = _comparison_table()
    assert policy_figures.phase_columns(table) == ["phase_dispatch_s", "phase_expert_compute_s", "phase_grad_sync_s"]
    assert policy_figures.phase_name("phase_grad_sync_s") == "grad sync"
    assert policy_figures.phase_columns(pd.DataFrame(columns=["phase__s", "phase_x", "x_s"])) == []


def test_comparison_figure(tmp_path):
    table = _comparison_table()
    fig = policy_figures.draw_comparison(table)
    ax_target, ax_phase = fig.axes
    assert len(fig.axes) == 2
    # ranked, least time first; speed-ups vs static: 300/200, 300/240, 300/300
    assert [text.get_text() for text in ax_target.texts] == ["1.50x", "1.25x", "1.00x"]
    assert [patch.get_height() for patch in ax_target.patches] == [200.0, 240.0, 300.0]
    assert "speed-up vs static" in ax_target.get_title()
    assert ax_target.get_ylabel() == "time to target loss (s)"
    assert ax_phase.get_ylabel() == "seconds per iteration (s)"
    # 3 phases x 3 policies stacked, ranked by iteration wall time (0.42, 0.45, 0.50): the tops of the stacks are
    # the per-policy sums
    assert len(ax_phase.patches) == 9
    tops = {}
    for patch in ax_phase.patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), patch.get_y() + patch.get_height())
    np.testing.assert_allclose([tops[0], tops[1], tops[2]], [0.34, 0.37, 0.40])
    legend = [text.get_text() for text in ax_phase.get_legend().get_texts()]
    assert legend == ["dispatch", "expert compute", "grad sync", "iteration wall time"]
    assert [label.get_text() for label in ax_phase.get_xticklabels()] == ["symi-balanced", "symi", "static"]

    path = tmp_path / "out" / "comparison.png"
    save_figure("comparison", table, path)
    assert _png_size(path) == (1100, 495)  # 10 x 4.5 in at 110 dpi
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind


def test_comparison_without_static_labels_seconds():
    table = _comparison_table().iloc[1:]
    ax_target = policy_figures.draw_comparison(table).axes[0]
    assert [text.get_text() for text in ax_target.texts] == ["200 s", "240 s"]
    assert "speed-up" not in ax_target.get_title()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: t.drop(columns="mean_time_s"), "missing column"),
        (lambda t: t.iloc[:0], "empty"),
        (lambda t: t.drop(columns=policy_figures.phase_columns(t)), "phase_"),
        (lambda t: t.assign(policy=["static", "symi", "symi"]), "repeated"),
        (lambda t: t.assign(time_to_target_s=[300.0, np.nan, 200.0]), "'symi' has nan"),
        (lambda t: t.assign(phase_dispatch_s=[0.1, -0.1, 0.1]), "phase_dispatch_s"),
        (lambda t: t.assign(time_to_target_s=[300.0, 0.0, 200.0]), "> 0"),
    ],
)
def test_comparison_bad_input_writes_nothing(tmp_path, mutate, match):
    path = tmp_path / "comparison.png"
    with pytest.raises(ValueError, match=match):
        save_figure("comparison", mutate(_comparison_table()), path)
    assert list(tmp_path.iterdir()) == []


def test_comparison_rejects_non_png_path_and_non_table(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure("comparison", _comparison_table(), tmp_path / "figure.pdf")
    with pytest.raises(ValueError, match="DataFrame"):
        save_figure("comparison", {"policy": ["static"]}, tmp_path / "figure.png")
    assert list(tmp_path.iterdir()) == []


def test_replay_figure(tmp_path):
    fig = policy_figures.draw_replay(_replay_table())
    ax_imbalance, ax_dropped = fig.axes
    assert len(fig.axes) == 2
    # each panel ranked by its own value, best (lowest) first
    assert [patch.get_height() for patch in ax_imbalance.patches] == [1.0, 1.2, 2.3]
    np.testing.assert_allclose([patch.get_height() for patch in ax_dropped.patches], [25.0, 30.0, 55.0])
    assert [text.get_text() for text in ax_dropped.texts] == ["25.0%", "30.0%", "55.0%"]
    assert [label.get_text() for label in ax_imbalance.get_xticklabels()] == [
        "static\n(plan 0.01 ms)", "eplb\n(plan 30 ms)", "symi\n(plan 0.4 ms)"]
    assert [label.get_text() for label in ax_dropped.get_xticklabels()] == ["eplb", "symi", "static"]
    assert policy_figures.replication_note(_replay_table()) is None  # the table does not say: no note
    assert not [text for text in fig.texts if "slot" in text.get_text()]
    assert "max / mean" in ax_imbalance.get_ylabel()
    path = tmp_path / "replay.png"
    save_figure("replay", _replay_table(), path)
    assert _png_size(path) == (990, 440)  # 9 x 4 in at 110 dpi


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: t.drop(columns="plan_ms_median"), "missing column"),
        (lambda t: t.iloc[:0], "empty"),
        (lambda t: t.assign(imbalance=["a", 1.0, 1.0]), "imbalance"),
    ],
)
def test_replay_bad_input_writes_nothing(tmp_path, mutate, match):
    with pytest.raises(ValueError, match=match):
        save_figure("replay", mutate(_replay_table()), tmp_path / "replay.png")
    assert list(tmp_path.iterdir()) == []


def test_expert_share():
    counts_SLE = np.array([[[1, 3], [0, 0]], [[2, 2], [5, 0]]])
    np.testing.assert_allclose(training_figures.expert_share_SLE(counts_SLE.astype(float)),
                               [[[0.25, 0.75], [0.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]]])


def test_load_heatmap(tmp_path):
    counts_SLE = np.zeros((5, 6, 3))
    counts_SLE[:, :, 0] = 1.0
    counts_SLE[:, :, 2] = 3.0
    counts_SLE[4, 5] = [0.0, 8.0, 0.0]
    fig = training_figures.draw_heatmap(counts_SLE, layers=[0, 5])
    assert len(fig.axes) == 3  # two layer panels + the colour bar
    ax_first, ax_last = fig.axes[:2]
    assert [ax_first.get_title(), ax_last.get_title()] == ["layer 0", "layer 5"]
    image = ax_last.get_images()[0].get_array()
    assert image.shape == (3, 5)  # experts on y, steps on x
    np.testing.assert_allclose(image[:, 0], [0.25, 0.0, 0.75])
    np.testing.assert_allclose(image[:, 4], [0.0, 1.0, 0.0])
    assert ax_last.get_xlabel() == "training step"

    path = tmp_path / "heat.png"
    save_figure("heatmap", counts_SLE, path, layers=[0, 5])
    assert _png_size(path) == (880, 550)  # 8 x (1.2 + 2 * 1.9) in at 110 dpi
    # default layers: up to 4 spread over the depth, first and last included: linspace(0, 5, 4) rounded
    default = training_figures.draw_heatmap(training_figures.check_heatmap(counts_SLE))
    assert [ax.get_title() for ax in default.axes[:-1]] == ["layer 0", "layer 2", "layer 3", "layer 5"]


@pytest.mark.parametrize(
    "counts,layers,match",
    [
        (np.ones((4, 3)), None, "3-D"),
        (np.ones((0, 2, 3)), None, "empty"),
        (np.full((2, 2, 3), -1.0), None, "step 0 layer 0 expert 0"),
        (np.full((2, 2, 3), np.nan), None, ">= 0"),
        (np.ones((2, 2, 3)), [2], "layer 2"),
        (np.ones((2, 2, 3)), [], "empty"),
        (np.ones((2, 2, 3)), [1, 1], "repeats"),
        (np.ones((2, 2, 3)), [True], "layer True"),
    ],
)
def test_load_heatmap_bad_input_writes_nothing(tmp_path, counts, layers, match):
    with pytest.raises(ValueError, match=match):
        save_figure("heatmap", counts, tmp_path / "heat.png", layers=layers)
    assert list(tmp_path.iterdir()) == []


def _steps_table() -> pd.DataFrame:
    # policy b's rows come out of step order: the timeline sorts them, the CDFs sort the values
    return pd.DataFrame({
        "policy": ["a", "a", "a", "b", "b", "b"],
        "step": [1, 2, 3, 3, 1, 2],
        "time_s": [0.5, 0.7, 0.6, 0.9, 0.8, 1.0],
        "imbalance": [1.5, 1.0, 2.0, 1.1, 1.3, 1.2],
        "dropped_fraction": [0.25, 0.0, 0.5, 0.1, 0.3, 0.2],
    })


def test_ecdf():
    x, y = policy_figures.ecdf(np.array([3.0, 1.0, 2.0, 2.0]))
    np.testing.assert_allclose(x, [1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(y, [0.25, 0.5, 0.75, 1.0])


def test_cdf_figure(tmp_path):
    fig = policy_figures.draw_cdf(_steps_table())
    ax_imbalance, ax_dropped = fig.axes
    assert [line.get_label() for line in ax_imbalance.get_lines() if not line.get_label().startswith("_")] == [
        "a", "b"]
    line_a, line_b = (line for line in ax_imbalance.get_lines() if not line.get_label().startswith("_"))
    np.testing.assert_allclose(line_a.get_xdata(), [1.0, 1.5, 2.0])
    np.testing.assert_allclose(line_b.get_xdata(), [1.1, 1.2, 1.3])
    np.testing.assert_allclose(line_a.get_ydata(), [1 / 3, 2 / 3, 1.0])
    dropped_a = ax_dropped.get_lines()[0]
    np.testing.assert_allclose(dropped_a.get_xdata(), [0.0, 25.0, 50.0])  # percent
    assert ax_imbalance.get_xlabel() == "GPU load imbalance (max / mean tokens)"
    assert ax_dropped.get_xlabel() == "dropped tokens (% of assignments)"
    assert ax_imbalance.get_ylabel() == "fraction of iterations (CDF)"
    assert [text.get_text() for text in ax_dropped.get_legend().get_texts()] == ["a", "b"]
    path = tmp_path / "cdf.png"
    save_figure("cdf", _steps_table(), path)
    assert _png_size(path) == (1100, 440)


def test_timeline_figure(tmp_path):
    ax = policy_figures.draw_timeline(_steps_table()).axes[0]
    line_a, line_b = ax.get_lines()
    assert (line_a.get_label(), line_b.get_label()) == ("a", "b")
    np.testing.assert_allclose(line_b.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(line_b.get_ydata(), [0.8, 1.0, 0.9])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "iteration time (s)")
    path = tmp_path / "timeline.png"
    save_figure("timeline", _steps_table(), path)
    assert _png_size(path) == (990, 440)


def _metrics_table() -> pd.DataFrame:
    return pd.DataFrame({"step": [0, 2, 1], "loss": [5.0, 3.0, 4.0], "step_s": [0.5, 1.0, 0.25],
                         "dropped_fraction": [0.1, 0.3, 0.2]})


def test_loss_figure(tmp_path):
    fig = training_figures.draw_loss(_metrics_table(), label="policy symi")
    ax_wall, ax_step = fig.axes
    # sorted by step: step_s 0.5, 0.25, 1.0 -> wall time at the end of each step 0.5, 0.75, 1.75
    np.testing.assert_allclose(ax_wall.get_lines()[0].get_xdata(), [0.5, 0.75, 1.75])
    np.testing.assert_allclose(ax_wall.get_lines()[0].get_ydata(), [5.0, 4.0, 3.0])
    np.testing.assert_allclose(ax_step.get_lines()[0].get_xdata(), [0, 1, 2])
    assert ax_wall.get_xlabel() == "wall time (s, sum of step times)"
    assert ax_step.get_xlabel() == "training step"
    assert "loss" in ax_wall.get_ylabel()
    assert fig.get_suptitle() == "Training loss (policy symi)"
    path = tmp_path / "loss.png"
    save_figure("loss", _metrics_table(), path)
    assert _png_size(path) == (1100, 440)


def test_dropped_figure(tmp_path):
    ax = training_figures.draw_dropped(_metrics_table()).axes[0]
    per_step, mean = ax.get_lines()
    np.testing.assert_allclose(per_step.get_ydata(), [10.0, 20.0, 30.0])
    np.testing.assert_allclose(mean.get_ydata(), [20.0, 20.0])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["per step", "mean 20.00%"]
    assert ax.get_ylabel() == "dropped tokens (% of assignments)"
    path = tmp_path / "dropped.png"
    save_figure("dropped", _metrics_table(), path)
    assert _png_size(path) == (990, 440)


@pytest.mark.parametrize(
    "figure,table,match",
    [
        ("cdf", _steps_table().drop(columns="imbalance"), "missing column"),
        ("cdf", _steps_table().iloc[:0], "empty"),
        ("cdf", _steps_table().assign(dropped_fraction=[0, 0, 0, 0, 0, 1.5]), r"in \[0, 1\]; policy 'b'"),
        ("cdf", _steps_table().assign(step=[1, 2, 3, 3, 1, 1]), "policy 'b', step 1"),
        ("timeline", _steps_table().assign(step=[1, 2, 3.5, 3, 1, 2]), "whole numbers"),
        ("timeline", _steps_table().assign(time_s=[1, 1, 1, 1, 1, -1]), "row 6 has -1"),
        ("loss", _metrics_table().assign(loss=[1.0, np.inf, 1.0]), "'loss' must hold finite numbers"),
        ("loss", _metrics_table().assign(step=[0, 0, 1]), "more than one row for step 0"),
        ("dropped", _metrics_table().drop(columns="dropped_fraction"), "missing column"),
        ("dropped", [1, 2], "DataFrame"),
    ],
)
def test_step_figures_bad_input_writes_nothing(tmp_path, figure, table, match):
    with pytest.raises(ValueError, match=match):
        save_figure(figure, table, tmp_path / "figure.png")
    assert list(tmp_path.iterdir()) == []


def test_loss_accepts_negative_loss_but_not_negative_time():
    training_figures.check_loss(_metrics_table().assign(loss=[-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="'step_s' must hold finite numbers >= 0"):
        training_figures.check_loss(_metrics_table().assign(step_s=[0.1, -0.1, 0.1]))


def test_detect_run(tmp_path):
    for kind, marker in registry.RUN_MARKERS.items():
        (tmp_path / kind).mkdir()
        (tmp_path / kind / marker).write_text("x")
        assert registry.detect_run(tmp_path / kind) == kind
    (tmp_path / "x.CSV").write_text("x")
    assert registry.detect_run(tmp_path / "x.CSV") == "trace"
    assert registry.run_figure_kinds(tmp_path / "train") == ("train", ["loss", "dropped"])
    (tmp_path / "train" / "trace.parquet").write_text("x")
    assert registry.run_figure_kinds(tmp_path / "train") == ("train", ["loss", "heatmap", "dropped"])
    with pytest.raises(ValueError, match="not a symi run directory"):
        registry.detect_run(tmp_path)


def test_free_png(tmp_path):
    assert registry._free_png(tmp_path, "cdf", set()) == tmp_path / "cdf.png"
    (tmp_path / "cdf.png").write_bytes(b"")
    (tmp_path / "cdf-2.png").write_bytes(b"")
    assert registry._free_png(tmp_path, "cdf", {tmp_path / "cdf-3.png"}) == tmp_path / "cdf-4.png"


def test_plot_run_removes_its_figures_when_a_later_write_fails(tmp_path, monkeypatch):
    run = tmp_path / "train"
    run.mkdir()
    _metrics_table().to_csv(run / "metrics.csv", index=False)
    saved = []
    real_save = registry._save

    def failing_save(fig, path):
        if saved:
            raise OSError("disk full")
        real_save(fig, path)
        saved.append(path)

    monkeypatch.setattr(registry, "_save", failing_save)
    with pytest.raises(ValueError, match=f"cannot write '{run / 'dropped.png'}': disk full"):
        registry.plot_run(run)
    assert saved == [run / "loss.png"]  # it was written, then removed
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]


# ---------------------------------------------------------------- one colour per policy, one registry of figures


POLICIES = ["static", "symi", "symi-balanced", "flexmoe-10", "flexmoe-50", "symi-balanced:shares=live"]


def _bar_colours(ax) -> dict[str, tuple]:
    """{policy: face colour} of a bar panel, the policy read from its tick label (before a newline or ' (')."""
    labels = [label.get_text().split("\n")[0].split(" (")[0] for label in ax.get_xticklabels()]
    centres = [patch.get_x() + patch.get_width() / 2 for patch in ax.patches]
    return {labels[round(x)]: to_rgba(patch.get_facecolor()) for x, patch in zip(centres, ax.patches, strict=True)}


def _line_colours(ax) -> dict[str, tuple]:
    return {line.get_label().split(" (")[0]: to_rgba(line.get_color()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_a_policy_has_the_same_colour_in_every_figure_and_study():
    from experiments.paper_comparison.study import comparison_figure
    from experiments.scale_out.study import time_to_target_figure

    rng = np.random.default_rng(3)
    count = len(POLICIES)
    summary = pd.DataFrame({"policy": POLICIES, "time_to_target_s": rng.uniform(100, 300, count),
                            "mean_time_s": rng.uniform(0.3, 0.6, count), "dropped_fraction": rng.uniform(0, 0.5, count),
                            "phase_a2a_forward_s": rng.uniform(0, 0.1, count), "plan_ms_median": 1.0,
                            "imbalance": rng.uniform(1, 2, count), "speedup_vs_static": 1.0})
    steps = pd.DataFrame({"policy": np.repeat(POLICIES, 3), "step": np.tile([1, 2, 3], count),
                          "time_s": rng.uniform(0.1, 1, 3 * count), "imbalance": rng.uniform(1, 2, 3 * count),
                          "dropped_fraction": rng.uniform(0, 1, 3 * count)})
    expected = {policy: to_rgba(policy_colour(policy)) for policy in POLICIES}
    assert len(set(expected.values())) == count  # the two flexmoe periods and the symi-balanced variant differ

    seen = [_bar_colours(policy_figures.draw_comparison(summary).axes[0]),
            *(_bar_colours(ax) for ax in policy_figures.draw_replay(summary).axes),
            *(_line_colours(ax) for ax in policy_figures.draw_cdf(steps).axes),
            _line_colours(policy_figures.draw_timeline(steps).axes[0]),
            # the same policies in another order keep their colours
            _bar_colours(policy_figures.draw_comparison(summary.iloc[::-1]).axes[0]),
            _bar_colours(comparison_figure(summary.assign(trace="t"), "t").axes[0]),
            _line_colours(time_to_target_figure(pd.concat(
                [summary.assign(family="f", num_gpus=gpus) for gpus in (16, 64)])).axes[0])]
    for colours in seen:
        assert colours == expected
    # a train run's lines take its policy's colour
    for figure in (training_figures.draw_loss, training_figures.draw_dropped):
        line = figure(_metrics_table(), label="policy flexmoe-50").axes[0].get_lines()[0]
        assert to_rgba(line.get_color()) == expected["flexmoe-50"]


def test_every_figure_applies_to_a_run_kind_whose_marker_is_known():
    assert set(registry.RUN_KIND_NAMES) == {*registry.RUN_MARKERS, registry.TRACE}
    for name, spec in registry.FIGURES.items():
        assert spec.name == name
        assert spec.sources, f"figure {name!r} applies to no run kind"
        assert set(spec.sources) <= set(registry.RUN_KIND_NAMES), name
        assert set(spec.optional) <= set(spec.sources), name
        for deferred in (spec.read, spec.check, spec.draw):
            assert callable(deferred.resolve()), (name, deferred)
        keyword_only = {parameter.name for parameter in inspect.signature(spec.draw.resolve()).parameters.values()
                        if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(spec.options) == keyword_only, name
    for run_kind, marker in registry.RUN_MARKERS.items():
        assert marker in {registry.FIGURES[name].sources[run_kind] for name in registry.figure_names(run_kind)}
    # the drawing order of each kind of run (plot_run's output order)
    assert {kind: registry.figure_names(kind) for kind in registry.RUN_KIND_NAMES} == {
        "simulate": ["comparison", "cdf", "timeline"], "replay": ["replay", "cdf"],
        "train": ["loss", "heatmap", "dropped"], "trace": ["heatmap"]}


def test_help_text_from_the_registry_without_matplotlib_or_pandas():
    probe = ("import json, sys; from symi_sim.figures import registry; text = registry.plot_kinds_help(); "
             "print(json.dumps([text, sorted(m for m in ('matplotlib', 'pandas', 'numpy') if m in sys.modules)]))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    text, heavy = json.loads(result.stdout)
    assert heavy == []
    assert text == ("simulate runs: comparison, cdf, timeline; plan --replay runs: replay, cdf; train runs: loss, "
                    "heatmap (needs trace.parquet), dropped; a trace file: heatmap")


def test_save_figure_refuses_unknown_figures_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown figure kind 'pie'; choices: comparison, replay"):
        save_figure("pie", _replay_table(), tmp_path / "pie.png")
    with pytest.raises(TypeError, match=r"takes no option\(s\) \['label'\]"):
        save_figure("replay", _replay_table(), tmp_path / "replay.png", label="x")
    assert save_figure("loss", _metrics_table(), tmp_path / "loss.png", label="policy x") == tmp_path / "loss.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


# ---------------------------------------------------------------- issue 12: visible lines, honest labels and notes


def test_cdf_lines_never_share_colour_style_and_marker_and_coinciding_ones_are_named():
    for count in (2, 5, 9):
        names = [f"p{index}" for index in range(count - 1)] + ["flexmoe-10"]
        steps = pd.DataFrame({"policy": np.repeat(names, 4), "step": np.tile([1, 2, 3, 4], count),
                              "imbalance": np.tile([1.0, 1.5, 2.0, 1.2], count), "dropped_fraction": 0.25})
        for ax in policy_figures.draw_cdf(steps).axes:
            lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
            assert len(lines) == count
            keys = {(to_rgba(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines}
            assert len(keys) == count
            # every line coincides: each later one is drawn thinner on top, so all stay visible
            widths = [line.get_linewidth() for line in lines]
            assert widths == sorted(widths, reverse=True) and len(set(widths)) == count
        legend = [text.get_text() for text in policy_figures.draw_cdf(steps).axes[1].get_legend().get_texts()]
        assert legend == ["p0", *(f"{name} (dropped = p0)" for name in names[1:])]


def test_replay_notes_a_configuration_with_no_spare_slot():
    def notes(table: pd.DataFrame) -> list[str]:
        return [text.get_text() for text in policy_figures.draw_replay(table).texts if "slot" in text.get_text()]

    assert notes(_replay_table().assign(num_experts=64, num_slots=64)) == [
        policy_figures.replication_note(_replay_table().assign(num_experts=64, num_slots=64))]
    assert "64 experts on 64 slots" in notes(_replay_table().assign(num_experts=64, num_slots=64))[0]
    assert notes(_replay_table().assign(num_experts=16, num_slots=64)) == []


def test_replay_run_of_64_experts_on_64_slots_carries_the_note(tmp_path):
    from symi_sim.cluster import load_cluster
    from symi_sim.simulator.replay import replay
    from symi_sim.traces.format import read_trace

    trace = read_trace(Path(__file__).resolve().parents[1] / "traces" / "olmoe-domains.parquet")
    _, summary = replay(trace, load_cluster("paper-a100-16"), ["static", "symi"])
    assert (summary["num_experts"].tolist(), summary["num_slots"].tolist()) == ([64, 64], [64, 64])
    assert policy_figures.replication_note(summary).startswith("64 experts on 64 slots")
    _, roomy = replay(trace, load_cluster("paper-a100-16", slots_per_gpu=8), ["static"])
    assert policy_figures.replication_note(roomy) is None


def test_heatmap_names_domains_and_original_layers_from_the_trace():
    from symi_sim.traces.format import LoadTrace, read_trace

    olmoe = read_trace(Path(__file__).resolve().parents[1] / "traces" / "olmoe-domains.parquet")
    fig = training_figures.draw_heatmap(training_figures.check_heatmap(olmoe))
    panels = fig.axes[:-1]
    assert [ax.get_title() for ax in panels] == ["layer 0 of the model", "layer 7 of the model",
                                                 "layer 15 of the model"]
    assert [label.get_text() for label in panels[-1].get_xticklabels()] == ["arxiv", "book", "c4", "github",
                                                                            "wikipedia"]
    assert "domain" in panels[-1].get_xlabel() and "training step" not in panels[-1].get_xlabel()
    # metadata stored as lists (today's importer) or as their text (older files), or bad: then plain indices
    counts_SLE = np.ones((2, 2, 3), dtype=np.int64)
    for meta, titles, xlabel in (
        ({"domains": ["a", "b"], "original_layers": [3, 9]}, ["layer 3 of the model", "layer 9 of the model"],
         "text domain (one step per domain)"),
        ({"domains": "['a', 'b']", "original_layers": "[3, 9]"}, ["layer 3 of the model", "layer 9 of the model"],
         "text domain (one step per domain)"),
        ({"domains": ["a"], "original_layers": [3, "x"]}, ["layer 0", "layer 1"], "training step"),
        ({"domains": "__import__('os')", "original_layers": 5}, ["layer 0", "layer 1"], "training step"),
    ):
        fig = training_figures.draw_heatmap(LoadTrace(counts_SLE=counts_SLE, meta=meta))
        assert [ax.get_title() for ax in fig.axes[:-1]] == titles
        assert fig.axes[-2].get_xlabel() == xlabel
