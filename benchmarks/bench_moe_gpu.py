"""GPU benchmark: the MoE layer against a dense MLP of equal FLOPs per token, and world-size-1 `symi train` runs.

    PYTHONPATH=. python3 benchmarks/bench_moe_gpu.py                      # layer suite on CUDA
    PYTHONPATH=. python3 benchmarks/bench_moe_gpu.py --suite train        # symi train, 1 rank (NCCL)
    PYTHONPATH=. python3 benchmarks/bench_moe_gpu.py --suite all
    .venv/bin/python benchmarks/bench_moe_gpu.py --device cpu --smoke     # tiny shapes on the CPU (a smoke test)

Without CUDA (and without --device cpu) it prints why it skips and exits 0, writing nothing.

Layer suite, per (dtype, d_model, top_k, tokens per step), forward and forward+backward of one layer:
  dense          GELU MLP d_model -> k*d_ff -> d_model: the same matmul FLOPs per token as k experts of width d_ff
  expert_gemms   the experts' matmuls alone: N*k rows pre-sorted into E equal chunks, one expert MLP per chunk
                 (the kernel shapes of a perfectly balanced MoE, without routing, permutation or host syncs)
  moe_ref        symi_exec.model.MoE: the single-device reference layer (loop over experts, index_add combine)
  moe_grouped    symi_exec.moe.ReplicatedMoE at world size 1 (router, popularity, host-side dispatch plan,
                 all-to-all (a copy at one rank), slot compute, combine; the executor's layer), its S slots
                 computed as torch._grouped_mm (a CUTLASS kernel for bf16 on compute capability 9.x/10.x; elsewhere
                 torch's fallback loop, which reads the offsets back to the host)
  moe_padded     the same layer, slots as one batched matmul over [S, max rows, D] (zero rows padded)
  moe_loop       the same layer, one matmul pair per slot (the executor before the grouped compute)
`symi train` uses moe_grouped where symi_exec.moe.grouped_mm_supported says so, moe_padded otherwise (the
`auto_compute` column). The MoE layers share one router; the replicated layers' slots hold the reference experts
(S slots, slot p holding expert p % E), so with no capacity limit all compute the same function (checked:
max_abs_diff against moe_ref). The defaults include gpt-small's expert shape (d_model 768, d_ff 3072) in bf16.
FLOPs counted: the expert / MLP matmuls only, 2 * 2 * N * k * D * F forward and three times that forward+backward
(the router's N * D * E is left out). Results: bench_moe_gpu.csv and .json (device, versions) in --results (default
runs/bench_moe_gpu, runs/bench_moe_cpu on the CPU; the committed ones: --results benchmarks/results).

Train suite: `symi train` on one rank (NCCL on a GPU) for each policy x top-k, by default the executor's
`gpt-small` (12 layers, d_model 768, d_ff 3072, sequence 512: the model `symi simulate --model gpt-small` models;
vocabulary 256, the shipped text's bytes, since the benchmark prepares no data) in bfloat16 with float32 masters,
16 experts in 20 slots, static and symi, 8 sequences (4,096 tokens) per step; the slots compute with
torch._grouped_mm where the GPU supports it (symi_exec.moe.grouped_mm_supported; the summary's slot_compute). Per
run: the median step time and tokens/s after --train-warmup-steps, the peak GPU memory (metrics.csv's
peak_memory_mib: the CUDA allocator's peak), drops, loss and the phases' mean times. Prints a summary, writes
gpu_train_summary.csv and each run's metrics as gpu_train_<policy>_top<k>.csv into the same folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from symi_exec.comm import Comm
from symi_exec.model import ModelConfig, MoE, expert_mlp
from symi_exec.moe import ReplicatedMoE, grouped_mm_supported
from symi_sim.placement import Placement

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPLICATED = {"moe_grouped": "grouped", "moe_padded": "padded", "moe_loop": "loop"}   # variant: slot compute
VARIANTS = ("dense", "expert_gemms", "moe_ref", *REPLICATED)


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, *, warmup: int, iters: int) -> float:
    """Mean wall time of fn() in ms over `iters` calls after `warmup` calls, synchronised with the device."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - start) / iters


# ---------------------------------------------------------------------------------------------- layers


