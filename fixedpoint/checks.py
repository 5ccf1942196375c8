"""Argument checks that raise errors naming the parameter and what was expected."""

from __future__ import annotations

import difflib
import math
import numbers

__all__ = ["check_int", "check_real", "check_choice", "check_options"]


def check_int(name, value, minimum):
    """Return ``value`` as int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_real(name, value, low=None, high=None, *, low_open=False, high_open=False, allow_inf=False):
    """Return ``value`` as float, or raise if it is not a real number in the interval given.

    ``low``/``high`` of None mean unbounded; ``*_open`` excludes the end point.  Infinite values
    are refused unless ``allow_inf`` (for options where infinity means "never", e.g. a safeguard
    threshold).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value:g}")
    bad = (low is not None and (value < low or (low_open and value == low))) or (
        high is not None and (value > high or (high_open and value == high))
    )
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        lo_v = "-inf" if low is None else f"{low:g}"
        hi_v = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {lo}{lo_v}, {hi_v}{hi}, got {value:g}")
    return value


def check_choice(name, value, choices):
    """Return ``value`` if it is one of ``choices``, else raise naming the allowed values."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_options(where, given, allowed):
    """Raise TypeError for any key of ``given`` not in ``allowed``, suggesting the closest name."""
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{where} got an unknown option {key!r}{hint} Valid options: {', '.join(sorted(allowed))}")
