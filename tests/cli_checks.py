"""Shared pieces of the CLI tests: a small trace to run commands on, and the check that a command fails cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cli import symi
from symi_sim.traces.format import LoadTrace, write_trace


def small_trace(directory: Path, num_steps: int = 4) -> Path:
    """A 2-layer, 4-expert trace of `num_steps` steps (64 tokens each, top-1) written to directory/t<S>.parquet."""
    path = directory / f"t{num_steps}.parquet"
    counts = np.random.default_rng(0).multinomial(64, [0.4, 0.3, 0.2, 0.1], size=(num_steps, 2))
    write_trace(LoadTrace(counts, top_k=1, tokens_per_step=64), path)
    return path


def one_error_line(directory: Path, *args: object) -> str:
    """Run `symi args`: exit 1, exactly one Error line, no traceback, nothing new in `directory`; the line."""
    before = sorted(p.name for p in directory.iterdir())
    result = CliRunner().invoke(symi, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in directory.iterdir()) == before
    return errors[0]
