"""LoadTrace: per-step, per-layer, per-expert token counts, and the trace file format.

Legend: S steps, L MoE layers, E logical experts, G source ranks.

In memory a trace is dense numpy: counts_SLE[s, l, e] = tokens routed to expert e of MoE layer l at step s
(top-k assignments, so a step's layer total is k x tokens when every token is routed).

On disk (write_trace / read_trace), canonical Parquet, tidy: one row per (step, layer, expert[, src_rank]) with
columns step int32, layer int16, expert int16, tokens int32 and optional src_rank int16; missing rows mean 0
tokens, but every step must have at least one row for every layer. File-level metadata is JSON under the key
`symi`: schema_version, num_layers, num_experts, top_k, tokens_per_step (null = unknown), model, source,
provenance and meta (free-form JSON object: original layer ids, domains, step_ids, ...). A CSV with the same
columns is accepted on input (its metadata then comes from the caller: top_k defaults to 1). Step ids need not
be 0..S-1: they are kept, sorted, in meta["step_ids"] when they are not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_positive_int, is_int
from symi_sim.outputs import atomic_file

logger = logging.getLogger(__name__)


# Most tokens one (step, layer, expert) count may hold: the file's tokens column is int32, and sums over a layer's
# experts then stay far inside int64.
MAX_TOKEN_COUNT = 2**31 - 1


@dataclass(frozen=True, eq=False)
class LoadTrace:
    counts_SLE: np.ndarray
    top_k: int = 1
    tokens_per_step: int | None = None     # tokens per step (before top-k); None when unknown
    model: str = "unknown"
    source: str = "unknown"
    provenance: str = ""
    src_counts_SLEG: np.ndarray | None = None   # optional per-source-rank counts, summing to counts_SLE
    meta: dict[str, Any] = field(default_factory=dict)   # anything else (original layer ids, domains, ...)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts_SLE)
        if counts.ndim != 3 or 0 in counts.shape:
            raise ValueError(f"trace counts must be a non-empty 3-D array [steps, layers, experts], got {counts.shape}")
        if np.issubdtype(counts.dtype, np.floating):
            if not np.all(np.isfinite(counts)):
                raise ValueError("trace counts hold NaN or infinite values")
            if not np.all(counts == np.round(counts)):
                raise ValueError("trace counts must be whole numbers of tokens")
        elif not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"trace counts must be integers, got dtype {counts.dtype}")
        if (counts < 0).any():
            s, layer, e = np.argwhere(counts < 0)[0]
            raise ValueError(f"trace counts are negative (step {s}, layer {layer}, expert {e}: {counts[s, layer, e]})")
        if (counts > MAX_TOKEN_COUNT).any():
            s, layer, e = np.argwhere(counts > MAX_TOKEN_COUNT)[0]
            raise ValueError(f"trace count {counts[s, layer, e]} (step {s}, layer {layer}, expert {e}) is more than "
                             f"the {MAX_TOKEN_COUNT} tokens a trace may hold per (step, layer, expert)")
        object.__setattr__(self, "counts_SLE", counts.astype(np.int64))
        check_positive_int(self.top_k, "top_k")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds the number of experts {self.num_experts}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"trace meta must be a dict, got {type(self.meta).__name__}")
        if self.tokens_per_step is not None:
            check_positive_int(self.tokens_per_step, "tokens_per_step")
            if self.tokens_per_step > MAX_TOKEN_COUNT:
                raise ValueError(f"tokens_per_step {self.tokens_per_step} is more than the {MAX_TOKEN_COUNT} a trace "
                                 "may hold")
            totals = self.counts_SLE.sum(axis=2)
            expected = self.top_k * self.tokens_per_step
            bad = np.argwhere(totals > expected)
            if len(bad):
                s, layer = bad[0]
                raise ValueError(
                    f"step {s} layer {layer} routes {totals[s, layer]} tokens, more than top_k x tokens_per_step "
                    f"= {expected}"
                )
            # a token picks top_k distinct experts, so no expert gets more than tokens_per_step of them
            over = np.argwhere(self.counts_SLE > self.tokens_per_step)
            if len(over):
                s, layer, e = over[0]
                raise ValueError(
                    f"step {s} layer {layer} expert {e} receives {self.counts_SLE[s, layer, e]} assignments, more "
                    f"than the {self.tokens_per_step} tokens per step (each token picks distinct experts)"
                )
        if self.src_counts_SLEG is not None:
            src = np.asarray(self.src_counts_SLEG)
            if src.ndim != 4 or src.shape[:3] != self.counts_SLE.shape:
                raise ValueError(
                    f"src_counts shape {src.shape} does not match counts {self.counts_SLE.shape} + [ranks]"
                )
            if (src < 0).any() or not np.array_equal(src.sum(axis=3), self.counts_SLE):
                raise ValueError("per-source-rank counts must be non-negative and sum to the expert counts")
            object.__setattr__(self, "src_counts_SLEG", src.astype(np.int64))

    @property
    def num_steps(self) -> int:
        return self.counts_SLE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts_SLE.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts_SLE.shape[2]

    def num_assignments_L(self, step: int) -> np.ndarray:
        """[L] k x tokens at `step`: the capacity reference (the routed total when tokens_per_step is unknown)."""
        if self.tokens_per_step is not None:
            return np.full(self.num_layers, self.top_k * self.tokens_per_step, dtype=np.int64)
        return self.counts_SLE[step].sum(axis=1)


# ---------------------------------------------------------------- the file format

SCHEMA_VERSION = 1
METADATA_KEY = b"symi"
REQUIRED_COLUMNS = ("step", "layer", "expert", "tokens")
# Column dtypes of the canonical Parquet file; the optional src_rank column holds the source rank of the tokens.
COLUMN_DTYPES = {"step": np.int32, "layer": np.int16, "expert": np.int16, "tokens": np.int32, "src_rank": np.int16}
TRACE_SUFFIXES = (".parquet", ".csv")
# Largest dense steps x layers x experts x source ranks a file may expand to (2 GiB of int64 counts).
MAX_DENSE_COUNTS = 2**28


def write_trace(trace: LoadTrace, path: str | Path) -> None:
    """Write `trace` as canonical Parquet (atomically: the file appears only once complete).

    Rows: one per (step, layer, expert[, src_rank]) with tokens > 0, plus the expert-0 (source-rank-0) row of
    every (step, layer) so that every step keeps every layer; missing rows mean 0 tokens. Step ids are
    meta["step_ids"] when the trace carries them (a trace read from a file with gaps in its steps), else 0..S-1.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix.lower() != ".parquet":
        raise ValueError(f"trace output {str(path)!r} must end in .parquet")
    table = trace_table(trace)
    metadata = json.dumps(trace_metadata(trace), sort_keys=True).encode()
    table = table.replace_schema_metadata({METADATA_KEY: metadata})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    logger.info("wrote %s: %d rows, %d steps x %d layers x %d experts", path, table.num_rows, *trace.counts_SLE.shape)


