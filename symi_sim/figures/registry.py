"""Every figure `symi plot` draws, in one registry (FIGURES), and the two ways to draw them: `save_figure` (one
figure from a table to a PNG, for the simulator's and the replay's run directories) and `plot_run` (every figure
that applies to a run directory or a trace file).

A FigureSpec names the run kinds a figure applies to with the file it reads in each, and the functions that read,
check and draw it. Those live in the drawing modules (policy_figures, training_figures, tables) and are imported
on first use: this module loads neither matplotlib nor pandas, so that `symi --help` can list the figures
(plot_kinds_help) at no cost. Figures are matplotlib Figure objects rendered by Agg, never pyplot: no global
figure state, nothing ever shown. A PNG is written atomically (symi_sim.outputs.atomic_file).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

TRACE = "trace"  # the run kind of a trace file (.parquet or .csv) rather than a run directory


@dataclass(frozen=True)
class _Deferred:
    """`function` of symi_sim.figures.<module>, imported on its first call (see the module docstring)."""

    module: str
    function: str

    def resolve(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"symi_sim.figures.{self.module}"), self.function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


@dataclass(frozen=True)
class FigureSpec:
    """One figure: where it is drawn from and how.

    sources: run kind -> the file of the run directory the figure reads ("" for a trace: the file itself).
    read: that file -> the input (a table, or a trace's counts); ValueError naming the file.
    check: the input -> the checked input; ValueError naming the broken rule (columns, ranges, one row per ...).
    draw: the checked input and `options` -> a matplotlib Figure.
    options: the keyword options `draw` takes (save_figure passes them on).
    optional: run kind -> how to get a source that such a run may lack (the figure then does not apply).
    run_label: its title names the run's policy (a train run's config.json), in plot_run.
    """

    name: str
    sources: Mapping[str, str]
    read: Callable[[Path], Any]
    check: Callable[[Any], Any]
    draw: Callable[..., Figure]
    options: tuple[str, ...] = ()
    optional: Mapping[str, str] = field(default_factory=dict)
    run_label: bool = False


def _table_figure(name: str, module: str, sources: Mapping[str, str], **more: Any) -> FigureSpec:
    return FigureSpec(name, sources, read=_Deferred("tables", "read_table"), check=_Deferred(module, f"check_{name}"),
                      draw=_Deferred(module, f"draw_{name}"), **more)


# In the order plot_run draws them: each run's own figure first.
FIGURES: dict[str, FigureSpec] = {spec.name: spec for spec in (
    _table_figure("comparison", "policy_figures", {"simulate": "summary.csv"}),
    _table_figure("replay", "policy_figures", {"replay": "summary.csv"}),
    _table_figure("cdf", "policy_figures", {"simulate": "iterations.parquet", "replay": "steps.csv"}),
    _table_figure("timeline", "policy_figures", {"simulate": "iterations.parquet"}),
    _table_figure("loss", "training_figures", {"train": "metrics.csv"}, options=("label",), run_label=True),
    FigureSpec("heatmap", {"train": "trace.parquet", TRACE: ""}, read=_Deferred("training_figures", "read_counts"),
               check=_Deferred("training_figures", "check_heatmap"), draw=_Deferred("training_figures", "draw_heatmap"),
               options=("layers",), optional={"train": "train with --record-trace"}),
    _table_figure("dropped", "training_figures", {"train": "metrics.csv"}, options=("label",), run_label=True),
)}
# The file that tells each kind of run directory apart (simulate's write_run, replay's write_replay, train).
RUN_MARKERS = {"simulate": "iterations.parquet", "replay": "steps.csv", "train": "metrics.csv"}
RUN_KIND_NAMES = {"simulate": "simulate runs", "replay": "plan --replay runs", "train": "train runs",
                  TRACE: "a trace file"}


def figure_names(run_kind: str) -> list[str]:
    """The figures that apply to `run_kind`, in drawing order (optional ones included)."""
    return [name for name, spec in FIGURES.items() if run_kind in spec.sources]


def plot_kinds_help() -> str:
    """The figures of each run kind, for `symi plot --help`."""
    def entry(name: str, run_kind: str) -> str:
        spec = FIGURES[name]
        return f"{name} (needs {spec.sources[run_kind]})" if run_kind in spec.optional else name

    return "; ".join(f"{label}: {', '.join(entry(name, kind) for name in figure_names(kind))}"
                     for kind, label in RUN_KIND_NAMES.items())


def build_figure(name: str, data: Any, **options: Any) -> Figure:
    """Figure `name` (a key of FIGURES) from its input: checked, then drawn; ValueError for a bad input."""
    from symi_sim.checks import check_choice

    spec = FIGURES[check_choice(name, "figure kind", FIGURES)]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise TypeError(f"figure {name!r} takes no option(s) {unknown}; its options: {list(spec.options)}")
    return spec.draw(spec.check(data), **options)


def _check_png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png, got {str(path)!r}")
    return path


def _save(fig: Figure, path: Path) -> None:
    from symi_sim.outputs import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def save_figure(name: str, data: Any, path: str | Path, **options: Any) -> Path:
    """Draw figure `name` from `data` (its table; a heatmap's trace, or its counts_SLE [steps, layers, experts]) to
    the PNG `path`, written atomically; return the path. A bad input is one ValueError and no file.

    options: those of FIGURES[name] (loss, dropped: label=, in the title; heatmap: layers=, default up to 4 spread
    over the depth, first and last included).
    """
    path = _check_png_path(path)
    _save(build_figure(name, data, **options), path)
    return path


def detect_run(path: str | Path) -> str:
    """What `path` is: "simulate", "replay" or "train" (a run directory, told apart by the file only that kind
    writes: RUN_MARKERS) or "trace" (a .parquet/.csv file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() in (".parquet", ".csv"):
            return TRACE
        raise ValueError(f"{str(path)!r} is a file but not a trace (.parquet or .csv); give a run directory or a trace")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is neither a directory nor a file")
    found = [kind for kind, marker in RUN_MARKERS.items() if (path / marker).is_file()]
    if len(found) == 1:
        return found[0]
    expected = ", ".join(f"{marker} ({kind})" for kind, marker in RUN_MARKERS.items())
    if not found:
        raise ValueError(f"{str(path)!r} is not a symi run directory: it has none of {expected}")
    raise ValueError(f"{str(path)!r} is ambiguous: it has " + " and ".join(RUN_MARKERS[kind] for kind in found))


def _source(spec: FigureSpec, run_kind: str, path: Path) -> Path:
    file_name = spec.sources[run_kind]
    return path / file_name if file_name else path


def run_figure_kinds(path: str | Path) -> tuple[str, list[str]]:
    """(kind of `path`, the figures that apply to it): an optional source (a train run's trace.parquet) must be
    there."""
    run_kind = detect_run(path)
    names = [name for name in figure_names(run_kind)
             if run_kind not in FIGURES[name].optional or _source(FIGURES[name], run_kind, Path(path)).is_file()]
    return run_kind, names


def _run_label(run_dir: Path) -> str | None:
    """'policy symi' from a train run's config.json, or None (the label is decoration: never an error)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return f"policy {config['train']['policy']}"
    except (OSError, ValueError, KeyError, TypeError):
        logger.debug("no policy label from %s", run_dir / "config.json")
        return None


def _figure_for(name: str, run_kind: str, path: Path) -> Figure:
    """Read, check and draw figure `name` of `path` (ValueError naming the file when its input is bad)."""
    spec = FIGURES[name]
    source = _source(spec, run_kind, path)
    data = spec.read(source)
    options = {"label": _run_label(path)} if spec.run_label else {}
    try:
        return spec.draw(spec.check(data), **options)
    except ValueError as exc:
        raise ValueError(f"{str(source)!r}: {exc}") from None


def _free_png(out_dir: Path, stem: str, taken: set[Path]) -> Path:
    """out_dir/stem.png, or stem-2.png, stem-3.png, ... : the first name neither on disk nor `taken`."""
    candidate, number = out_dir / f"{stem}.png", 1
    while candidate.exists() or candidate in taken:
        number += 1
        candidate = out_dir / f"{stem}-{number}.png"
    return candidate


def _chosen(kinds: Sequence[str], run_kind: str, applicable: list[str], path: Path) -> list[str]:
    """`kinds` without repeats, each known and applicable to `path` (else one ValueError saying why)."""
    chosen = list(dict.fromkeys(kinds))
    if not chosen:
        raise ValueError("no figure kind given")
    unknown = [kind for kind in chosen if kind not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure kind(s) {unknown}; choices: {', '.join(FIGURES)}")
    for kind in chosen:
        if kind not in applicable:
            spec = FIGURES[kind]
            why = (f" (this {run_kind} run has no {spec.sources[run_kind]}: {spec.optional[run_kind]})"
                   if run_kind in spec.optional else "")
            raise ValueError(f"figure {kind!r} does not apply to {run_kind} {str(path)!r}{why}; it takes: "
                             f"{', '.join(applicable)}")
    return chosen


def plot_run(path: str | Path, *, kinds: Sequence[str] | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of a run directory (simulate, plan --replay, train) or of a trace file; return the PNGs.

    kinds: names of FIGURES that apply to the kind of path (default: all that apply; a train run's heatmap needs
    trace.parquet). out_dir: default the run directory (a trace's own directory). A figure goes to `<kind>.png` (a
    trace's to `<trace stem>-heatmap.png`), or `-2`, `-3`, ... before `.png` when that name is taken: nothing is
    ever overwritten. Every input is read and every figure built before the first file is written; a bad input is
    one ValueError and no file.
    """
    path = Path(path)
    run_kind, applicable = run_figure_kinds(path)
    chosen = applicable if kinds is None else _chosen(kinds, run_kind, applicable, path)
    target = Path(out_dir) if out_dir is not None else (path.parent if run_kind == TRACE else path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output directory {str(target)!r} exists and is not a directory")
    figures = {kind: _figure_for(kind, run_kind, path) for kind in chosen}
    written: list[Path] = []
    png = target
    try:
        for kind, fig in figures.items():
            stem = f"{path.stem}-{kind}" if run_kind == TRACE else kind
            png = _free_png(target, stem, set(written))
            _save(fig, png)
            written.append(png)
            logger.info("wrote %s", png)
    except BaseException as exc:
        for done in written:
            done.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # an unwritable --out: one error line, like any bad input
            raise ValueError(f"cannot write {str(png)!r}: {exc}") from None
        raise
    return written
