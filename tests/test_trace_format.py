"""The trace file format: Parquet round trips, tidy CSV input, and one clear error per bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from symi_sim.traces.format import LoadTrace, read_trace, write_trace

SHIPPED = Path(__file__).resolve().parent.parent / "traces"


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parquet_round_trip_keeps_counts_metadata_and_column_types(tmp_path):
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, (6, 3, 5))
    counts[2, 1, :] = 0          # an all-zero layer must survive (it keeps its expert-0 row)
    counts[:, :, 4] = 0          # so must a never-used last expert (num_experts comes from the metadata)
    trace = LoadTrace(counts, top_k=2, tokens_per_step=200, model="m", source="s", provenance="p",
                      meta={"domains": ["a", "b"]})
    path = tmp_path / "t.parquet"
    write_trace(trace, path)
    back = read_trace(path)
    np.testing.assert_array_equal(back.counts_SLE, counts)
    assert (back.top_k, back.tokens_per_step, back.model, back.source, back.provenance) == (2, 200, "m", "s", "p")
    assert back.meta == {"domains": ["a", "b"]}
    table = pq.read_table(path)
    assert table.schema.field("step").type == pa.int32()
    assert table.schema.field("layer").type == pa.int16()
    assert table.schema.field("expert").type == pa.int16()
    assert table.schema.field("tokens").type == pa.int32()
    info = json.loads(table.schema.metadata[b"symi"])
    assert (info["schema_version"], info["num_layers"], info["num_experts"], info["top_k"]) == (1, 3, 5, 2)
    # sparse rows: every positive count, plus the expert-0 row of each (step, layer)
    assert table.num_rows == int(((counts > 0) | (np.arange(5) == 0)).sum())


def test_parquet_round_trip_with_source_ranks_and_step_gaps(tmp_path):
    src = np.zeros((2, 1, 3, 2), dtype=np.int64)
    src[0, 0] = [[1, 2], [0, 3], [4, 0]]
    src[1, 0] = [[0, 0], [5, 5], [0, 1]]
    trace = LoadTrace(src.sum(axis=3), src_counts_SLEG=src, meta={"step_ids": [10, 20]})
    path = tmp_path / "ranks.parquet"
    write_trace(trace, path)
    table = pq.read_table(path)
    assert table.schema.field("src_rank").type == pa.int16()
    assert sorted(set(table.column("step").to_pylist())) == [10, 20]
    back = read_trace(path)
    np.testing.assert_array_equal(back.src_counts_SLEG, src)
    np.testing.assert_array_equal(back.counts_SLE, [[[3, 3, 4]], [[0, 10, 1]]])
    assert back.meta["step_ids"] == [10, 20]


def test_csv_missing_rows_mean_zero_and_metadata_comes_from_arguments(tmp_path):
    path = _write_csv(tmp_path / "t.csv", "step,layer,expert,tokens\n0,0,1,5\n0,1,0,2\n1,0,2,7\n1,1,1,1\n0,0,0,3\n")
    trace = read_trace(path)
    np.testing.assert_array_equal(trace.counts_SLE, [[[3, 5, 0], [2, 0, 0]], [[0, 0, 7], [0, 1, 0]]])
    assert trace.top_k == 1 and trace.tokens_per_step is None
    trace = read_trace(path, top_k=2, tokens_per_step=7)
    assert (trace.top_k, trace.tokens_per_step) == (2, 7)
    np.testing.assert_array_equal(trace.num_assignments_L(0), [14, 14])


def test_csv_with_src_rank_column(tmp_path):
    path = _write_csv(tmp_path / "t.csv", "step,layer,expert,tokens,src_rank\n0,0,0,4,0\n0,0,0,6,1\n0,0,1,1,1\n")
    trace = read_trace(path)
    np.testing.assert_array_equal(trace.counts_SLE, [[[10, 1]]])
    np.testing.assert_array_equal(trace.src_counts_SLEG, [[[[4, 6], [0, 1]]]])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("step,layer,tokens\n0,0,1\n", "missing column(s) ['expert']"),
        ("step,layer,expert,tokens\n0,0,0,3\n0,0,1,\n", "data row 2: column 'tokens' is missing a value"),
        ("step,layer,expert,tokens\n0,0,0,3\n0,0,1,1.5\n", "data row 2: column 'tokens' holds 1.5, not an integer"),
        ("step,layer,expert,tokens\n0,0,0,3\n0,0,x,1\n", "data row 2: column 'expert' holds 'x', not an integer"),
        ("step,layer,expert,tokens\n0,0,0,3\n0,0,1,-4\n", "data row 2: column 'tokens' is negative (-4)"),
        ("step,layer,expert,tokens\n0,0,0,3\n0,0,1,1\n0,0,0,2\n", "duplicate rows data row 1 and 3 (step 0, layer 0, "
         "expert 0)"),
        ("step,layer,expert,tokens\n0,0,0,3\n0,1,0,1\n1,0,0,2\n", "step 1 has no rows for layer 1"),
        ("step,layer,expert,tokens\n0,0,0,nan\n", "data row 1: column 'tokens' is missing a value"),
        ("step,layer,expert,tokens\n", "no data rows"),
        ("", "not a readable CSV file"),
    ],
)
def test_bad_csv_gives_one_error_naming_file_and_row(tmp_path, body, expected):
    path = _write_csv(tmp_path / "bad.csv", body)
    with pytest.raises(ValueError) as info:
        read_trace(path)
    assert expected in str(info.value)
    assert "bad.csv" in str(info.value)


def test_totals_over_top_k_times_tokens_rejected_naming_the_step(tmp_path):
    path = _write_csv(tmp_path / "t.csv", "step,layer,expert,tokens\n5,0,0,3\n5,0,1,2\n7,0,0,9\n")
    read_trace(path, top_k=1, tokens_per_step=9)
    with pytest.raises(ValueError, match=r"step 7 layer 0 routes 9 tokens, more than .* = 8"):
        read_trace(path, top_k=2, tokens_per_step=4)
    # top_k distinct experts per token: one expert cannot take more than tokens_per_step assignments
    with pytest.raises(ValueError, match=r"step 7 layer 0 expert 0 receives 9 assignments, more than the 5 tokens"):
        read_trace(path, top_k=2, tokens_per_step=5)


def _parquet_with(tmp_path: Path, columns: dict, metadata: dict | None) -> Path:
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({b"symi": json.dumps(metadata).encode()})
    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    return path


META = {"schema_version": 1, "num_layers": 1, "num_experts": 2, "top_k": 1, "tokens_per_step": None}


def test_parquet_ids_checked_against_metadata(tmp_path):
    cols = {"step": pa.array([0, 0], pa.int32()), "layer": pa.array([0, 0], pa.int16()),
            "expert": pa.array([0, 2], pa.int16()), "tokens": pa.array([1, 1], pa.int32())}
    path = _parquet_with(tmp_path, cols, META)
    with pytest.raises(ValueError, match=r"row 2: expert 2 is out of range \[0, 2\)"):
        read_trace(path)
    # without metadata the ids define the shape (max + 1)
    assert read_trace(_parquet_with(tmp_path, cols, None)).num_experts == 3


@pytest.mark.parametrize(
    ("columns", "metadata", "expected"),
    [
        ({"step": pa.array([0, 0]), "layer": pa.array([0, 0]), "expert": pa.array([0, 1]),
          "tokens": pa.array([1.0, float("nan")])}, META, "row 2: column 'tokens' is missing a value (NaN)"),
        ({"step": pa.array([0, 0]), "layer": pa.array([0, 0]), "expert": pa.array([0, 1]),
          "tokens": pa.array([1, None], pa.int32())}, META, "row 2: column 'tokens' is missing a value"),
        ({"step": pa.array([0]), "layer": pa.array([0]), "expert": pa.array(["a"]), "tokens": pa.array([1])},
         META, "column 'expert' must hold integers"),
        ({"step": pa.array([0]), "layer": pa.array([0]), "tokens": pa.array([1])}, META, "missing column 'expert'"),
        ({"step": pa.array([0]), "layer": pa.array([0]), "expert": pa.array([0]), "tokens": pa.array([1])},
         {**META, "schema_version": 99}, "unsupported trace schema_version 99"),
        ({"step": pa.array([0]), "layer": pa.array([0]), "expert": pa.array([0]), "tokens": pa.array([1])},
         {**META, "top_k": 0}, "metadata top_k must be a positive integer"),
    ],
)
def test_bad_parquet_gives_one_error(tmp_path, columns, metadata, expected):
    path = _parquet_with(tmp_path, columns, metadata)
    with pytest.raises(ValueError) as info:
        read_trace(path)
    assert expected in str(info.value)
    assert "x.parquet" in str(info.value)


def test_invalid_metadata_json(tmp_path):
    table = pa.table({"step": [0], "layer": [0], "expert": [0], "tokens": [1]})
    path = tmp_path / "m.parquet"
    pq.write_table(table.replace_schema_metadata({b"symi": b"{not json"}), path)
    with pytest.raises(ValueError, match="metadata 'symi' is not valid JSON"):
        read_trace(path)


def test_truncated_or_corrupt_parquet_is_a_clear_error(tmp_path):
    good = tmp_path / "good.parquet"
    write_trace(LoadTrace(np.ones((4, 2, 3), dtype=np.int64)), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1" + bytes(range(200)))
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=f"{path.name}' is not a readable Parquet file"):
            read_trace(path)


def test_path_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown suffix '.txt'"):
        read_trace(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="must end in .parquet"):
        write_trace(LoadTrace(np.ones((1, 1, 1), dtype=np.int64)), tmp_path / "t.csv")


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="more than the 2147483647 tokens a trace may hold"):   # never written
        LoadTrace(np.full((1, 1, 2), 2**31, dtype=np.int64))
    not_json = LoadTrace(np.ones((1, 1, 2), dtype=np.int64), meta={"x": object()})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        write_trace(not_json, tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == []


def test_load_trace_validation():
    with pytest.raises(ValueError, match="more than top_k x tokens_per_step = 4"):
        LoadTrace(np.array([[[3, 2]]]), top_k=1, tokens_per_step=4)
    with pytest.raises(ValueError, match="NaN"):
        LoadTrace(np.array([[[np.nan, 2.0]]]))
    with pytest.raises(ValueError, match="negative"):
        LoadTrace(np.array([[[-1, 2]]]))
    with pytest.raises(ValueError, match="sum to the expert counts"):
        LoadTrace(np.array([[[1, 2]]]), src_counts_SLEG=np.array([[[[1, 0], [1, 0]]]]))
    with pytest.raises(ValueError, match="tokens_per_step must be a positive integer"):
        LoadTrace(np.array([[[1, 2]]]), tokens_per_step=0)
    with pytest.raises(ValueError, match="step 0 layer 0 expert 1 receives 3 assignments, more than the 2 tokens"):
        LoadTrace(np.array([[[1, 3]]]), top_k=2, tokens_per_step=2)


@pytest.mark.parametrize("name", ["olmoe-domains.parquet", "mixtral-domains.parquet", "synthetic-drift.parquet"])
def test_shipped_traces_read_and_validate(name):
    trace = read_trace(SHIPPED / name)
    expected_shape = {"olmoe-domains.parquet": (5, 3, 64), "mixtral-domains.parquet": (5, 3, 8),
                      "synthetic-drift.parquet": (1000, 12, 16)}[name]
    assert trace.counts_SLE.shape == expected_shape
    # every shipped trace routes every token: each layer total is exactly k x tokens
    np.testing.assert_array_equal(trace.counts_SLE.sum(axis=2), trace.top_k * trace.tokens_per_step)