class DenseMLP(nn.Module):
    """The equal-FLOPs dense reference: one GELU MLP of width k * d_ff (no biases, like an expert)."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.w_in_DF = nn.Parameter(torch.randn(d_model, width) * 0.02)
        self.w_out_FD = nn.Parameter(torch.randn(width, d_model) * 0.02)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x_BTD, self.w_in_DF, self.w_out_FD)


class ExpertGemms(nn.Module):
    """The experts' matmuls without routing: N*k pre-sorted rows in E equal chunks, one expert each."""

    def __init__(self, experts_w_in_EDF: torch.Tensor, experts_w_out_EFD: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.w_in_EDF = nn.Parameter(experts_w_in_EDF.detach().clone())
        self.w_out_EFD = nn.Parameter(experts_w_out_EFD.detach().clone())
        self.top_k = top_k

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_AD = x_BTD.reshape(-1, x_BTD.shape[-1]).repeat_interleave(self.top_k, dim=0)
        chunks = torch.tensor_split(x_AD, self.w_in_EDF.shape[0])
        y_AD = torch.cat([expert_mlp(x, self.w_in_EDF[e], self.w_out_EFD[e]) for e, x in enumerate(chunks)])
        return y_AD.view(*x_BTD.shape[:-1], self.top_k, -1).sum(dim=-2)


def build_layers(*, d_model: int, d_ff: int, num_experts: int, top_k: int, slots: int,
                 capacity_factor: float | None, dtype: torch.dtype, device: torch.device, seed: int
                 ) -> dict[str, nn.Module]:
    """The benchmarked layers, on `device` in `dtype`; the MoE layers share router and expert weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=1, d_model=d_model, num_heads=1, d_ff=d_ff, seq_len=1, num_experts=num_experts,
                      top_k=top_k)
    ref = MoE(cfg)
    with torch.no_grad():
        ref.experts.w_in_EDF.normal_(0.0, 0.02)
        ref.experts.w_out_EFD.normal_(0.0, 0.02)
    ref = ref.to(device=device, dtype=dtype)
    comm = Comm(rank=0, world_size=1, device=device)
    layers: dict[str, nn.Module] = {"dense": DenseMLP(d_model, top_k * d_ff).to(device=device, dtype=dtype),
                                    "expert_gemms": ExpertGemms(ref.experts.w_in_EDF, ref.experts.w_out_EFD, top_k),
                                    "moe_ref": ref}
    for variant, slot_compute in REPLICATED.items():
        replicated = ReplicatedMoE(ref.router, cfg, slots_per_rank=slots, comm=comm, capacity_factor=capacity_factor,
                                   slot_compute=slot_compute)
        replicated.placement = Placement.even((np.arange(slots, dtype=np.int64) % num_experts)[None, :],
                                              num_experts)
        with torch.no_grad():
            replicated.slot_weights_SP.copy_(ref.experts.flat_EP()[np.arange(slots) % num_experts])
        layers[variant] = replicated
    return layers


def bench_shape(*, dtype_name: str, d_model: int, num_experts: int, top_k: int, tokens: int, slots: int,
                capacity_factor: float | None, device: torch.device, warmup: int, iters: int, seed: int
                ) -> list[dict[str, Any]]:
    """One shape: a row per variant (times, tokens/s, achieved TFLOP/s, peak memory, ratio to dense)."""
    dtype = DTYPES[dtype_name]
    d_ff = 4 * d_model
    layers = build_layers(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, slots=slots,
                          capacity_factor=capacity_factor, dtype=dtype, device=device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x_BTD = torch.randn(1, tokens, d_model, generator=gen, device=device, dtype=dtype)
    grad_BTD = torch.randn(1, tokens, d_model, generator=gen, device=device, dtype=dtype)

    # the MoE layers compute the same function when nothing is dropped
    with torch.no_grad():
        y_ref = layers["moe_ref"](x_BTD)
        max_abs_diff = {variant: float((y_ref.float() - layers[variant](x_BTD).float()).abs().max())
                        for variant in REPLICATED}
    replicated: ReplicatedMoE = layers["moe_padded"]  # type: ignore[assignment]
    auto_compute = "grouped" if grouped_mm_supported(device, dtype, d_model, d_ff) else "padded"
    count_E = replicated.count_GE.sum(axis=0)
    max_load_ratio = float(count_E.max() / count_E.mean())
    dropped_pct = 100.0 * float(replicated.dropped_E.sum()) / float(count_E.sum())

    matmul_flops_fwd = 4.0 * tokens * top_k * d_model * d_ff
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        layer = layers[variant]
        params = list(layer.parameters())
        x_in = x_BTD.detach().clone().requires_grad_(True)

        def forward(layer: nn.Module = layer, x_in: torch.Tensor = x_in) -> None:
            layer(x_in)

        def forward_backward(layer: nn.Module = layer, x_in: torch.Tensor = x_in,
                             params: list[nn.Parameter] = params, grad_BTD: torch.Tensor = grad_BTD) -> None:
            for p in params:
                p.grad = None
            x_in.grad = None
            layer(x_in).backward(grad_BTD)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        fwd_ms = time_ms(forward, device, warmup=warmup, iters=iters)
        fwd_bwd_ms = time_ms(forward_backward, device, warmup=warmup, iters=iters)
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        rows.append({
            "dtype": dtype_name, "d_model": d_model, "d_ff": d_ff, "experts": num_experts, "top_k": top_k,
            "tokens": tokens, "variant": variant, "auto_compute": auto_compute,
            "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fwd_bwd_ms, 3),
            "tokens_per_s": round(tokens / (fwd_bwd_ms / 1e3)),
            "tflops": round(3 * matmul_flops_fwd / (fwd_bwd_ms / 1e3) / 1e12, 2),
            "vs_dense": float("nan"), "peak_mib": round(peak_mib, 1),
            "max_load_ratio": round(max_load_ratio, 3) if variant.startswith("moe") else float("nan"),
            "dropped_pct": round(dropped_pct, 3) if variant in REPLICATED else float("nan"),
            "max_abs_diff": max_abs_diff.get(variant, float("nan")),
        })
    dense_tps = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_dense"] = round(row["tokens_per_s"] / dense_tps, 3)
    del layers, x_BTD, grad_BTD
    return rows


# ---------------------------------------------------------------------------------------------- train suite


def run_train_suite(args: argparse.Namespace, results_dir: Path) -> list[dict[str, Any]]:
    """`symi train` on one rank for each policy x top-k; copies each metrics.csv and returns a summary row each."""
    from symi_exec.config import TrainConfig
    from symi_exec.launch import launch
    from symi_exec.loop import PHASES
    from symi_exec.model import TORCH_DTYPES
    from symi_exec.moe import grouped_mm_supported

    summary: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.train_policies.split(","):
            for top_k in (int(k) for k in args.train_top_k.split(",")):
                config = TrainConfig(out=str(Path(tmp) / f"{policy}-top{top_k}"), model=args.train_model,
                                     num_experts=args.train_experts, slots_per_rank=args.train_slots, top_k=top_k,
                                     policy=policy.strip(), capacity_factor=args.train_capacity_factor,
                                     steps=args.train_steps, batch_size=args.train_batch_size, lr=args.train_lr,
                                     min_lr=args.train_lr / 10, log_interval=max(args.train_steps // 5, 1),
                                     dtype=args.train_dtype)
                cfg = config.model_config()
                start = time.perf_counter()
                run_dir = launch(config, 1)
                wall_s = time.perf_counter() - start
                with open(run_dir / "metrics.csv") as f:
                    rows = [{k: float(v or "nan") for k, v in row.items()} for row in csv.DictReader(f)]
                shutil.copyfile(run_dir / "metrics.csv", results_dir / f"gpu_train_{policy.strip()}_top{top_k}.csv")
                with open(run_dir / "config.json") as f:
                    resolved = json.load(f)
                timed = rows[min(args.train_warmup_steps, len(rows) - 1):]
                window = max(min(10, len(rows) // 4), 1)
                row: dict[str, Any] = {
                    "policy": policy.strip(), "top_k": top_k, "model": args.train_model, "dtype": args.train_dtype,
                    "slot_compute": "grouped" if grouped_mm_supported(
                        torch.device(resolved["device"]), TORCH_DTYPES[args.train_dtype], d_model=cfg.d_model,
                        d_ff=cfg.d_ff) else "padded",
                    "experts": args.train_experts, "slots": args.train_slots,
                    "capacity_factor": args.train_capacity_factor, "steps": len(rows),
                    "tokens_per_step": resolved["tokens_per_step"], "backend": resolved["backend"],
                    "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed)),
                    "step_ms_median": round(1e3 * statistics.median(r["step_s"] for r in timed), 2),
                    "peak_memory_mib": round(max(r["peak_memory_mib"] for r in rows)),
                    "dropped_pct": round(100 * statistics.mean(r["dropped_fraction"] for r in rows), 2),
                    "dropped_pct_last": round(100 * statistics.mean(r["dropped_fraction"] for r in rows[-window:]),
                                              2),
                    "loss_first": round(statistics.mean(r["loss"] for r in rows[:window]), 4),
                    "loss_last": round(statistics.mean(r["loss"] for r in rows[-window:]), 4),
                    "replica_moves_per_step": round(statistics.mean(r["replica_moves"] for r in rows), 2),
                    "wall_s": round(wall_s, 1),
                }
                for phase in PHASES:
                    row[f"{phase}_ms"] = round(1e3 * statistics.mean(r[f"time_{phase}_s"] for r in timed), 2)
                summary.append(row)
                print(f"trained {policy} top-{top_k}: {row['tokens_per_s']} tokens/s, loss {row['loss_first']} -> "
                      f"{row['loss_last']}, dropped {row['dropped_pct']}%", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------- output


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(cell[i]) for cell in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for cell in cells:
        print("  ".join(v.rjust(w) for v, w in zip(cell, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:   # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:g}"
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "device_type": device.type,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device_name": props.name, "cuda": torch.version.cuda,
                    "device_memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count})
    else:
        env.update({"device_name": platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads()})
    return env


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("layer", "train", "all"), default="layer")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes and few steps (a quick check).")
    parser.add_argument("--dtypes", default="bfloat16,float32", help=f"Comma-separated: {', '.join(DTYPES)}.")
    parser.add_argument("--d-models", default="768,1024", help="d_ff is 4 x d_model.")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--slots", type=int, default=None, help="Slots of the replicated layer (default: experts).")
    parser.add_argument("--top-k", default="1,2")
    parser.add_argument("--tokens", default="8192,32768", help="Tokens per step (before top-k).")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="Replicated layer's capacity factor (default: dropless, so FLOPs equal dense).")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf32", action="store_true", help="Allow TF32 matmuls for float32.")
    parser.add_argument("--train-policies", default="symi,static")
    parser.add_argument("--train-top-k", default="1,2")
    parser.add_argument("--train-model", default="gpt-small")
    parser.add_argument("--train-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--train-experts", type=int, default=16)
    parser.add_argument("--train-slots", type=int, default=20,
                        help="Slots of the one rank (>= experts; the spare ones hold replicas).")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--train-batch-size", type=int, default=8, help="Sequences per step.")
    parser.add_argument("--train-lr", type=float, default=3e-3)
    parser.add_argument("--train-capacity-factor", type=float, default=1.0)
    parser.add_argument("--train-warmup-steps", type=int, default=10, help="Steps left out of the throughput.")
    parser.add_argument("--results", default=None,
                        help="Output folder (default: runs/bench_moe_gpu on CUDA, runs/bench_moe_cpu on the CPU; "
                             "--results benchmarks/results refreshes the committed tables).")
    args = parser.parse_args(argv)
    if args.smoke:
        args.d_models, args.tokens, args.experts, args.warmup, args.iters = "64", "512", 4, 1, 2
        args.train_model, args.train_experts, args.train_slots, args.train_steps = "tiny", 4, 6, 4
        args.train_batch_size, args.train_warmup_steps, args.train_dtype = 2, 1, "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_moe_gpu: CUDA is not available here; skipping the GPU benchmark (nothing written). "
              "Use --device cpu --smoke for a CPU smoke run.", file=sys.stderr)
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    results_dir = Path(args.results) if args.results else (
        Path("runs") / ("bench_moe_gpu" if device.type == "cuda" else "bench_moe_cpu"))
    results_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print(f"device: {env['device_name']}, torch {env['torch']}", flush=True)

    if args.suite in ("layer", "all"):
        rows: list[dict[str, Any]] = []
        for dtype_name in args.dtypes.split(","):
            if dtype_name not in DTYPES:
                raise SystemExit(f"unknown dtype {dtype_name!r}; choices: {', '.join(DTYPES)}")
            for d_model in _ints(args.d_models):
                for top_k in _ints(args.top_k):
                    for tokens in _ints(args.tokens):
                        rows += bench_shape(dtype_name=dtype_name, d_model=d_model, num_experts=args.experts,
                                            top_k=top_k, tokens=tokens, slots=args.slots or args.experts,
                                            capacity_factor=args.capacity_factor, device=device,
                                            warmup=args.warmup, iters=args.iters, seed=args.seed)
                        print(f"  done {dtype_name} d_model {d_model} top-{top_k} {tokens} tokens", flush=True)
        print_table(rows)
        write_csv(results_dir / "bench_moe_gpu.csv", rows)
        meta = {**env, "suite": "layer", "args": vars(args), "variants": list(VARIANTS),
                "flops_counted": "expert/MLP matmuls: 12*N*k*D*F per forward+backward (router excluded)"}
        (results_dir / "bench_moe_gpu.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"wrote {results_dir / 'bench_moe_gpu.json'}")

    if args.suite in ("train", "all"):
        if device.type == "cuda":
            torch.cuda.empty_cache()   # the spawned rank gets the GPU memory the layer suite cached
        summary = run_train_suite(args, results_dir)
        print_table(summary)
        write_csv(results_dir / "gpu_train_summary.csv", summary)
        (results_dir / "gpu_train_summary.json").write_text(
            json.dumps({**env, "suite": "train", "args": vars(args)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
