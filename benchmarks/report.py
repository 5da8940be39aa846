"""The output of the executor benchmarks: one right-aligned text table, and the same rows as CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


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
