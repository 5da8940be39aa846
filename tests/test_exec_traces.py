"""The shipped traces recorded by `symi train` read, validate and have the shapes traces/README.md documents
(the recording runs themselves are minutes long and are not re-run here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from symi_sim.traces.format import read_trace
from symi_sim.traces.stats import trace_info

TRACES = Path(__file__).parent.parent / "traces"
NUM_RANKS, SEQS_PER_RANK, SEQ_LEN = 4, 4, 64

# file: (steps, layers, experts, top_k), as documented in traces/README.md
RECORDED = {
    "recorded-tiny-e16-top1.parquet": (500, 2, 16, 1),
    "recorded-tiny-e16-top2.parquet": (300, 2, 16, 2),
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_trace_reads_with_documented_shape_and_skew(name: str) -> None:
    path = TRACES / name
    assert path.stat().st_size < 2 * 2**20
    trace = read_trace(path)   # validates: ids in range, every step has every layer, totals = top_k x tokens
    num_steps, num_layers, num_experts, top_k = RECORDED[name]
    assert trace.counts_SLE.shape == (num_steps, num_layers, num_experts)
    assert trace.top_k == top_k and trace.tokens_per_step == NUM_RANKS * SEQS_PER_RANK * SEQ_LEN
    assert trace.source == "symi train" and trace.model == "symi-exec-tiny-E16"
    assert "seed 0" in trace.provenance and f"{NUM_RANKS} ranks" in trace.provenance
    # every step, layer and source rank routed exactly its own tokens' top-k choices
    assert trace.src_counts_SLEG is not None and trace.src_counts_SLEG.shape[-1] == NUM_RANKS
    np.testing.assert_array_equal(trace.src_counts_SLEG.sum(axis=3), trace.counts_SLE)
    np.testing.assert_array_equal(trace.src_counts_SLEG.sum(axis=2), top_k * SEQS_PER_RANK * SEQ_LEN)
    # real skew: with a 1e-5 aux-loss coefficient the busiest expert takes several times its even share
    for layer in trace_info(trace)["per_layer"]:
        assert layer["skew_median"] > 3 and layer["top2_share_median"] > 0.3


def test_recorded_traces_are_documented() -> None:
    readme = (TRACES / "README.md").read_text()
    for name, (num_steps, num_layers, num_experts, top_k) in RECORDED.items():
        assert name in readme
        assert f"--steps {num_steps}" in readme and f"--top-k {top_k}" in readme
        assert f"{num_steps} x {num_layers} x {num_experts}" in readme
