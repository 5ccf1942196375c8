"""The options every method takes: one table of name, default, check and one-line description.

:func:`fixedpoint.solve` takes its keyword defaults from :data:`DEFAULTS`, the driver loop
(:mod:`fixedpoint.iteration`) and the DEQ layer (:mod:`fixedpoint.torch`) validate with
:func:`check_common`, and the documentation's option reference (docs/options.md) is
written from :data:`COMMON_OPTIONS` (tests/test_docs.py checks that it is).  An option
added here is therefore taken, checked and documented everywhere at once; its full
description belongs in :func:`fixedpoint.solve`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .checks import check_bool, check_callable, check_choice, check_int, check_real
from .comm import as_communicator

__all__ = ["Option", "COMMON_OPTIONS", "DEFAULTS", "COMPACT_CHOICES", "STOP_MODES", "check_common"]

#: Values of ``stop_mode``: relative or absolute residual.
STOP_MODES = ("rel", "abs")
#: Values of ``compact``: never, from the first host check, or once at most half the samples iterate.
COMPACT_CHOICES: tuple[bool | str, ...] = (False, True, "auto")


@dataclass(frozen=True)
class Option:
    """One option common to every method.

    Attributes
    ----------
    name : str
        The keyword argument.
    default : object
        Its default in :func:`fixedpoint.solve` and the shortcuts.
    check : callable
        ``check(value) -> value``: the value normalised, or ``TypeError``/``ValueError`` naming the option.
    doc : str
        One line for the option reference.
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str


def _positive_tol(value: Any) -> float:
    return check_real("tol", value, 0.0, None, low_open=True)


def _max_iter(value: Any) -> int:
    return check_int("max_iter", value, 1)


def _stop_mode(value: Any) -> str:
    return check_choice("stop_mode", value, STOP_MODES)


def _divtol(value: Any) -> float | None:
    return None if value is None else check_real("divtol", value, 1.0, None, low_open=True, allow_inf=True)


def _batch(value: Any) -> bool:
    return check_bool("batch", value)


def _compact(value: Any) -> bool | str:
    return check_choice("compact", value, COMPACT_CHOICES)


def _check_every(value: Any) -> int | None:
    return None if value is None else check_int("check_every", value, 1)


def _callback(value: Any) -> Callable[..., Any] | None:
    return check_callable("callback", value)


def _backend(value: Any) -> Any:
    return value  # a name or a module: resolved (and refused with the names known) when the solve starts


#: The options common to every method, by name, in the order of :func:`fixedpoint.solve`'s signature.
COMMON_OPTIONS: Mapping[str, Option] = MappingProxyType({option.name: option for option in (
    Option("tol", 1e-5, _positive_tol,
           "Stop a sample once its residual (``stop_mode``) is at most tol; > 0."),
    Option("max_iter", 1000, _max_iter,
           "Most evaluations of g, >= 1."),
    Option("stop_mode", "rel", _stop_mode,
           "``\"rel\"``: ‖g(x) − x‖ / (‖g(x)‖ + 1e-12); ``\"abs\"``: ‖g(x) − x‖ (units of x); per sample."),
    Option("divtol", 1e10, _divtol,
           "Stop a sample as diverged once its residual exceeds divtol × its first; > 1, or None."),
    Option("batch", False, _batch,
           "The leading axis of x0 holds independent problems."),
    Option("compact", False, _compact,
           "With batch: evaluate g only on the samples still iterating (False, True or \"auto\")."),
    Option("check_every", None, _check_every,
           "Host check every this many iterations (None: 1 on CPUs, 10 on GPUs)."),
    Option("callback", None, _callback,
           "``callback(info)`` after every evaluation of g; True stops the solve."),
    Option("backend", None, _backend,
           "Array library to iterate in (\"numpy\", \"torch\", \"cupy\", \"array_api_strict\"); None: x0's."),
    Option("comm", None, as_communicator,
           "mpi4py communicator or torch.distributed group: x0 is this process's shard."),
)})

#: The default of every common option, by name (what :func:`fixedpoint.solve`'s signature says).
DEFAULTS: Mapping[str, Any] = MappingProxyType({name: option.default for name, option in COMMON_OPTIONS.items()})


def check_common(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Validate common options; return them normalised.

    Parameters
    ----------
    opts : mapping
        Some of the options of :data:`COMMON_OPTIONS`, by name.

    Returns
    -------
    dict
        The same keys, each value checked and normalised (e.g. ``np.True_`` to ``True``).

    Raises
    ------
    TypeError, ValueError
        Naming the option, for a value of the wrong type or out of range.
    KeyError
        For a name that is not a common option (a caller's error, not a user's: callers split the
        user's options first, with :func:`fixedpoint.registry.resolve_method`).
    """
    return {key: COMMON_OPTIONS[key].check(value) for key, value in opts.items()}