def trace_metadata(trace: LoadTrace) -> dict[str, Any]:
    """The JSON stored under the Parquet key `symi`."""
    try:
        meta = json.loads(json.dumps(trace.meta))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"trace meta must be JSON-serialisable: {exc}") from None
    return {
        "schema_version": SCHEMA_VERSION,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": int(trace.top_k),
        "tokens_per_step": None if trace.tokens_per_step is None else int(trace.tokens_per_step),
        "model": trace.model,
        "source": trace.source,
        "provenance": trace.provenance,
        "meta": meta,
    }


def trace_table(trace: LoadTrace) -> Any:
    """The tidy pyarrow Table of `trace` (no file metadata)."""
    import pyarrow as pa

    num_steps, num_layers, num_experts = trace.counts_SLE.shape
    if num_experts > np.iinfo(np.int16).max or num_layers > np.iinfo(np.int16).max:
        raise ValueError(f"trace too large for int16 layer/expert ids: {num_layers} layers, {num_experts} experts")
    step_ids_S = _step_ids(trace)
    if trace.src_counts_SLEG is not None:
        counts = trace.src_counts_SLEG
        if counts.shape[3] > np.iinfo(np.int16).max:
            raise ValueError(f"too many source ranks for int16 ids: {counts.shape[3]}")
    else:
        counts = trace.counts_SLE[..., None]
    if counts.size and counts.max() > np.iinfo(np.int32).max:
        raise ValueError(f"token count {counts.max()} does not fit the file's int32 tokens column")
    keep = counts > 0
    keep[:, :, 0, 0] = True
    s, layer, e, g = np.nonzero(keep)
    columns = {
        "step": step_ids_S[s].astype(np.int32),
        "layer": layer.astype(np.int16),
        "expert": e.astype(np.int16),
        "tokens": counts[s, layer, e, g].astype(np.int32),
    }
    if trace.src_counts_SLEG is not None:
        columns["src_rank"] = g.astype(np.int16)
    return pa.table(columns)


