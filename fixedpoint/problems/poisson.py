"""A cheap O(n) map: one Jacobi sweep for the 1-D (screened) Poisson problem."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ..backend import Array
from ..checks import check_int, check_real
from .base import Problem, placed


def poisson_jacobi(n: int = 1000, shift: float = 0.0, *, backend: Any = "numpy", dtype: Any = None,
                   device: Any = None) -> Problem:
    """Jacobi sweep for the discrete problem (2 + s) u_i − u_{i−1} − u_{i+1} = h², u_0 = u_{n+1} = 0.

    g(u)_i = (u_{i−1} + u_{i+1} + h²) / (2 + s) with h = 1/(n+1).  With the shift
    s = 0 this is −u'' = 1 on (0, 1) with zero boundary values, whose discrete
    solution is u_i = x_i (1 − x_i) / 2 at x_i = i·h (the second difference is exact
    for quadratics), and forward iteration slows as n grows (rate cos(πh)).  A
    shift s > 0 (a screened Poisson problem in grid units) bounds the rate by
    2 / (2 + s) whatever n, so that solves of every size reach a tolerance in a
    similar number of iterations; the exact solution is then
    u_i = (h²/s) [1 − (r^i + r^{n+1−i}) / (1 + r^{n+1})] with r + 1/r = 2 + s, r < 1.

    g costs O(n) and reads/writes a few n values, so solves on it measure a
    solver's own overhead.

    Parameters
    ----------
    n : int, default 1000
        Number of interior grid points, >= 1.
    shift : float, default 0.0
        The shift s >= 0.
    backend : str or module, default "numpy"
    dtype, device : optional
        As for :func:`fixedpoint.problems.linear_contraction`.

    Returns
    -------
    Problem
        ``g`` accepts u of shape (n,) or (B, n); ``x0`` is zeros; ``solution``
        is the closed form above.
    """
    n = check_int("n", n, 1)
    s = check_real("shift", shift, 0.0, None)
    h = 1.0 / (n + 1)
    i = np.arange(1, n + 1)
    if s == 0.0:
        u = i * h * (1 - i * h) / 2
    else:
        r = ((2 + s) - np.sqrt((2 + s) ** 2 - 4)) / 2
        # r**(n+1-i) computed as a power of a non-negative exponent, without overflow
        u = (h * h / s) * (1 - (r**i + r ** (n + 1 - i)) / (1 + r ** (n + 1)))
    exact, xp = placed(u, backend, dtype, device)
    h2, denom = h * h, 2.0 + s

    def g(v: Array) -> Array:
        pad = xp.zeros(v.shape[:-1] + (1,), dtype=v.dtype, device=array_api_compat.device(v))
        left = xp.concat([pad, v[..., :-1]], axis=-1)
        right = xp.concat([v[..., 1:], pad], axis=-1)
        gv: Array = (left + right + h2) / denom
        return gv

    name = f"1-D Poisson, Jacobi sweep (n={n}" + (f", shift={s:g})" if s else ")")
    return Problem(name, g, xp.zeros_like(exact), exact, xp, dict(n=n, shift=s))
