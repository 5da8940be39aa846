"""`symi plot` through click's CliRunner on small run directories made here: a real `symi simulate` run, a real
`symi plan --replay` run, and a hand-written train run (metrics.csv, config.json, trace.parquet)."""

import json
import shutil
import struct

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import LoadTrace, write_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COUNTS_SLE = np.random.default_rng(0).multinomial(64, [0.4, 0.3, 0.2, 0.1], size=(6, 2))  # 6 steps, 2 layers


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _plot(*args: str):
    return CliRunner().invoke(symi, ["plot", *args])


def _files(root) -> dict[str, bytes]:
    """Every file under root (hidden temporaries included) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _error_line(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Pristine run directories, made once; tests copy them (see `runs`)."""
    root = tmp_path_factory.mktemp("made")
    trace = root / "t.parquet"
    write_trace(LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=64), trace)
    result = CliRunner().invoke(symi, [
        "simulate", "--trace", str(trace), "--cluster", "cpu-4", "--slots", "2", "--model", "gpt-small",
        "--fit-model-to-trace", "--policies", "static,symi", "--steps", "5", "--out", str(root / "sim")])
    assert result.exit_code == 0, result.output
    cluster = root / "toy.toml"
    cluster.write_text("num_nodes = 1\ngpus_per_node = 4\nslots_per_gpu = 2\n")
    result = CliRunner().invoke(symi, ["plan", "--trace", str(trace), "--cluster", str(cluster), "--replay",
                                       "--policies", "static,symi,eplb", "--out", str(root / "replay")])
    assert result.exit_code == 0, result.output

    train = root / "train"
    train.mkdir()
    # the columns symi train writes that the figures use, plus one it does not
    pd.DataFrame({"step": [0, 1, 2, 3], "loss": [5.5, 4.0, 3.5, 3.0], "step_s": [0.5, 0.25, 0.25, 0.5],
                  "dropped_fraction": [0.2, 0.4, 0.1, 0.1], "lr": [3e-3] * 4}).to_csv(train / "metrics.csv",
                                                                                        index=False)
    (train / "config.json").write_text(json.dumps({"train": {"policy": "symi", "steps": 4}}))
    write_trace(LoadTrace(COUNTS_SLE[:4], top_k=1, tokens_per_step=64), train / "trace.parquet")
    shutil.copytree(train, root / "train-no-trace")
    (root / "train-no-trace" / "trace.parquet").unlink()
    return root


@pytest.fixture()
def runs(made, tmp_path):
    shutil.copytree(made, tmp_path / "runs")
    return tmp_path / "runs"


def test_simulate_run_all_figures_without_overwriting(runs):
    sim = runs / "sim"
    before = _files(sim)
    result = _plot(str(sim))
    assert result.exit_code == 0, result.output
    # comparison.png is simulate's own: ours goes next to it, and it stays as it was
    assert result.output.splitlines() == [f"wrote {sim / name}" for name in ("comparison-2.png", "cdf.png",
                                                                             "timeline.png")]
    after = _files(sim)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == ["cdf.png", "comparison-2.png", "timeline.png"]
    assert _png_size(sim / "comparison-2.png") == (1100, 495)  # the comparison figure's 10 x 4.5 in at 110 dpi
    assert _png_size(sim / "cdf.png") == (1100, 440)
    assert _png_size(sim / "timeline.png") == (990, 440)

    # again: new names, the first figures untouched
    result = _plot(str(sim), "--kind", "cdf")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"wrote {sim / 'cdf-2.png'}"]
    assert _files(sim)["cdf.png"] == after["cdf.png"]


def test_kinds_and_out_directory(runs, tmp_path):
    sim, out = runs / "sim", tmp_path / "figures" / "sim"
    before = _files(sim)
    result = _plot(str(sim), "--kind", "timeline,cdf", "--kind", "cdf", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cdf.png", "timeline.png"]
    assert _files(sim) == before


def test_replay_run(runs):
    replay = runs / "replay"
    result = _plot(str(replay))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"wrote {replay / 'replay-2.png'}", f"wrote {replay / 'cdf.png'}"]
    assert _png_size(replay / "replay-2.png") == (990, 440)
    assert _png_size(replay / "cdf.png") == (1100, 440)


def test_train_run(runs):
    train = runs / "train"
    result = _plot(str(train))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"wrote {train / name}" for name in ("loss.png", "heatmap.png",
                                                                               "dropped.png")]
    assert _png_size(train / "loss.png") == (1100, 440)
    assert _png_size(train / "heatmap.png") == (880, 550)  # 8 x (1.2 + 2 layers x 1.9) in
    assert _png_size(train / "dropped.png") == (990, 440)