def _step_ids(trace: LoadTrace) -> np.ndarray:
    ids = trace.meta.get("step_ids")
    if ids is None:
        return np.arange(trace.num_steps, dtype=np.int64)
    ids = np.asarray(ids)
    if (ids.shape != (trace.num_steps,) or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any()
            or (np.diff(ids) <= 0).any() or ids.max(initial=0) > np.iinfo(np.int32).max):
        raise ValueError(f"trace meta step_ids must be {trace.num_steps} increasing non-negative integers")
    return ids.astype(np.int64)


def read_trace(path: str | Path, *, top_k: int | None = None, tokens_per_step: int | None = None) -> LoadTrace:
    """Read a trace file, choosing the reader by suffix (.parquet canonical, .csv tidy).

    top_k / tokens_per_step override the file's metadata (a CSV has none: top_k defaults to 1, tokens_per_step
    to unknown). Every problem is one ValueError naming the file (and the row, for bad rows).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TRACE_SUFFIXES:
        raise ValueError(f"trace file {str(path)!r}: unknown suffix {path.suffix!r}; expected .parquet or .csv")
    if not path.is_file():
        raise ValueError(f"trace file {str(path)!r} does not exist")
    if suffix == ".csv":
        return read_trace_csv(path, top_k=top_k, tokens_per_step=tokens_per_step)
    return read_trace_parquet(path, top_k=top_k, tokens_per_step=tokens_per_step)


def read_trace_parquet(path: str | Path, *, top_k: int | None = None,
                       tokens_per_step: int | None = None) -> LoadTrace:
    """Read a canonical Parquet trace (see write_trace); metadata from its `symi` key, overridable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    where = f"trace file {str(path)!r}"
    try:
        table = pq.read_table(path)
        column_names = table.column_names   # decoding a corrupt file's column names can fail too
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"{where} is not a readable Parquet file: {_one_line(exc)}") from None
    info = _parse_metadata((table.schema.metadata or {}).get(METADATA_KEY), where)
    columns: dict[str, np.ndarray] = {}
    for name in (*REQUIRED_COLUMNS, "src_rank"):
        if name not in column_names:
            if name == "src_rank":
                continue
            raise ValueError(f"{where}: missing column {name!r} (has {column_names})")
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{where}, row {row + 1}: column {name!r} is missing a value")
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise ValueError(f"{where}: column {name!r} must hold integers, got type {column.type}")
        columns[name] = _integer_column(column.to_numpy(), name, where, "row")
    return _build_trace(columns, where=where, row_word="row", info=info, top_k=top_k,
                        tokens_per_step=tokens_per_step)


def read_trace_csv(path: str | Path, *, top_k: int | None = None, tokens_per_step: int | None = None,
                   model: str = "unknown", source: str | None = None, provenance: str = "") -> LoadTrace:
    """Read a tidy CSV trace: header step,layer,expert,tokens[,src_rank]; errors name the 1-based data row."""
    path = Path(path)
    where = f"trace file {str(path)!r}"
    frame = read_csv_frame(path, where, REQUIRED_COLUMNS)
    extra = sorted(set(frame.columns) - set(COLUMN_DTYPES))
    if extra:
        logger.warning("%s: ignoring unknown column(s) %s", where, extra)
    columns = {
        name: parse_integer_column(frame[name], name, where)
        for name in (*REQUIRED_COLUMNS, "src_rank") if name in frame.columns
    }
    info = {"model": model, "source": source or f"csv:{path.name}", "provenance": provenance}
    return _build_trace(columns, where=where, row_word="data row", info=info, top_k=top_k,
                        tokens_per_step=tokens_per_step)


