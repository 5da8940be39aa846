"""All-or-nothing output: files and run directories appear only once complete; JSON of numpy values; the default
run directory name (timestamped); output paths checked before any work starts.

A command that fails half-way must leave no partial file behind, so everything is written under a
temporary name next to its destination and renamed into place at the end (rename is atomic on POSIX).
The temporary name `.NAME.<pid>.<random>.tmp` carries the writing process's id: a process killed outright
(SIGKILL, power loss) cannot clean up, so the next atomic write to the same NAME removes the temporaries whose
process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to `path` (replacing a file there), on error it is removed.
    `path` must not be a directory."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write file {str(path)!r}: it is a folder")
    _make_parent(path)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished output gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `path`, which must not exist or be empty, unless
    `replace` (--force): then an existing directory there is replaced as a whole, once the new one is complete."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {str(path)!r} is a file")
    if path.exists() and any(path.iterdir()) and not replace:
        raise ValueError(f"output directory {str(path)!r} already exists and is not empty (--force replaces it)")
    _make_parent(path)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old: Path | None = None
    try:
        yield tmp
        if path.exists():
            if any(path.iterdir()):
                # an old run is moved aside (atomic) and deleted only after the new one is in place
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
                os.replace(path, old)
            else:
                path.rmdir()
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries `.NAME.<pid>.*.tmp` next to `path` whose writing process no longer runs (a killed
    atomic write); returns what was removed. Temporaries of live processes, and names without a pid, are kept."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()
        except OSError as exc:   # another process may be cleaning up the same leftovers
            logger.debug("could not remove stale temporary %s: %s", sibling, exc)
            continue
        logger.info("removed %s, left by a killed write (process %s is gone)", sibling, match.group(1))
        removed.append(sibling)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def check_output_path(path: str | Path, *, what: str, is_dir: bool = False, force: bool = False) -> Path:
    """Refuse, before any work, an output that could not be written or would silently replace something: a file
    output naming a folder, a directory output naming a file, an existing output without `force` (a directory
    output only when not empty), a folder path through a file, or a folder where nothing can be created
    (read-only, no permission, a pseudo file system). `what` names the option (e.g. "--out")."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not is_dir and path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a folder; give a file name")
        if is_dir and not path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a file; give a directory")
        if not force and (not is_dir or any(path.iterdir())):
            state = "already exists and is not empty" if is_dir else "already exists"
            raise ValueError(f"{what} {str(path)!r} {state}; pass --force to replace it")
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():   # a dangling link: mkdir would fail on it
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {str(path)!r}: a part of its folder path, {str(ancestor)!r}, is not a folder")
    failure = write_probe(ancestor)
    if failure is not None:
        reason = failure.strerror or str(failure)
        if failure.errno == errno.ENOENT:
            reason = "the folder does not accept new files"
        raise ValueError(f"{what} {str(path)!r}: cannot write into {str(ancestor)!r} ({reason})")
    return path


def write_probe(folder: str | Path) -> OSError | None:
    """Create and remove an empty folder in `folder`: None when that works, else the OSError. Tried for real
    because access() says yes to root on a read-only file system or /proc."""
    try:
        probe = tempfile.mkdtemp(prefix=".symi-write-check.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return exc
    os.rmdir(probe)
    return None


RUN_COMPLETE = "COMPLETE"   # written last into a `symi train` run directory, once every rank finished


def check_complete_run(path: str | Path) -> None:
    """ValueError unless `path` is a finished `symi train` run directory (its COMPLETE marker written last): a
    failed or running job's directory holds only the steps written so far."""
    if Path(path).is_dir() and not (Path(path) / RUN_COMPLETE).is_file():
        raise ValueError(f"run directory {str(path)!r} is not complete (no {RUN_COMPLETE} marker): its job failed "
                         f"or is still running")


def timestamped_dir(prefix: str, root: str | Path = "runs") -> Path:
    """`root/<prefix>-YYYYmmdd-HHMMSS` (local time now): the default run directory of a command or study."""
    return Path(root) / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {str(path)!r}: a part of its folder path is a file") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    """`data` as JSON (one space per indent level, numpy values and paths as plain ones) with a final newline; the
    one format of every config.json, summary.json and placement file."""
    Path(path).write_text(json.dumps(data, indent=1, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    """`json.dumps(..., default=json_default)`: numpy scalars and arrays as Python numbers and lists, paths as text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
