"""A cheap O(n) map: one Jacobi sweep for the 1-D Poisson problem."""

from __future__ import annotations

import array_api_compat
import numpy as np

from ..checks import check_int
from .base import Problem, placed


def poisson_jacobi(n=1000, *, backend="numpy", dtype=None, device=None):
    """Jacobi sweep for −u'' = 1 on (0, 1), u(0) = u(1) = 0, n interior points.

    g(u)_i = (u_{i−1} + u_{i+1} + h²) / 2 with h = 1/(n+1) and zero boundary
    values.  The fixed point is the discrete solution u_i = x_i (1 − x_i) / 2 at
    x_i = i·h (exact: the second difference is exact for quadratics).  g costs O(n)
    and reads/writes a few n values, so solves on it measure a solver's own
    overhead.  Forward iteration converges slowly (rate cos(πh)).

    Parameters
    ----------
    n : int, default 1000
        Number of interior grid points, >= 1.
    backend : str or module, default "numpy"
    dtype, device : optional

    Returns
    -------
    Problem
        ``g`` accepts u of shape (n,) or (B, n); ``x0`` is zeros.
    """
    n = check_int("n", n, 1)
    h = 1.0 / (n + 1)
    grid = np.arange(1, n + 1) * h
    exact, xp = placed(grid * (1 - grid) / 2, backend, dtype, device)
    h2 = h * h

    def g(u):
        pad = xp.zeros(u.shape[:-1] + (1,), dtype=u.dtype, device=array_api_compat.device(u))
        left = xp.concat([pad, u[..., :-1]], axis=-1)
        right = xp.concat([u[..., 1:], pad], axis=-1)
        return (left + right + h2) * 0.5

    return Problem(f"1-D Poisson, Jacobi sweep (n={n})", g, xp.zeros_like(exact), exact, xp, dict(n=n))
