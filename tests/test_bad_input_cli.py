"""Bad command-line input, generated, through click's CliRunner: a non-zero exit, exactly one `Error:` line, no
traceback, and no output file (nor a temporary one) left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import symi
from symi_sim.policies import available_policies
from symi_sim.traces.format import LoadTrace, write_trace

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
NUM_STEPS = 4


def _make_trace(directory: Path) -> Path:
    path = directory / "t.parquet"
    counts = np.random.default_rng(0).multinomial(64, [0.4, 0.3, 0.2, 0.1], size=(NUM_STEPS, 2))
    write_trace(LoadTrace(counts, top_k=1, tokens_per_step=64), path)
    return path


def _invoke(directory: Path, *args: object):
    """Run `symi args` and check the failure is clean: exit != 0, one Error line, nothing new in `directory`."""
    before = sorted(p.name for p in directory.iterdir())
    result = CliRunner().invoke(symi, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert sorted(p.name for p in directory.iterdir()) == before   # no output, no temporary file
    return errors[0]


# ---------------------------------------------------------------- symi trace info


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".parquet"]))
def test_trace_info_on_garbage(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"junk{suffix}"
        path.write_bytes(b"\xff" + data)   # never valid UTF-8 nor a Parquet file (which starts with PAR1)
        error = _invoke(Path(tmp), "trace", "info", path)
    assert f"junk{suffix}" in error
    assert ("not a readable CSV file" if suffix == ".csv" else "not a readable Parquet file") in error


@pytest.mark.parametrize(("args", "expected"), [
    (["--top-k", "0"], "top_k must be a positive integer, got 0"),
    (["--top-k", "5"], "top_k 5 exceeds the number of experts 4"),
    (["--tokens-per-step", "0"], "tokens_per_step must be a positive integer, got 0"),
    (["--tokens-per-step", "-3"], "tokens_per_step must be a positive integer, got -3"),
    (["--tokens-per-step", "10"], "routes 64 tokens, more than top_k x tokens_per_step"),
    (["--top-k", "x"], "Invalid value for '--top-k'"),
])
def test_trace_info_bad_overrides(tmp_path, args, expected):
    trace = _make_trace(tmp_path)
    assert expected in _invoke(tmp_path, "trace", "info", trace, *args)


def test_trace_info_missing_and_unknown_suffix(tmp_path):
    assert "does not exist" in _invoke(tmp_path, "trace", "info", tmp_path / "none.parquet")
    (tmp_path / "t.txt").write_text("step,layer,expert,tokens\n0,0,0,1\n")
    assert "unknown suffix '.txt'" in _invoke(tmp_path, "trace", "info", tmp_path / "t.txt")


# ---------------------------------------------------------------- symi plan


def _plan(tmp_path: Path, *args: object) -> str:
    trace = _make_trace(tmp_path) if not (tmp_path / "t.parquet").exists() else tmp_path / "t.parquet"
    return _invoke(tmp_path, "plan", "--trace", trace, "--cluster", "cpu-4", "--out", tmp_path / "plan.json", *args)


POLICY_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(
    lambda name: name not in available_policies())


@SETTINGS
@given(name=POLICY_NAMES)
def test_plan_unknown_policy(name):
    with tempfile.TemporaryDirectory() as tmp:
        error = _plan(Path(tmp), "--policy", name, "--step", "1")
    assert f"unknown policy '{name}'" in error and "choices: " in error


@SETTINGS
@given(names=st.lists(POLICY_NAMES, min_size=1, max_size=2))
def test_plan_replay_unknown_policy(names):
    with tempfile.TemporaryDirectory() as tmp:
        error = _invoke(Path(tmp), "plan", "--trace", _make_trace(Path(tmp)), "--cluster", "cpu-4", "--replay",
                        "--policies", ",".join(["static", *names]), "--out", Path(tmp) / "replay")
    assert f"unknown policy '{names[0]}'" in error


@SETTINGS
@given(key=st.from_regex(r"[a-z_]{1,10}", fullmatch=True), value=st.sampled_from(["1", "x", "nan", "-1"]),
       policy=st.sampled_from(["static", "symi", "eplb", "lazarus"]))
def test_plan_unknown_policy_option(key, value, policy):
    from symi_sim.policies import get_policy

    if key in get_policy(policy).config():
        return
    with tempfile.TemporaryDirectory() as tmp:
        error = _plan(Path(tmp), "--policy", policy, "--step", "1", "-o", f"{key}={value}")
    assert f"unknown option(s) ['{key}'] for policy '{policy}'" in error


@SETTINGS
@given(option=st.from_regex(r"[a-z_ ]{0,8}", fullmatch=True))
def test_plan_option_without_equals(option):
    with tempfile.TemporaryDirectory() as tmp:
        error = _plan(Path(tmp), "--policy", "symi", "--step", "1", "-o", option)
    assert f"policy option '{option}' must look like key=value" in error


@SETTINGS
@given(step=st.one_of(st.integers(max_value=-1), st.integers(min_value=NUM_STEPS)))
def test_plan_step_outside_the_trace(step):
    with tempfile.TemporaryDirectory() as tmp:
        error = _plan(Path(tmp), "--step", step)
    assert f"step {step} is outside the trace's steps 0..{NUM_STEPS - 1}" in error


@SETTINGS
@given(window=st.integers(max_value=0), replay=st.booleans())
def test_plan_bad_window(window, replay):
    with tempfile.TemporaryDirectory() as tmp:
        error = _plan(Path(tmp), *(["--replay"] if replay else ["--step", "2"]), "--window", window)
    assert f"window must be a positive integer, got {window}" in error


@pytest.mark.parametrize(("args", "expected"), [
    (["--step", "0"], "step 0 has no earlier step to plan from"),
    (["--step", "1.5"], "Invalid value for '--step'"),
    (["--step", "x"], "Invalid value for '--step'"),
    (["--window", "w", "--step", "1"], "Invalid value for '--window'"),
    (["--step", "1", "--format", "npz"], "Invalid value for '--format'"),
    (["--step", "1", "--format", "eplb"], "--format eplb does not match --out"),
    (["--step", "1", "--slots", "0"], "slots_per_gpu must be a positive integer, got 0"),
    (["--step", "1", "--policy", "eplb", "-o", "num_groups=0"], "num_groups must be a positive integer, got 0"),
    (["--step", "1", "--policy", "flexmoe", "-o", "rebalance_every=nan"], "rebalance_every must be a positive"),
    (["--step", "1", "--policy", "symi-balanced", "-o", "packing=xyz"], "unknown packing 'xyz'"),
    (["--replay", "--capacity-factor", "nan"], "finite number > 0 or None, got nan"),
    (["--replay", "--capacity-factor", "-1"], "finite number > 0 or None, got -1.0"),
    (["--replay", "--capacity-mode", "tokens"], "Invalid value for '--capacity-mode'"),
    (["--step", "1", "--bogus"], "No such option '--bogus'"),
])
def test_plan_bad_options(tmp_path, args, expected):
    assert expected in _plan(tmp_path, *args)


def test_plan_replay_with_no_policy_named(tmp_path):
    error = _invoke(tmp_path, "plan", "--trace", _make_trace(tmp_path), "--cluster", "cpu-4", "--replay",
                    "--policies", ",", "--out", tmp_path / "replay")
    assert "no policy" in error


# ---------------------------------------------------------------- symi simulate


def _simulate(tmp_path: Path, *args: object) -> str:
    trace = _make_trace(tmp_path) if not (tmp_path / "t.parquet").exists() else tmp_path / "t.parquet"
    return _invoke(tmp_path, "simulate", "--trace", trace, "--cluster", "cpu-4", "--fit-model-to-trace",
                   "--policies", "static", "--out", tmp_path / "run", *args)


@SETTINGS
@given(factor=st.one_of(st.just(float("nan")), st.floats(max_value=0, allow_nan=False, allow_infinity=True)))
def test_simulate_bad_capacity_factor(factor):
    with tempfile.TemporaryDirectory() as tmp:
        error = _simulate(Path(tmp), "--capacity-factor", repr(factor))
    assert "capacity factor must be a finite number > 0" in error


def test_simulate_infinite_capacity_factor(tmp_path):
    assert "capacity factor" in _simulate(tmp_path, "--capacity-factor", "inf")


@SETTINGS
@given(steps=st.integers(max_value=0))
def test_simulate_non_positive_steps(steps):
    with tempfile.TemporaryDirectory() as tmp:
        error = _simulate(Path(tmp), "--steps", steps)
    assert f"steps must be a positive integer, got {steps}" in error


@SETTINGS
@given(steps=st.integers(min_value=NUM_STEPS, max_value=10**6))
def test_simulate_more_steps_than_the_trace(steps):
    with tempfile.TemporaryDirectory() as tmp:
        error = _simulate(Path(tmp), "--steps", steps)
    assert f"{steps} asked" in error and "--loop" in error


@SETTINGS
@given(name=st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True), what=st.sampled_from(["model", "cluster"]))
def test_simulate_unknown_model_or_cluster(name, what):
    from symi_sim.cluster import available_clusters
    from symi_sim.models import PRESETS

    if name in PRESETS or name in available_clusters():
        return
    with tempfile.TemporaryDirectory() as tmp:
        error = _simulate(Path(tmp), f"--{what}", name)
    assert f"unknown {what} '{name}': give a preset" in error


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "missing.toml"], "model file 'missing.toml' does not exist"),
    (["--cluster", "missing.json"], "cluster file 'missing.json' does not exist"),
    (["--steps", "abc"], "Invalid value for '--steps'"),
    (["--capacity-factor", "lots"], "--capacity-factor: capacity factor must be a number or 'none', got 'lots'"),
    (["--window", "0"], "window must be a positive integer, got 0"),
    (["--slots", "-1"], "slots_per_gpu must be a positive integer, got -1"),
    (["--policies", " , "], "no policy named in --policies"),
    (["--policies", "static,static"], "policies are listed more than once"),
    (["--policies", "static:packing"], "policy option 'packing' must look like key=value"),
    (["--policies", "flexmoe-0"], "rebalance_every must be a positive integer, got 0"),
    (["--convergence", "missing.csv"], "calibration file not found"),
])
def test_simulate_bad_options(tmp_path, args, expected):
    assert expected in _simulate(tmp_path, *args)


@pytest.mark.parametrize(("body", "expected"), [
    (b"\xff\xfe", "cal.csv: cannot be read"),   # used to be a bare UnicodeDecodeError message, no file named
    (b"survival,iterations\n0.5," + b"1" * 200_000 + b"\n1.0,2\n", "cal.csv: cannot be read"),   # used to be csv.Error
    (b"survival,iterations\n0.5,10\n0.5,10\n", "got only 0.5"),
    (b"survival,iterations\nnan,1\n1.0,2\n", "line 2: survival is NaN"),
])
def test_simulate_bad_convergence_file(tmp_path, body, expected):
    (tmp_path / "cal.csv").write_bytes(body)
    assert expected in _simulate(tmp_path, "--convergence", tmp_path / "cal.csv")


def test_simulate_bad_trace_files(tmp_path):
    (tmp_path / "bad.csv").write_text("step,layer,expert,tokens\n0,0,0,1\n0,0,1,2,3\n")
    error = _invoke(tmp_path, "simulate", "--trace", tmp_path / "bad.csv", "--out", tmp_path / "run")
    assert "bad.csv' is not a readable CSV file: Error tokenizing data" in error   # one line (pandas adds \n)
    data = bytearray(_make_trace(tmp_path).read_bytes())
    (tmp_path / "cut.parquet").write_bytes(bytes(data[: len(data) // 3]))
    error = _invoke(tmp_path, "simulate", "--trace", tmp_path / "cut.parquet", "--out", tmp_path / "run")
    assert "cut.parquet' is not a readable Parquet file" in error


# ---------------------------------------------------------------- symi trace synth

SYNTH_OK = {"--experts": "4", "--layers": "2", "--steps": "3", "--skew": "1", "--drift": "0.1", "--seed": "0"}


@st.composite
def bad_synth_options(draw) -> tuple[dict[str, str], str]:
    option, value, expected = draw(st.one_of(
        st.tuples(st.sampled_from(["--experts", "--layers", "--steps", "--tokens-per-step", "--top-k"]),
                  st.integers(max_value=0).map(str), st.just("must be a positive integer")),
        st.tuples(st.just("--skew"), st.sampled_from(["nan", "inf", "-1", "-0.5"]),
                  st.just("skew must be a finite number >= 0")),
        st.tuples(st.just("--drift"), st.sampled_from(["nan", "-0.1", "1.5", "inf"]),
                  st.just("drift must be a number in [0, 1]")),
        st.tuples(st.just("--burst-prob"), st.sampled_from(["nan", "-1", "2"]),
                  st.just("burst probability must be a number in [0, 1]")),
        st.tuples(st.just("--burst-scale"), st.sampled_from(["nan", "inf", "0", "-2"]),
                  st.just("burst scale must be a finite number > 0")),
        st.tuples(st.just("--seed"), st.integers(max_value=-1).map(str),
                  st.just("seed must be an integer >= 0")),
        st.tuples(st.just("--top-k"), st.integers(5, 100).map(str), st.just("exceeds the number of experts 4")),
        st.tuples(st.just("--experts"), st.integers(2**15, 2**20).map(str), st.just("too large")),
        st.tuples(st.sampled_from(["--experts", "--steps", "--seed"]), st.sampled_from(["x", "1.5", ""]),
                  st.just("Invalid value for")),
    ))
    return {**SYNTH_OK, option: value}, expected


@SETTINGS
@given(bad=bad_synth_options())
def test_trace_synth_bad_parameters(bad):
    options, expected = bad
    with tempfile.TemporaryDirectory() as tmp:
        args = [x for pair in options.items() for x in pair]
        error = _invoke(Path(tmp), "trace", "synth", Path(tmp) / "s.parquet", *args)
    assert expected in error


@pytest.mark.parametrize("name", ["s.csv", "s.parquet.tmp", "s"])
def test_trace_synth_bad_output_suffix(tmp_path, name):
    args = [x for pair in SYNTH_OK.items() for x in pair]
    assert "must end in .parquet" in _invoke(tmp_path, "trace", "synth", tmp_path / name, *args)


def test_trace_synth_output_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    args = [x for pair in SYNTH_OK.items() for x in pair]
    assert "f/s.parquet" in _invoke(tmp_path, "trace", "synth", tmp_path / "f" / "s.parquet", *args)


def test_trace_convert_bad_input_leaves_nothing(tmp_path):
    (tmp_path / "in.csv").write_bytes(b"step,layer,expert,tokens\n0,0,0,1\n\xff\n")
    error = _invoke(tmp_path, "trace", "convert", tmp_path / "in.csv", tmp_path / "out.parquet", "--from", "csv")
    assert "in.csv' is not a readable CSV file" in error
