"""The options of a DEQ layer: their values, their checks, and the validated configuration the layer carries.

:func:`make_config` checks every option of :class:`fixedpoint.torch.DEQ` and
:func:`fixedpoint.torch.deq_fixed_point` once (the message names the option) and returns a
frozen :class:`Config`, which the forward solve, the backward pass and the ``unconverged``
policy (:func:`signal_unconverged`) read.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypedDict

from ..checks import check_choice, check_int, check_real, user_stacklevel
from ..method import Method
from ..options import COMMON_OPTIONS, DEFAULTS, check_common
from ..registry import resolve_method
from ..result import ConvergenceError, ConvergenceWarning
from .backends import SOLVER_BACKENDS
from .stats import SolveStats

__all__ = ["GRADIENTS", "LAYER_DEFAULTS", "LayerOptions", "PHANTOM_DAMPING", "PHANTOM_STEPS", "REBUILD_FRACTION",
           "UNCONVERGED"]

#: Values of the ``gradient`` argument: implicit differentiation, phantom gradients, Jacobian-free backpropagation.
GRADIENTS = ("implicit", "phantom", "jfb")

#: Defaults of ``gradient_steps`` and ``gradient_damping`` for ``gradient="phantom"`` (Geng et al. 2021 use
#: k = 5 and λ = 0.5 for multiscale DEQs).
PHANTOM_STEPS, PHANTOM_DAMPING = 5, 0.5

#: Default of ``rebuild_fraction``: in the adjoint solve with compaction, f is evaluated again, with autograd,
#: on the rows still iterating once they are at most this fraction of the rows of the graph the products run on
#: (see docs/deq.md for the measurement).  Read once, as the default value of the option.
REBUILD_FRACTION = 0.5

#: Solver options the layer sets itself (so they cannot be passed as ``options``).
_RESERVED = ("tol", "max_iter", "batch", "backend", "callback", "compact")

#: Values of the ``unconverged`` argument: what the layer does when its forward or adjoint solve ends unconverged.
UNCONVERGED = ("warn", "raise", "ignore")

#: Defaults of the layer's own arguments, written once for :class:`fixedpoint.torch.DEQ` and
#: :func:`fixedpoint.torch.deq_fixed_point`: the tolerance 1e-2 of Al Dajani & Keyes (arXiv 2410.19460) in place
#: of :func:`fixedpoint.solve`'s 1e-5, solve's ``max_iter``, batch mode, and compaction once half the samples have
#: stopped.  The other solver options default as in :data:`fixedpoint.COMMON_OPTIONS`.
LAYER_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "method": "anderson", "backend": "auto", "tol": 1e-2, "max_iter": DEFAULTS["max_iter"], "batch": True,
    "compact": "auto", "gradient": "implicit", "unconverged": "warn", "rebuild_fraction": REBUILD_FRACTION})


class LayerOptions(TypedDict, total=False):
    """The keyword arguments of :func:`fixedpoint.torch.deq_fixed_point` besides ``jacobian_probes``, with their types.

    Its overloads take them as ``**options: Unpack[LayerOptions]``, so that the signature is written once.
    """

    method: str | Method
    backend: str
    tol: float
    max_iter: int
    batch: bool
    compact: bool | str
    gradient: str
    gradient_steps: int | None
    gradient_damping: float | None
    options: dict[str, Any] | None
    backward_method: str | Method | None
    backward_tol: float | None
    backward_max_iter: int | None
    backward_options: dict[str, Any] | None
    unconverged: str
    rebuild_fraction: float


@dataclass(frozen=True)
class Config:
    """A DEQ layer's options, checked (:func:`make_config`); the solver's method objects resolved."""

    method: Method
    solver_options: dict[str, Any]  # common solver options besides the layer's own (stop_mode, check_every)
    backend: str
    tol: float
    max_iter: int
    batch: bool
    compact: bool | str
    gradient: str
    gradient_steps: int
    gradient_damping: float
    backward_method: Method
    backward_solver_options: dict[str, Any]
    backward_tol: float
    backward_max_iter: int
    unconverged: str = "warn"
    rebuild_fraction: float = REBUILD_FRACTION


def _resolve(method: str | Method, options: object, name: str) -> tuple[Method, dict[str, Any]]:
    """Return (method object, checked common solver options) from a method name or object and ``options``.

    ``name`` names ``options`` in the errors: ``TypeError`` for a non-dict, a reserved key, or an
    option unknown to the method; ``ValueError`` for a bad value.
    """
    if not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict of solver options, got {type(options).__name__}")
    for key in options:
        if key in _RESERVED:
            raise TypeError(f"{name} must not contain {key!r}: the DEQ layer sets it (use the layer's own "
                            f"tol, max_iter, batch, compact, backend arguments)")
    method_obj, common = resolve_method(method, options, where="DEQ")
    return method_obj, check_common(common)


def _check_compact(compact: bool | str, batch: bool) -> bool | str:
    """Return the checked ``compact`` (False without batch mode); ``ValueError`` for True with ``batch=False``."""
    compact = COMMON_OPTIONS["compact"].check(compact)
    if compact is True and not batch:
        raise ValueError("compact=True evaluates f on the samples still iterating, so it needs batch=True "
                         "(compact='auto' or False with batch=False)")
    return compact if batch else False


def _check_gradient(gradient: str, steps: int | None, damping: float | None,
                    backward_given: list[str]) -> tuple[str, int, float]:
    """Return (gradient, steps, damping) checked, with the phantom defaults, or (gradient, 1, 1.0) otherwise.

    ``backward_given`` names the adjoint options that were set; they are refused (``ValueError``)
    with phantom or Jacobian-free gradients, as are phantom options with another gradient.
    """
    check_choice("gradient", gradient, GRADIENTS)
    if gradient != "phantom":
        for name, value in (("gradient_steps", steps), ("gradient_damping", damping)):
            if value is not None:
                raise ValueError(f"{name} applies to gradient='phantom' only, got {name}={value!r} with "
                                 f"gradient={gradient!r}")
    if gradient != "implicit" and backward_given:
        raise ValueError(f"{', '.join(backward_given)} set(s) the adjoint solve of gradient='implicit'; "
                         f"gradient={gradient!r} solves no adjoint")
    steps = PHANTOM_STEPS if steps is None else check_int("gradient_steps", steps, 1)
    damping = PHANTOM_DAMPING if damping is None else check_real("gradient_damping", damping, 0.0, 1.0,
                                                                  low_open=True)
    if gradient != "phantom":  # one evaluation of f at z*
        steps, damping = 1, 1.0
    return gradient, steps, damping


def make_config(method: str | Method, backend: str, tol: float, max_iter: int, batch: bool,
                options: dict[str, Any] | None, backward_method: str | Method | None, backward_tol: float | None,
                backward_max_iter: int | None, backward_options: dict[str, Any] | None,
                compact: bool | str, gradient: str, gradient_steps: int | None, gradient_damping: float | None,
                unconverged: str, rebuild_fraction: float) -> Config:
    """Check the layer's options once and return them as a :class:`Config`.

    The parameters are those of :func:`fixedpoint.torch.deq_fixed_point` (``options`` and
    ``backward_options`` as dicts, None for none).

    Raises
    ------
    TypeError, ValueError
        For a bad option (the message names it), as listed in :func:`fixedpoint.torch.deq_fixed_point`.
    """
    check_choice("backend", backend, SOLVER_BACKENDS)
    unconverged = check_choice("unconverged", unconverged, UNCONVERGED)
    tol = COMMON_OPTIONS["tol"].check(tol)
    max_iter = COMMON_OPTIONS["max_iter"].check(max_iter)
    batch = COMMON_OPTIONS["batch"].check(batch)
    compact = _check_compact(compact, batch)
    rebuild_fraction = check_real("rebuild_fraction", rebuild_fraction, 0.0, 1.0)
    given = [name for name, value in (("backward_method", backward_method), ("backward_tol", backward_tol),
                                      ("backward_max_iter", backward_max_iter),
                                      ("backward_options", backward_options)) if value is not None]
    gradient, gradient_steps, gradient_damping = _check_gradient(gradient, gradient_steps, gradient_damping, given)
    method_obj, common = _resolve(method, options or {}, "options")
    backward_tol = tol if backward_tol is None else check_real("backward_tol", backward_tol, 0.0, None,
                                                                low_open=True)
    backward_max_iter = max_iter if backward_max_iter is None else check_int("backward_max_iter",
                                                                             backward_max_iter, 1)
    if backward_method is None and backward_options is None:
        backward_obj, backward_common = method_obj, common
    else:
        if backward_method is None:  # the forward method's kind, with other options
            backward_method = method_obj.name if isinstance(method, Method) else method
        backward_obj, backward_common = _resolve(backward_method, backward_options or {}, "backward_options")
    return Config(method_obj, common, backend, tol, max_iter, batch, compact, gradient, gradient_steps,
                   gradient_damping, backward_obj, backward_common, backward_tol, backward_max_iter, unconverged,
                   rebuild_fraction)


def signal_unconverged(cfg: Config, which: str, stats: SolveStats) -> None:
    """Apply the layer's ``unconverged`` policy to a solve (``which``: "forward" or "adjoint").

    Nothing happens when every sample converged or ``cfg.unconverged`` is "ignore".

    Raises
    ------
    ConvergenceError
        With ``unconverged="raise"``, carrying ``stats``.

    Warns
    -----
    ConvergenceWarning
        With ``unconverged="warn"`` (the same text each time, so Python's default filter shows it once).
    """
    if cfg.unconverged == "ignore" or stats.converged_fraction >= 1.0:
        return
    where = "layer.stats.forward" if which == "forward" else "layer.stats.backward"
    so = "the output is not a fixed point of f" if which == "forward" else "the gradient is not the implicit gradient"
    if cfg.unconverged == "raise":
        raise ConvergenceError(f"DEQ {which} solve ended unconverged (status {stats.status!r}, "
                               f"{1 - stats.converged_fraction:.3g} of the samples above tol): {so}; see {where}, "
                               "raise max_iter or tol, or make f more contractive", stats)
    # The same text every time (the numbers are in the stats), so that Python's default filter shows it once.
    warnings.warn(f"DEQ {which} solve ended unconverged for some samples: {so} (see {where}; "
                  "unconverged='raise' makes this an error, 'ignore' silences it)", ConvergenceWarning,
                  stacklevel=user_stacklevel())
