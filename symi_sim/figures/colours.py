"""One colour and one short label per policy, for every figure and study: a policy looks the same everywhere.

A policy spec (`symi-balanced:packing=grouped`, `flexmoe-50`, `oracle:packing=grouped`) takes the colour of its
exact spec when listed, else of its family (the name before options and the rebalance period), else a fixed colour
derived from its text (so that an unknown policy keeps its colour from one run to the next).
"""

from __future__ import annotations

import re
import zlib

# Families in matplotlib's tab10/tab20 colours; variants of a family are shades of its colour.
POLICY_COLOURS = {
    "static": "#7f7f7f",                          # grey: the baseline
    "symi": "#1f77b4",                            # blue: SYMI (the paper's Algorithm 1)
    "symi-balanced": "#aec7e8",                   # light blue: ours, spread packing
    "symi-balanced:packing=grouped": "#17becf",   # cyan: ours, grouped packing
    "flexmoe": "#ff7f0e",                         # orange
    "flexmoe:rule=cost_benefit": "#ffbb78",       # light orange: FlexMoE under its own cost-benefit rule
    "fastermoe": "#9467bd",                       # purple
    "eplb": "#d62728",                            # red
    "lazarus": "#8c564b",                         # brown
    "oracle": "#2ca02c",                          # green: the upper bound
}
_FALLBACK = ("#e377c2", "#bcbd22", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#98df8a")
_PERIOD = re.compile(r"^([a-z-]+?)-\d+$")
SHORT_LABELS = ((":rule=cost_benefit", " rule"), (":packing=grouped", " grouped"))


def policy_family(spec: str) -> str:
    """`flexmoe-50:rule=cost_benefit` -> `flexmoe:rule=cost_benefit`; `symi-balanced` -> itself."""
    name, sep, options = spec.partition(":")
    match = _PERIOD.match(name)
    return (match.group(1) if match else name) + sep + options


def policy_colour(spec: str) -> str:
    """The hex colour of policy `spec` (a bracketed note after it, e.g. " [paper accounting]", is ignored)."""
    spec = spec.split(" [", 1)[0]
    for key in (spec, policy_family(spec), policy_family(spec).partition(":")[0]):
        if key in POLICY_COLOURS:
            return POLICY_COLOURS[key]
    return _FALLBACK[zlib.crc32(spec.encode()) % len(_FALLBACK)]


def short_label(spec: str) -> str:
    """A policy spec shortened for axis labels: `symi-balanced:packing=grouped` -> `symi-balanced grouped`."""
    for option, short in SHORT_LABELS:
        spec = spec.replace(option, short)
    return spec
