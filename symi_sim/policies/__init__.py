"""Replica-allocation policies, one file each, behind one registry.

    from symi_sim.policies import get_policy, available_policies
    placement = get_policy("symi-balanced").plan(load_LE, cluster, previous=None)

numpy only: no simpy, no torch, no file I/O (the executor imports this package unchanged).
A name may carry a rebalance period as a suffix: `flexmoe-50` is get_policy("flexmoe", rebalance_every=50), and
options after colons: `symi-balanced:packing=grouped` is get_policy("symi-balanced", packing="grouped")
(values read as int, float, true/false or none where they parse, else as text).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

from symi_sim.policies.base import Policy, check_load

# Each module defines POLICY, a Policy subclass; listing order is the order of available_policies().
_POLICY_MODULES = (
    "static",
    "symi",
    "symi_balanced",
    "eplb",
    "flexmoe",
    "fastermoe",
    "lazarus",
    "oracle",
)

_REGISTRY: dict[str, type[Policy]] = {}
for _module in _POLICY_MODULES:
    _cls = importlib.import_module(f"symi_sim.policies.{_module}").POLICY
    _REGISTRY[_cls.name] = _cls


def available_policies() -> list[str]:
    return list(_REGISTRY)


def parse_option_value(raw: str) -> Any:
    """A command-line option value: int, float, bool (true/false), None (none), else the text itself."""
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """["key=value", ...] -> {key: parsed value}."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"policy option {pair!r} must look like key=value")
        options[key.strip()] = parse_option_value(raw)
    return options


def get_policy(name: str, **config: Any) -> Policy:
    """The policy `name` (optionally `name:key=value:...`) with options `config`; ValueError naming the valid
    choices otherwise."""
    if ":" in name:
        name, *pairs = name.split(":")
        config = {**parse_options(pairs), **config}
    cls = _REGISTRY.get(name)
    if cls is None:
        match = re.fullmatch(r"(.+)-(\d+)", name)
        if match and match.group(1) in _REGISTRY and _has_field(_REGISTRY[match.group(1)], "rebalance_every"):
            cls = _REGISTRY[match.group(1)]
            config = {"rebalance_every": int(match.group(2)), **config}
        else:
            raise ValueError(f"unknown policy {name!r}; choices: {', '.join(available_policies())}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for policy {cls.name!r}; options: {sorted(fields) or 'none'}")
    try:
        return cls(**config)
    except TypeError as exc:
        raise ValueError(f"policy {cls.name!r}: {exc}") from None


def with_context(policy: Policy, **context: Any) -> Policy:
    """A copy of `policy` given the context values it takes as options (e.g. d_model, d_ff, weight_bytes,
    activation_bytes, optimizer_bytes, capacity_mode, capacity_factor).

    Drivers know facts a policy may need (the model's shapes and bytes per value, the capacity the plan is served
    under); a policy without such an option ignores them.
    """
    names = {f.name for f in dataclasses.fields(policy)}
    given = {key: value for key, value in context.items() if key in names}
    return dataclasses.replace(policy, **given) if given else policy


def _has_field(cls: type[Policy], field: str) -> bool:
    return any(f.name == field for f in dataclasses.fields(cls))


__all__ = ["Policy", "available_policies", "check_load", "get_policy", "parse_options", "with_context"]
