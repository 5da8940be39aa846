"""What every study shares: its command line, its run directory (with config.json), its table writers, the lines it
prints, and the colours, ranking and labels of its figures.

A study is a subpackage experiments/<study>/, run from the repository root as `python -m experiments.<study>`; its
main(argv) writes everything into one run directory (runs/<study>-<timestamp>/ unless --out) at once: the
directory appears only when complete (symi_sim.outputs.atomic_dir), holding config.json (the study, its resolved
arguments and the command line) beside the study's tables and figures.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from symi_sim.figures.colours import phase_colour, policy_colour, policy_styles, short_label
from symi_sim.figures.tables import best_first
from symi_sim.outputs import atomic_dir, timestamped_dir, write_json

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["FIGURE_DPI", "LOG_SCALE", "REPO_ROOT", "TRACES_DIR", "add_out_option", "best_first", "phase_colours",
           "policy_colour", "policy_styles", "run_dir", "run_path", "write_png", "say", "say_table", "short_label",
           "study_parser", "write_json", "write_rows", "write_table"]

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACES_DIR = REPO_ROOT / "traces"
FIGURE_DPI = 110
LOG_SCALE = " (log scale)"  # ends the label of every logarithmic axis


# ---------------------------------------------------------------- command line and run directory


def study_parser(study: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of `study`, described by the first line of its module docstring `doc`."""
    return argparse.ArgumentParser(prog=f"python -m experiments.{study}", description=doc.splitlines()[0])


def add_out_option(parser: argparse.ArgumentParser, study: str) -> None:
    parser.add_argument("--out", type=Path, default=None, help=f"run directory (default runs/{study}-<timestamp>)")


def run_path(study: str, out: str | Path | None) -> Path:
    """The run directory: `out`, or runs/<study>-<timestamp> (relative to the working directory)."""
    return Path(out) if out else timestamped_dir(study)


@contextlib.contextmanager
def run_dir(path: Path, *, study: str, args: Mapping[str, Any], argv: Sequence[str] | None) -> Iterator[Path]:
    """atomic_dir(path) (refused if `path` exists and is not empty) with config.json written first: the study,
    its resolved arguments `args` and the command line (`argv`: what main() was given; None: sys.argv)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = {"study": study, "args": dict(args), "argv": argv,
              "command": shlex.join(["python", "-m", f"experiments.{study}", *argv]), "cwd": os.getcwd(),
              "python": platform.python_version(), "platform": platform.platform()}
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", config)
        yield tmp


# ---------------------------------------------------------------- tables


def write_table(path: Path, table: pd.DataFrame) -> None:
    """A data frame as CSV, without its index."""
    table.to_csv(path, index=False)


def write_rows(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> None:
    """Rows (sequences in column order, or mappings by column) as CSV under a header; None is an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c) for c in columns] if isinstance(row, Mapping) else row)


# ---------------------------------------------------------------- what a study prints


def say(line: str = "") -> None:
    """One line of a study's own output (its progress and summary) to stdout."""
    print(line, flush=True)


def say_table(table: pd.DataFrame, columns: Sequence[str], float_format: str) -> None:
    """`columns` of `table`, without the index, floats formatted by the format spec `float_format` (".3f")."""
    say(table.loc[:, list(columns)].to_string(index=False, float_format=lambda v: format(v, float_format)))


# ---------------------------------------------------------------- figures


def phase_colours(phases: Sequence[str]) -> dict[str, Any]:
    """The colour of each critical-path phase (a phase keeps its colour in every figure: colours.phase_colour)."""
    return {phase: phase_colour(phase) for phase in phases}


def write_png(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=FIGURE_DPI)
