"""`symi train --record-trace --trace-format megatron-router-trace`: the run also writes Megatron-Core router traces,
which the megatron-router-trace reader reads back to exactly the counts of the run's trace.parquet (per step, layer,
expert and rank); the option's misuses are one error before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import read_trace
from symi_sim.traces.readers_megatron import import_megatron_router_trace
from symi_sim.traces.resolve import detect_format


@pytest.mark.parametrize(("args", "message"), [
    (["--trace-format", "megatron-router-trace"], "--trace-format megatron-router-trace goes with --record-trace"),
    (["--trace-format", "megatron-router-trace", "--record-trace", "--resume", "ckpt"],
     "megatron-router-trace cannot resume a run"),
])
def test_trace_format_misuse_is_refused_before_starting(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "ckpt").mkdir()
    result = CliRunner().invoke(symi, ["train", "--out", str(tmp_path / "run"),
                                       *[str(tmp_path / a) if a == "ckpt" else a for a in args]])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_ranks_write_router_traces_that_read_back_to_the_parquet_counts(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "run"
    result = CliRunner().invoke(symi, ["train", "--nproc-per-node", "2", "--experts", "4", "--slots", "2",
                                       "--top-k", "2", "--steps", "3", "--grad-accum", "2", "--batch-size", "1",
                                       "--log-interval", "2", "--data", str(data), "--out", str(out),
                                       "--record-trace", "--trace-format", "megatron-router-trace"])
    assert result.exit_code == 0, result.output
    directory = out / "router_trace"
    assert sorted(p.name for p in directory.iterdir()) == ["router_trace_rank0.jsonl", "router_trace_rank1.jsonl"]
    records = [json.loads(line) for line in (directory / "router_trace_rank1.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    num_layers, seq_len = config["model"]["num_layers"], config["model"]["seq_len"]
    # one record per step, micro-batch and layer, in Megatron's layout
    assert len(records) == 3 * 2 * num_layers
    assert set(records[0]) == {"step", "stage", "block", "layer", "rank", "num_tokens", "topk", "top_indices"}
    assert {(r["step"], r["layer"], r["rank"], r["stage"], r["block"], r["num_tokens"], r["topk"]) for r in records} \
        == {(s, layer, 1, "pre_dispatch", "decoder", seq_len, 2) for s in range(3) for layer in range(num_layers)}
    assert detect_format(directory) == "megatron-router-trace"
    parquet = read_trace(out / "trace.parquet")
    megatron = import_megatron_router_trace(directory, num_experts=4)
    assert megatron.meta["layers"] == [f"decoder.{layer}" for layer in range(num_layers)]
    assert megatron.top_k == parquet.top_k == 2 and megatron.tokens_per_step == parquet.tokens_per_step
    np.testing.assert_array_equal(megatron.src_counts_SLEG, parquet.src_counts_SLEG)