def test_train_run_without_trace_skips_the_heatmap_and_refuses_it(runs):
    train = runs / "train-no-trace"
    result = _plot(str(train))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in train.glob("*.png")) == ["dropped.png", "loss.png"]
    before = _files(train)
    line = _error_line(_plot(str(train), "--kind", "loss,heatmap"))
    assert "'heatmap' does not apply" in line and "--record-trace" in line
    assert _files(train) == before  # not even loss-2.png


def test_trace_file_heatmap(runs, tmp_path):
    result = _plot(str(runs / "t.parquet"), "--kind", "heatmap")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"wrote {runs / 't-heatmap.png'}"]
    assert _png_size(runs / "t-heatmap.png") == (880, 550)
    result = _plot(str(runs / "t.parquet"), "--out", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["t-heatmap.png"]


def _write(path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


@pytest.mark.parametrize(("target", "args", "setup", "message"), [
    ("missing", [], None, "'{runs}/missing' does not exist"),
    (".", [], None, "is not a symi run directory: it has none of iterations.parquet (simulate)"),
    ("toy.toml", [], None, "is a file but not a trace"),
    ("sim", ["--kind", "replay"], None, "figure 'replay' does not apply to simulate"),
    ("replay", ["--kind", "timeline"], None, "it takes: replay, cdf"),
    ("train", ["--kind", "loss,bogus"], None, "unknown figure kind(s) ['bogus']; choices: comparison"),
    ("train", ["--kind", ","], None, "no figure kind named in --kind"),
    ("t.parquet", ["--kind", "loss"], None, "figure 'loss' does not apply to trace"),
    ("sim", ["--out", "{runs}/toy.toml"], None, "exists and is not a directory"),
    ("sim", ["--out", "{runs}/toy.toml/figures"], None, "cannot write '{runs}/toy.toml/figures/comparison.png'"),
    ("sim", [], ("sim/steps.csv", "policy\n"), "is ambiguous: it has iterations.parquet and steps.csv"),
    # corrupt tables: the figures that could be drawn are not drawn either
    ("sim", [], ("sim/iterations.parquet", b"PAR1 not really"), "iterations.parquet' is not a readable table"),
    ("sim", ["--kind", "comparison"], ("sim/summary.csv", "policy,mean_time_s\nstatic,1\n"),
     "summary.csv': simulation summary is missing column(s) ['time_to_target_s', 'dropped_fraction']"),
    ("replay", [], ("replay/steps.csv", "policy,step,imbalance,dropped_fraction\nstatic,1,1.2,0.5\nstatic,2,x,0\n"),
     "column 'imbalance' must hold finite numbers >= 0; policy 'static', row 2 has 'x'"),
    ("replay", [], ("replay/steps.csv", "policy,step,imbalance,dropped_fraction\nstatic,1,1.2,0.5\nstatic,1,1,0\n"),
     "more than one row for policy 'static', step 1"),
    ("replay", [], ("replay/steps.csv", b"\x00\xff\xfe garbage\n\"unterminated"), "steps.csv' is not a readable table"),
    ("train", [], ("train/metrics.csv", ""), "metrics.csv' is not a readable table"),
    ("train", [], ("train/metrics.csv", "step,loss,step_s,dropped_fraction\n"), "metrics table is empty"),
    ("train", [], ("train/metrics.csv", "step,loss,step_s,dropped_fraction\n0,nan,0.1,0\n"),
     "column 'loss' must hold finite numbers; row 1 has nan"),
    ("train", ["--kind", "dropped"], ("train/metrics.csv", "step,loss,step_s,dropped_fraction\n0,1,0.1,1.5\n"),
     "'dropped_fraction' must hold finite numbers in [0, 1]"),
    ("train", [], ("train/trace.parquet", b"not parquet"), "trace.parquet' is not a readable Parquet file"),
])
def test_bad_input_is_one_error_line_and_no_file(runs, target, args, setup, message):
    if setup is not None:
        _write(runs / setup[0], setup[1])
    before = _files(runs)
    args = [arg.format(runs=runs) for arg in args]
    line = _error_line(_plot(str(runs / target), *args))
    assert message.format(runs=runs) in line
    assert _files(runs) == before


def test_help_lists_the_kinds():
    result = _plot("--help")
    assert result.exit_code == 0
    assert "timeline" in result.output and "dropped" in result.output and "RUN_DIR" in result.output
