"""Importers: OLMoE aggregate counts, per-rank CSVs, Megatron-style JSONL, tidy CSV, and convert_trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from symi_sim.traces.format import read_trace
from symi_sim.traces.importers import (
    convert_trace,
    import_counts_jsonl,
    import_olmoe,
    import_per_rank_csv,
)

TRACES = Path(__file__).resolve().parent.parent / "traces"
OLMOE_CSV = TRACES / "source" / "olmoe-routing" / "expert_counts.csv"
HEADER = "model,selection,domain,layer,expert,count,layer_total_assignments\n"


def _mistral_rows(domain: str, layer: int, counts: list[int], total: int, selection: str = "topk") -> str:
    return "".join(f"mistral,{selection},{domain},{layer},{e},{c},{total}\n" for e, c in enumerate(counts) if c)


def test_olmoe_small_file_one_step_per_domain_in_requested_order(tmp_path):
    path = tmp_path / "counts.csv"
    a = [3, 1, 0, 0, 0, 0, 0, 4]      # 8 Mixtral experts; zero counts left out of the file
    b = [0, 0, 4, 4, 0, 0, 0, 0]
    path.write_text(HEADER + _mistral_rows("book", 0, a, 8) + _mistral_rows("book", 7, b, 8)
                    + _mistral_rows("arxiv", 0, b, 8) + _mistral_rows("arxiv", 7, a, 8)
                    + "olmoe,topk,arxiv,0,0,8,8\n")
    trace = import_olmoe(path, model="mistral", domains=["book", "arxiv"])
    np.testing.assert_array_equal(trace.counts_SLE, [[a, b], [b, a]])
    assert (trace.top_k, trace.tokens_per_step) == (2, 4)       # layer total 8 = 4 tokens x top-2
    assert trace.meta["original_layers"] == [0, 7] and trace.meta["domains"] == ["book", "arxiv"]
    assert trace.model == "mistralai/Mixtral-8x7B-v0.1"


def test_olmoe_shipped_source_values():
    trace = import_olmoe(OLMOE_CSV, model="olmoe")
    # values quoted in SOURCE.md: OLMoE layer 0 on arxiv, expert 0 gets 204,013 of 1,671,168 assignments
    assert trace.counts_SLE[0, 0, 0] == 204_013
    np.testing.assert_array_equal(trace.counts_SLE.sum(axis=2), 1_671_168)
    assert (trace.top_k, trace.tokens_per_step, trace.counts_SLE.shape) == (8, 208_896, (5, 3, 64))
    top1 = import_olmoe(OLMOE_CSV, model="olmoe", selection="top1")
    assert (top1.top_k, top1.tokens_per_step) == (1, 208_896)
    np.testing.assert_array_equal(top1.counts_SLE.sum(axis=2), 208_896)
    assert (top1.counts_SLE == 0).any()              # experts absent from top1 rows count 0


def test_olmoe_mixed_token_counts_leave_tokens_per_step_unknown():
    trace = import_olmoe(OLMOE_CSV, model="olmoe", domains=["arxiv", "tulu"])
    assert trace.tokens_per_step is None
    assert trace.meta["tokens_per_domain"] == {"arxiv": 208_896, "tulu": 205_243}


@pytest.mark.parametrize(("name", "model"), [("olmoe-domains.parquet", "olmoe"),
                                             ("mixtral-domains.parquet", "mistral")])
def test_shipped_real_traces_regenerate_identically(tmp_path, name, model):
    out = tmp_path / name
    convert_trace(OLMOE_CSV, out, fmt="olmoe", model=model)
    shipped, again = read_trace(TRACES / name), read_trace(out)
    np.testing.assert_array_equal(again.counts_SLE, shipped.counts_SLE)
    assert (again.top_k, again.tokens_per_step, again.model, again.meta) == (
        shipped.top_k, shipped.tokens_per_step, shipped.model, shipped.meta)


@pytest.mark.parametrize(
    ("options", "body", "expected"),
    [
        ({"model": "gpt"}, None, "unknown OLMoE-analysis model 'gpt'; choices: olmoe, olmoe-sft"),
        ({"selection": "top3"}, None, "unknown selection 'top3'; choices: topk, top1"),
        ({"model": "mistral", "domains": ["arxiv", "law"]}, None, "domain(s) ['law']"),
        ({"model": "mistral"}, "model,selection,domain,layer,expert,count\n", "missing column(s) "
         "['layer_total_assignments']"),
        ({"model": "mistral", "domains": ["c4"]}, HEADER + "mistral,topk,c4,0,0,4,8\nmistral,topk,c4,0,1,x,8\n",
         "data row 2: column 'count' holds 'x'"),
        ({"model": "mistral", "domains": ["c4"]}, HEADER + "mistral,topk,c4,0,9,4,8\n",
         "data row 1: expert 9 is out of range [0, 8)"),
        ({"model": "mistral", "domains": ["c4"]}, HEADER + "mistral,topk,c4,0,0,4,8\nmistral,topk,c4,0,0,4,8\n",
         "data row 2: duplicate row"),
        ({"model": "mistral", "domains": ["c4"]}, HEADER + "mistral,topk,c4,0,0,9,8\n", "below the routed total 9"),
        ({"model": "olmoe"}, HEADER + "mistral,topk,c4,0,0,4,8\n", "no rows for model 'olmoe' selection 'topk'"),
    ],
)
def test_olmoe_errors(tmp_path, options, body, expected):
    path = OLMOE_CSV
    if body is not None:
        path = tmp_path / "counts.csv"
        path.write_text(body)
    with pytest.raises(ValueError) as info:
        import_olmoe(path, **options)
    assert expected in str(info.value)


def _rank_csv(path: Path, rows: list[tuple[int, int, int, int]]) -> None:
    path.write_text("step,layer,expert,tokens\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_per_rank_csv_sums_ranks_and_keeps_source_counts(tmp_path):
    _rank_csv(tmp_path / "loads_rank0.csv", [(0, 0, 0, 3), (0, 0, 1, 1), (1, 0, 0, 2)])
    _rank_csv(tmp_path / "loads_rank1.csv", [(0, 0, 2, 4), (1, 0, 1, 2), (1, 0, 2, 2)])   # rank 1 reaches expert 2
    (tmp_path / "notes.csv").write_text("ignored\n")
    trace = import_per_rank_csv(tmp_path, top_k=1, tokens_per_step=8)
    np.testing.assert_array_equal(trace.counts_SLE, [[[3, 1, 4]], [[2, 2, 2]]])
    np.testing.assert_array_equal(trace.src_counts_SLEG[:, 0, :, 0], [[3, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(trace.src_counts_SLEG[:, 0, :, 1], [[0, 0, 4], [0, 2, 2]])
    out = tmp_path / "out.parquet"
    convert_trace(tmp_path, out, fmt="per-rank-csv", tokens_per_step=8)
    np.testing.assert_array_equal(read_trace(out).src_counts_SLEG, trace.src_counts_SLEG)


def test_per_rank_csv_errors(tmp_path):
    _rank_csv(tmp_path / "rank0.csv", [(0, 0, 0, 3)])
    _rank_csv(tmp_path / "rank2.csv", [(0, 0, 0, 3)])
    with pytest.raises(ValueError, match=r"no file for rank\(s\) \[1\]"):
        import_per_rank_csv(tmp_path)
    _rank_csv(tmp_path / "rank1.csv", [(0, 0, 0, 3), (1, 0, 0, 1)])
    with pytest.raises(ValueError, match="rank1.csv' has steps/layers"):
        import_per_rank_csv(tmp_path)
    _rank_csv(tmp_path / "rank1.csv", [(0, 0, 0, -3)])
    with pytest.raises(ValueError, match="rank1.csv', data row 1: column 'tokens' is negative"):
        import_per_rank_csv(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        import_per_rank_csv(empty)
    with pytest.raises(ValueError, match="x_rank0.csv' does not exist"):
        import_per_rank_csv([tmp_path / "x_rank0.csv"])


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_counts_jsonl_both_line_forms(tmp_path):
    path = _jsonl(tmp_path / "r.jsonl", [
        {"iteration": 3, "layer": 1, "tokens_per_expert": [1, 2, 3], "aux_loss": 0.1},
        {"iteration": 3, "layer": 0, "tokens_per_expert": [4, 0, 2]},
        "",
        {"step": 5, "tokens_per_expert": [[0, 5, 1], [2, 2, 2.0]]},
    ])
    trace = import_counts_jsonl(path, top_k=2, tokens_per_step=5)
    np.testing.assert_array_equal(trace.counts_SLE, [[[4, 0, 2], [1, 2, 3]], [[0, 5, 1], [2, 2, 2]]])
    assert trace.meta["step_ids"] == [3, 5]
    out = tmp_path / "r.parquet"
    convert_trace(path, out, fmt="counts-jsonl", top_k=2, tokens_per_step=5)
    back = read_trace(out)
    np.testing.assert_array_equal(back.counts_SLE, trace.counts_SLE)
    assert back.meta["step_ids"] == [3, 5]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"iteration": 0, "layer": 0, "tokens_per_expert": [1, 2]}', "{oops"], "line 2: not valid JSON"),
        ([{"iteration": 0, "layer": 0, "tokens_per_expert": [1]}, {"iteration": 0, "layer": 0,
                                                                   "tokens_per_expert": [1]}],
         "line 2: iteration 0 layer 0 already given on line 1"),
        ([{"iteration": 0, "layer": 0, "tokens_per_expert": [1, 2]},
          {"iteration": 0, "layer": 1, "tokens_per_expert": [1]}], "line 2: layer 1 lists 1 experts"),
        ([{"iteration": 0, "layer": 1, "tokens_per_expert": [1]}], "iteration 0 has no record for layer 0"),
        ([{"layer": 0, "tokens_per_expert": [1]}], "line 1: 'iteration' (or 'step') must be"),
        ([{"iteration": 0, "layer": 0, "tokens_per_expert": [1, -2]}], "must be non-negative integers, got -2"),
        ([{"iteration": 0, "layer": 0, "tokens_per_expert": [1, 0.5]}], "got 0.5"),
        ([""], "no records"),
    ],
)
def test_counts_jsonl_errors(tmp_path, lines, expected):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as info:
        import_counts_jsonl(path)
    assert expected in str(info.value)
    assert "bad.jsonl" in str(info.value)


def test_convert_trace_dispatch_errors_and_csv(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("step,layer,expert,tokens\n0,0,0,3\n0,0,1,1\n")
    with pytest.raises(ValueError, match="unknown trace format 'json'; choices: csv, olmoe, per-rank-csv"):
        convert_trace(src, tmp_path / "o.parquet", fmt="json")
    with pytest.raises(ValueError, match=r"option\(s\) \['selection'\] do not apply to format 'csv'"):
        convert_trace(src, tmp_path / "o.parquet", fmt="csv", selection="top1")
    trace = convert_trace(src, tmp_path / "o.parquet", fmt="csv", top_k=2, tokens_per_step=3, selection=None)
    back = read_trace(tmp_path / "o.parquet")
    np.testing.assert_array_equal(back.counts_SLE, [[[3, 1]]])
    assert (back.top_k, back.tokens_per_step) == (trace.top_k, trace.tokens_per_step) == (2, 3)
