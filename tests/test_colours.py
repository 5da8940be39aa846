"""symi_sim.figures.colours: one colour and short label per policy, the same in every figure and study."""

from matplotlib.colors import is_color_like

from symi_sim.figures.colours import POLICY_COLOURS, policy_colour, policy_family, short_label


def test_family_strips_period_keeps_options():
    assert policy_family("flexmoe-50") == "flexmoe"
    assert policy_family("flexmoe-10:rule=cost_benefit") == "flexmoe:rule=cost_benefit"
    assert policy_family("symi-balanced:packing=grouped") == "symi-balanced:packing=grouped"
    assert policy_family("symi") == "symi"


def test_colours_by_spec_then_family():
    assert policy_colour("static") == POLICY_COLOURS["static"]
    assert policy_colour("flexmoe-10") == policy_colour("flexmoe-100") == POLICY_COLOURS["flexmoe"]
    assert policy_colour("flexmoe-10:rule=cost_benefit") == POLICY_COLOURS["flexmoe:rule=cost_benefit"]
    assert policy_colour("symi-balanced:packing=grouped") == POLICY_COLOURS["symi-balanced:packing=grouped"]
    assert policy_colour("oracle:packing=grouped") == POLICY_COLOURS["oracle"]
    assert policy_colour("eplb:num_groups=4") == POLICY_COLOURS["eplb"]
    assert policy_colour("symi [paper accounting]") == POLICY_COLOURS["symi"]
    # distinct families never share a colour
    assert len(set(POLICY_COLOURS.values())) == len(POLICY_COLOURS)
    assert all(is_color_like(colour) for colour in POLICY_COLOURS.values())


def test_unknown_policy_gets_a_stable_colour():
    colour = policy_colour("my-policy")
    assert is_color_like(colour) and colour not in POLICY_COLOURS.values()
    assert policy_colour("my-policy") == colour


def test_short_label():
    assert short_label("symi-balanced:packing=grouped") == "symi-balanced grouped"
    assert short_label("flexmoe-10:rule=cost_benefit") == "flexmoe-10 rule"
    assert short_label("eplb") == "eplb"
