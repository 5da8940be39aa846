"""What the benchmarks share: where they write (runs/<benchmark> unless --out: a default run never touches the
committed tables in benchmarks/results, which the README cites), one right-aligned text table, and the same rows as
CSV."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

RUNS_DIR = Path("runs")  # relative to the working directory, like `symi` and the experiments


def add_out_option(parser: argparse.ArgumentParser, name: str) -> None:
    """--out: the folder the benchmark writes its tables to (default runs/<name>)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {RUNS_DIR / name}; --out benchmarks/results refreshes the "
                             f"committed tables)")


def out_dir(out: str | Path | None, name: str) -> Path:
    """The folder benchmark `name` writes to: `out`, or runs/<name>."""
    return Path(out) if out is not None else RUNS_DIR / name


def print_table(rows: list[dict[str, Any]]) -> None:
    """Columns are the union of the rows' keys, in first-seen order; a missing or None cell prints as '-'."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))  # noqa: T201 (the table is the output)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))  # noqa: T201


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV (columns as in print_table), creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(c for r in rows for c in r)))
        writer.writeheader()
        writer.writerows(rows)


def write_results(out: Path, name: str, rows: list[dict[str, Any]], args: argparse.Namespace,
                  **meta: Any) -> None:
    """<out>/<name>.csv (the rows) and <out>/<name>.json (machine, versions, the arguments, `meta`, the rows)."""
    import torch

    write_csv(out / f"{name}.csv", rows)
    header = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, **meta,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (out / f"{name}.json").write_text(json.dumps({"meta": header, "results": rows}, indent=1) + "\n")
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.json')}")  # noqa: T201
