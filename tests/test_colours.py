"""symi_sim.figures.colours: one colour, line style and short label per policy and one colour per phase, the same in
every figure and study, and told apart where they are shown together."""

import itertools
import random

import pytest
from matplotlib.colors import is_color_like, to_hex

from symi_sim.figures.colours import (
    LINESTYLES,
    MARKERS,
    PHASE_COLOURS,
    PHASE_MIN_DELTA_E,
    POLICY_ALIASES,
    POLICY_COLOURS,
    cielab,
    delta_e,
    phase_colour,
    policy_colour,
    policy_family,
    policy_styles,
    short_label,
)
from symi_sim.simulator.engine import PHASES

FAMILIES = ("static", "symi", "symi-balanced", "flexmoe", "fastermoe", "eplb", "lazarus", "oracle")


def test_family_strips_period_keeps_options():
    assert policy_family("flexmoe-50") == "flexmoe"
    assert policy_family("flexmoe-10:rule=cost_benefit") == "flexmoe:rule=cost_benefit"
    assert policy_family("symi-balanced:packing=grouped") == "symi-balanced:packing=grouped"
    assert policy_family("symi") == "symi"


def test_listed_specs_and_aliases():
    assert policy_colour("static") == POLICY_COLOURS["static"]
    assert policy_colour("symi-balanced:packing=grouped") == POLICY_COLOURS["symi-balanced:packing=grouped"]
    assert policy_colour("symi [paper accounting]") == POLICY_COLOURS["symi"]
    # flexmoe's default period is 10: the same policy, the same colour
    assert policy_colour("flexmoe-10") == policy_colour("flexmoe") == POLICY_COLOURS["flexmoe"]
    assert policy_colour("flexmoe-10:rule=cost_benefit") == POLICY_COLOURS["flexmoe:rule=cost_benefit"]
    assert set(POLICY_ALIASES.values()) <= set(POLICY_COLOURS)
    # the paper's three FlexMoE periods, under either rule, are six different colours
    flexmoe = [policy_colour(f"flexmoe-{period}{rule}") for period in (10, 50, 100)
               for rule in ("", ":rule=cost_benefit")]
    assert len(set(flexmoe)) == 6
    # distinct listed policies never share a colour, and all are clearly apart (CIELAB)
    assert len(set(POLICY_COLOURS.values())) == len(POLICY_COLOURS)
    assert min(delta_e(a, b) for a, b in itertools.combinations(POLICY_COLOURS.values(), 2)) >= 20
    assert all(is_color_like(colour) for colour in POLICY_COLOURS.values())


def test_parameterised_and_unknown_specs_get_a_fixed_colour_of_their_own():
    rng = random.Random(12)
    options = ("", ":shares=live", ":packing=grouped", ":num_groups=4", ":rule=cost_benefit", ":window=3")
    for _ in range(300):
        family = rng.choice(FAMILIES + ("my-policy", "x"))
        period = rng.choice(("", f"-{rng.randint(1, 1000)}"))
        spec = family + period + rng.choice(options)
        colour = policy_colour(spec)
        assert is_color_like(colour) and colour == to_hex(colour)
        assert policy_colour(spec) == colour  # deterministic: the same in every figure and run
        assert policy_colour(spec + " [paper accounting]") == colour
        listed = POLICY_ALIASES.get(spec, spec) in POLICY_COLOURS
        if not listed and family in FAMILIES:
            # a variant is its own shade of its family's hue, clear of every listed policy's colour
            assert min(delta_e(colour, other) for other in POLICY_COLOURS.values()) >= 15, spec
    assert policy_colour("symi-balanced:shares=live") != policy_colour("symi-balanced")
    assert delta_e(policy_colour("symi-balanced:shares=live"), policy_colour("symi")) >= 15
    assert policy_colour("my-policy") not in POLICY_COLOURS.values()


def test_policy_styles_never_repeat_within_a_figure():
    for count in range(1, 29):
        names = [f"p{index}" for index in range(count)]
        styles = policy_styles(names)
        assert list(styles) == names
        assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}) == count
        # even for policies that share a colour, line style and marker tell them apart
        assert len({(s["linestyle"], s["marker"]) for s in styles.values()}) == count
    assert set(LINESTYLES) and set(MARKERS)
    assert policy_styles(["static", "symi"])["symi"]["color"] == policy_colour("symi")


def test_cielab_against_known_values():
    assert cielab("white") == pytest.approx((100.0, 0.0, 0.0), abs=0.05)
    assert cielab("black") == pytest.approx((0.0, 0.0, 0.0), abs=0.01)
    assert cielab("#ff0000") == pytest.approx((53.24, 80.09, 67.20), abs=0.05)
    assert delta_e("white", "black") == pytest.approx(100.0, abs=0.05)


def test_every_phase_has_a_colour_clearly_apart_from_the_others():
    assert set(PHASES) <= set(PHASE_COLOURS)
    colours = [phase_colour(phase) for phase in PHASES]
    assert len(set(colours)) == len(PHASES) == 13
    worst = min((delta_e(a, b), a, b) for a, b in itertools.combinations(colours, 2))
    assert worst[0] >= PHASE_MIN_DELTA_E >= 30, worst
    # tab20's first 13 colours (the old palette) fail the same bar: light and dark of one hue
    from matplotlib import colormaps

    tab20 = [colormaps["tab20"](index)[:3] for index in range(13)]
    assert min(delta_e(a, b) for a, b in itertools.combinations(tab20, 2)) < PHASE_MIN_DELTA_E
    # a column name, a label and a phase name are one phase; an unknown phase keeps a fixed colour
    assert phase_colour("phase_a2a_forward_s") == phase_colour("a2a forward") == PHASE_COLOURS["a2a_forward"]
    assert phase_colour("phase_dispatch_s") == phase_colour("dispatch") and is_color_like(phase_colour("dispatch"))


def test_short_label():
    assert short_label("symi-balanced:packing=grouped") == "symi-balanced grouped"
    assert short_label("flexmoe-10:rule=cost_benefit") == "flexmoe-10 rule"
    assert short_label("eplb") == "eplb"
