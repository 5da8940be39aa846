"""Outputs of every command (issue 12): an OSError is one error line like a ValueError, output paths are checked
before any work, an existing output is replaced only with --force, and killed writes leave no temporary behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_checks import one_error_line, small_trace
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from cli import symi
from symi_sim.outputs import atomic_dir, atomic_file, remove_stale_temporaries

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
ROOT = Path(__file__).resolve().parents[1]


def _commands(tmp: Path, trace: Path) -> dict[str, list[object]]:
    """One successful invocation of every command that writes a file or run directory, writing under `tmp`."""
    (tmp / "in.csv").write_text("step,layer,expert,tokens\n0,0,0,3\n0,0,1,1\n1,0,0,2\n1,0,1,2\n")
    return {
        "simulate": ["simulate", "--trace", trace, "--cluster", "cpu-4", "--fit-model-to-trace", "--policies",
                     "static", "--out", tmp / "run"],
        "plan": ["plan", "--trace", trace, "--cluster", "cpu-4", "--step", "1", "--out", tmp / "plan.json"],
        "plan --replay": ["plan", "--trace", trace, "--cluster", "cpu-4", "--replay", "--policies", "static",
                          "--out", tmp / "replay"],
        "trace synth": ["trace", "synth", tmp / "s.parquet", "--experts", "4", "--layers", "2", "--steps", "3"],
        "trace convert": ["trace", "convert", tmp / "in.csv", tmp / "c.parquet", "--from", "csv"],
    }


OUTPUT_OF = {"simulate": "run", "plan": "plan.json", "plan --replay": "replay", "trace synth": "s.parquet",
             "trace convert": "c.parquet"}
ERRNOS = [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO, errno.EDQUOT]


@SETTINGS
@given(command=st.sampled_from(sorted(OUTPUT_OF)), code=st.sampled_from(ERRNOS))
def test_an_oserror_while_writing_is_one_line_and_leaves_nothing(command, code):
    """A full or read-only disk half-way through writing: one line naming the output (not its temporary)."""
    import pyarrow.parquet as pq

    import symi_sim.outputs as outputs

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[-1]))

    with tempfile.TemporaryDirectory() as tmp_name, pytest.MonkeyPatch.context() as patch:
        tmp = Path(tmp_name)
        args = _commands(tmp, small_trace(tmp))[command]
        # every writer ends in one of these, inside its atomic temporary
        patch.setattr(outputs.os, "replace", fail)
        patch.setattr(pq, "write_table", fail)
        error = one_error_line(tmp, *args)
    assert os.strerror(code) in error
    assert ".tmp" not in error


def test_simulate_refuses_an_unwritable_out_before_simulating(tmp_path, monkeypatch):
    import symi_sim.simulator.driver as driver

    def never(*args, **kwargs):
        raise AssertionError("simulated although --out cannot be written")

    monkeypatch.setattr(driver, "simulate", never)
    trace = small_trace(tmp_path)
    (tmp_path / "file").write_text("x")
    for out, expected in [("/proc/symi-run", "cannot write into '/proc'"),
                          (tmp_path / "file" / "run", "is not a folder"),
                          (tmp_path / "file", "is a file; give a directory")]:
        error = one_error_line(tmp_path, "simulate", "--trace", trace, "--cluster", "cpu-4", "--fit-model-to-trace",
                               "--policies", "static", "--out", out)
        assert expected in error and str(out) in error


@pytest.mark.parametrize("command", sorted(OUTPUT_OF))
def test_an_output_naming_a_folder_is_one_line(tmp_path, command):
    args = _commands(tmp_path, small_trace(tmp_path))[command]
    target = tmp_path / OUTPUT_OF[command]
    if target.suffix:   # a file output that is a folder
        target.mkdir()
        (target / "keep").write_text("x")
        assert "is a folder" in one_error_line(tmp_path, *args)
    else:               # a directory output that is a file
        target.write_text("x")
        assert "is a file" in one_error_line(tmp_path, *args)


@pytest.mark.parametrize("command", sorted(OUTPUT_OF))
def test_existing_outputs_are_replaced_only_with_force(tmp_path, command):
    args = _commands(tmp_path, small_trace(tmp_path))[command]
    target = tmp_path / OUTPUT_OF[command]
    if target.suffix:
        target.write_text("old")
    else:
        target.mkdir()
        (target / "old.txt").write_text("old")
    assert "already exists" in one_error_line(tmp_path, *args) and "--force" in one_error_line(tmp_path, *args)
    assert (target.read_text() if target.is_file() else (target / "old.txt").read_text()) == "old"
    result = CliRunner().invoke(symi, [str(a) for a in args] + ["--force"])
    assert result.exit_code == 0, result.output
    if target.suffix:
        assert target.read_bytes() != b"old"
    else:
        assert not (target / "old.txt").exists() and (target / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_calibrate_out_needs_force_too(tmp_path):
    (tmp_path / "calib.json").write_text("{}")
    error = one_error_line(tmp_path, "calibrate", "--latencies",
                           ROOT / "symi_sim/data/calibrations/paper-motivation-forward.csv", "--cluster",
                           "paper-a100-16", "--model", "gpt-small", "--experts", "32", "--out", tmp_path / "calib.json")
    assert "calib.json' already exists; pass --force" in error


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, kind):
    dead, alive = _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".out.{dead}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "half.csv").write_text("x")
    stale_file = tmp_path / f".out.{dead}.zz9.tmp"
    stale_file.write_text("x")
    live = tmp_path / f".out.{alive}.live1.tmp"      # another write of this very process: kept
    live.mkdir()
    other = tmp_path / f".other.{dead}.abc.tmp"      # another target's: kept
    other.mkdir()
    no_pid = tmp_path / ".out.k2j3h4.tmp"            # the old naming, no owner known: kept
    no_pid.mkdir()
    if kind == "file":
        with atomic_file(tmp_path / "out") as tmp:
            assert tmp.name.startswith(f".out.{alive}.")
            tmp.write_text("new")
    else:
        with atomic_dir(tmp_path / "out") as tmp:
            assert tmp.name.startswith(f".out.{alive}.")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other.exists() and no_pid.exists()
    assert remove_stale_temporaries(tmp_path / "out") == []


_HOLD_OPEN = """
import signal, sys
import cli
from symi_sim.outputs import atomic_dir
signal.signal(signal.SIGTERM, cli._exit_on_signal)
signal.signal(signal.SIGINT, signal.default_int_handler)   # a job started in the background inherits SIGINT ignored
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.csv").write_text("x")
    print(tmp, flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_terminated_write_removes_its_temporary(tmp_path, signum):
    """SIGTERM (by the handler `symi` installs) and SIGINT unwind through the atomic write's cleanup."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _HOLD_OPEN, str(tmp_path / "run")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    tmp = Path(child.stdout.readline().strip())   # the event: the temporary exists and holds a file
    assert tmp.is_dir() and (tmp / "half.csv").exists()
    child.send_signal(signum)
    child.communicate(timeout=60)
    assert child.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_main_installs_the_sigterm_handler(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "symi", lambda **kwargs: seen.append(signal.getsignal(signal.SIGTERM)))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [cli._exit_on_signal]
