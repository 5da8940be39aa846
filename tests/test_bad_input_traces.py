"""Bad trace files, generated: every malformed CSV or corrupt Parquet file is one ValueError naming the file (and
the row where there is one), on one line; valid generated traces round-trip exactly."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symi_sim.traces.format import MAX_DENSE_COUNTS, LoadTrace, read_trace, trace_table, write_trace

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COLUMNS = ("step", "layer", "expert", "tokens")


def _read_error(path: Path, **kwargs) -> str:
    """The message of the one ValueError read_trace must raise; it names the file and fits on one line."""
    with pytest.raises(ValueError) as info:
        read_trace(path, **kwargs)
    message = str(info.value)
    assert path.name in message, message
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- valid traces round-trip


@st.composite
def traces(draw) -> LoadTrace:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5)))
    num_ranks = draw(st.integers(0, 3))   # 0: no per-source-rank counts
    cells = int(np.prod(shape)) * max(num_ranks, 1)
    values = np.array(draw(st.lists(st.integers(0, 40), min_size=cells, max_size=cells)), dtype=np.int64)
    src = values.reshape(*shape, num_ranks) if num_ranks else None
    counts = src.sum(axis=3) if num_ranks else values.reshape(shape)
    top_k = draw(st.integers(1, shape[2]))
    tokens_per_step = None
    if draw(st.booleans()):   # large enough for every layer's total and every single expert
        need = max(int(np.ceil(counts.sum(axis=2).max() / top_k)), int(counts.max()), 1)
        tokens_per_step = need + draw(st.integers(0, 10))
    meta = {}
    if draw(st.booleans()):
        gaps = draw(st.lists(st.integers(1, 1000), min_size=shape[0], max_size=shape[0]))
        meta["step_ids"] = np.cumsum(gaps).tolist()
    if draw(st.booleans()):
        meta["note"] = draw(st.text(max_size=8))
    return LoadTrace(counts, top_k=top_k, tokens_per_step=tokens_per_step, model=draw(st.text(max_size=6)),
                     source="gen", provenance=draw(st.text(max_size=6)), src_counts_SLEG=src, meta=meta)


@SETTINGS
@given(trace=traces())
def test_valid_traces_round_trip_exactly_through_parquet_and_csv(trace):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        write_trace(trace, path)
        back = read_trace(path)
        np.testing.assert_array_equal(back.counts_SLE, trace.counts_SLE)
        if trace.src_counts_SLEG is None:
            assert back.src_counts_SLEG is None
        else:
            # trailing all-zero source ranks leave no rows, so the file may hold fewer ranks
            ranks = back.src_counts_SLEG.shape[3]
            np.testing.assert_array_equal(back.src_counts_SLEG, trace.src_counts_SLEG[..., :ranks])
            assert not trace.src_counts_SLEG[..., ranks:].any()
        assert (back.top_k, back.tokens_per_step, back.model, back.source, back.provenance, back.meta) == (
            trace.top_k, trace.tokens_per_step, trace.model, trace.source, trace.provenance, trace.meta)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["t.parquet"]   # no temporary file left
        # the same rows as a tidy CSV: the same counts (metadata then comes from the caller)
        csv_path = Path(tmp) / "t.csv"
        trace_table(trace).to_pandas().to_csv(csv_path, index=False)
        back = read_trace(csv_path, top_k=trace.top_k, tokens_per_step=trace.tokens_per_step)
        np.testing.assert_array_equal(back.counts_SLE, trace.counts_SLE)
        assert back.meta.get("step_ids") == trace.meta.get("step_ids")


# ---------------------------------------------------------------- malformed tidy CSVs


@st.composite
def tidy_rows(draw, min_steps: int = 1, min_layers: int = 1) -> list[list[int]]:
    """Valid rows step,layer,expert,tokens: every step has every layer, no (step, layer, expert) twice."""
    steps = sorted(draw(st.sets(st.integers(0, 50), min_size=min_steps, max_size=3)))
    num_layers = draw(st.integers(min_layers, 3))
    rows = []
    for step in steps:
        for layer in range(num_layers):
            experts = draw(st.sets(st.integers(0, 5), min_size=1, max_size=3))
            rows += [[step, layer, e, draw(st.integers(0, 99))] for e in sorted(experts)]
    return draw(st.permutations(rows))


def _write_rows(path: Path, rows: list[list[object]], header: tuple[str, ...] = COLUMNS) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


@SETTINGS
@given(rows=tidy_rows())
def test_generated_valid_csv_reads(rows):
    with tempfile.TemporaryDirectory() as tmp:
        trace = read_trace(_write_rows(Path(tmp) / "ok.csv", rows))
        step_ids = sorted({r[0] for r in rows})
        for step, layer, expert, tokens in rows:
            assert trace.counts_SLE[step_ids.index(step), layer, expert] == tokens
        assert trace.counts_SLE.sum() == sum(r[3] for r in rows)


@SETTINGS
@given(rows=tidy_rows(), data=st.data())
def test_csv_missing_column(rows, data):
    drop = data.draw(st.sampled_from(COLUMNS))
    keep = [i for i, c in enumerate(COLUMNS) if c != drop]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_rows(Path(tmp) / "bad.csv", [[r[i] for i in keep] for r in rows],
                           tuple(COLUMNS[i] for i in keep))
        assert f"missing column(s) ['{drop}']" in _read_error(path)


BAD_CELLS = [  # (cell text, the problem the message must state)
    ("abc", "holds 'abc', not an integer"),
    ("1.5", "holds 1.5, not an integer"),
    ("0x10", "holds '0x10', not an integer"),
    ("", "is missing a value"),
    ("nan", "is missing a value"),
    ("inf", "holds inf"),
    ("-3", "is negative (-3)"),
    ("1e30", "holds 1e+30, out of range"),
]


@SETTINGS
@given(rows=tidy_rows(), data=st.data())
def test_csv_bad_cell_names_file_row_and_column(rows, data):
    row = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.integers(0, 3))
    cell, problem = data.draw(st.sampled_from(BAD_CELLS))
    rows = [list(r) for r in rows]
    rows[row][column] = cell
    with tempfile.TemporaryDirectory() as tmp:
        message = _read_error(_write_rows(Path(tmp) / "bad.csv", rows))
    assert f"data row {row + 1}: column '{COLUMNS[column]}' {problem}" in message


@SETTINGS
@given(rows=tidy_rows(), data=st.data())
def test_csv_out_of_range_ids(rows, data):
    row = data.draw(st.integers(0, len(rows) - 1))
    column, value = data.draw(st.sampled_from([(0, 2**31), (1, 2**15), (2, 2**15), (2, 40000), (1, 99999)]))
    rows = [list(r) for r in rows]
    rows[row][column] = value
    with tempfile.TemporaryDirectory() as tmp:
        message = _read_error(_write_rows(Path(tmp) / "bad.csv", rows))
    assert f"data row {row + 1}: {COLUMNS[column]} {value} is out of range" in message


@SETTINGS
@given(rows=tidy_rows(), data=st.data())
def test_csv_duplicate_row(rows, data):
    row = data.draw(st.integers(0, len(rows) - 1))
    copy = [*rows[row][:3], data.draw(st.integers(0, 99))]
    with tempfile.TemporaryDirectory() as tmp:
        message = _read_error(_write_rows(Path(tmp) / "bad.csv", [*rows, copy]))
    step, layer, expert = rows[row][:3]
    assert (f"duplicate rows data row {row + 1} and {len(rows) + 1} (step {step}, layer {layer}, expert {expert})"
            in message)


@SETTINGS
@given(rows=tidy_rows(min_steps=2, min_layers=2), data=st.data())
def test_csv_step_missing_a_layer(rows, data):
    step = data.draw(st.sampled_from(sorted({r[0] for r in rows})))
    layer = data.draw(st.sampled_from(sorted({r[1] for r in rows})))
    kept = [r for r in rows if (r[0], r[1]) != (step, layer)]
    with tempfile.TemporaryDirectory() as tmp:
        message = _read_error(_write_rows(Path(tmp) / "bad.csv", kept))
    assert f"step {step} has no rows for layer {layer}" in message


@SETTINGS
@given(data=st.binary(max_size=200))
def test_csv_garbage_bytes_never_escape_as_anything_but_one_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "garbage.csv"
        path.write_bytes(data)
        try:
            trace = read_trace(path)
        except ValueError as exc:
            assert "garbage.csv" in str(exc) and "\n" not in str(exc)
        else:   # random bytes that happen to be a valid tidy CSV
            assert isinstance(trace, LoadTrace)


@SETTINGS
@given(head=st.binary(max_size=60), tail=st.binary(max_size=60))
def test_csv_invalid_utf8_is_unreadable(head, tail):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "garbage.csv"
        path.write_bytes(b"step,layer,expert,tokens\n" + head + b"\xff\xfe" + tail)
        assert "is not a readable CSV file" in _read_error(path)


@pytest.mark.parametrize(("body", "expected"), [
    ("", "is not a readable CSV file: No columns to parse"),
    ("\n\n", "is not a readable CSV file"),
    ("step,layer,expert,tokens\n", "no data rows"),
    ("step,layer,expert,tokens\n0,0,0,1\n0,0,1,2,3,4\n", "is not a readable CSV file: Error tokenizing data"),
    ("step,layer,expert,tokens\n0,0,0,True\n", "column 'tokens' must hold integers, got bool"),
    # one row with large ids would expand to 32768 x 32768 dense counts (8 GiB): refused up front
    ("step,layer,expert,tokens,src_rank\n0,0,32767,1,32767\n", f"more than the {MAX_DENSE_COUNTS} a trace may hold"),
])
def test_csv_fixed_bad_files(tmp_path, body, expected):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    assert expected in _read_error(path)


def test_overridden_top_k_or_tokens_per_step_is_named(tmp_path):
    path = _write_rows(tmp_path / "t.csv", [[0, 0, 0, 5]])
    assert "tokens_per_step must be a positive integer, got -1" in _read_error(path, tokens_per_step=-1)
    assert "tokens_per_step must be a positive integer, got 0" in _read_error(path, tokens_per_step=0)
    assert "top_k must be a positive integer, got 0" in _read_error(path, top_k=0, tokens_per_step=5)
    assert "top_k 2 exceeds the number of experts 1" in _read_error(path, top_k=2)


# ---------------------------------------------------------------- corrupt Parquet files


def _valid_parquet_bytes() -> bytes:
    rng = np.random.default_rng(7)
    src = rng.integers(0, 6, (3, 2, 4, 2))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "good.parquet"
        write_trace(LoadTrace(src.sum(axis=3), src_counts_SLEG=src, top_k=2, tokens_per_step=40,
                              meta={"domains": ["a", "b", "c"]}), path)
        return path.read_bytes()


VALID_PARQUET = _valid_parquet_bytes()


@settings(max_examples=80, deadline=None, derandomize=True)
@given(cut=st.integers(0, len(VALID_PARQUET) - 1))
def test_truncated_parquet_is_unreadable(cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cut.parquet"
        path.write_bytes(VALID_PARQUET[:cut])
        assert "is not a readable Parquet file" in _read_error(path)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID_PARQUET) - 1), st.integers(1, 255)), min_size=1,
                      max_size=4))
def test_flipped_bytes_give_one_error_or_a_valid_trace(flips):
    data = bytearray(VALID_PARQUET)
    for offset, xor in flips:
        data[offset] ^= xor
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flipped.parquet"
        path.write_bytes(bytes(data))
        try:
            trace = read_trace(path)
        except ValueError as exc:   # never another exception type, never a message without the file
            assert "flipped.parquet" in str(exc) and "\n" not in str(exc), str(exc)
        else:   # a flip inside a value or unused bytes can go unnoticed (no checksums): still a valid trace
            assert trace.counts_SLE.ndim == 3 and (trace.counts_SLE >= 0).all()


def test_flipped_column_name_byte_is_an_error_not_a_unicode_traceback(tmp_path):
    # a corrupted column name that is not UTF-8 used to escape as a bare UnicodeDecodeError from pyarrow
    table = pa.table({"step": pa.array([0], pa.int32()), "layer": pa.array([0], pa.int16()),
                      "expert": pa.array([0], pa.int16()), "tokens": pa.array([1], pa.int32())})
    path = tmp_path / "names.parquet"
    pq.write_table(table, path)
    data = path.read_bytes()
    assert data.count(b"expert") >= 1
    path.write_bytes(data.replace(b"expert", b"\xd6\xff\xfe\xfd\xfc\xfb"))
    assert "is not a readable Parquet file: 'utf-8' codec can't decode" in _read_error(path)


META = {"schema_version": 1, "num_layers": 2, "num_experts": 3, "top_k": 1, "tokens_per_step": None}


@st.composite
def parquet_columns(draw) -> dict[str, list[int]]:
    rows = [(s, layer, e) for s in range(2) for layer in range(2) for e in range(3)]
    chosen = draw(st.lists(st.sampled_from(rows[1:]), unique=True, max_size=6))
    keys = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), *[k for k in chosen if k[2]]]
    keys = draw(st.permutations(sorted(set(keys))))
    return {"step": [k[0] for k in keys], "layer": [k[1] for k in keys], "expert": [k[2] for k in keys],
            "tokens": [draw(st.integers(0, 9)) for _ in keys]}


def _write_parquet(path: Path, columns: dict[str, list], types: dict[str, pa.DataType] | None = None,
                   metadata: dict | None = META) -> Path:
    types = {"step": pa.int32(), "layer": pa.int16(), "expert": pa.int16(), "tokens": pa.int32(), **(types or {})}
    table = pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})
    if metadata is not None:
        table = table.replace_schema_metadata({b"symi": json.dumps(metadata).encode()})
    pq.write_table(table, path)
    return path


@SETTINGS
@given(columns=parquet_columns(), data=st.data())
def test_parquet_bad_values_name_the_row(columns, data):
    row = data.draw(st.integers(0, len(columns["step"]) - 1))
    kind = data.draw(st.sampled_from(["null", "nan", "fraction", "negative", "layer-range", "expert-range",
                                      "duplicate"]))
    types: dict[str, pa.DataType] = {}
    name = data.draw(st.sampled_from(COLUMNS))
    if kind == "null":
        columns[name][row] = None
        expected = f"row {row + 1}: column '{name}' is missing a value"
    elif kind in ("nan", "fraction"):
        types[name] = pa.float64()
        columns[name][row] = float("nan") if kind == "nan" else 0.5
        expected = (f"row {row + 1}: column '{name}' is missing a value (NaN)" if kind == "nan"
                    else f"row {row + 1}: column '{name}' holds 0.5, not an integer")
    elif kind == "negative":
        columns[name][row] = -2
        expected = f"row {row + 1}: column '{name}' is negative (-2)"
    elif kind == "layer-range":
        columns["layer"][row] = 2
        expected = f"row {row + 1}: layer 2 is out of range [0, 2)"
    elif kind == "expert-range":
        columns["expert"][row] = 3
        expected = f"row {row + 1}: expert 3 is out of range [0, 3)"
    else:
        for values in columns.values():
            values.append(values[row])
        n = len(columns["step"])
        expected = f"duplicate rows row {row + 1} and {n}"
    with tempfile.TemporaryDirectory() as tmp:
        message = _read_error(_write_parquet(Path(tmp) / "bad.parquet", columns, types))
    assert expected in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"num_experts": 10**9}, "metadata num_experts 1000000000 exceeds the int16 id limit 32767"),
    ({"num_layers": 40000}, "metadata num_layers 40000 exceeds the int16 id limit"),
    ({"num_experts": 0}, "metadata num_experts must be a positive integer, got 0"),
    ({"top_k": "2"}, "metadata top_k must be a positive integer, got '2'"),
    ({"tokens_per_step": -1}, "metadata tokens_per_step must be a positive integer or null, got -1"),
    ({"schema_version": 2}, "unsupported trace schema_version 2"),
    ({"model": 3}, "metadata model must be a string, got 3"),
    ({"meta": [1]}, "metadata meta must be a JSON object"),
])
def test_parquet_bad_metadata(tmp_path, change, expected):
    columns = {"step": [0, 0], "layer": [0, 1], "expert": [0, 0], "tokens": [1, 1]}
    assert expected in _read_error(_write_parquet(tmp_path / "bad.parquet", columns, metadata={**META, **change}))


def test_parquet_duplicate_or_missing_column(tmp_path):
    table = pa.table([pa.array([0]), pa.array([0]), pa.array([0]), pa.array([1]), pa.array([5])],
                     names=["step", "layer", "expert", "tokens", "tokens"])
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    assert "is not a readable Parquet file" in _read_error(path)   # pyarrow refuses duplicate names itself
    path = _write_parquet(tmp_path / "missing.parquet", {"step": [0], "layer": [0], "tokens": [1]})
    assert "missing column 'expert'" in _read_error(path)


@pytest.mark.parametrize("body", [b"", b"PAR1", b"PAR1PAR1", b"not parquet at all", b"PAR1" + bytes(300) + b"PAR1"])
def test_parquet_garbage(tmp_path, body):
    path = tmp_path / "junk.parquet"
    path.write_bytes(body)
    assert "is not a readable Parquet file" in _read_error(path)

