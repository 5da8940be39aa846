"""Options of every command (issue 12): help on each, registries listed, shared options alike everywhere,
dropless simulate, simulate -o, defaults, and options a mode would ignore refused."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
from cli_checks import one_error_line, small_trace
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import symi
from symi_sim.cluster import available_clusters
from symi_sim.models import PRESETS as MODEL_PRESETS
from symi_sim.policies import available_policies, get_policy
from symi_sim.traces.format import LoadTrace, read_trace, write_trace

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _walk(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    commands = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            commands.update(_walk(command, f"{prefix}{name} "))
        else:
            commands[f"{prefix}{name}"] = command
    return commands


COMMANDS = _walk(symi)


def _option(command: str, flag: str) -> click.Option:
    return next(p for p in COMMANDS[command].params if isinstance(p, click.Option) and flag in p.opts)


def _default(command: str, flag: str) -> object:
    return _option(command, flag).get_default(click.Context(COMMANDS[command]))


def test_every_option_of_every_command_has_help():
    assert {"simulate", "plan", "train", "plot", "calibrate", "trace info", "trace convert", "trace synth"} <= set(
        COMMANDS)
    missing = [f"{name} {max(p.opts, key=len)}" for name, command in COMMANDS.items() for p in command.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == []
    assert all((p.help or "").strip() for p in symi.params if isinstance(p, click.Option))


def test_choices_are_listed_from_the_registries():
    for command in ("simulate", "plan"):
        assert all(name in _option(command, "--cluster").help for name in available_clusters())
    assert all(name in _option("simulate", "--model").help for name in MODEL_PRESETS)
    for command, flag in (("simulate", "--policies"), ("plan", "--policies"), ("plan", "--policy")):
        assert all(name in _option(command, flag).help for name in available_policies())


# (flag, commands where it means the same): same help, default and type in each
SHARED = [
    ("--cluster", ["plan", "simulate"]),
    ("--capacity-factor", ["plan", "simulate", "train"]),
    ("--capacity-mode", ["plan", "simulate", "train"]),
    ("--slots", ["plan", "simulate"]),
    ("--window", ["plan", "simulate"]),
    ("-o", ["plan", "simulate", "train"]),
    ("--force", ["calibrate", "plan", "simulate", "trace convert", "trace synth"]),
]
# the same option with one shared first sentence and a context-specific rest (which formats use it, overrides)
SHARED_PREFIX = [
    ("--top-k", ["trace info", "trace convert", "trace synth", "train"]),
    ("--tokens-per-step", ["trace info", "trace convert", "trace synth"]),
]


@pytest.mark.parametrize(("flag", "commands"), SHARED)
def test_shared_options_are_alike_in_every_command(flag, commands):
    options = [_option(command, flag) for command in commands]
    assert len({o.help for o in options}) == 1
    assert len({tuple(sorted(o.opts)) for o in options}) == 1
    assert len({type(o.type) for o in options}) == 1
    assert len({repr(_default(command, flag)) for command in commands}) == 1


@pytest.mark.parametrize(("flag", "commands"), SHARED_PREFIX)
def test_shared_options_start_with_the_same_help(flag, commands):
    first = [_option(command, flag).help.split(". ")[0].rstrip(".") for command in commands]
    assert len(set(first)) == 1, first


def test_out_and_policy_options_say_what_they_write():
    for command in ("simulate", "plan", "train"):
        assert "runs/" in _option(command, "--out").help
    assert "runs/plan-" in _option("plan", "--out").help


# ---------------------------------------------------------------- behaviour


def _ok(*args: object) -> click.testing.Result:
    result = CliRunner().invoke(symi, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("word", ["none", "None", "dropless", " NONE "])
def test_simulate_and_plan_accept_a_dropless_capacity_factor(tmp_path, word):
    trace = small_trace(tmp_path)
    _ok("simulate", "--trace", trace, "--cluster", "cpu-4", "--fit-model-to-trace", "--policies", "static,symi",
        "--capacity-factor", word, "--out", tmp_path / "sim")
    summary = pd.read_csv(tmp_path / "sim" / "summary.csv")
    assert (summary["dropped_fraction"] == 0).all()
    assert json.loads((tmp_path / "sim" / "config.json").read_text())["capacity_factor"] is None
    _ok("plan", "--trace", trace, "--cluster", "cpu-4", "--replay", "--policies", "static", "--capacity-factor", word,
        "--out", tmp_path / "replay")
    assert (pd.read_csv(tmp_path / "replay" / "summary.csv")["dropped_fraction"] == 0).all()


def test_dropless_slot_buffers_pad_to_the_busiest_slot(tmp_path):
    """Dropless pads every slot buffer to the busiest slot's load: never cheaper than a factor that drops."""
    trace = small_trace(tmp_path)
    times = {}
    for factor in ("none", "1.0"):
        _ok("simulate", "--trace", trace, "--cluster", "cpu-4", "--fit-model-to-trace", "--policies", "static",
            "--capacity-factor", factor, "--out", tmp_path / factor)
        times[factor] = pd.read_csv(tmp_path / factor / "summary.csv")["mean_time_s"].iloc[0]
    assert times["none"] >= times["1.0"]


