"""`symi`: thin click commands over keyword-only library functions.

Commands parse and validate options, check their output paths before any work, call one library function, and
write files (atomically, see symi_sim.outputs). Every ValueError from the libraries, and every OSError (a full or
read-only disk, a folder where a file was meant), becomes one clear error line and exit status 1. SIGTERM is
turned into a normal exit so that temporary outputs are removed as on Ctrl-C. Options that several commands share
are declared once below (same name, meaning, default and help everywhere). torch is imported lazily, inside
`train` only.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import signal
import sys
from collections.abc import Iterable

import click
from click.core import ParameterSource

from symi_sim.cluster import available_clusters
from symi_sim.figures.registry import plot_kinds_help
from symi_sim.models import PRESETS as MODEL_PRESETS
from symi_sim.outputs import check_output_path, timestamped_dir
from symi_sim.policies import available_policies
from symi_sim.routing import MAX_CAPACITY_FACTOR

_TEMP_NAME = re.compile(r"\.(.+)\.\d+\.[^.]+\.tmp")


def _os_error_line(exc: OSError) -> str:
    """`PATH: reason` of an OSError, naming the output rather than its temporary (.NAME.<pid>.XXXX.tmp) sibling."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
        reason = f"cannot write: {reason}"
    names = []
    for name in (exc.filename, exc.filename2):
        if name is None:
            continue
        path = os.fsdecode(name) if isinstance(name, bytes | os.PathLike) else str(name)
        head, tail = os.path.split(path)
        match = _TEMP_NAME.fullmatch(tail)
        names.append(repr(os.path.join(head, match.group(1)) if match else path))
    return f"{' -> '.join(dict.fromkeys(names))}: {reason}" if names else reason


class _SymiGroup(click.Group):
    """Turns library ValueErrors and OSErrors into one line `Error: ...` and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ValueError as exc:
            raise click.ClickException(" ".join(str(exc).split("\n"))) from None
        except OSError as exc:
            raise click.ClickException(_os_error_line(exc)) from None


@click.group(cls=_SymiGroup)
@click.version_option(package_name="symi", message="symi %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def symi(verbose: int) -> None:
    """Adaptive expert replication for MoE training: simulate, plan, train, plot, trace."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---------------------------------------------------------------- options shared by several commands

DEFAULT_CLUSTER = "paper-a100-16"
CLUSTER_HELP = f"Cluster preset ({', '.join(available_clusters())}) or a .toml/.json file."
MODEL_HELP = f"Model preset ({', '.join(MODEL_PRESETS)}) or a .toml/.json file."
POLICY_NAMES_HELP = (f"Policies: {', '.join(available_policies())}; a period suffix like flexmoe-50 sets "
                     "rebalance_every, options follow colons (symi-balanced:packing=grouped).")
OPTION_HELP = ("Policy option key=value (repeatable); with several policies it goes to every policy that takes the "
               "key (a policy's own name:key=value wins) and a key no policy takes is refused.")
CAPACITY_FACTOR_HELP = ("Expert buffer as a multiple of the mean load per slot (or per GPU, see --capacity-mode): "
                        f"tokens beyond it are dropped; 'none' for dropless; at most {MAX_CAPACITY_FACTOR:g}.")
CAPACITY_MODE_HELP = "slot: every slot has its own buffer (DeepSpeed, the paper); gpu: a GPU's slots share one."
WINDOW_HELP = "Steps of history the policies plan from."
SLOTS_HELP = "Expert slots per GPU (overrides the cluster's)."
TOP_K_HELP = "Experts each token is routed to (top-k)."
TOKENS_PER_STEP_HELP = "Tokens per step, before top-k."
# symi_exec.model.MODEL_PRESETS' names, here so that `import cli` loads no torch (a test keeps them equal)
TRAIN_MODEL_PRESETS = ("tiny", "small", "gpt-small", "gpt-medium", "gpt-large")
FORCE_HELP = "Replace an existing output (file, or non-empty run directory) instead of refusing."


class _CapacityFactor(click.ParamType):
    """A capacity factor: a number, or none/dropless for no capacity limit (None). A bad one is a ValueError (exit
    1, like the range checks of the libraries), so that every command reports it the same way."""

    name = "FACTOR|none"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float | None:
        if value is None or isinstance(value, float | int):
            return value  # type: ignore[return-value]
        text = str(value).strip().lower()
        if text in ("none", "dropless"):
            return None
        try:
            return float(text)
        except ValueError:
            where = f"{max(param.opts, key=len)}: " if param is not None else ""
            raise ValueError(f"{where}capacity factor must be a number or 'none', got {value!r}") from None


CAPACITY_FACTOR = _CapacityFactor()


def _cluster_option(f):
    return click.option("--cluster", "cluster_spec", default=DEFAULT_CLUSTER, show_default=True,
                        help=CLUSTER_HELP)(f)


def _capacity_options(f):
    f = click.option("--capacity-mode", type=click.Choice(["slot", "gpu"]), default="slot", show_default=True,
                     help=CAPACITY_MODE_HELP)(f)
    return click.option("--capacity-factor", type=CAPACITY_FACTOR, default=1.0, show_default=True,
                        help=CAPACITY_FACTOR_HELP)(f)


def _slots_window_options(f):
    f = click.option("--window", type=int, default=1, show_default=True, help=WINDOW_HELP)(f)
    return click.option("--slots", type=int, default=None, help=SLOTS_HELP)(f)


def _policy_options_option(f):
    return click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE", help=OPTION_HELP)(f)


def _force_option(f):
    return click.option("--force", is_flag=True, help=FORCE_HELP)(f)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether option `name` was given by the user (not left at its default)."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _option_name(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def _refuse_given(ctx: click.Context, names: Iterable[str], why: str) -> None:
    """One line naming the first of options `names` that the user gave although this mode ignores them."""
    for name in names:
        if _given(ctx, name):
            raise ValueError(f"{_option_name(ctx, name)} {why}")


