"""What `--trace` accepts: a shipped trace by name, a trace file, or another framework's records where their
structure says which framework wrote them.

The shipped traces are package data (symi_sim/data/traces/<name>.parquet, links to the repository's traces/ folder
in a checkout, real files once installed), so `--trace synthetic-drift` works from any directory after
`pip install`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from symi_sim.traces.format import TRACE_SUFFIXES, LoadTrace, read_trace

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"
# The foreign formats `--trace` reads without `symi trace convert`: (format, test on the path), first match wins.
# vllm-routed-experts needs --tokens-per-step and counts-jsonl is no framework's own: they go through convert.
_MEGATRON_FILE = re.compile(r"router_trace_rank\d+\.jsonl")
_TRTLLM_FILE = re.compile(r"rank\d+\.safetensors")
_SGLANG_FILE = re.compile(r"expert_distribution_recorder_.*\.pt")


def shipped_traces() -> dict[str, Path]:
    """Name -> file of the traces shipped with the package, sorted by name."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.parquet")) if p.is_file()}


def shipped_trace_lines() -> list[str]:
    """One line per shipped trace: name, steps x layers x experts, top-k, tokens per step, model."""
    lines = []
    traces = shipped_traces()
    width = max((len(name) for name in traces), default=0)
    for name, path in traces.items():
        trace = read_trace(path)
        tokens = "?" if trace.tokens_per_step is None else f"{trace.tokens_per_step:,}"
        lines.append(f"{name:<{width}}  {trace.num_steps} steps x {trace.num_layers} layers x {trace.num_experts} "
                     f"experts, top-{trace.top_k}, {tokens} tokens/step, {trace.model}")
    return lines


def detect_format(path: str | Path) -> str | None:
    """The foreign format whose structure `path` has (a directory or a file), or None."""
    path = Path(path)
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file()]
        if any(_MEGATRON_FILE.fullmatch(n) for n in names):
            return "megatron-router-trace"
        if "meta_info.json" in names and any(_TRTLLM_FILE.fullmatch(n) for n in names):
            return "trtllm-expert-statistic"
        if any(_SGLANG_FILE.fullmatch(n) for n in names):
            return "sglang-expert-distribution"
        return None
    if _MEGATRON_FILE.fullmatch(path.name):
        return "megatron-router-trace"
    if _SGLANG_FILE.fullmatch(path.name):
        return "sglang-expert-distribution"
    return None


def load_trace(spec: str | Path, **options: Any) -> LoadTrace:
    """The trace `spec` names: a shipped trace name (see shipped_traces), a .parquet/.csv trace file, or a file or
    directory of Megatron-Core router traces, SGLang recorder dumps or a TensorRT-LLM expert statistic (detected by
    their file names). `options` go to read_trace for trace files (top_k, tokens_per_step) and to the importer
    otherwise. One ValueError listing what is accepted when `spec` is none of these."""
    from symi_sim.traces.importers import import_trace

    text = str(spec)
    path = Path(spec)
    shipped = shipped_traces()
    if text in shipped and not path.exists():
        return read_trace(shipped[text], **options)
    if path.suffix.lower() in TRACE_SUFFIXES and not path.is_dir():
        return read_trace(path, **options)
    if path.exists():
        fmt = detect_format(path)
        if fmt is not None:
            return import_trace(path, fmt=fmt, **options)
        what = "a directory of no known records" if path.is_dir() else f"a file of unknown suffix {path.suffix!r}"
        raise ValueError(f"trace {text!r} is {what}: expected a .parquet/.csv trace, Megatron router traces, SGLang "
                         "recorder dumps or a TensorRT-LLM expert statistic; convert other formats first (symi trace "
                         "convert --from FORMAT)")
    raise ValueError(f"trace {text!r} does not exist and is not a shipped trace "
                     f"({', '.join(shipped) or 'none installed'}; see symi trace list)")