def read_csv_frame(path: Path, where: str, required: tuple[str, ...]) -> Any:
    """A pandas DataFrame of CSV `path` with the `required` columns and at least one data row (else ValueError)."""
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"{where} does not exist")
    try:
        frame = pd.read_csv(path, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"{where} is not a readable CSV file: {_one_line(exc)}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing} (header has {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"{where}: no data rows")
    return frame.reset_index(drop=True)


def parse_integer_column(series: Any, name: str, where: str) -> np.ndarray:
    """int64 values of a pandas column read from CSV; ValueError naming `where`, the data row and the bad value."""
    import pandas as pd

    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        numeric = pd.to_numeric(series, errors="coerce")
        bad = numeric.isna() & series.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{where}, data row {row + 1}: column {name!r} holds {series.iloc[row]!r}, not an integer")
        series = numeric
    values = series.to_numpy()
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.bool_):
        raise ValueError(f"{where}: column {name!r} must hold integers, got {values.dtype}")
    return _integer_column(values, name, where, "data row")


def _integer_column(values: np.ndarray, name: str, where: str, row_word: str) -> np.ndarray:
    """int64 copy of a numeric column; ValueError naming the first NaN / fractional / negative value's row."""
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            problem = "is missing a value (NaN)" if np.isnan(values[row]) else f"holds {values[row]}"
            raise ValueError(f"{where}, {row_word} {row + 1}: column {name!r} {problem}")
        bad = values != np.round(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}, {row_word} {row + 1}: column {name!r} holds {values[row]}, not an integer")
        if np.abs(values).max(initial=0) >= 2.0**62:
            row = int(np.argmax(np.abs(values)))
            raise ValueError(f"{where}, {row_word} {row + 1}: column {name!r} holds {values[row]}, out of range")
    elif not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{where}: column {name!r} must hold integers, got {values.dtype}")
    elif values.dtype == np.uint64 and values.size and values.max() >= 2**62:
        row = int(np.argmax(values))
        raise ValueError(f"{where}, {row_word} {row + 1}: column {name!r} holds {values[row]}, out of range")
    values = values.astype(np.int64)
    negative = values < 0
    if negative.any():
        row = int(np.flatnonzero(negative)[0])
        raise ValueError(f"{where}, {row_word} {row + 1}: column {name!r} is negative ({values[row]})")
    return values


def _parse_metadata(raw: bytes | None, where: str) -> dict[str, Any]:
    """Validated `symi` metadata (empty dict when the file has none)."""
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where}: metadata 'symi' is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{where}: metadata 'symi' must be a JSON object, got {type(info).__name__}")
    version = info.get("schema_version")
    if not is_int(version) or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(
            f"{where}: unsupported trace schema_version {version!r} (this reader knows 1..{SCHEMA_VERSION})"
        )
    for key in ("num_layers", "num_experts", "top_k"):
        if key in info:
            check_positive_int(info[key], f"{where}: metadata {key}")
    for key in ("num_layers", "num_experts"):   # the id columns are int16 (and the counts are held densely)
        if key in info and info[key] > np.iinfo(np.int16).max:
            raise ValueError(f"{where}: metadata {key} {info[key]} exceeds the int16 id limit {np.iinfo(np.int16).max}")
    value = info.get("tokens_per_step")
    if value is not None and not (is_int(value) and value >= 1):   # by hand: the file says null, not None
        raise ValueError(f"{where}: metadata tokens_per_step must be a positive integer or null, got {value!r}")
    for key in ("model", "source", "provenance"):
        if key in info and not isinstance(info[key], str):
            raise ValueError(f"{where}: metadata {key} must be a string, got {info[key]!r}")
    if not isinstance(info.get("meta", {}), dict):
        raise ValueError(f"{where}: metadata meta must be a JSON object, got {info['meta']!r}")
    return info


def _one_line(exc: BaseException) -> str:
    """A library's error message on one line (pandas' and Arrow's messages may hold newlines)."""
    return " ".join(str(exc).split())