# facts a simulation or replay gives every policy that takes them (sim_config.resolve_policy): never -o options
_CONTEXT_KEYS = ("d_model", "d_ff", "weight_bytes", "activation_bytes", "optimizer_bytes", "capacity_mode",
                 "capacity_factor")


def _with_shared_options(names: list[str], pairs: tuple[str, ...], *, context_keys: Iterable[str] = ()) -> list[str]:
    """Policy names with the -o options appended to every policy that takes each key (its own name:key=... wins);
    a key that no listed policy takes, or that the run sets itself (`context_keys`), is refused."""
    from symi_sim.policies import get_policy, parse_options

    options = parse_options(pairs)
    for key in options:
        if key in context_keys:
            raise ValueError(f"-o {key}: set by the run itself (model, --capacity-factor, --capacity-mode), not by -o")
    raw = {pair.partition("=")[0].strip(): pair.partition("=")[2].strip() for pair in pairs}
    for key, value in raw.items():
        if ":" in value:
            raise ValueError(f"-o {key}={value}: a value may not contain ':'")
    used: set[str] = set()
    out = []
    for name in names:
        fields = {f.name for f in dataclasses.fields(get_policy(name))}
        own = set(parse_options(name.split(":")[1:]))
        keys = [key for key in options if key in fields and key not in own]
        used.update(key for key in options if key in fields)
        out.append(name + "".join(f":{key}={raw[key]}" for key in keys))
    unused = [key for key in options if key not in used]
    if unused:
        raise ValueError(f"-o {unused[0]}: no policy among {', '.join(names)} takes this option")
    return out