@SETTINGS
@given(policies=st.lists(st.sampled_from(["static", "symi", "symi-balanced", "eplb", "lazarus", "flexmoe-10"]),
                         min_size=1, max_size=3, unique=True),
       key=st.sampled_from(["packing", "num_groups", "threshold", "rebalance_every"]))
def test_simulate_option_goes_to_every_policy_that_takes_it(policies, key):
    value = {"packing": "grouped", "num_groups": "1", "threshold": "1.5", "rebalance_every": "2"}[key]
    takers = [p for p in policies if key in get_policy(p).config()]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        args = ["simulate", "--trace", small_trace(tmp), "--cluster", "cpu-4", "--fit-model-to-trace", "--policies",
                ",".join(policies), "-o", f"{key}={value}", "--out", tmp / "run"]
        if not takers:
            assert f"-o {key}: no policy among" in one_error_line(tmp, *args)
            return
        _ok(*args)
        config = json.loads((tmp / "run" / "config.json").read_text())
    by_label = {p["label"]: p for p in config["policies"]}
    for policy in policies:
        label = f"{policy}:{key}={value}" if policy in takers else policy
        assert label in by_label
        if policy in takers:
            assert str(by_label[label][key]) == str(get_policy(f"{policy}:{key}={value}").config()[key])


def test_simulate_option_refuses_what_the_run_sets(tmp_path):
    error = one_error_line(tmp_path, "simulate", "--trace", small_trace(tmp_path), "--policies", "flexmoe", "-o",
                           "capacity_factor=2", "--out", tmp_path / "run")
    assert "-o capacity_factor: set by the run itself" in error


