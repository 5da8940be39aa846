"""symi_sim.checks: what each check accepts and the one message it gives otherwise."""

import math

import numpy as np
import pytest

from symi_sim.checks import (
    check_choice,
    check_int,
    check_non_negative_int,
    check_number,
    check_positive_int,
    is_int,
    is_number,
)


def test_is_int_and_is_number():
    assert [is_int(v) for v in (3, np.int16(3), True, np.bool_(True), 3.0, "3", None)] == [
        True, True, False, False, False, False, False]
    assert [is_number(v) for v in (3, 2.5, np.float32(0.5), np.int64(-1), True, math.nan, math.inf, "1", None)] == [
        True, True, True, True, False, False, False, False, False]
    assert not is_number(10**400)


def test_int_checks_return_python_ints():
    assert check_positive_int(np.int32(5), "steps") == 5 and type(check_positive_int(np.int32(5), "steps")) is int
    assert check_non_negative_int(0, "seed") == 0
    assert check_int(4, "k", minimum=2, maximum=4) == 4
    assert check_int(None, "max_shadow", minimum=0, optional=True) is None


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_positive_int(0, "steps"), "steps must be a positive integer, got 0"),
    (lambda: check_positive_int(True, "steps"), "steps must be a positive integer, got True"),
    (lambda: check_positive_int(2.0, "steps"), "steps must be a positive integer, got 2.0"),
    (lambda: check_non_negative_int(-1, "seed"), "seed must be an integer >= 0, got -1"),
    (lambda: check_int(5, "k", minimum=2, maximum=4), "k must be an integer in [2, 4], got 5"),
    (lambda: check_int(5, "k", maximum=4), "k must be an integer <= 4, got 5"),
    (lambda: check_int("a", "k"), "k must be an integer, got 'a'"),
    (lambda: check_int(-1, "fastermoe: max_shadow", minimum=0, optional=True),
     "fastermoe: max_shadow must be an integer >= 0 or None, got -1"),
])
def test_int_check_messages(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_number_checks():
    assert check_number(1, "lr", low=0) == 1.0 and type(check_number(1, "lr", low=0)) is float
    assert check_number(1.0, "share", low=0, high=1, low_open=True) == 1.0
    assert check_number(None, "hot share", low=0, optional=True) is None
    assert check_number(-3.5, "offset") == -3.5


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_number(0, "capacity factor", low=0, low_open=True),
     "capacity factor must be a finite number > 0, got 0"),
    (lambda: check_number(math.inf, "capacity factor", low=0, low_open=True),
     "capacity factor must be a finite number > 0, got inf"),
    (lambda: check_number(-0.1, "lr", low=0), "lr must be a finite number >= 0, got -0.1"),
    (lambda: check_number(0.0, "hot share", low=0, high=1, low_open=True),
     "hot share must be a number in (0, 1], got 0.0"),
    (lambda: check_number(1, "beta1", low=0, high=1, high_open=True), "beta1 must be a number in [0, 1), got 1"),
    (lambda: check_number(2, "drift", high=1), "drift must be a finite number <= 1, got 2"),
    (lambda: check_number(math.nan, "skew"), "skew must be a finite number, got nan"),
    (lambda: check_number(False, "skew"), "skew must be a finite number, got False"),
])
def test_number_check_messages(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_choice():
    assert check_choice("gpu", "capacity mode", ("slot", "gpu")) == "gpu"
    with pytest.raises(ValueError) as info:
        check_choice("disk", "capacity mode", ("slot", "gpu"))
    assert str(info.value) == "unknown capacity mode 'disk'; choices: slot, gpu"
