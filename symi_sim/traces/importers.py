"""Importers: public expert-load formats -> LoadTrace (then `write_trace` makes the canonical Parquet).

Legend: S steps, L MoE layers, E logical experts, G source ranks.

    trace = import_olmoe("traces/source/olmoe-routing/expert_counts.csv", model="mistral")
    convert_trace("stats.jsonl", "run.parquet", fmt="counts-jsonl", top_k=2, tokens_per_step=65536)
    convert_trace("router_traces/", "run.parquet", fmt="megatron-router-trace")

Formats (`convert_trace(..., fmt=...)`):
  csv                         the tidy CSV of the trace format (step,layer,expert,tokens[,src_rank])
  olmoe                       the OLMoE routing-analysis aggregate counts CSV
                              (model,selection,domain,layer,expert,count,layer_total_assignments): one step per domain
  per-rank-csv                a directory (or list) of `*rank<N>*.csv` tidy CSVs, one per source rank
  counts-jsonl                JSON lines of per-expert token counts, one (iteration, layer) or one iteration per line
  megatron-router-trace       Megatron-Core's router_trace_rank{r}.jsonl files (readers_megatron)
  sglang-expert-distribution  SGLang's expert distribution recorder dumps, stat or per_pass (readers_sglang)
  trtllm-expert-statistic     TensorRT-LLM's EXPERT_STATISTIC_PATH directory (readers_trtllm)
  vllm-routed-experts         vLLM's per-token routed expert ids [tokens, layers, top_k] (readers_vllm)
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_choice, is_int, is_number
from symi_sim.traces.format import (
    MAX_TOKEN_COUNT,
    LoadTrace,
    parse_integer_column,
    read_csv_frame,
    read_trace_csv,
    write_trace,
)
from symi_sim.traces.readers_common import json_object
from symi_sim.traces.readers_megatron import import_megatron_router_trace
from symi_sim.traces.readers_sglang import import_sglang_expert_distribution
from symi_sim.traces.readers_trtllm import import_trtllm_expert_statistic
from symi_sim.traces.readers_vllm import import_vllm_routed_experts

logger = logging.getLogger(__name__)

# model option -> (model id, experts, top-k of its router)
OLMOE_MODELS: dict[str, tuple[str, int, int]] = {
    "olmoe": ("allenai/OLMoE-1B-7B-0924", 64, 8),
    "olmoe-sft": ("allenai/OLMoE-1B-7B-0924-SFT", 64, 8),
    "olmoe-dpo": ("allenai/OLMoE-1B-7B-0924-Instruct", 64, 8),
    "mistral": ("mistralai/Mixtral-8x7B-v0.1", 8, 2),
}
OLMOE_SELECTIONS = ("topk", "top1")
# The pretraining-text domains of the analysis (tulu, the instruction data, has a different token count).
OLMOE_DEFAULT_DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")
OLMOE_COLUMNS = ("model", "selection", "domain", "layer", "expert", "count", "layer_total_assignments")
OLMOE_PROVENANCE = (
    "OLMoE routing analysis (github.com/allenai/OLMoE, scripts/routing_output, commit "
    "357454f4f647385839c0ff6b99a688dc7cd9c13f), Apache-2.0; inference on 102 x 2048-token samples per domain, "
    "aggregate counts for MoE layers 0, 7, 15; one step per domain"
)


def import_olmoe(path: str | Path, *, model: str = "olmoe", selection: str = "topk",
                 domains: Sequence[str] | None = None) -> LoadTrace:
    """OLMoE routing-analysis aggregate counts -> a trace with one step per domain (a domain-shift scenario).

    path: CSV with columns model,selection,domain,layer,expert,count,layer_total_assignments (one row per
    model x selection x domain x layer x expert; absent experts have 0 count).
    model: olmoe | olmoe-sft | olmoe-dpo | mistral (Mixtral-8x7B); selection: topk (all k choices) | top1.
    domains: step order (default arxiv, book, c4, github, wikipedia; tulu for olmoe-sft/-dpo).
    The file's layers (0, 7, 15) become layers 0..L-1, their original ids kept in meta["original_layers"].
    top_k = the model's k for topk (8 OLMoE, 2 Mixtral), 1 for top1; tokens_per_step = layer_total / top_k
    (None, with meta["tokens_per_domain"], if the chosen domains differ).
    """
    check_choice(model, "OLMoE-analysis model", OLMOE_MODELS)
    check_choice(selection, "selection", OLMOE_SELECTIONS)
    model_id, num_experts, model_k = OLMOE_MODELS[model]
    top_k = model_k if selection == "topk" else 1
    path = Path(path)
    where = f"OLMoE counts file {str(path)!r}"
    frame = read_csv_frame(path, where, OLMOE_COLUMNS)
    for name in ("model", "selection", "domain"):
        if frame[name].isna().any():
            row = int(np.flatnonzero(frame[name].isna().to_numpy())[0])
            raise ValueError(f"{where}, data row {row + 1}: column {name!r} is missing a value")
    for name in ("layer", "expert", "count", "layer_total_assignments"):
        frame[name] = parse_integer_column(frame[name], name, where)
    for name in ("model", "selection", "domain"):
        frame[name] = frame[name].astype(str).str.strip()
    chosen = frame[(frame["model"] == model) & (frame["selection"] == selection)]
    if chosen.empty:
        combos = sorted(set(zip(frame["model"], frame["selection"], strict=True)))
        raise ValueError(f"{where} has no rows for model {model!r} selection {selection!r}; it has {combos}")
    if domains is None:
        domains = ("tulu",) if model in ("olmoe-sft", "olmoe-dpo") else OLMOE_DEFAULT_DOMAINS
    domains = list(domains)
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be a non-empty list without repeats, got {domains}")
    present = sorted(chosen["domain"].unique())
    missing = [d for d in domains if d not in present]
    if missing:
        raise ValueError(f"{where}: no {model}/{selection} rows for domain(s) {missing}; available: {present}")
    chosen = chosen[chosen["domain"].isin(domains)]
    layers = sorted(int(x) for x in chosen["layer"].unique())
    bad_expert = chosen["expert"] >= num_experts
    if bad_expert.any():
        row = int(chosen.index[bad_expert.to_numpy()][0])
        raise ValueError(f"{where}, data row {row + 1}: expert {frame['expert'][row]} is out of range "
                         f"[0, {num_experts}) for {model}")
    dup = chosen.duplicated(["domain", "layer", "expert"])
    if dup.any():
        row = int(chosen.index[dup.to_numpy()][0])
        raise ValueError(f"{where}, data row {row + 1}: duplicate row for domain {frame['domain'][row]!r} layer "
                         f"{frame['layer'][row]} expert {frame['expert'][row]}")

    step_S = np.array([domains.index(d) for d in chosen["domain"]])
    layer_S = np.searchsorted(layers, chosen["layer"].to_numpy())
    counts_SLE = np.zeros((len(domains), len(layers), num_experts), dtype=np.int64)
    counts_SLE[step_S, layer_S, chosen["expert"].to_numpy()] = chosen["count"].to_numpy()
    totals = chosen.groupby(["domain", "layer"])["layer_total_assignments"].agg(["min", "max"])
    assignments_SL = np.zeros((len(domains), len(layers)), dtype=np.int64)
    for (domain, layer), row in totals.iterrows():
        if row["min"] != row["max"]:
            raise ValueError(f"{where}: domain {domain!r} layer {layer} has differing layer_total_assignments "
                             f"({row['min']} vs {row['max']})")
        assignments_SL[domains.index(domain), layers.index(layer)] = row["max"]
    for s, domain in enumerate(domains):
        for li, layer in enumerate(layers):
            if assignments_SL[s, li] == 0:
                raise ValueError(f"{where}: domain {domain!r} has no rows for layer {layer}")
            routed = counts_SLE[s, li].sum()
            if assignments_SL[s, li] % top_k or routed > assignments_SL[s, li]:
                raise ValueError(f"{where}: domain {domain!r} layer {layer}: layer_total_assignments "
                                 f"{assignments_SL[s, li]} is not a multiple of top_k {top_k} or is below the "
                                 f"routed total {routed}")
        if len(set(assignments_SL[s])) != 1:
            raise ValueError(f"{where}: domain {domain!r} has different token totals per layer {assignments_SL[s]}")
    tokens_per_domain = {d: int(assignments_SL[s, 0] // top_k) for s, d in enumerate(domains)}
    tokens_per_step = next(iter(tokens_per_domain.values()))
    meta: dict[str, Any] = {"domains": domains, "original_layers": layers, "selection": selection,
                            "analysis_model": model}
    if len(set(tokens_per_domain.values())) > 1:
        logger.info("domains %s have different token counts; tokens_per_step left unknown", domains)
        tokens_per_step = None
        meta["tokens_per_domain"] = tokens_per_domain
    return LoadTrace(
        counts_SLE=counts_SLE, top_k=top_k, tokens_per_step=tokens_per_step, model=model_id,
        source=f"olmoe-routing:{path.name} (model={model}, selection={selection})",
        provenance=OLMOE_PROVENANCE, meta=meta,
    )


def import_per_rank_csv(paths: str | Path | Sequence[str | Path], *, top_k: int = 1,
                        tokens_per_step: int | None = None, model: str = "unknown") -> LoadTrace:
    """Per-source-rank tidy CSVs -> counts summed over ranks, plus src_counts_SLEG [S, L, E, G].

    paths: a directory (its `*rank<N>*.csv` files) or a list of such files; N is the source rank, and ranks
    0..G-1 must all be present once. Each file: columns step,layer,expert,tokens (validated on its own, errors
    name that file and row); every file must hold the same steps and layers. tokens_per_step is the global
    (all-rank) token count per step.
    """
    files = _rank_files(paths)
    by_rank: dict[int, Path] = {}
    for file in files:
        match = re.search(r"rank(\d+)", file.name)
        if match is None:
            raise ValueError(f"per-rank CSV {str(file)!r}: name must contain rank<N>")
        rank = int(match.group(1))
        if rank in by_rank:
            raise ValueError(f"rank {rank} given twice: {str(by_rank[rank])!r} and {str(file)!r}")
        by_rank[rank] = file
    missing = sorted(set(range(max(by_rank) + 1)) - set(by_rank))
    if missing:
        raise ValueError(f"per-rank CSVs: no file for rank(s) {missing} (have {sorted(by_rank)})")
    traces = [read_trace_csv(by_rank[g]) for g in range(len(by_rank))]
    step_ids = [t.meta.get("step_ids", list(range(t.num_steps))) for t in traces]
    for g, trace in enumerate(traces):
        if step_ids[g] != step_ids[0] or trace.num_layers != traces[0].num_layers:
            raise ValueError(f"per-rank CSV {str(by_rank[g])!r} has steps/layers ({len(step_ids[g])} steps, "
                             f"{trace.num_layers} layers) unlike {str(by_rank[0])!r} ({len(step_ids[0])} steps, "
                             f"{traces[0].num_layers} layers)")
    num_experts = max(t.num_experts for t in traces)
    src_counts_SLEG = np.zeros((*traces[0].counts_SLE.shape[:2], num_experts, len(traces)), dtype=np.int64)
    for g, trace in enumerate(traces):
        src_counts_SLEG[:, :, : trace.num_experts, g] = trace.counts_SLE
    meta: dict[str, Any] = {"num_ranks": len(traces), "files": [by_rank[g].name for g in range(len(traces))]}
    if "step_ids" in traces[0].meta:
        meta["step_ids"] = step_ids[0]
    return LoadTrace(
        counts_SLE=src_counts_SLEG.sum(axis=3), top_k=top_k, tokens_per_step=tokens_per_step, model=model,
        source=f"per-rank-csv:{by_rank[0].parent.name or '.'}", src_counts_SLEG=src_counts_SLEG, meta=meta,
    )


def import_counts_jsonl(path: str | Path, *, top_k: int = 1, tokens_per_step: int | None = None,
                        model: str = "unknown") -> LoadTrace:
    """Per-expert token counts as JSON lines -> LoadTrace (a plain interchange format, no framework's own).

    Each non-blank line is one JSON object with
      "iteration" (or "step"): int >= 0, the training step;
      "layer": int >= 0, the MoE layer, with "tokens_per_expert": [E] non-negative integers; or, with no
      "layer" key, "tokens_per_expert": [L][E], every layer of that iteration at once.
    Other keys are ignored. E must be the same on every line; every iteration needs every layer 0..L-1 exactly
    once. For example (two layers of iteration 3):
      {"iteration": 3, "layer": 0, "tokens_per_expert": [120, 8, 0, 0]}
      {"iteration": 3, "layer": 1, "tokens_per_expert": [30, 30, 40, 28]}
    """
    path = Path(path)
    where = f"counts JSON-lines file {str(path)!r}"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from None
    entries: dict[tuple[int, int], tuple[int, list[Any]]] = {}   # (step, layer) -> (line number, counts)
    num_experts: int | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        at = f"{where}, line {number}"
        record = json_object(line, at)
        step = record.get("iteration", record.get("step"))
        if not _is_token_count(step):
            raise ValueError(f"{at}: 'iteration' (or 'step') must be a non-negative integer, got {step!r}")
        counts = record.get("tokens_per_expert")
        if not isinstance(counts, list) or not counts:
            raise ValueError(f"{at}: 'tokens_per_expert' must be a non-empty list, got {counts!r}")
        if "layer" in record:
            if not _is_token_count(record["layer"]):
                raise ValueError(f"{at}: 'layer' must be a non-negative integer, got {record['layer']!r}")
            rows = {int(record["layer"]): counts}
        else:
            if not all(isinstance(row, list) for row in counts):
                raise ValueError(f"{at}: without 'layer', 'tokens_per_expert' must be a list of per-layer lists")
            rows = dict(enumerate(counts))
        for layer, row in rows.items():
            bad = [x for x in row if not _is_token_count(x)]
            if bad or not row:
                raise ValueError(f"{at}: layer {layer} tokens_per_expert must be non-negative integers, "
                                 f"got {bad[0] if bad else row!r}")
            huge = [x for x in row if x > MAX_TOKEN_COUNT]
            if huge:
                raise ValueError(f"{at}: layer {layer} tokens_per_expert holds {huge[0]}, more than the "
                                 f"{MAX_TOKEN_COUNT} tokens a trace may hold per (step, layer, expert)")
            if num_experts is None:
                num_experts = len(row)
            elif len(row) != num_experts:
                raise ValueError(f"{at}: layer {layer} lists {len(row)} experts, earlier lines {num_experts}")
            if (int(step), layer) in entries:
                raise ValueError(f"{at}: iteration {step} layer {layer} already given on line "
                                 f"{entries[(int(step), layer)][0]}")
            entries[(int(step), layer)] = (number, row)
    if not entries:
        raise ValueError(f"{where}: no records")
    step_ids = sorted({s for s, _ in entries})
    num_layers = max(layer for _, layer in entries) + 1
    step_index = {s: i for i, s in enumerate(step_ids)}
    counts_SLE = np.zeros((len(step_ids), num_layers, num_experts or 0), dtype=np.int64)
    for (step, layer), (_, row) in entries.items():
        counts_SLE[step_index[step], layer] = row
    for step in step_ids:
        for layer in range(num_layers):
            if (step, layer) not in entries:
                raise ValueError(f"{where}: iteration {step} has no record for layer {layer}")
    meta: dict[str, Any] = {}
    if step_ids != list(range(len(step_ids))):
        meta["step_ids"] = step_ids
    try:
        return LoadTrace(counts_SLE=counts_SLE, top_k=top_k, tokens_per_step=tokens_per_step, model=model,
                         source=f"counts-jsonl:{path.name}", meta=meta)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def import_csv(path: str | Path, *, top_k: int = 1, tokens_per_step: int | None = None,
               model: str = "unknown") -> LoadTrace:
    """The tidy trace CSV (step,layer,expert,tokens[,src_rank]); see symi_sim.traces.format."""
    return read_trace_csv(path, top_k=top_k, tokens_per_step=tokens_per_step, model=model)


IMPORTERS: dict[str, Callable[..., LoadTrace]] = {
    "csv": import_csv,
    "olmoe": import_olmoe,
    "per-rank-csv": import_per_rank_csv,
    "counts-jsonl": import_counts_jsonl,
    "megatron-router-trace": import_megatron_router_trace,
    "sglang-expert-distribution": import_sglang_expert_distribution,
    "trtllm-expert-statistic": import_trtllm_expert_statistic,
    "vllm-routed-experts": import_vllm_routed_experts,
}


def import_trace(in_path: str | Path | Sequence[str | Path], *, fmt: str, **options: Any) -> LoadTrace:
    """Run the importer `fmt` on `in_path`; options left None take the importer's defaults."""
    check_choice(fmt, "trace format", IMPORTERS)
    importer = IMPORTERS[fmt]
    allowed = [name for name, p in inspect.signature(importer).parameters.items() if p.kind == p.KEYWORD_ONLY]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to format {fmt!r}; its options: {', '.join(allowed)}")
    return importer(in_path, **options)


def convert_trace(in_path: str | Path | Sequence[str | Path], out_path: str | Path, *, fmt: str,
                  **options: Any) -> LoadTrace:
    """Import `in_path` as format `fmt` (see IMPORTERS) and write it to `out_path` as canonical Parquet."""
    if Path(out_path).suffix.lower() != ".parquet":
        raise ValueError(f"trace output {str(out_path)!r} must end in .parquet")
    trace = import_trace(in_path, fmt=fmt, **options)
    write_trace(trace, out_path)
    return trace


def _rank_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        path = Path(paths)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.csv") if re.search(r"rank\d+", p.name))
            if not files:
                raise ValueError(f"directory {str(path)!r} holds no *rank<N>*.csv files")
            return files
        paths = [path]
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no per-rank CSV files given")
    for file in files:
        if not file.is_file():
            raise ValueError(f"per-rank CSV {str(file)!r} does not exist")
    return files


def _is_token_count(value: Any) -> bool:
    """An integer >= 0, or a float holding one (statistics written from float tensors read back as 2.0)."""
    return (is_int(value) or (is_number(value) and float(value).is_integer())) and value >= 0