def test_plan_cluster_defaults_like_simulate(tmp_path):
    assert _default("plan", "--cluster") == _default("simulate", "--cluster") == "paper-a100-16"
    trace = tmp_path / "t.parquet"
    write_trace(LoadTrace(np.random.default_rng(1).multinomial(64, [1 / 8] * 8, size=(3, 2)), top_k=1,
                          tokens_per_step=64), trace)
    _ok("plan", "--trace", trace, "--step", "1", "--out", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["cluster"]["name"] == "paper-a100-16"


def test_synth_defaults_make_a_trace_simulate_takes_as_it_is(tmp_path):
    out = tmp_path / "s.parquet"
    result = _ok("trace", "synth", out)
    trace = read_trace(out)
    model = MODEL_PRESETS["gpt-small"]
    assert (trace.num_experts, trace.num_layers, trace.top_k, trace.tokens_per_step) == (
        model.num_experts, model.num_moe_layers, model.top_k, model.tokens_per_step)
    assert "200 steps" in result.output
    help_text = _ok("trace", "synth", "--help").output
    for flag in ("--experts", "--layers", "--steps", "--skew", "--drift", "--seed"):
        assert _option("trace synth", flag).default is not None and _option("trace synth", flag).show_default
    assert "default: 16" in help_text
    _ok("simulate", "--trace", out, "--policies", "static", "--steps", "2", "--out", tmp_path / "run")


@pytest.mark.parametrize(("out", "fmt", "expected"), [
    ("p.json", None, "json"), ("p.npz", None, "eplb"), ("p.pt", None, "eplb"), ("p.json", "json", "json"),
    ("p.npz", "eplb", "eplb"),
])
def test_plan_format_follows_the_extension(tmp_path, out, fmt, expected):
    if out.endswith(".pt"):
        pytest.importorskip("torch")
    _ok("plan", "--trace", small_trace(tmp_path), "--cluster", "cpu-4", "--step", "1", "--out", tmp_path / out,
        *(["--format", fmt] if fmt else []))
    data = (tmp_path / out).read_bytes()
    assert data.startswith(b"{") == (expected == "json")


@pytest.mark.parametrize(("out", "fmt"), [("p.npz", "json"), ("p.pt", "json"), ("p.json", "eplb")])
def test_plan_format_contradicting_the_extension_is_refused(tmp_path, out, fmt):
    error = one_error_line(tmp_path, "plan", "--trace", small_trace(tmp_path), "--cluster", "cpu-4", "--step", "1",
                           "--out", tmp_path / out, "--format", fmt)
    assert f"--format {fmt} does not match --out" in error


@pytest.mark.parametrize("out", ["p.txt", "p", "p.parquet"])
def test_plan_out_with_an_unknown_extension_is_refused(tmp_path, out):
    error = one_error_line(tmp_path, "plan", "--trace", small_trace(tmp_path), "--cluster", "cpu-4", "--step", "1",
                           "--out", tmp_path / out)
    assert "must end in .json" in error


# options a mode ignores: (arguments, the message)
IGNORED = [
    (["plan", "--step", "1", "--policies", "static"], "--policies goes with --replay"),
    (["plan", "--replay", "--step", "1"], "--step is for a single plan"),
    (["plan", "--replay", "--policy", "eplb"], "--policy is for a single plan"),
    (["plan", "--replay", "--format", "json"], "--format is for a single plan"),
    (["plan", "--step", "1", "--policy", "symi", "--capacity-factor", "2"],
     "--capacity-factor: policy 'symi' does not use it in a single plan"),
    (["plan", "--step", "1", "--policy", "eplb", "--capacity-mode", "gpu"],
     "--capacity-mode: policy 'eplb' does not use it in a single plan"),
    (["simulate", "--failure-seed", "3"], "--failure-seed needs --mtbf-hours or --gpu-mtbf-hours"),
    (["simulate", "--mtbf-hours", "1", "--failure-seed", "3"], "--failure-seed needs --failure-runs"),
    (["simulate", "--checkpoint", "none"], "--checkpoint needs --mtbf-hours"),
    (["simulate", "--loop"], "--loop needs --steps"),
]


@pytest.mark.parametrize(("args", "expected"), IGNORED)
def test_options_a_mode_ignores_are_refused(tmp_path, args, expected):
    out = tmp_path / ("plan.json" if "--step" in args else "run")
    error = one_error_line(tmp_path, *args, "--trace", small_trace(tmp_path), "--cluster", "cpu-4", "--out", out,
                           *(["--fit-model-to-trace"] if args[0] == "simulate" else []))
    assert expected in error


CONVERT_USES = {"csv": {"--top-k", "--tokens-per-step", "--model"},
                "counts-jsonl": {"--top-k", "--tokens-per-step", "--model"},
                "per-rank-csv": {"--top-k", "--tokens-per-step", "--model"},
                "olmoe": {"--model", "--selection", "--domains"},
                "megatron-router-trace": {"--num-experts", "--mtp", "--model"},
                "sglang-expert-distribution": {"--top-k", "--model"},
                "trtllm-expert-statistic": {"--model"},
                "vllm-routed-experts": {"--tokens-per-step", "--num-experts", "--model"}}
CONVERT_VALUES = {"--top-k": "1", "--tokens-per-step": "64", "--model": "m", "--selection": "top1", "--domains": "a",
                  "--num-experts": "4"}


@SETTINGS
@given(fmt=st.sampled_from(sorted(CONVERT_USES)), flag=st.sampled_from(sorted(CONVERT_VALUES)))
def test_trace_convert_refuses_options_its_format_does_not_use(fmt, flag):
    if flag in CONVERT_USES[fmt]:
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "in.csv").write_text("step,layer,expert,tokens\n0,0,0,1\n")
        error = one_error_line(tmp, "trace", "convert", tmp / "in.csv", tmp / "out.parquet", "--from", fmt,
                               flag, CONVERT_VALUES[flag])
    assert f"{flag} does not apply to --from {fmt}" in error


def test_calibrate_refuses_warmup_steps_with_latencies(tmp_path):
    latencies = Path(__file__).resolve().parents[1] / "symi_sim/data/calibrations/paper-motivation-forward.csv"
    error = one_error_line(tmp_path, "calibrate", "--latencies", latencies, "--cluster", "paper-a100-16", "--model",
                           "gpt-small", "--experts", "32", "--warmup-steps", "5", "--out", tmp_path / "c.json")
    assert "--warmup-steps goes with run directories" in error


def test_plan_and_train_default_to_the_same_policy():
    from symi_exec.config import TrainConfig

    assert _option("plan", "--policy").default == TrainConfig.policy == "symi"
