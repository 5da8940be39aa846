"""Loss-curve helpers: trailing means and the first step reaching a target, by hand."""

import pytest

from symi_sim.simulator.curves import smoothed, steps_to


def test_smoothed_is_a_trailing_mean():
    assert smoothed([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert smoothed([1.0, 2.0, 3.0], 5) == [1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="window"):
        smoothed([1.0], 0)


def test_steps_to_needs_a_full_window():
    curve = [1.0, 0.5, 0.4, 0.3]
    assert steps_to(0.5, curve, 1) == 2
    assert steps_to(0.5, curve, 3) == 3    # index 1 reaches 0.5 but only index 2 has a full window of 3
    assert steps_to(0.1, curve, 1) is None
