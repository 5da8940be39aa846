"""The linear-program references of the live split (symi_sim.live_reference) on hand-computed instances."""

from __future__ import annotations

import numpy as np
import pytest

from symi_sim.live_reference import lp_least_remote, lp_max_served, lp_min_max


def test_min_max_balances_the_shared_expert() -> None:
    # GPU 0 holds experts 0 and 1 (8 tokens), GPU 1 experts 0 and 2 (none): expert 0's 10 tokens split 1 / 9
    assert lp_min_max(np.array([10, 8, 0]), np.array([0, 1, 0, 2]), 2) == pytest.approx(9.0)
    # real-valued: 11 tokens over two GPUs alone peak at 5.5
    assert lp_min_max(np.array([11]), np.array([0, 0]), 1) == pytest.approx(5.5)


def test_min_max_under_slot_caps() -> None:
    # cap 4: expert 0 (10 tokens > 2 x 4) gives each replica 5 (floor or one more, summing to 10: 5 and 5); expert 1
    # (2 tokens, fits) evens the GPUs: 5 + 1 and 5 + 1
    assert lp_min_max(np.array([10, 2]), np.array([0, 1, 0, 1]), 2, slot_cap=4) == pytest.approx(6.0)


def test_max_served_under_a_gpu_budget() -> None:
    # budget 5: GPU 0 already holds 6 fixed tokens (serves 5), GPU 1 its 2 plus 3 of expert 0's
    assert lp_max_served(np.array([10, 6, 2]), np.array([0, 1, 0, 2]), 2, 5) == pytest.approx(10.0)
    assert lp_max_served(np.array([10, 6, 2]), np.array([0, 1, 0, 2]), 2, 100) == pytest.approx(18.0)


def test_least_remote_keeps_what_the_peak_allows_local() -> None:
    # expert 0 on both GPUs, routed 7 by GPU 0 and 3 by GPU 1: a peak of 5 forces 5 / 5, so 2 of GPU 0's travel;
    # a peak of 10 keeps every token home
    source_EG = np.array([[7, 3]])
    assert lp_least_remote(np.array([10]), source_EG, np.array([0, 0]), 1, 5) == pytest.approx(2.0)
    assert lp_least_remote(np.array([10]), source_EG, np.array([0, 0]), 1, 10) == pytest.approx(0.0)


def test_an_infeasible_program_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="no optimum"):
        lp_least_remote(np.array([10]), np.array([[7, 3]]), np.array([0, 0]), 1, 4)
