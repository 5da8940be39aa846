"""Waits between ranks without the collective timeout: before a collective that follows a long rank-local step.

Rank 0 writes more than the others (the dense state in every checkpoint, the run directory at the end), so the
other ranks reach the next collective first; a collective waits at most --dist-timeout, which a large write may
exceed. `wait_for_ranks` meets every rank first on the job's rendezvous store (a counter per wait, no deadline), so
the collective after it starts together. A rank that dies meanwhile is caught by the launcher's supervision
(supervise.py) or torchrun's, which stop the others.

Test hook: with SYMI_TEST_WAIT_DIR set, a rank that starts such a wait writes `waiting-RRRRR` there, and rank 0's
writes (a checkpoint file, the run directory's final files) hold until `release` exists there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

POLL_S = (0.0005, 0.05)   # the first and the longest pause between looks: short waits stay short, long ones cheap
TEST_DIR_ENV = "SYMI_TEST_WAIT_DIR"


def wait_for_ranks(store: Any, name: str, *, rank: int, world_size: int) -> None:
    """Return once every rank of the job called this with `name` (a name used once per job); no deadline.
    `store`: a torch.distributed Store shared by the ranks (None, or one rank: no wait)."""
    if store is None or world_size == 1:
        return
    key = f"symi-wait/{name}"
    store.add(key, 1)
    folder = os.environ.get(TEST_DIR_ENV)
    if folder:
        Path(folder, f"waiting-{rank:05d}").write_text(f"{name}\n")
    pause = POLL_S[0]
    while store.add(key, 0) < world_size:
        time.sleep(pause)
        pause = min(2 * pause, POLL_S[1])


def hold_for_test(what: str) -> None:
    """The test hook of rank 0's writes (module doc); nothing unless SYMI_TEST_WAIT_DIR is set."""
    folder = os.environ.get(TEST_DIR_ENV)
    if not folder:
        return
    Path(folder, f"holding-{what}").write_text("")
    while not Path(folder, "release").exists():
        time.sleep(POLL_S[1])
