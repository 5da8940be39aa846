"""`symi`: thin click commands over keyword-only library functions.

Commands parse and validate options, call one library function, and write files (atomically, see
symi_sim.outputs). Every ValueError from the libraries becomes one clear error line and exit status 1.
torch is imported lazily, inside `train` only.
"""

from __future__ import annotations

import logging
import sys

import click

from symi_sim.figures.registry import plot_kinds_help
from symi_sim.outputs import timestamped_dir


class _SymiGroup(click.Group):
    """Turns library ValueErrors into `Error: ...` and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_SymiGroup)
@click.version_option(package_name="symi", message="symi %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def symi(verbose: int) -> None:
    """Adaptive expert replication for MoE training: simulate, plan, train, plot, trace."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---------------------------------------------------------------- trace


@symi.group("trace")
def trace_group() -> None:
    """Expert-load traces: inspect, convert from public formats, synthesise."""


@trace_group.command("info")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the facts and per-layer statistics as JSON.")
@click.option("--top-k", type=int, default=None, help="Top-k (overrides the file; a CSV defaults to 1).")
@click.option("--tokens-per-step", type=int, default=None, help="Tokens per step (overrides the file).")
def trace_info_cmd(file: str, as_json: bool, top_k: int | None, tokens_per_step: int | None) -> None:
    """Shape, metadata and per-layer skew/volatility of trace FILE (.parquet or .csv)."""
    import json

    from symi_sim.traces.format import read_trace
    from symi_sim.traces.stats import format_trace_info, trace_info

    info = trace_info(read_trace(file, top_k=top_k, tokens_per_step=tokens_per_step))
    click.echo(json.dumps(info, indent=2) if as_json else format_trace_info(info))


@trace_group.command("convert")
@click.argument("in_path", metavar="IN")
@click.argument("out_path", metavar="OUT")
@click.option("--from", "fmt", required=True, type=click.Choice(["csv", "olmoe", "per-rank-csv", "megatron-jsonl"]),
              help="Input format (per-rank-csv: IN is a directory of *rank<N>*.csv files).")
@click.option("--model", default=None, help="olmoe: olmoe|olmoe-sft|olmoe-dpo|mistral; others: a model name.")
@click.option("--selection", default=None, help="olmoe: topk (all k choices, default) or top1.")
@click.option("--domains", default=None, help="olmoe: comma-separated domains, one step each, in order.")
@click.option("--top-k", type=int, default=None, help="Top-k of the router (csv, per-rank-csv, megatron-jsonl).")
@click.option("--tokens-per-step", type=int, default=None, help="Tokens per step before top-k (csv, per-rank-csv, "
              "megatron-jsonl).")
def trace_convert_cmd(in_path: str, out_path: str, fmt: str, model: str | None, selection: str | None,
                      domains: str | None, top_k: int | None, tokens_per_step: int | None) -> None:
    """Convert IN (format --from) to the canonical Parquet trace OUT."""
    from symi_sim.traces.importers import convert_trace

    domain_list = None if domains is None else [d.strip() for d in domains.split(",") if d.strip()]
    trace = convert_trace(in_path, out_path, fmt=fmt, model=model, selection=selection, domains=domain_list,
                          top_k=top_k, tokens_per_step=tokens_per_step)
    click.echo(f"wrote {out_path}: {trace.num_steps} steps x {trace.num_layers} layers x {trace.num_experts} "
               f"experts, top-{trace.top_k}")


@trace_group.command("synth")
@click.argument("out_path", metavar="OUT")
@click.option("--experts", "num_experts", type=int, required=True, help="Logical experts per layer (E).")
@click.option("--layers", "num_layers", type=int, required=True, help="MoE layers (L).")
@click.option("--steps", "num_steps", type=int, required=True, help="Training steps (S).")
@click.option("--skew", type=float, required=True, help="Zipf exponent of the base popularity (0 = uniform).")
@click.option("--drift", type=float, required=True, help="How much popularity moves per step, in [0, 1].")
@click.option("--seed", type=int, required=True, help="Random seed (same seed, same trace).")
@click.option("--top-k", type=int, default=1, show_default=True, help="Distinct experts per token.")
@click.option("--tokens-per-step", type=int, default=32768, show_default=True, help="Tokens per step.")
@click.option("--burst-prob", type=float, default=0.0, show_default=True,
              help="Per step and layer, the probability that a random expert bursts.")