def _build_trace(columns: dict[str, np.ndarray], *, where: str, row_word: str, info: dict[str, Any],
                 top_k: int | None, tokens_per_step: int | None) -> LoadTrace:
    """Dense LoadTrace from validated non-negative int64 columns (ids checked here, against `info` when given)."""
    step, layer, expert, tokens = (columns[c] for c in REQUIRED_COLUMNS)
    src = columns.get("src_rank")
    if step.size == 0:
        raise ValueError(f"{where}: no data rows")
    limits = {"step": np.iinfo(np.int32).max, "layer": np.iinfo(np.int16).max, "expert": np.iinfo(np.int16).max,
              "src_rank": np.iinfo(np.int16).max}
    for name, limit in limits.items():
        if name in columns and columns[name].max() > limit:
            row = int(np.argmax(columns[name]))
            raise ValueError(f"{where}, {row_word} {row + 1}: {name} {columns[name][row]} is out of range")
    if tokens.max() > MAX_TOKEN_COUNT:
        row = int(np.argmax(tokens))
        raise ValueError(f"{where}, {row_word} {row + 1}: tokens {tokens[row]} is more than the {MAX_TOKEN_COUNT} a "
                         "trace may hold per (step, layer, expert)")
    num_layers = info.get("num_layers", int(layer.max()) + 1)
    num_experts = info.get("num_experts", int(expert.max()) + 1)
    for name, values, bound in (("layer", layer, num_layers), ("expert", expert, num_experts)):
        bad = values >= bound
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}, {row_word} {row + 1}: {name} {values[row]} is out of range [0, {bound})")
    step_ids, step_idx = np.unique(step, return_inverse=True)
    num_steps = step_ids.size
    num_ranks = int(src.max()) + 1 if src is not None else 1
    num_cells = num_steps * num_layers * num_experts * num_ranks
    if num_cells > MAX_DENSE_COUNTS:   # a few sparse rows with large ids must not allocate gigabytes
        raise ValueError(f"{where}: {num_steps} steps x {num_layers} layers x {num_experts} experts x {num_ranks} "
                         f"source ranks = {num_cells} counts, more than the {MAX_DENSE_COUNTS} a trace may hold")
    src_idx = src if src is not None else np.zeros_like(step)
    key = ((step_idx * num_layers + layer) * num_experts + expert) * num_ranks + src_idx
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order][1:] == key[order][:-1])
    if same.size:
        first, second = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        what = f"step {step[first]}, layer {layer[first]}, expert {expert[first]}"
        if src is not None:
            what += f", src_rank {src[first]}"
        raise ValueError(f"{where}: duplicate rows {row_word} {first + 1} and {second + 1} ({what})")
    present_SL = np.zeros((num_steps, num_layers), dtype=bool)
    present_SL[step_idx, layer] = True
    if not present_SL.all():
        s, missing_layer = np.argwhere(~present_SL)[0]
        raise ValueError(f"{where}: step {step_ids[s]} has no rows for layer {missing_layer} (every step needs every "
                         f"layer; absent experts mean 0 tokens)")
    counts_SLEG = np.zeros((num_steps, num_layers, num_experts, num_ranks), dtype=np.int64)
    counts_SLEG[step_idx, layer, expert, src_idx] = tokens
    top_k = top_k if top_k is not None else info.get("top_k", 1)
    tokens_per_step = tokens_per_step if tokens_per_step is not None else info.get("tokens_per_step")
    if is_int(top_k) and is_int(tokens_per_step) and top_k >= 1 and tokens_per_step >= 1:  # else LoadTrace says
        totals_SL = counts_SLEG.sum(axis=(2, 3))
        over = np.argwhere(totals_SL > top_k * tokens_per_step)
        if len(over):
            s, bad_layer = over[0]
            raise ValueError(
                f"{where}: step {step_ids[s]} layer {bad_layer} routes {totals_SL[s, bad_layer]} tokens, more than "
                f"top_k x tokens_per_step = {top_k} x {tokens_per_step} = {top_k * tokens_per_step}"
            )
        over = np.argwhere(counts_SLEG.sum(axis=3) > tokens_per_step)
        if len(over):
            s, bad_layer, e = over[0]
            raise ValueError(
                f"{where}: step {step_ids[s]} layer {bad_layer} expert {e} receives "
                f"{counts_SLEG[s, bad_layer, e].sum()} assignments, more than the {tokens_per_step} tokens per step"
            )
    meta = dict(info.get("meta", {}))
    meta.pop("step_ids", None)
    if not np.array_equal(step_ids, np.arange(num_steps)):
        meta["step_ids"] = step_ids.tolist()
    try:
        return LoadTrace(
            counts_SLE=counts_SLEG.sum(axis=3),
            top_k=top_k,
            tokens_per_step=tokens_per_step,
            model=info.get("model", "unknown"),
            source=info.get("source", "unknown"),
            provenance=info.get("provenance", ""),
            src_counts_SLEG=counts_SLEG if src is not None else None,
            meta=meta,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