def _split_names(text: str, option: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ValueError(f"no policy named in {option} {text!r}")
    return names


# ---------------------------------------------------------------- trace


@symi.group("trace")
def trace_group() -> None:
    """Expert-load traces: inspect, convert from public formats, synthesise."""


@trace_group.command("info")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the facts and per-layer statistics as JSON.")
@click.option("--top-k", type=int, default=None, help=f"{TOP_K_HELP} Overrides the file; a CSV defaults to 1.")
@click.option("--tokens-per-step", type=int, default=None, help=f"{TOKENS_PER_STEP_HELP} Overrides the file.")
def trace_info_cmd(file: str, as_json: bool, top_k: int | None, tokens_per_step: int | None) -> None:
    """Shape, metadata and per-layer skew/volatility of trace FILE (.parquet or .csv, a shipped trace's name, or
    records `--trace` reads directly)."""
    import json

    from symi_sim.traces.resolve import load_trace
    from symi_sim.traces.stats import format_trace_info, trace_info

    info = trace_info(load_trace(file, top_k=top_k, tokens_per_step=tokens_per_step))
    click.echo(json.dumps(info, indent=2) if as_json else format_trace_info(info))


@trace_group.command("list")
def trace_list_cmd() -> None:
    """The traces shipped with symi, one line each: name, shape, top-k, tokens per step, model. Any command's
    --trace takes the name."""
    from symi_sim.traces.resolve import shipped_trace_lines

    lines = shipped_trace_lines()
    if not lines:
        raise ValueError("no shipped traces found (the package data symi_sim/data/traces is missing)")
    click.echo("\n".join(lines))


# which --from formats use each convert option (the importers' keyword arguments, symi_sim.traces.importers)
CONVERT_OPTIONS = {"model": "--model", "selection": "--selection", "domains": "--domains", "top_k": "--top-k",
                   "tokens_per_step": "--tokens-per-step", "num_experts": "--num-experts", "mtp": "--mtp"}
CONVERT_FORMATS = ["csv", "olmoe", "per-rank-csv", "counts-jsonl", "megatron-router-trace",
                   "sglang-expert-distribution", "trtllm-expert-statistic", "vllm-routed-experts"]
TRACE_HELP = ("Trace: a shipped trace's name (symi trace list), a .parquet/.csv file, or a directory/file of "
              "Megatron-Core router traces, SGLang recorder dumps or a TensorRT-LLM expert statistic.")


def _check_trace_output(out_path: str, force: bool) -> None:
    if not out_path.lower().endswith(".parquet"):
        raise ValueError(f"trace output {out_path!r} must end in .parquet")
    check_output_path(out_path, what="OUT", force=force)


@trace_group.command("convert")
@click.argument("in_path", metavar="IN")
@click.argument("out_path", metavar="OUT")
@click.option("--from", "fmt", required=True, type=click.Choice(CONVERT_FORMATS),
              help="Input format (per-rank-csv, megatron-router-trace, trtllm-expert-statistic, "
                   "sglang-expert-distribution: IN may be a directory of per-rank files; README 'Formats of other "
                   "frameworks').")
@click.option("--model", default=None, help="olmoe: olmoe|olmoe-sft|olmoe-dpo|mistral; others: a model name.")
@click.option("--selection", default=None, help="olmoe only: topk (all k choices, default) or top1.")
@click.option("--domains", default=None, help="olmoe only: comma-separated domains, one step each, in order.")
@click.option("--top-k", type=int, default=None,
              help=f"{TOP_K_HELP} csv, per-rank-csv, counts-jsonl, sglang-expert-distribution only.")
@click.option("--tokens-per-step", type=int, default=None,
              help=f"{TOKENS_PER_STEP_HELP} csv, per-rank-csv, counts-jsonl; vllm-routed-experts (required: the "
                   "tokens cut into steps).")
@click.option("--num-experts", type=int, default=None,
              help="megatron-router-trace, vllm-routed-experts only: experts E (default: the largest id seen + 1).")
@click.option("--mtp", is_flag=True, default=None,
              help="megatron-router-trace only: also keep the multi-token-prediction layers.")
@_force_option
def trace_convert_cmd(in_path: str, out_path: str, fmt: str, model: str | None, selection: str | None,
                      domains: str | None, top_k: int | None, tokens_per_step: int | None, num_experts: int | None,
                      mtp: bool | None, force: bool) -> None:
    """Convert IN (format --from) to the canonical Parquet trace OUT (an existing OUT only with --force)."""
    import inspect

    from symi_sim.traces.importers import IMPORTERS, convert_trace

    taken = [name for name, p in inspect.signature(IMPORTERS[fmt]).parameters.items() if p.kind == p.KEYWORD_ONLY]
    _refuse_given(click.get_current_context(), [name for name in CONVERT_OPTIONS if name not in taken],
                  f"does not apply to --from {fmt} (it takes {', '.join(CONVERT_OPTIONS[n] for n in taken)})")
    _check_trace_output(out_path, force)
    domain_list = None if domains is None else [d.strip() for d in domains.split(",") if d.strip()]
    trace = convert_trace(in_path, out_path, fmt=fmt, model=model, selection=selection, domains=domain_list,
                          top_k=top_k, tokens_per_step=tokens_per_step, num_experts=num_experts, mtp=mtp or None)
    click.echo(f"wrote {out_path}: {trace.num_steps} steps x {trace.num_layers} layers x {trace.num_experts} "
               f"experts, top-{trace.top_k}")


@trace_group.command("synth")
@click.argument("out_path", metavar="OUT")
@click.option("--experts", "num_experts", type=int, default=16, show_default=True,
              help="Logical experts per layer (E); the default fits --model gpt-small.")
@click.option("--layers", "num_layers", type=int, default=12, show_default=True, help="MoE layers (L).")
@click.option("--steps", "num_steps", type=int, default=200, show_default=True, help="Training steps (S).")
@click.option("--skew", type=float, default=1.0, show_default=True,
              help="Zipf exponent of the base popularity (0 = uniform).")
@click.option("--drift", type=float, default=0.1, show_default=True,
              help="How much popularity moves per step, in [0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same trace).")
@click.option("--top-k", type=int, default=1, show_default=True, help=TOP_K_HELP)
@click.option("--tokens-per-step", type=int, default=32768, show_default=True, help=TOKENS_PER_STEP_HELP)
@click.option("--burst-prob", type=float, default=0.0, show_default=True,
              help="Per step and layer, the probability that a random expert bursts.")
@click.option("--burst-scale", type=float, default=4.0, show_default=True, help="Weight multiplier of a burst.")
@_force_option
def trace_synth_cmd(out_path: str, num_experts: int, num_layers: int, num_steps: int, skew: float, drift: float,
                    seed: int, top_k: int, tokens_per_step: int, burst_prob: float, burst_scale: float,
                    force: bool) -> None:
    """Synthesise a skewed, drifting expert-load trace and write it to OUT (.parquet; an existing OUT only with
    --force). The defaults give a trace `symi simulate --model gpt-small` takes as it is."""
    from symi_sim.traces.format import write_trace
    from symi_sim.traces.synth import synth_trace

    _check_trace_output(out_path, force)
    trace = synth_trace(num_experts=num_experts, num_layers=num_layers, num_steps=num_steps, skew=skew,
                        drift=drift, seed=seed, top_k=top_k, tokens_per_step=tokens_per_step,
                        burst_prob=burst_prob, burst_scale=burst_scale)
    write_trace(trace, out_path)
    click.echo(f"wrote {out_path}: {num_steps} steps x {num_layers} layers x {num_experts} experts, top-{top_k}")


# ---------------------------------------------------------------- plan

# the format an --out extension means when --format is not given (.json: our own; sglang and vllm-ascend JSON
# files need --format); every format's own extensions are symi_sim.placement_formats.FORMAT_SUFFIXES
PLAN_FORMATS = {".json": "json", ".npz": "eplb", ".pt": "eplb", ".yaml": "trtllm", ".yml": "trtllm"}
PLAN_FORMAT_HELP = (
    "json: our placement file; eplb: DeepSeek EPLB's phy2log/log2phy/logcnt arrays (.npz or .pt); sglang: "
    "SGLang's --init-expert-location file (.json or .pt); trtllm: TensorRT-LLM's wide-EP load-balancer YAML; "
    "vllm-ascend: vllm-ascend's expert-map JSON [default: from --out's extension (.json, .npz, .pt, .yaml), "
    "else json].")


def _plan_format(fmt: str | None, out: str | None) -> str:
    """--format, or the one --out's extension names; an extension that the format is not written to is refused."""
    from symi_sim.placement_formats import FORMAT_SUFFIXES

    if out is not None and os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a folder; a single plan is a file (.json, .npz, .pt or .yaml)")
    suffix = os.path.splitext(out)[1].lower() if out else ""
    if fmt is not None and out is not None and suffix not in FORMAT_SUFFIXES[fmt]:
        raise ValueError(f"--format {fmt} does not match --out {out!r}: --format {fmt} is written to a "
                         f"{' or '.join(FORMAT_SUFFIXES[fmt])} file")
    if fmt is None and out is not None and suffix not in PLAN_FORMATS:
        raise ValueError(f"--out {out!r} must end in .json (--format json, sglang, vllm-ascend), .npz/.pt "
                         "(--format eplb; sglang .pt) or .yaml/.yml (--format trtllm)")
    return fmt or PLAN_FORMATS.get(suffix, "json")


@symi.command()
@click.option("--trace", "trace_path", required=True, help=TRACE_HELP)
@_cluster_option
@_slots_window_options
@click.option("--policy", default="symi", show_default=True,
              help=f"The policy of a single plan. {POLICY_NAMES_HELP}")
@click.option("--step", type=int, default=None, help="Plan the placement serving this step (from the steps before).")
@_policy_options_option
@click.option("--format", "fmt", type=click.Choice(["json", "eplb", "sglang", "trtllm", "vllm-ascend"]),
              default=None, help=PLAN_FORMAT_HELP)
@click.option("--first-moe-layer", type=int, default=0, show_default=True,
              help="--format sglang/trtllm: the model's layer id of the trace's first MoE layer (their layer ids "
                   "count dense layers too; DeepSeek-V3: 3).")
@click.option("--replay", is_flag=True, help="Plan every step from the previous ones and score it on its own loads.")
@click.option("--policies", default=None,
              help=f"--replay: comma-separated policies (default: all). {POLICY_NAMES_HELP}")
@_capacity_options
@click.option("--plan-capacity-mode", type=click.Choice(["slot", "gpu"]), default=None,
              help="--replay: the capacity mode the policies plan for (default: --capacity-mode, the one scored); "
                   "e.g. slot plans (even shares) scored under --capacity-mode gpu budgets.")
@click.option("--out", "out", default=None,
              help="A single plan's file (default runs/plan-<timestamp> with the format's extension), or the --replay "
                   "run directory (default runs/plan-replay-<timestamp>).")
@_force_option
def plan(trace_path: str, cluster_spec: str, slots: int | None, window: int, policy: str, step: int | None,
         options: tuple[str, ...], fmt: str | None, first_moe_layer: int, replay: bool, policies: str | None,
         capacity_factor: float | None, capacity_mode: str, plan_capacity_mode: str | None, out: str | None,
         force: bool) -> None:
    """Emit a placement for one step, or replay a whole trace and compare policies."""
    from symi_sim.cluster import load_cluster
    from symi_sim.placement_formats import FORMAT_SUFFIXES, LAYER_ID_FORMATS, load_hint, write_placement
    from symi_sim.policies import get_policy, parse_options, with_context
    from symi_sim.simulator.replay import plan_step, write_replay
    from symi_sim.simulator.replay import replay as replay_trace
    from symi_sim.traces.resolve import load_trace

    ctx = click.get_current_context()
    if replay:
        _refuse_given(ctx, ["step", "policy", "fmt", "first_moe_layer"], "is for a single plan; --replay plans "
                      "every step (name the policies with --policies)")
        names = _split_names(policies, "--policies") if policies is not None else available_policies()
        names = _with_shared_options(names, options, context_keys=("capacity_mode", "capacity_factor"))
        out_dir = out or str(timestamped_dir("plan-replay"))
        check_output_path(out_dir, what="--out", is_dir=True, force=force)
    else:
        _refuse_given(ctx, ["policies"], "goes with --replay; a single plan takes one --policy")
        _refuse_given(ctx, ["plan_capacity_mode"], "goes with --replay; a single plan is made for --capacity-mode")
        if step is None:
            raise ValueError("a single plan needs --step (or use --replay)")
        fmt = _plan_format(fmt, out)
        if _given(ctx, "first_moe_layer") and fmt not in LAYER_ID_FORMATS:
            raise ValueError(f"--first-moe-layer is for --format {' or '.join(LAYER_ID_FORMATS)}, not {fmt}")
        if first_moe_layer < 0:
            raise ValueError(f"--first-moe-layer must be >= 0, got {first_moe_layer}")
        out = out or str(timestamped_dir("plan")) + FORMAT_SUFFIXES[fmt][0]
        check_output_path(out, what="--out", force=force)
    cluster = load_cluster(cluster_spec, slots_per_gpu=slots)
    trace = load_trace(trace_path)
    cluster.check_experts(trace.num_experts)
    if replay:
        steps, summary = replay_trace(trace, cluster, names, capacity_factor=capacity_factor,
                                      capacity_mode=capacity_mode, window=window,
                                      plan_capacity_mode=plan_capacity_mode)
        config = {"command": "plan --replay", "trace": trace_path, "trace_model": trace.model,
                  "cluster": cluster.to_dict(), "policies": names, "capacity_factor": capacity_factor,
                  "capacity_mode": capacity_mode, "plan_capacity_mode": plan_capacity_mode or capacity_mode,
                  "window": window}
        write_replay(out_dir, steps, summary, config, replace=force)
        click.echo(summary.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        click.echo(f"wrote {out_dir}")
        return
    chosen = get_policy(policy, **parse_options(options))
    fields = {f.name for f in dataclasses.fields(chosen)}
    capacity = {name: value for name, value in (("capacity_factor", capacity_factor), ("capacity_mode", capacity_mode))
                if _given(ctx, name)}
    for name in capacity:
        if name not in fields:
            raise ValueError(f"{_option_name(ctx, name)}: policy {policy!r} does not use it in a single plan")
    chosen = with_context(chosen, **capacity)
    placement = plan_step(trace, cluster, chosen, step=step, window=window)
    write_placement(out, placement, cluster, fmt, first_moe_layer=first_moe_layer,
                    policy={**chosen.config(), "step": step, "window": window, "trace": trace_path})
    click.echo(f"wrote {out}: {placement.num_layers} layers x {placement.num_slots} slots, policy {policy}")
    if hint := load_hint(fmt, out, placement, cluster):
        click.echo(hint)


# ---------------------------------------------------------------- simulate

# the paper's comparison plus ours; kept here as text so that --help shows it without importing the simulator
DEFAULT_SIMULATE_POLICIES = ("static,symi,symi-balanced,symi-balanced:packing=grouped,flexmoe-10,flexmoe-50,"
                             "flexmoe-100,fastermoe,eplb,oracle:packing=grouped")
SUMMARY_COLUMNS = ("policy", "mean_time_s", "p99_time_s", "survival", "imbalance", "iterations_to_target",
                   "time_to_target_s", "speedup_vs_static")


@symi.command()
@click.option("--trace", "trace_path", required=True, help=TRACE_HELP)
@_cluster_option
@click.option("--model", "model_spec", default="gpt-small", show_default=True, help=MODEL_HELP)
@click.option("--policies", default=DEFAULT_SIMULATE_POLICIES, show_default=True,
              help=f"Comma-separated policies. {POLICY_NAMES_HELP}")
@_policy_options_option
@_capacity_options
@click.option("--steps", type=int, default=None, help="Simulate this many steps (default: the whole trace).")
@click.option("--loop", is_flag=True, help="Cycle a shorter trace up to --steps.")
@_slots_window_options
@click.option("--fit-model-to-trace", is_flag=True,
              help="Take the trace's experts, MoE layers and top-k when they differ from the model's.")
@click.option("--convergence", "convergence_path", default=None, type=click.Path(dir_okay=False),
              help="Calibration file of (survival, iterations) points, .csv or .json (default: the paper's table).")
@click.option("--convergence-form", type=click.Choice(["power", "exponential"]), default="power", show_default=True,
              help="Curve fitted to the calibration points.")
@click.option("--mtbf-hours", type=float, default=None,
              help="The job's mean time between failures (any GPU failing stops it): adds the failure columns.")
@click.option("--gpu-mtbf-hours", type=float, default=None,
              help="One GPU's MTBF instead (job MTBF = this / GPUs).")
@click.option("--checkpoint", default=None,
              help="With an MTBF: none, full-K (every K steps) or sparse[-K_full][:hot=F] [default: full-100].")
@click.option("--failure-runs", type=int, default=0, show_default=True,
              help="With an MTBF: also inject failures into this many sampled job timelines (sampled_* columns).")
@click.option("--failure-seed", type=int, default=0, show_default=True,
              help="With --failure-runs: seed of the injected failures.")
@click.option("--calibration", "calibration_spec", default=None,
              help="Measured compute terms: a shipped calibration (paper-a100-16-gpt-small) or a .json/.toml file "
                   "from `symi calibrate` (default: the FLOP model, whose absolute times are not measured).")
@click.option("--optimizer-location", type=click.Choice(["host", "gpu"]), default=None,
              help="Where every policy keeps the experts' optimizer state: host (the paper's setting: gradients down "
                   "and weights up over PCIe, FlexMoE's replicas included) or gpu (no policy pays PCIe) "
                   "[default: the calibration's; host for the FLOP model].")
@click.option("--expert-state-accounting", type=click.Choice(["pairs", "paper"]), default="pairs",
              show_default=True,
              help="SYMI's gradient collection and weight send-out: once per distinct (expert, GPU) pair, or per slot "
                   "as the paper's formula counts ((sN - s)/N X over the network + E/N X over PCIe).")
@click.option("--out", "out", default=None, help="Run directory (default runs/simulate-<timestamp>).")
@_force_option
def simulate(trace_path: str, cluster_spec: str, model_spec: str, policies: str, options: tuple[str, ...],
             capacity_factor: float | None, capacity_mode: str, steps: int | None, loop: bool, slots: int | None,
             window: int,
             fit_model_to_trace: bool, convergence_path: str | None, convergence_form: str, mtbf_hours: float | None,
             gpu_mtbf_hours: float | None, checkpoint: str | None, failure_runs: int, failure_seed: int,
             calibration_spec: str | None, optimizer_location: str | None, expert_state_accounting: str,
             out: str | None, force: bool) -> None:
    """Replay a trace through every policy on the simulated cluster; compare time to target loss."""
    from pathlib import Path

    from symi_sim.cluster import load_cluster
    from symi_sim.failures.model import DEFAULT_CHECKPOINT, FailureModel
    from symi_sim.models import load_model
    from symi_sim.simulator.calibration import load_calibration
    from symi_sim.simulator.convergence import load_convergence, paper_model
    from symi_sim.simulator.driver import SimulationConfig, write_run
    from symi_sim.simulator.driver import simulate as run_simulation
    from symi_sim.traces.fit import fit_trace
    from symi_sim.traces.resolve import load_trace

    ctx = click.get_current_context()
    if loop and steps is None:
        raise ValueError("--loop needs --steps (the number of steps to cycle the trace up to)")
    failures = None
    if mtbf_hours is not None or gpu_mtbf_hours is not None:
        if _given(ctx, "failure_seed") and not failure_runs:
            raise ValueError("--failure-seed needs --failure-runs (only injected failures are seeded)")
        failures = FailureModel(checkpoint=checkpoint or DEFAULT_CHECKPOINT, mtbf_hours=mtbf_hours,
                                gpu_mtbf_hours=gpu_mtbf_hours, sampled_runs=failure_runs, seed=failure_seed)
    else:
        _refuse_given(ctx, ["checkpoint", "failure_runs", "failure_seed"], "needs --mtbf-hours or --gpu-mtbf-hours")
    out_dir = Path(out or timestamped_dir("simulate"))
    check_output_path(out_dir, what="--out", is_dir=True, force=force)
    cluster = load_cluster(cluster_spec, slots_per_gpu=slots)
    model = load_model(model_spec)
    names = _with_shared_options(_split_names(policies, "--policies"), options, context_keys=_CONTEXT_KEYS)
    trace = load_trace(trace_path)
    cluster.check_experts(trace.num_experts)
    model, trace = fit_trace(model, trace, adopt_trace_shape=fit_model_to_trace)
    convergence = (load_convergence(convergence_path, form=convergence_form) if convergence_path
                   else paper_model(form=convergence_form))
    calibration = load_calibration(calibration_spec) if calibration_spec is not None else None
    config = SimulationConfig(trace=trace, cluster=cluster, model=model, policies=names,
                              capacity_factor=capacity_factor, capacity_mode=capacity_mode, steps=steps, loop=loop,
                              window=window, convergence=convergence, failures=failures, calibration=calibration,
                              optimizer_location=optimizer_location, expert_state_accounting=expert_state_accounting,
                              trace_path=trace_path)
    result = run_simulation(config)
    write_run(result, out_dir, replace=force)
    columns = list(SUMMARY_COLUMNS) + (list(failures.columns) if failures is not None else [])
    click.echo(result.summary.loc[:, columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    source = result.config["calibration"]["source"]
    click.echo(f"times from: {source}" + ("; absolute times are not measured (see --calibration)"
                                           if calibration is None else ""))
    click.echo(f"wrote {out_dir}")


# ---------------------------------------------------------------- plot

PLOT_KINDS_HELP = plot_kinds_help()  # from the figure registry, which loads matplotlib only to draw


@symi.command("plot")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--kind", "kinds", multiple=True,
              help=f"Figure(s) to draw, repeatable or comma-separated (default: all that apply). {PLOT_KINDS_HELP}.")
@click.option("--out", "out", default=None, help="Directory for the PNGs (default: RUN_DIR; a trace's directory).")
def plot(run_dir: str, kinds: tuple[str, ...], out: str | None) -> None:
    """Draw PNG figures of RUN_DIR (a simulate, plan --replay or train run directory) or of a trace file.

    The kind of run is told by its files. A figure goes to <kind>.png (a trace's to <stem>-heatmap.png), or to
    <kind>-2.png, -3, ... when that name is taken: nothing is overwritten. A bad input writes no file at all.
    """
    from symi_sim.figures.registry import plot_run

    names = [name.strip() for raw in kinds for name in raw.split(",") if name.strip()]
    if kinds and not names:
        raise ValueError(f"no figure kind named in --kind {', '.join(kinds)!r}")
    for path in plot_run(run_dir, kinds=names or None, out_dir=out):
        click.echo(f"wrote {path}")


# ---------------------------------------------------------------- train


class _TrainOption(click.Option):
    """A `symi train` option whose default is TrainConfig's (symi_exec.config): each default lives there only.
    Read when the command runs or shows its help, so that `import cli` never imports symi_exec."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, show_default=True, **kwargs)

    def get_default(self, ctx: click.Context, call: bool = True) -> object:
        from symi_exec.config import default_of

        return default_of(self.name)


def _train_option(*decls: str, **attrs: object):
    """click.option for an option of `symi train` named like its TrainConfig field."""
    return click.option(*decls, cls=_TrainOption, **attrs)


@symi.command()
@click.option("--nproc-per-node", type=int, default=2, show_default=True,
              help="Local ranks to spawn (ignored under torchrun, which sets RANK/WORLD_SIZE).")
@_train_option("--model", type=click.Choice(TRAIN_MODEL_PRESETS),
               help="Model preset (symi_exec/model.py; the gpt-* ones are the simulator's); --n-layer etc. override.")
@click.option("--n-layer", "num_layers", type=int, default=None, help="Transformer blocks (overrides the preset).")
@click.option("--d-model", "d_model", type=int, default=None, help="Model width (overrides the preset).")
@click.option("--n-head", "num_heads", type=int, default=None, help="Attention heads (overrides the preset).")
@click.option("--d-ff", "d_ff", type=int, default=None, help="Expert hidden width (overrides the preset).")
@click.option("--seq-len", "seq_len", type=int, default=None, help="Sequence length (overrides the preset).")
@_train_option("--experts", "num_experts", type=int, help="Experts per MoE layer (E).")
@_train_option("--slots", "slots_per_rank", type=int, help="Expert slots per rank.")
@_train_option("--top-k", type=int, help=TOP_K_HELP)
@_train_option("--policy", help="Replica placement policy (static, symi, symi-balanced, eplb, lazarus, flexmoe[-N]).")
@_policy_options_option
@_train_option("--capacity-factor", type=CAPACITY_FACTOR, help=CAPACITY_FACTOR_HELP)
@_train_option("--capacity-mode", type=click.Choice(["slot", "gpu"]), help=CAPACITY_MODE_HELP)
@_train_option("--steps", type=int, help="Training steps.")
@_train_option("--batch-size", type=int, help="Sequences per rank per micro-batch.")
@_train_option("--grad-accum", type=int,
               help="Micro-batches per step, gradients accumulated (global batch: ranks x batch size x this).")
@_train_option("--lr", type=float, help="Peak learning rate (cosine decay to a tenth of it).")
@_train_option("--warmup-steps", type=int, help="Steps of linear learning-rate warmup before the cosine decay.")
@_train_option("--weight-decay", type=float, help="AdamW's decoupled weight decay (matrices and embeddings only).")
@_train_option("--clip-grad", "grad_clip", type=float, help="Clip the global gradient norm to this (0: no clipping).")
@_train_option("--aux-loss-coef", type=float, help="Load-balancing loss weight.")
@_train_option("--router-skew", type=float,
               help="Skewed expert load: expert e's router logit biased by -S ln(1 + e), a Zipf-like start the router "
                    "may learn against (0: none).")
@_train_option("--seed", type=int, help="Random seed (model initialisation and batches).")
@_train_option("--data", type=click.Path(),
               help="A `symi data prepare` folder (token files, read by memory map), or a text file whose bytes are "
                    "the tokens (its last 10% validates); default: the shipped Wikipedia sample as bytes.")
@_train_option("--eval-every", type=int,
               help="Validation loss after every N-th step and after the last one (0: never).")
@_train_option("--eval-batches", type=int,
               help="Fixed validation batches (--batch-size sequences per rank each) per evaluation.")
@_train_option("--dtype", type=click.Choice(["float32", "float64", "bfloat16"]),
               help="Parameter and activation dtype (bfloat16: float32 master weights and AdamW moments).")
@_train_option("--bucket-mb", type=float, help="MiB of dense gradients per all-reduce bucket (during the backward).")
@_train_option("--record-trace", is_flag=True, help="Also write trace.parquet (per step, layer, expert, rank).")
@_train_option("--trace-format", type=click.Choice(["parquet", "megatron-router-trace"]),
               help="With --record-trace: megatron-router-trace also writes router_trace/router_trace_rank<r>.jsonl, "
                    "Megatron-Core's router-trace records (per-token top-k ids per step, layer and rank).")
@_train_option("--log-interval", type=int, help="Steps between rank-0 log lines.")
@_train_option("--dist-timeout", "dist_timeout_s", type=float,
               help="Seconds a rank may stay silent (stopped, hung, a dead node) before the job ends naming it.")
@click.option("--out", default=None, help="Run directory (default runs/train-<timestamp>).")
@_train_option("--checkpoint-every", type=int, help="Checkpoint every K steps and after the last one (0: never).")
@_train_option("--checkpoint-dir",
               help="Where checkpoints go (default: the --resume directory, else <out>-checkpoints).")
@_train_option("--resume", type=click.Path(file_okay=False),
               help="Continue from the latest complete checkpoint in this directory (any number of ranks).")
@_train_option("--sparse-hot-share", type=float,
               help="Between full checkpoints, snapshot after every step only the hot experts, covering this share "
                    "(0-1] of the tokens since each expert's last snapshot (MoEtion-style; needs --checkpoint-every).")
@_train_option("--keep-checkpoints", type=int, help="Keep only the newest N full checkpoints (0: keep all).")
@_train_option("--overlap-checkpoints", is_flag=True,
               help="Write checkpoints and snapshots in a background thread while training goes on.")
@_train_option("--fail-at-step", type=int,
               help="Failure drill: every rank kills itself (SIGKILL) when this step starts; resume with --resume.")
@_train_option("--overwrite-checkpoints", is_flag=True,
               help="A new run deletes the checkpoints already in its checkpoint dir (else it refuses to start).")
@click.option("--allow-config-change", "allow_config_change", default="", metavar="FIELD[,FIELD...]",
              help="Settings a resume may change from those recorded in the checkpoint (e.g. lr,seed,batch_size); "
                   "any other change is refused.")
def train(nproc_per_node: int, model: str, num_experts: int, slots_per_rank: int, top_k: int, policy: str,
          options: tuple[str, ...], capacity_factor: float | None, capacity_mode: str, steps: int, batch_size: int,
          lr: float, aux_loss_coef: float, router_skew: float, seed: int, data: str | None, dtype: str,
          record_trace: bool, trace_format: str, log_interval: int, out: str | None, checkpoint_every: int,
          checkpoint_dir: str | None,
          resume: str | None, sparse_hot_share: float | None, keep_checkpoints: int, overlap_checkpoints: bool,
          fail_at_step: int | None, overwrite_checkpoints: bool, allow_config_change: str,
          dist_timeout_s: float, grad_accum: int, warmup_steps: int, weight_decay: float, grad_clip: float,
          bucket_mb: float, num_layers: int | None, d_model: int | None, num_heads: int | None,
          d_ff: int | None, seq_len: int | None, eval_every: int, eval_batches: int) -> None:
    """Train a small MoE GPT with expert replicas placed by POLICY (gloo on CPU, NCCL on GPUs)."""
    import csv
    import os

    from symi_exec.config import TrainConfig
    from symi_exec.launch import JobFailed, launch
    from symi_sim.policies import parse_options

    config = TrainConfig(
        out=out or str(timestamped_dir("train")), model=model, num_experts=num_experts, slots_per_rank=slots_per_rank,
        top_k=top_k, policy=policy, policy_options=parse_options(options),
        capacity_factor=capacity_factor, capacity_mode=capacity_mode, steps=steps,
        batch_size=batch_size, lr=lr, min_lr=lr / 10, aux_loss_coef=aux_loss_coef, router_skew=router_skew, seed=seed,
        data=data, record_trace=record_trace, trace_format=trace_format, dtype=dtype, log_interval=log_interval,
        checkpoint_every=checkpoint_every,
        checkpoint_dir=checkpoint_dir, resume=resume, sparse_hot_share=sparse_hot_share,
        keep_checkpoints=keep_checkpoints, overlap_checkpoints=overlap_checkpoints, fail_at_step=fail_at_step,
        overwrite_checkpoints=overwrite_checkpoints,
        allow_config_change=tuple(f.strip() for f in allow_config_change.split(",") if f.strip()),
        dist_timeout_s=dist_timeout_s, grad_accum=grad_accum, warmup_steps=warmup_steps, weight_decay=weight_decay,
        grad_clip=grad_clip, bucket_mb=bucket_mb,
        eval_every=eval_every, eval_batches=eval_batches,
        model_overrides={name: value for name, value in (("num_layers", num_layers), ("d_model", d_model),
                                                         ("num_heads", num_heads), ("d_ff", d_ff),
                                                         ("seq_len", seq_len)) if value is not None},
    )
    try:
        run_dir = launch(config, nproc_per_node)
    except JobFailed as exc:
        failure = click.ClickException(str(exc))
        failure.exit_code = exc.exit_code   # 128 + the signal when interrupted
        raise failure from None
    if os.environ.get("RANK", "0") != "0":
        return   # under torchrun only rank 0 writes the run directory (other nodes may not even see it)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    mean_tps = sum(float(r["tokens_per_s"]) for r in rows) / len(rows)
    state_mib = sum(float(r["bytes_optimizer_state"]) for r in rows) / 2**20
    # counted like the log lines (step 200/200 is the last of 200), not by the 0-based step of metrics.csv
    click.echo(f"step {int(last['step']) + 1}/{config.steps}: loss {float(last['loss']):.4f}, {mean_tps:.0f} "
               f"tokens/s on average, "
               f"dropped {100 * float(last['dropped_fraction']):.2f}%, optimizer state moved {state_mib:.2f} MiB")
    click.echo(f"wrote {run_dir}")


# ---------------------------------------------------------------- data


@symi.group("data")
def data_group() -> None:
    """Training data for `symi train`: tokenizer and token files."""


@data_group.command("prepare")
@click.argument("texts", nargs=-1, required=True, metavar="TEXT...")
@click.option("--vocab-size", type=int, required=True,
              help="Tokens of the byte-level BPE tokenizer (at least 257: the 256 bytes and <|endoftext|>).")
@click.option("--out", required=True, help="Folder to write (tokenizer.json, train.bin, val.bin, meta.json).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of the tokens (the last ones) written to val.bin.")
@_force_option
def data_prepare(texts: tuple[str, ...], vocab_size: int, out: str, val_fraction: float, force: bool) -> None:
    """Train a byte-level BPE tokenizer on the TEXT files (offline) and write their tokens for `symi train --data`."""
    from symi_exec.prepare import prepare_data

    check_output_path(out, what="--out", is_dir=True, force=force)
    meta = prepare_data(sources=texts, vocab_size=vocab_size, out=out, val_fraction=val_fraction, force=force)
    click.echo(f"vocabulary {meta['vocab_size']}, {meta['train_tokens']} train and {meta['val_tokens']} validation "
               f"tokens ({meta['dtype']})")
    click.echo(f"wrote {out}")


# ---------------------------------------------------------------- calibrate

# kept here as text so that --help shows them without importing scipy (tests check they match the library's)
CALIBRATE_GEMM_FORMS = ("linear", "power")
CALIBRATE_WARMUP_STEPS = 3
CALIBRATE_OPTIMIZER_STATE = ("host", "gpu")


@symi.command("calibrate")
@click.argument("run_dirs", nargs=-1)
@click.option("--latencies", "latencies_path", default=None,
              help="CSV of measured static forward latencies: columns capacity_factor, forward_ms ('#' lines are "
                   "comments), e.g. symi_sim/data/calibrations/paper-motivation-forward.csv.")
@click.option("--cluster", "cluster_spec", default=None,
              help="The measured cluster, a preset or TOML/JSON file: needed with --latencies; for run directories "
                   "it replaces the one node of world-size ranks that `symi train` spawns.")
@click.option("--model", "model_spec", default=None,
              help="With --latencies: the measured model (preset or TOML/JSON file).")
@click.option("--experts", "num_experts", type=int, default=None,
              help="With --latencies: experts per MoE layer (overrides the model's).")
@click.option("--gemm-form", type=click.Choice(CALIBRATE_GEMM_FORMS), default=None,
              help="Expert GEMM time: linear (2 fitted terms with --latencies; the default, and the only form for "
                   "run directories) or power (a small-batch regime, 3 terms: for sweeps of more than 3 points).")
@click.option("--warmup-steps", type=int, default=CALIBRATE_WARMUP_STEPS, show_default=True,
              help="Run directories: first steps left out of the per-phase medians.")
@click.option("--optimizer-state", type=click.Choice(CALIBRATE_OPTIMIZER_STATE), default="host", show_default=True,
              help="Where every policy's optimizer state lives in the simulation (not fitted: a choice).")
@click.option("--out", required=True, help="Calibration file to write (.json), for `symi simulate --calibration`.")
@_force_option
def calibrate(run_dirs: tuple[str, ...], latencies_path: str | None, cluster_spec: str | None,
              model_spec: str | None, num_experts: int | None, gemm_form: str | None, warmup_steps: int,
              optimizer_state: str, out: str, force: bool) -> None:
    """Fit measured compute and communication terms to forward latencies (--latencies) or to `symi train` RUN_DIRS;
    prints every term, its standard error and the residuals, and writes a calibration file."""
    from symi_sim.cluster import load_cluster
    from symi_sim.models import load_model
    from symi_sim.simulator.calibrate import fit_latencies, fit_runs, format_fit
    from symi_sim.simulator.calibration import write_calibration

    if (latencies_path is None) == (not run_dirs):
        raise ValueError("give either --latencies FILE.csv or run directories (they describe different machines)")
    check_output_path(out, what="--out", force=force)
    if latencies_path is not None:
        _refuse_given(click.get_current_context(), ["warmup_steps"], "goes with run directories, not --latencies")
        if cluster_spec is None or model_spec is None:
            raise ValueError("--latencies needs --cluster and --model (and --experts if not the model's)")
        model = load_model(model_spec, num_experts=num_experts)
        fit = fit_latencies(latencies_path=latencies_path, cluster=load_cluster(cluster_spec), model=model,
                            gemm_form=gemm_form or "linear", optimizer_state_location=optimizer_state)
    else:
        if model_spec is not None or num_experts is not None:
            raise ValueError("--model and --experts go with --latencies; run directories name their own model")
        if gemm_form == "power":
            raise ValueError("run directories fit the linear GEMM form only (the power form needs a sweep of "
                             "tokens per slot: use --latencies)")
        cluster = load_cluster(cluster_spec) if cluster_spec is not None else None
        fit = fit_runs(run_dirs=run_dirs, warmup_steps=warmup_steps, cluster=cluster,
                       optimizer_state_location=optimizer_state)
    write_calibration(out, fit.calibration)
    click.echo(format_fit(fit))
    click.echo(f"wrote {out}")


def _exit_on_signal(signum: int, frame: object) -> None:
    # SIGTERM's default ends the process at once, leaving temporary outputs behind; an exception unwinds through
    # every `finally` (outputs.atomic_file/atomic_dir remove their temporaries) as Ctrl-C does
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    symi(prog_name="symi")


if __name__ == "__main__":
    main()