@click.option("--burst-scale", type=float, default=4.0, show_default=True, help="Weight multiplier of a burst.")
def trace_synth_cmd(out_path: str, num_experts: int, num_layers: int, num_steps: int, skew: float, drift: float,
                    seed: int, top_k: int, tokens_per_step: int, burst_prob: float, burst_scale: float) -> None:
    """Synthesise a skewed, drifting expert-load trace and write it to OUT (.parquet)."""
    from symi_sim.traces.format import write_trace
    from symi_sim.traces.synth import synth_trace

    if not out_path.lower().endswith(".parquet"):
        raise ValueError(f"trace output {out_path!r} must end in .parquet")
    trace = synth_trace(num_experts=num_experts, num_layers=num_layers, num_steps=num_steps, skew=skew,
                        drift=drift, seed=seed, top_k=top_k, tokens_per_step=tokens_per_step,
                        burst_prob=burst_prob, burst_scale=burst_scale)
    write_trace(trace, out_path)
    click.echo(f"wrote {out_path}: {num_steps} steps x {num_layers} layers x {num_experts} experts, top-{top_k}")


# ---------------------------------------------------------------- plan



@symi.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="Trace (.parquet/.csv).")
@click.option("--cluster", "cluster_spec", required=True, help="Cluster preset or .toml/.json file.")
@click.option("--slots", type=int, default=None, help="Override the cluster's slots per GPU.")
@click.option("--policy", default="symi-balanced", show_default=True, help="Policy for a single plan.")
@click.option("--step", type=int, default=None, help="Plan the placement serving this step (from the steps before).")
@click.option("--window", type=int, default=1, show_default=True, help="Steps of history the policy sees.")
@click.option("-o", "--option", "options", multiple=True, help="Policy option key=value (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["json", "eplb"]), default="json", show_default=True,
              help="json: our placement file; eplb: DeepSeek EPLB's phy2log/log2phy/logcnt arrays (.npz or .pt).")
