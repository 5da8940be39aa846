"""Bad cluster and model files (TOML/JSON), generated: one ValueError naming the file or the field; an impossible
cluster is one `Error:` line at `symi plan` / `symi simulate` and leaves no output."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import symi
from symi_sim.cluster import load_cluster
from symi_sim.models import _NON_NEGATIVE_INT_FIELDS, _POSITIVE_INT_FIELDS, load_model
from symi_sim.traces.format import LoadTrace, write_trace

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

CLUSTER_INT_FIELDS = ("num_nodes", "gpus_per_node", "slots_per_gpu", "nics_per_node")
CLUSTER_POSITIVE_FLOAT_FIELDS = ("nic_gbps", "intra_node_gbps", "pcie_gbps", "gpu_peak_flops", "gpu_memory_bytes")
MODEL_BOOL_FIELDS = ("tied_embeddings", "learned_positions")

TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=5)   # TOML-safe without escapes
NON_NUMBERS = st.one_of(TEXT, st.booleans(), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=1))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)   # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _write(tmp: str, fields: dict, suffix: str, table: str | None) -> Path:
    path = Path(tmp) / f"conf{suffix}"
    data = {table: fields} if table else fields
    if suffix == ".json":
        path.write_text(json.dumps(data))   # NaN/Infinity literals: Python's json accepts them on input
    else:
        body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in fields.items())
        path.write_text(f"[{table}]\n{body}" if table else body)
    return path


def _load_error(loader, path: Path) -> str:
    with pytest.raises(ValueError) as info:
        loader(str(path))
    message = str(info.value)
    assert "\n" not in message, message
    return message


@st.composite
def bad_cluster_field(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["int", "float", "latency", "efficiency"]))
    if kind == "int":
        value = draw(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), NON_NUMBERS))
        return draw(st.sampled_from(CLUSTER_INT_FIELDS)), value
    if kind == "float":
        value = draw(st.one_of(st.integers(max_value=0), st.floats(max_value=0), NON_FINITE, NON_NUMBERS))
        return draw(st.sampled_from(CLUSTER_POSITIVE_FLOAT_FIELDS)), value
    if kind == "latency":
        return "link_latency_s", draw(st.one_of(st.floats(max_value=-1e-9), NON_FINITE, NON_NUMBERS))
    return "compute_efficiency", draw(st.one_of(st.floats(min_value=1.0001, allow_infinity=False),
                                                st.floats(max_value=0), NON_FINITE, NON_NUMBERS))


@SETTINGS
@given(field=bad_cluster_field(), suffix=st.sampled_from([".toml", ".json"]),
       table=st.sampled_from([None, "cluster"]), base=st.booleans())
def test_bad_cluster_field_is_named(field, suffix, table, base):
    name, value = field
    fields = {"base": "cpu-4", name: value} if base else {name: value}
    with tempfile.TemporaryDirectory() as tmp:
        message = _load_error(load_cluster, _write(tmp, fields, suffix, table))
    assert f": {name} must be " in message, message


@st.composite
def bad_model_field(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["positive", "non-negative", "bool"]))
    if kind == "positive":
        value = draw(st.one_of(st.integers(max_value=0), st.floats(), NON_NUMBERS))
        return draw(st.sampled_from(_POSITIVE_INT_FIELDS)), value
    if kind == "non-negative":
        value = draw(st.one_of(st.integers(max_value=-1), st.floats(), NON_NUMBERS))
        return draw(st.sampled_from(_NON_NEGATIVE_INT_FIELDS)), value
    return draw(st.sampled_from(MODEL_BOOL_FIELDS)), draw(st.one_of(st.integers(), st.floats(), TEXT))


@SETTINGS
@given(field=bad_model_field(), suffix=st.sampled_from([".toml", ".json"]), table=st.sampled_from([None, "model"]))
def test_bad_model_field_is_named(field, suffix, table):
    name, value = field
    with tempfile.TemporaryDirectory() as tmp:
        message = _load_error(load_model, _write(tmp, {"base": "gpt-small", name: value}, suffix, table))
    assert f": {name} must be " in message, message


@SETTINGS
@given(unknown=st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True), suffix=st.sampled_from([".toml", ".json"]),
       kind=st.sampled_from(["cluster", "model"]))
def test_unknown_field_is_named(unknown, suffix, kind):
    loader = load_cluster if kind == "cluster" else load_model
    valid = set(load_cluster("cpu-4").to_dict()) if kind == "cluster" else set(load_model("gpt-small").to_dict())
    if unknown in valid or unknown in ("base", kind):
        return
    with tempfile.TemporaryDirectory() as tmp:
        message = _load_error(loader, _write(tmp, {unknown: 1}, suffix, None))
    assert f"unknown field(s) ['{unknown}']" in message and "conf" + suffix in message


@SETTINGS
@given(cut=st.integers(0, 200), kind=st.sampled_from(["cluster", "model"]))
def test_truncated_json_cannot_be_parsed(cut, kind):
    loader = load_cluster if kind == "cluster" else load_model
    text = json.dumps({"base": "cpu-4" if kind == "cluster" else "gpt-small", "name": "x"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cut.json"
        path.write_text(text[: min(cut, len(text) - 1)])   # every strict prefix of a JSON object is invalid
        message = _load_error(loader, path)
    assert "cut.json' cannot be parsed" in message


BROKEN_TOML = [
    "num_nodes = \n",
    "num_nodes = 1\nnum_nodes = 2\n",          # a key defined twice
    "[cluster\nnum_nodes = 1\n",
    "name = \"unterminated\n",
    "= 3\n",
    "num_nodes = 1 2\n",
    "[[[\n",
]


@pytest.mark.parametrize("body", [*BROKEN_TOML, b"\xff\xfe\x00"])
@pytest.mark.parametrize("kind", ["cluster", "model"])
def test_broken_toml_syntax(tmp_path, body, kind):
    path = tmp_path / "broken.toml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    message = _load_error(load_cluster if kind == "cluster" else load_model, path)
    assert f"{kind} file '{path}' cannot be parsed" in message


@pytest.mark.parametrize(("body", "expected"), [
    ('{"base": [1]}', "base [1] is not a preset"),             # an unhashable base used to raise TypeError
    ('{"base": {"a": 1}}', "base {'a': 1} is not a preset"),
    ('{"base": "nope"}', "base 'nope' is not a preset"),
    ('{"name": 5}', "name must be a non-empty string, got 5"),   # a non-string name used to be accepted
    ('{"name": ""}', "name must be a non-empty string"),
    ('{"name": null}', "name must be a non-empty string, got None"),
    ('[1, 2]', "must hold a table/object of cluster fields"),
    ('{"cluster": 5}', "[cluster] must be a table of cluster fields"),
    ('{"num_nodes": 1e400}', "num_nodes must be a positive integer, got inf"),
])
def test_cluster_file_structure(tmp_path, body, expected):
    path = tmp_path / "c.json"
    path.write_text(body)
    assert expected in _load_error(load_cluster, path)


def test_spec_errors_and_overrides():
    assert "unknown cluster 'nope'" in _load_error(load_cluster, Path("nope"))
    assert "does not exist" in _load_error(load_cluster, Path("/nonexistent/c.toml"))
    assert "unknown model 'gpt-huge'" in _load_error(load_model, Path("gpt-huge"))
    with pytest.raises(ValueError, match=r"slots_per_gpu must be a positive integer, got 0"):
        load_cluster("cpu-4", slots_per_gpu=0)
    with pytest.raises(ValueError, match=r"unknown cluster field\(s\) \['bogus'\]"):
        load_cluster("cpu-4", bogus=1)


# ---------------------------------------------------------------- impossible clusters at the command line


def _assert_one_error(result, *expected: str) -> str:
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(nodes=st.integers(1, 2), gpus=st.integers(1, 3), slots=st.integers(1, 3),
       suffix=st.sampled_from([".toml", ".json"]), command=st.sampled_from(["plan", "simulate"]))
def test_impossible_cluster_is_one_error_and_no_output(nodes, gpus, slots, suffix, command):
    num_experts = nodes * gpus * slots + 1   # one expert more than the cluster has slots
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        trace = tmp_path / "t.parquet"
        write_trace(LoadTrace(np.ones((3, 1, num_experts), dtype=np.int64)), trace)
        cluster = _write(tmp, {"num_nodes": nodes, "gpus_per_node": gpus, "slots_per_gpu": slots}, suffix, None)
        out = tmp_path / ("plan.json" if command == "plan" else "run")
        args = (["plan", "--trace", str(trace), "--cluster", str(cluster), "--step", "1", "--out", str(out)]
                if command == "plan" else
                ["simulate", "--trace", str(trace), "--cluster", str(cluster), "--fit-model-to-trace",
                 "--policies", "static", "--out", str(out)])
        result = CliRunner().invoke(symi, args)
        _assert_one_error(result, "impossible cluster", f"{num_experts} experts",
                          f"{nodes * gpus * slots} slots")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.parquet", cluster.name])
