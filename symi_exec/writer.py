"""Writing one rank's checkpoint files, blocking or in a background thread (overlapped with training).

The completion protocol needs no collective, so a background thread can run it while the training loop goes on:
every rank writes its file (atomically: temporary name, fsync, rename), then a `.done-RRRRR` note holding its
file's size, expert bytes and sha256; rank 0, once all G notes are there, writes meta.json and COMPLETE (finish()).
At most one write per rank is in flight: a new one waits for the previous one, so snapshots complete in step order (a
sparse chain never has a later snapshot complete before an earlier one). The state handed to an overlapped write must
be a copy the training loop does not touch again (checkpointing.py clones tensors and copies lists before handing them
over); a blocking write may take the live tensors, since the loop waits for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from symi_exec import checkpoint
from symi_exec.waits import hold_for_test

POLL_S = 0.002


def _note(directory: Path, rank: int) -> Path:
    return directory / f".done-{rank:05d}"


class SnapshotWriter:
    """One rank's writer. `write` returns once the write is done (blocking) or handed to the thread (overlapped)."""

    def __init__(self, rank: int, world_size: int, *, overlapped: bool) -> None:
        self.rank, self.world_size, self.overlapped = rank, world_size, overlapped
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, directory: Path, state: dict[str, Any], expert_bytes: int,
              finish: Callable[[int, int, list[str]], None] | None, record: dict[str, Any]) -> None:
        """Write this rank's file of `directory` (prepared by rank 0 beforehand). Rank 0 passes
        finish(total_bytes, total_expert_bytes, sha256 of each rank's file), called once every rank's file is in
        place; `record` gets
        `write_s` (this rank's wall time of the write, finish included) when the write is done."""
        self.wait()
        if not self.overlapped:
            self._run(directory, state, expert_bytes, finish, record)
            return
        self._thread = threading.Thread(target=self._guarded, args=(directory, state, expert_bytes, finish, record),
                                        name=f"snapshot-{directory.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight is done; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("a background checkpoint write failed") from error

    def _guarded(self, *args: Any) -> None:
        try:
            self._run(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the training thread by wait())
            self._error = exc

    def _run(self, directory: Path, state: dict[str, Any], expert_bytes: int,
             finish: Callable[[int, int, list[str]], None] | None, record: dict[str, Any]) -> None:
        start = time.perf_counter()
        if self.rank == 0:
            hold_for_test(directory.name)
        num_bytes, sha256 = checkpoint.save_rank(directory, self.rank, state)
        checkpoint.write_atomic_text(_note(directory, self.rank), f"{num_bytes} {expert_bytes} {sha256}\n")
        if finish is not None:
            notes = [_note(directory, rank) for rank in range(self.world_size)]
            while not all(note.is_file() for note in notes):
                time.sleep(POLL_S)
            parts = [note.read_text().split() for note in notes]
            finish(sum(int(p[0]) for p in parts), sum(int(p[1]) for p in parts), [p[2] for p in parts])
        record["write_s"] = time.perf_counter() - start