@click.option("--replay", is_flag=True, help="Plan every step from the previous ones and score it on its own loads.")
@click.option("--policies", default=None, help="Comma-separated policies for --replay (default: all).")
@click.option("--capacity-factor", type=float, default=1.0, show_default=True)
@click.option("--capacity-mode", type=click.Choice(["slot", "gpu"]), default="slot", show_default=True)
@click.option("--out", "out", default=None, help="Output file (single plan) or run directory (--replay).")
def plan(trace_path: str, cluster_spec: str, slots: int | None, policy: str, step: int | None, window: int,
         options: tuple[str, ...], fmt: str, replay: bool, policies: str | None, capacity_factor: float,
         capacity_mode: str, out: str | None) -> None:
    """Emit a placement for one step, or replay a whole trace and compare policies."""
    from symi_sim.cluster import load_cluster
    from symi_sim.placement import write_eplb_arrays, write_placement_json
    from symi_sim.policies import available_policies, get_policy, parse_options
    from symi_sim.simulator.replay import plan_step, write_replay
    from symi_sim.simulator.replay import replay as replay_trace
    from symi_sim.traces.format import read_trace

    cluster = load_cluster(cluster_spec, slots_per_gpu=slots)
    trace = read_trace(trace_path)
    cluster.check_experts(trace.num_experts)
    if replay:
        names = [p.strip() for p in policies.split(",") if p.strip()] if policies else available_policies()
        if not names:
            raise ValueError(f"no policy named in --policies {policies!r}")
        for name in names:
            get_policy(name)  # fail on an unknown name before any work
        steps, summary = replay_trace(trace, cluster, names, capacity_factor=capacity_factor,
                                      capacity_mode=capacity_mode, window=window)
        out_dir = out or str(timestamped_dir("plan-replay"))
        config = {"command": "plan --replay", "trace": trace_path, "trace_model": trace.model,
                  "cluster": cluster.to_dict(), "policies": names, "capacity_factor": capacity_factor,
                  "capacity_mode": capacity_mode, "window": window}
        write_replay(out_dir, steps, summary, config)
        click.echo(summary.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        click.echo(f"wrote {out_dir}")
        return
    if step is None or out is None:
        raise ValueError("a single plan needs --step and --out (or use --replay)")
    chosen = get_policy(policy, **parse_options(options))
    placement = plan_step(trace, cluster, chosen, step=step, window=window)
    if fmt == "eplb":
        write_eplb_arrays(out, placement)
    else:
        write_placement_json(out, placement, cluster, {**chosen.config(), "step": step, "window": window,
                                                       "trace": trace_path})
    click.echo(f"wrote {out}: {placement.num_layers} layers x {placement.num_slots} slots, policy {policy}")


# ---------------------------------------------------------------- simulate

# the paper's comparison plus ours; kept here as text so that --help shows it without importing the simulator
DEFAULT_SIMULATE_POLICIES = ("static,symi,symi-balanced,symi-balanced:packing=grouped,flexmoe-10,flexmoe-50,"
                             "flexmoe-100,fastermoe,eplb,oracle:packing=grouped")
SUMMARY_COLUMNS = ("policy", "mean_time_s", "p99_time_s", "survival", "imbalance", "iterations_to_target",
                   "time_to_target_s", "speedup_vs_static")


@symi.command()
@click.option("--trace", "trace_path", required=True, type=click.Path(dir_okay=False), help="Trace (.parquet/.csv).")
@click.option("--cluster", "cluster_spec", default="paper-a100-16", show_default=True,
              help="Cluster preset or .toml/.json file.")
@click.option("--model", "model_spec", default="gpt-small", show_default=True,
              help="Model preset (gpt-small, gpt-medium, gpt-large, deepseek-v3) or .toml/.json file.")
@click.option("--policies", default=DEFAULT_SIMULATE_POLICIES, show_default=True,
              help="Comma-separated policies (a period suffix like flexmoe-50 sets rebalance_every).")
@click.option("--capacity-factor", type=float, default=1.0, show_default=True)
@click.option("--capacity-mode", type=click.Choice(["slot", "gpu"]), default="slot", show_default=True)
@click.option("--steps", type=int, default=None, help="Simulate this many steps (default: the whole trace).")
@click.option("--loop", is_flag=True, help="Cycle a shorter trace up to --steps.")
@click.option("--window", type=int, default=1, show_default=True, help="Steps of history the policies see.")
@click.option("--slots", type=int, default=None, help="Override the cluster's slots per GPU.")
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
@click.option("--failure-seed", type=int, default=0, show_default=True, help="Seed of the injected failures.")
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
def simulate(trace_path: str, cluster_spec: str, model_spec: str, policies: str, capacity_factor: float,
             capacity_mode: str, steps: int | None, loop: bool, window: int, slots: int | None,
             fit_model_to_trace: bool, convergence_path: str | None, convergence_form: str, mtbf_hours: float | None,
             gpu_mtbf_hours: float | None, checkpoint: str | None, failure_runs: int, failure_seed: int,
             calibration_spec: str | None, optimizer_location: str | None, expert_state_accounting: str,
             out: str | None) -> None:
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
    from symi_sim.traces.format import read_trace

    out_dir = Path(out or timestamped_dir("simulate"))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output directory {str(out_dir)!r} already exists and is not empty")
    failures = None
    if mtbf_hours is not None or gpu_mtbf_hours is not None:
        failures = FailureModel(checkpoint=checkpoint or DEFAULT_CHECKPOINT, mtbf_hours=mtbf_hours,
                                gpu_mtbf_hours=gpu_mtbf_hours, sampled_runs=failure_runs, seed=failure_seed)
    elif checkpoint is not None or failure_runs:
        option = "--checkpoint" if checkpoint is not None else "--failure-runs"
        raise ValueError(f"{option} needs --mtbf-hours or --gpu-mtbf-hours")
    cluster = load_cluster(cluster_spec, slots_per_gpu=slots)
    model = load_model(model_spec)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise ValueError(f"no policy named in --policies {policies!r}")
    trace = read_trace(trace_path)
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
    write_run(result, out_dir)
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


def _capacity_factor(raw: str | None) -> float | None:
    if raw is None or raw.strip().lower() in ("none", "dropless"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"capacity factor must be a number or 'none', got {raw!r}") from None


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
@_train_option("--model", type=click.Choice(["tiny", "small"]), help="Model preset (symi_exec/model.py).")
@_train_option("--experts", "num_experts", type=int, help="Experts per MoE layer (E).")
@_train_option("--slots", "slots_per_rank", type=int, help="Expert slots per rank.")
@_train_option("--top-k", type=int, help="Experts each token is routed to.")
@_train_option("--policy", help="Replica placement policy (static, symi, symi-balanced, eplb, lazarus, flexmoe[-N]).")
@click.option("-o", "--option", "options", multiple=True, help="Policy option key=value (repeatable).")
@_train_option("--capacity-factor", type=str, help="A number, or 'none' for dropless.")
@_train_option("--capacity-mode", type=click.Choice(["slot", "gpu"]),
               help="Capacity per slot, or per GPU shared by its slots.")
@_train_option("--steps", type=int, help="Training steps.")
@_train_option("--batch-size", type=int, help="Sequences per rank per step.")
@_train_option("--lr", type=float, help="Peak learning rate (cosine decay to a tenth of it).")
@_train_option("--aux-loss-coef", type=float, help="Load-balancing loss weight.")
@_train_option("--router-skew", type=float,
               help="Skewed expert load: expert e's router logit biased by -S ln(1 + e), a Zipf-like start the router "
                    "may learn against (0: none).")
@_train_option("--seed", type=int, help="Random seed (model initialisation and batches).")
@_train_option("--data", type=click.Path(dir_okay=False),
               help="Text file to train on (bytes are tokens); default: the shipped Wikipedia sample.")
@_train_option("--dtype", type=click.Choice(["float32", "float64"]), help="Parameter and activation dtype.")
@_train_option("--record-trace", is_flag=True, help="Also write trace.parquet (per step, layer, expert, rank).")
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
def train(nproc_per_node: int, model: str, num_experts: int, slots_per_rank: int, top_k: int, policy: str,
          options: tuple[str, ...], capacity_factor: str | None, capacity_mode: str, steps: int, batch_size: int,
          lr: float, aux_loss_coef: float, router_skew: float, seed: int, data: str | None, dtype: str,
          record_trace: bool, log_interval: int, out: str | None, checkpoint_every: int, checkpoint_dir: str | None,
          resume: str | None, sparse_hot_share: float | None, keep_checkpoints: int, overlap_checkpoints: bool,
          fail_at_step: int | None, dist_timeout_s: float) -> None:
    """Train a small MoE GPT with expert replicas placed by POLICY (gloo on CPU, NCCL on GPUs)."""
    import csv
    import os

    from symi_exec.config import TrainConfig
    from symi_exec.launch import JobFailed, launch
    from symi_sim.policies import parse_options

    config = TrainConfig(
        out=out or str(timestamped_dir("train")), model=model, num_experts=num_experts, slots_per_rank=slots_per_rank,
        top_k=top_k, policy=policy, policy_options=parse_options(options),
        capacity_factor=_capacity_factor(capacity_factor), capacity_mode=capacity_mode, steps=steps,
        batch_size=batch_size, lr=lr, min_lr=lr / 10, aux_loss_coef=aux_loss_coef, router_skew=router_skew, seed=seed,
        data=data, record_trace=record_trace, dtype=dtype, log_interval=log_interval, checkpoint_every=checkpoint_every,
        checkpoint_dir=checkpoint_dir, resume=resume, sparse_hot_share=sparse_hot_share,
        keep_checkpoints=keep_checkpoints, overlap_checkpoints=overlap_checkpoints, fail_at_step=fail_at_step,
        dist_timeout_s=dist_timeout_s,
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
    click.echo(f"step {last['step']}: loss {float(last['loss']):.4f}, {mean_tps:.0f} tokens/s on average, "
               f"dropped {100 * float(last['dropped_fraction']):.2f}%, optimizer state moved {state_mib:.2f} MiB")
    click.echo(f"wrote {run_dir}")


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
def calibrate(run_dirs: tuple[str, ...], latencies_path: str | None, cluster_spec: str | None,
              model_spec: str | None, num_experts: int | None, gemm_form: str | None, warmup_steps: int,
              optimizer_state: str, out: str) -> None:
    """Fit measured compute and communication terms to forward latencies (--latencies) or to `symi train` RUN_DIRS;
    prints every term, its standard error and the residuals, and writes a calibration file."""
    from symi_sim.cluster import load_cluster
    from symi_sim.models import load_model
    from symi_sim.simulator.calibrate import fit_latencies, fit_runs, format_fit
    from symi_sim.simulator.calibration import write_calibration

    if (latencies_path is None) == (not run_dirs):
        raise ValueError("give either --latencies FILE.csv or run directories (they describe different machines)")
    if latencies_path is not None:
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


def main() -> None:
    symi(prog_name="symi")


if __name__ == "__main__":
    main()
