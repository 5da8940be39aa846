"""Reading and validating the tables figures are drawn from: one ValueError naming the rule a table breaks.

Two shapes of table: one row per policy (summaries: `check_policy_table`) and one row per step, or per policy and
step (`check_step_table`). Numbers must be finite and >= 0 unless a column is declared otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def check_frame(table: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """A non-empty DataFrame with the required columns."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{what} is empty: nothing to plot")


def _plain(value: object) -> object:
    """A numpy scalar as the Python value, so that messages read `nan`, not `np.float64(nan)`."""
    return value.item() if isinstance(value, np.generic) else value


def check_policy_table(summary: pd.DataFrame, required: Sequence[str], what: str) -> None:
    """One row per policy, the required columns present, numbers finite and >= 0."""
    check_frame(summary, required, what)
    duplicated = summary["policy"][summary["policy"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{what} must have one row per policy; repeated: {duplicated}")
    for column in required:
        if column == "policy":
            continue
        values = pd.to_numeric(summary[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{what}: column {column!r} must hold finite numbers >= 0; policy "
                f"{summary['policy'].iloc[row]!r} has {_plain(summary[column].iloc[row])!r}"
            )


def check_step_table(table: pd.DataFrame, required: Sequence[str], what: str, *, signed: Sequence[str] = (),
                     at_most_one: Sequence[str] = ()) -> None:
    """A per-step table: the required columns present, not empty, numbers finite and >= 0 (or any finite number
    for the `signed` columns, <= 1 too for the `at_most_one` ones), `step` whole numbers, at most one row per
    (policy, step)."""
    check_frame(table, required, what)
    for column in required:
        if column == "policy":
            continue
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(values)
        if column not in signed:
            ok &= values >= 0
        if column in at_most_one:
            ok &= values <= 1
        if column == "step":
            ok &= values == np.round(values)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            rule = ("whole numbers >= 0" if column == "step" else "finite numbers" if column in signed
                    else "finite numbers in [0, 1]" if column in at_most_one else "finite numbers >= 0")
            where = f"policy {table['policy'].iloc[row]!r}, " if "policy" in table.columns else ""
            raise ValueError(f"{what}: column {column!r} must hold {rule}; {where}row {row + 1} has "
                             f"{_plain(table[column].iloc[row])!r}")
    if "step" in required:
        keys = ["policy", "step"] if "policy" in table.columns else ["step"]
        repeated = table.loc[table.duplicated(keys), keys]
        if not repeated.empty:
            first = ", ".join(f"{key} {_plain(repeated[key].iloc[0])!r}" for key in keys)
            raise ValueError(f"{what} has more than one row for {first}")


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table; one ValueError naming the file when it is missing or unreadable."""
    import pyarrow as pa

    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        message = " ".join(str(exc).split())  # one line: parser messages may hold newlines
        raise ValueError(f"{str(path)!r} is not a readable table: {message}") from None


def numbers(table: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64 (a checked table's numbers may have been read as text or objects)."""
    return pd.to_numeric(table[column]).to_numpy(dtype=np.float64)


def per_policy(table: pd.DataFrame, column: str) -> dict[str, np.ndarray]:
    """{policy: values of `column`} in table order (policies in order of first appearance)."""
    return {str(name): numbers(group, column) for name, group in table.groupby("policy", sort=False)}


def best_first(values: Sequence[float], names: Sequence[str], *, higher_is_better: bool = False) -> list[int]:
    """Row indices ranked for a bar chart: best value first (lowest unless `higher_is_better`), ties by name; NaN
    last."""
    def key(index: int) -> tuple[bool, float, str]:
        value = float(values[index])
        missing = value != value
        return missing, 0.0 if missing else (-value if higher_is_better else value), str(names[index])

    return sorted(range(len(names)), key=key)
