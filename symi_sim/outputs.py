"""All-or-nothing output: files and run directories appear only once complete; JSON of numpy values; the default
run directory name (timestamped).

A command that fails half-way must leave no partial file behind, so everything is written under a
temporary name next to its destination and renamed into place at the end (rename is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to `path`, on error it is removed."""
    path = Path(path)
    _make_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (which must not exist or be empty)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output directory {str(path)!r} already exists and is not empty")
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
