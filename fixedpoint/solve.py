"""The single entry point :func:`solve`, dispatching to a method by name."""

from __future__ import annotations

from .anderson import ANDERSON_DEFAULTS, anderson
from .checks import check_choice, check_options
from .forward import FORWARD_DEFAULTS, forward_iteration
from .iteration import COMMON_DEFAULTS

__all__ = ["solve", "METHODS"]

#: Methods by name, with the options each takes (common ones included) and their defaults.
METHODS = {
    "anderson": (anderson, dict(COMMON_DEFAULTS, **ANDERSON_DEFAULTS)),
    "forward": (forward_iteration, dict(COMMON_DEFAULTS, **FORWARD_DEFAULTS)),
}


def solve(g, x0, method="anderson", **options):
    """Find x with x = g(x), by Anderson acceleration (default) or forward iteration.

    Parameters
    ----------
    g : callable
        Fixed-point map ``g(x) -> array``, same library, shape, dtype and device as ``x``.
    x0 : array
        Initial guess (NumPy, CuPy, PyTorch or any array API library), any shape.
    method : {"anderson", "forward"}, default "anderson"
        :func:`fixedpoint.anderson` (Type-II AA) or :func:`fixedpoint.forward_iteration`.
    **options
        The method's options (``m``, ``beta``, ``lam``, ``tol``, ``max_iter``,
        ``stop_mode``, ``damping``, ``batch``, ``check_every``, ``callback``,
        ``backend``, ...); see the method's documentation and :data:`METHODS`.

    Returns
    -------
    FixedPointResult

    Raises
    ------
    ValueError
        For an unknown ``method`` or a bad option value.
    TypeError
        For an option the method does not take (never silently ignored).

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.solve(np.cos, np.zeros(3), tol=1e-10)
    >>> bool(res.converged), round(float(res.x[0]), 6)
    (True, 0.739085)
    """
    check_choice("method", method, tuple(METHODS))
    func, defaults = METHODS[method]
    check_options(f"solve(method={method!r})", options, tuple(defaults))
    return func(g, x0, **options)
