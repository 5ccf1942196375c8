"""Argument checks that raise errors naming the parameter and what was expected."""

from __future__ import annotations

import difflib
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

__all__ = ["check_int", "check_real", "check_bool", "check_choice", "check_callable", "check_options",
           "user_stacklevel"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False, allow_inf: bool = False) -> float:
    """Return ``value`` as float, or raise if it is not a real number in the interval given.

    ``low``/``high`` of None mean unbounded; ``*_open`` excludes the end point.  Infinite values
    are refused unless ``allow_inf`` (for options where infinity means "never", e.g. a safeguard
    threshold).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if math.isinf(number) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {number:g}")
    bad = (low is not None and (number < low or (low_open and number == low))) or (
        high is not None and (number > high or (high_open and number == high))
    )
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        lo_v = "-inf" if low is None else f"{low:g}"
        hi_v = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {lo}{lo_v}, {hi_v}{hi}, got {number:g}")
    return number


def _describe(value: Any) -> str:
    """``repr(value)``, with its type where the repr alone would hide it (``0`` against ``False``)."""
    if isinstance(value, (bool, str)) or value is None:
        return repr(value)
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
    return f"{value!r} (of type {name})"


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` as a Python bool, or raise ``TypeError`` if it is not True or False.

    NumPy booleans (``np.True_``, ``np.False_``) are accepted; integers such as 0 and 1 are not,
    so that a typo never turns an option on.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}")


def check_choice(name: str, value: Any, choices: Sequence[T]) -> T:
    """Return the element of ``choices`` that ``value`` is, else raise naming the allowed values.

    Matching is strict: a boolean choice matches only True/False (or a NumPy bool), never 0 or 1,
    and a string choice only a string, so that the returned object can be tested with ``is``.
    """
    for choice in choices:
        if isinstance(choice, bool):
            same = isinstance(value, (bool, np.bool_)) and bool(value) is choice
        elif isinstance(choice, str):
            same = isinstance(value, str) and value == choice
        else:
            same = type(value) is type(choice) and value == choice
        if same:
            return choice
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {_describe(value)}")


def check_callable(name: str, value: Any) -> Callable[..., Any] | None:
    """Return ``value`` if it is callable or None, else raise ``TypeError`` naming ``name``."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r}")
    checked: Callable[..., Any] | None = value
    return checked


def check_options(where: str, given: Iterable[str], allowed: Sequence[str]) -> None:
    """Raise TypeError for any key of ``given`` not in ``allowed``, suggesting the closest name."""
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise TypeError(f"{where} got an unknown option {key!r}{hint} Valid options: {', '.join(sorted(allowed))}")


def user_stacklevel() -> int:
    """Return the ``stacklevel`` that makes a warning of this package name the user's line.

    For ``warnings.warn`` called right here by a function of this package: the level of the first
    frame of the caller's program, past this package's frames and torch's (a layer's
    ``Module.__call__``, ``backward()``).
    """
    inside = [os.path.dirname(os.path.abspath(__file__))]
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        inside.append(os.path.dirname(torch_file))
    level = 2  # 1: the function that warns; 2: its caller
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(tuple(inside)):
        frame, level = frame.f_back, level + 1
    return level
