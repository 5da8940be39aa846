"""`symi trace info | convert | synth` through click's CliRunner: outputs, and clean failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import read_trace
from symi_sim.traces.stats import trace_info
from symi_sim.traces.synth import synth_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"
OLMOE_CSV = TRACES / "source" / "olmoe-routing" / "expert_counts.csv"


def _run(*args: str):
    return CliRunner().invoke(symi, [str(a) for a in args])


def _assert_clean_failure(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], result.output


def test_info_text_table():
    result = _run("trace", "info", TRACES / "mixtral-domains.parquet")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "mistralai/Mixtral-8x7B-v0.1" in lines[0]
    assert "5 steps x 3 layers x 8 experts" in result.output
    assert "steps = domains  arxiv, book, c4, github, wikipedia" in result.output
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "orig"])
    rows = [line.split() for line in lines[header + 1:]]
    assert [row[:2] for row in rows] == [["0", "0"], ["1", "7"], ["2", "15"]]
    expected = trace_info(read_trace(TRACES / "mixtral-domains.parquet"))["per_layer"]
    assert [float(row[2]) for row in rows] == pytest.approx([r["skew_median"] for r in expected], abs=5e-4)


def test_info_json_matches_library(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("step,layer,expert,tokens\n0,0,0,3\n0,0,1,1\n1,0,1,4\n")
    result = _run("trace", "info", csv, "--json", "--top-k", "1", "--tokens-per-step", "4")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["steps"], info["layers"], info["experts"], info["tokens_per_step"]) == (2, 1, 2, 4)
    assert info["per_layer"][0]["skew_overall"] == pytest.approx(5 / 4)


def test_convert_olmoe_reproduces_the_shipped_trace(tmp_path):
    out = tmp_path / "m.parquet"
    result = _run("trace", "convert", OLMOE_CSV, out, "--from", "olmoe", "--model", "mistral")
    assert result.exit_code == 0, result.output
    assert "5 steps x 3 layers x 8 experts, top-2" in result.output
    np.testing.assert_array_equal(read_trace(out).counts_SLE, read_trace(TRACES / "mixtral-domains.parquet").counts_SLE)
    out1 = tmp_path / "top1.parquet"
    result = _run("trace", "convert", OLMOE_CSV, out1, "--from", "olmoe", "--model", "olmoe", "--selection", "top1",
                  "--domains", "c4,arxiv")
    assert result.exit_code == 0, result.output
    trace = read_trace(out1)
    assert (trace.top_k, trace.meta["domains"]) == (1, ["c4", "arxiv"])


def test_convert_counts_jsonl(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text('{"iteration": 0, "layer": 0, "tokens_per_expert": [3, 1]}\n'
                   '{"iteration": 1, "layer": 0, "tokens_per_expert": [0, 4]}\n')
    out = tmp_path / "r.parquet"
    result = _run("trace", "convert", src, out, "--from", "counts-jsonl", "--top-k", "1", "--tokens-per-step", "4")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_trace(out).counts_SLE, [[[3, 1]], [[0, 4]]])


def test_synth_matches_the_library(tmp_path):
    out = tmp_path / "s.parquet"
    result = _run("trace", "synth", "--experts", "8", "--layers", "2", "--steps", "30", "--skew", "1.2", "--drift",
                  "0.3", "--seed", "11", "--top-k", "2", "--tokens-per-step", "500", "--burst-prob", "0.1", out)
    assert result.exit_code == 0, result.output
    expected = synth_trace(num_experts=8, num_layers=2, num_steps=30, skew=1.2, drift=0.3, seed=11, top_k=2,
                           tokens_per_step=500, burst_prob=0.1)
    back = read_trace(out)
    np.testing.assert_array_equal(back.counts_SLE, expected.counts_SLE)
    assert (back.top_k, back.tokens_per_step) == (2, 500)


def test_errors_are_one_line_and_leave_no_output(tmp_path):
    _assert_clean_failure(_run("trace", "info", tmp_path / "missing.parquet"), "missing.parquet", "does not exist")
    bad = tmp_path / "bad.csv"
    bad.write_text("step,layer,expert,tokens\n0,0,0,3\n0,0,1,-2\n")
    _assert_clean_failure(_run("trace", "info", bad), "bad.csv", "data row 2", "negative")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_clean_failure(_run("trace", "convert", bad, out_dir / "x.parquet", "--from", "csv"), "data row 2")
    _assert_clean_failure(_run("trace", "convert", OLMOE_CSV, out_dir / "x.parquet", "--from", "olmoe",
                               "--model", "gpt4"), "unknown OLMoE-analysis model 'gpt4'")
    _assert_clean_failure(_run("trace", "convert", bad, out_dir / "x.parquet", "--from", "csv", "--selection",
                               "top1"), "--selection does not apply to --from csv")
    _assert_clean_failure(_run("trace", "convert", bad, out_dir / "x.parquet", "--from", "json"), "--from")
    _assert_clean_failure(_run("trace", "synth", "--experts", "4", "--layers", "1", "--steps", "3", "--skew", "1",
                               "--drift", "2", "--seed", "0", out_dir / "s.parquet"),
                          "drift must be a number in [0, 1]")
    _assert_clean_failure(_run("trace", "synth", "--experts", "4", "--layers", "1", "--steps", "3", "--skew", "1",
                               "--drift", "0.1", "--seed", "0", out_dir / "s.csv"), "must end in .parquet")
    _assert_clean_failure(_run("trace", "synth", "--layers", "0", out_dir / "s.parquet"), "num_layers must be")
    assert list(out_dir.iterdir()) == []
