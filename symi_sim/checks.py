"""Argument checks shared by every layer: one ValueError naming the argument and the offending value.

`what` names the argument as the user knows it, with its context when that helps ("cluster 'x': num_nodes",
"fastermoe: max_shadow"); the message reads "<what> must be <rule>, got <value>". bool is never a number here
(True is an int in Python, but `--steps True` is a mistake), numpy scalars are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: Any) -> bool:
    """A finite real number (int or float, Python or numpy), not a bool; an int too large for a float is not."""
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool | np.bool_):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_int(value: Any, what: str, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """`value` as an int in [minimum, maximum] (either bound may be open-ended); None too when `optional`."""
    if optional and value is None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum == 1 and maximum is None:
            rule = "a positive integer"
        elif maximum is None:
            rule = "an integer" if minimum is None else f"an integer >= {minimum}"
        else:
            rule = f"an integer <= {maximum}" if minimum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{what} must be {rule}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_positive_int(value: Any, what: str) -> int:
    """`value` as an int >= 1."""
    return check_int(value, what, minimum=1)


def check_non_negative_int(value: Any, what: str) -> int:
    """`value` as an int >= 0."""
    return check_int(value, what, minimum=0)


def check_number(value: Any, what: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """`value` as a finite float within the bounds (closed unless `*_open`); None too when `optional`."""
    if optional and value is None:
        return None
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            rule = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            rule = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            rule = "a finite number"
        raise ValueError(f"{what} must be {rule}{' or None' if optional else ''}, got {value!r}")
    return float(value)


def check_choice(value: T, what: str, choices: Iterable[T]) -> T:
    """`value` if it is one of `choices`; else "unknown <what> <value>; choices: a, b"."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choices: {', '.join(str(choice) for choice in choices)}")
    return value
