"""Named presets or TOML/JSON files of dataclass fields: how clusters and models are given on the command line.

A file holds the fields at top level or under a table named after the kind ([cluster], [model]); it may start
from a preset named under `base` and override some of its fields; without its own `name` it is named after the
file (a modified preset must not carry the preset's name into results).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def load_preset_or_file(spec: str | Path, *, kind: str, cls: type[T], presets: dict[str, T],
                        **overrides: Any) -> T:
    """A preset name or a .toml/.json file of `cls` fields, with field overrides (None values are ignored)."""
    spec_str = str(spec)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if spec_str in presets:
        base = dataclasses.asdict(presets[spec_str])  # type: ignore[call-overload]
    else:
        path = Path(spec_str)
        if path.suffix.lower() not in (".toml", ".json"):
            raise ValueError(
                f"unknown {kind} {spec_str!r}: give a preset ({', '.join(sorted(presets))}) or a .toml/.json file"
            )
        if not path.is_file():
            raise ValueError(f"{kind} file {spec_str!r} does not exist")
        base = _read_fields(path, kind=kind, fields=fields, presets=presets)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {kind} field(s) {unknown}; valid fields: {sorted(fields)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**base)
    except TypeError as exc:  # wrong types that dataclass construction itself rejects
        raise ValueError(f"{kind} {spec_str!r}: {exc}") from None


def read_fields_file(path: Path, *, kind: str) -> dict[str, Any]:
    """The fields of a .toml/.json file of `kind` (at top level, or under a table named `kind`); one ValueError
    naming the file when it cannot be read or holds no table."""
    where = f"{kind} file {str(path)!r}"
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a table/object of {kind} fields")
    data = data.get(kind, data)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: [{kind}] must be a table of {kind} fields")
    return dict(data)


def _read_fields(path: Path, *, kind: str, fields: set[str], presets: dict[str, Any]) -> dict[str, Any]:
    where = f"{kind} file {str(path)!r}"
    data = read_fields_file(path, kind=kind)
    base: dict[str, Any] = {}
    if "base" in data:
        preset = data.pop("base")
        if not isinstance(preset, str) or preset not in presets:
            raise ValueError(f"{where}: base {preset!r} is not a preset ({', '.join(sorted(presets))})")
        base = dataclasses.asdict(presets[preset])
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
    if "name" in data and (not isinstance(data["name"], str) or not data["name"].strip()):
        raise ValueError(f"{where}: name must be a non-empty string, got {data['name']!r}")
    base.update(data)
    base["name"] = data.get("name", path.stem)
    return base
