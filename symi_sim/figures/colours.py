"""One colour, one line style and one short label per policy, and one colour per critical-path phase, for every
figure and study: a policy (and a phase) looks the same everywhere.

A policy spec (`symi-balanced:packing=grouped`, `flexmoe-50`, `symi-balanced:shares=live`) takes the colour of its
exact spec when listed; else, when its family (the name before the rebalance period and options) is listed, a shade
of the family's colour picked from the spec's text (so that two variants shown together differ, and each keeps its
shade from one figure and run to the next); else a fixed colour derived from its text. Phases (the simulator's
`phase_<name>_s` columns) take hand-picked colours at least PHASE_MIN_DELTA_E apart in CIELAB, so that the 13
stacked phases can be told apart.
"""

from __future__ import annotations

import colorsys
import re
import zlib
from collections.abc import Sequence

# Families in matplotlib's tab10/tab20 colours; listed variants of a family are shades of its colour.
POLICY_COLOURS = {
    "static": "#7f7f7f",                          # grey: the baseline
    "symi": "#1f77b4",                            # blue: SYMI (the paper's Algorithm 1)
    "symi-balanced": "#aec7e8",                   # light blue: ours, spread packing
    "symi-balanced:packing=grouped": "#17becf",   # cyan: ours, grouped packing
    "flexmoe": "#ff7f0e",                         # orange
    "flexmoe-50": "#a65200",                      # the paper's other FlexMoE periods: dark, light orange
    "flexmoe-100": "#ffb366",
    "flexmoe:rule=cost_benefit": "#bcbd22",       # olive: FlexMoE under its own cost-benefit rule
    "flexmoe-50:rule=cost_benefit": "#6f7000",
    "flexmoe-100:rule=cost_benefit": "#dbdb8d",
    "fastermoe": "#9467bd",                       # purple
    "eplb": "#d62728",                            # red
    "lazarus": "#8c564b",                         # brown
    "oracle": "#2ca02c",                          # green: the upper bound
}
# Specs that name the same policy as another (flexmoe's default period is 10) take its colour.
POLICY_ALIASES = {"flexmoe-10": "flexmoe", "flexmoe-10:rule=cost_benefit": "flexmoe:rule=cost_benefit"}
_FALLBACK = ("#e377c2", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5", "#98df8a", "#393b79", "#637939")
# Lightness levels (HLS) of an unlisted variant's shade, and how far (CIELAB) a shade keeps from listed colours.
_SHADE_LIGHTNESS = tuple(0.12 + 0.05 * step for step in range(16))  # 0.12 .. 0.87
_SHADE_MIN_DELTA_E = 15.0
_PERIOD = re.compile(r"^([a-z-]+?)-\d+$")
SHORT_LABELS = ((":rule=cost_benefit", " rule"), (":packing=grouped", " grouped"))

# Line figures: a policy's line also takes a line style and a marker (by its place in the figure), so that lines
# that coincide (every policy at 0% dropped) stay visible; 4 x 7 coprime cycles give 28 distinct pairs.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")

PHASE_COLOURS = {
    "popularity": "#2b3d26",        # dark olive
    "migration": "#ff7f0e",         # orange
    "shadow": "#ffbb78",            # light orange
    "a2a_forward": "#1f77b4",       # blue
    "expert_forward": "#d62728",    # red
    "dense_forward": "#008856",     # green
    "a2a_backward": "#9edae5",      # light cyan
    "expert_backward": "#f7b6d2",   # pink
    "dense_backward": "#98df8a",    # light green
    "dense_allreduce": "#8db600",   # yellow-green
    "grad_collect": "#9467bd",      # purple
    "optimizer": "#f3c300",         # yellow
    "weight_sendout": "#b3446c",    # raspberry
}
PHASE_MIN_DELTA_E = 30.0  # CIELAB distance (CIE76) every two phase colours keep at least
_PHASE_FALLBACK = ("#7f7f7f", "#654522", "#e25822", "#604e97", "#c2b280")


def policy_family(spec: str) -> str:
    """`flexmoe-50:rule=cost_benefit` -> `flexmoe:rule=cost_benefit`; `symi-balanced` -> itself."""
    name, sep, options = spec.partition(":")
    match = _PERIOD.match(name)
    return (match.group(1) if match else name) + sep + options


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def cielab(colour: str | Sequence[float]) -> tuple[float, float, float]:
    """CIELAB (D65) coordinates of a matplotlib colour: distances there follow perceived differences."""
    from matplotlib.colors import to_rgb

    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    xyz = [sum(w * c for w, c in zip(row, linear, strict=True)) / white for row, white in (
        ((0.4124, 0.3576, 0.1805), 0.95047), ((0.2126, 0.7152, 0.0722), 1.0), ((0.0193, 0.1192, 0.9505), 1.08883))]
    fx, fy, fz = (t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def delta_e(first: str | Sequence[float], second: str | Sequence[float]) -> float:
    """CIE76 colour difference: about 2.3 is just noticeable, over 20 clearly different colours."""
    return sum((a - b) ** 2 for a, b in zip(cielab(first), cielab(second), strict=True)) ** 0.5


def _shade(colour: str, spec: str) -> str:
    """A shade of `colour` (same hue and saturation, another lightness) picked by the text of `spec`, among those
    that stay clear of every listed policy colour (a shade of light blue must not pass for symi's blue)."""
    from matplotlib.colors import to_hex, to_rgb

    hue, lightness, saturation = colorsys.rgb_to_hls(*to_rgb(colour))
    shades = [to_hex(colorsys.hls_to_rgb(hue, level, saturation)) for level in _SHADE_LIGHTNESS]
    clear = [shade for shade in shades if min(delta_e(shade, listed) for listed in POLICY_COLOURS.values())
             >= _SHADE_MIN_DELTA_E]
    candidates = clear or shades
    return candidates[_crc(spec) % len(candidates)]


def policy_colour(spec: str) -> str:
    """The hex colour of policy `spec` (a bracketed note after it, e.g. " [paper accounting]", is ignored)."""
    spec = spec.split(" [", 1)[0]
    spec = POLICY_ALIASES.get(spec, spec)
    if spec in POLICY_COLOURS:
        return POLICY_COLOURS[spec]
    family = policy_family(spec)
    for key in (family, family.partition(":")[0]):
        if key in POLICY_COLOURS:
            return _shade(POLICY_COLOURS[key], spec)
    return _FALLBACK[_crc(spec) % len(_FALLBACK)]


def policy_styles(policies: Sequence[str]) -> dict[str, dict[str, object]]:
    """{policy: matplotlib line keywords (color, linestyle, marker)} for the policies of one line figure: no two
    share all three."""
    return {policy: {"color": policy_colour(policy), "linestyle": LINESTYLES[index % len(LINESTYLES)],
                     "marker": MARKERS[index % len(MARKERS)]}
            for index, policy in enumerate(dict.fromkeys(policies))}


def phase_colour(phase: str) -> str:
    """The hex colour of critical-path phase `phase` (`a2a_forward`, or a column `phase_a2a_forward_s`, or its label
    `a2a forward`); an unknown phase gets a fixed colour derived from its name."""
    name = phase.removeprefix("phase_").removesuffix("_s").replace(" ", "_")
    return PHASE_COLOURS.get(name) or _PHASE_FALLBACK[_crc(name) % len(_PHASE_FALLBACK)]


def short_label(spec: str) -> str:
    """A policy spec shortened for axis labels: `symi-balanced:packing=grouped` -> `symi-balanced grouped`."""
    for option, short in SHORT_LABELS:
        spec = spec.replace(option, short)
    return spec
