"""Trace statistics on tiny traces, against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from symi_sim.traces.format import LoadTrace
from symi_sim.traces.stats import format_trace_info, layer_stats, trace_info

# layer 0: step 0 [5, 1, 2, 0], step 1 [1, 1, 1, 5]; layer 1: step 0 routes nothing, step 1 [2, 2, 2, 2]
COUNTS_SLE = np.array([[[5, 1, 2, 0], [0, 0, 0, 0]], [[1, 1, 1, 5], [2, 2, 2, 2]]])


def test_layer_stats_by_hand():
    stats = layer_stats(LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=8)).set_index("layer")
    layer0 = stats.loc[0]
    # max/mean: 5/2 at both steps; overall [6, 2, 3, 5] -> 6/4
    assert layer0["skew_median"] == pytest.approx(2.5)
    assert layer0["skew_overall"] == pytest.approx(1.5)
    # population std / mean: sqrt(3.5)/2 and sqrt(3)/2
    assert layer0["cv_median"] == pytest.approx((math.sqrt(3.5) / 2 + math.sqrt(3) / 2) / 2)
    # top-2 share: 7/8 and 6/8
    assert layer0["top2_share_median"] == pytest.approx(0.8125)
    assert layer0["top2_share_max"] == pytest.approx(0.875)
    # TV: 0.5 * (|5-1| + |1-1| + |2-1| + |0-5|) / 8
    assert layer0["tv_mean"] == pytest.approx(0.625)
    # expert 0: 5 -> 1; expert 3: 0 (counted as 1) -> 5
    assert layer0["max_step_ratio"] == pytest.approx(5.0)
    layer1 = stats.loc[1]
    # the empty step is left out of per-step statistics and of step pairs
    assert (layer1["skew_median"], layer1["cv_median"], layer1["top2_share_median"]) == (1.0, 0.0, 0.5)
    assert math.isnan(layer1["tv_mean"])
    assert layer1["max_step_ratio"] == 2.0


def test_trace_info_is_json_with_header_facts():
    trace = LoadTrace(COUNTS_SLE, top_k=1, tokens_per_step=8, model="toy", meta={"original_layers": [3, 9]})
    info = json.loads(json.dumps(trace_info(trace)))
    assert (info["steps"], info["layers"], info["experts"], info["top_k"], info["tokens_per_step"]) == (2, 2, 4, 1, 8)
    assert info["total_assignments"] == 24 and info["model"] == "toy" and info["source_ranks"] is None
    assert info["per_layer"][1]["tv_mean"] is None
    assert [r["original_layer"] for r in info["per_layer"]] == [3, 9]
    text = format_trace_info(trace_info(trace))
    assert "2 steps x 2 layers x 4 experts" in text
    assert text.splitlines()[-2].split()[:3] == ["0", "3", "2.500"]
    assert text.splitlines()[-1].split()[7] == "-"     # layer 1 tv_mean unknown


def test_single_step_has_no_volatility():
    stats = layer_stats(LoadTrace(COUNTS_SLE[:1]))
    assert stats["tv_mean"].isna().all() and stats["max_step_ratio"].isna().all()
