"""Chandrasekhar's H-equation in Kelley's form, discretised by Gauss–Legendre quadrature."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ..backend import namespace_of
from ..checks import check_int, check_real
from .base import Problem, placed


def _newton(kmat, tol=1e-15, max_steps=200):
    """Discrete H-equation H = 1/(1 − K H) solved by Newton's method in float64 (the independent reference)."""
    n = kmat.shape[0]
    h = np.ones(n)
    for _ in range(max_steps):
        gh = 1.0 / (1.0 - kmat @ h)
        jac = np.eye(n) - (gh**2)[:, None] * kmat
        step = np.linalg.solve(jac, gh - h)
        h = h + step
        if np.max(np.abs(step)) <= tol * np.max(np.abs(h)):
            break
    return h


def chandrasekhar(n: int = 100, c: float = 0.9, *, backend: Any = "numpy", dtype: Any = None,
                  device: Any = None) -> Problem:
    """Chandrasekhar's H-equation, H(μ) = 1 / (1 − (c/2) ∫₀¹ μ H(ν) / (μ + ν) dν), μ ∈ [0, 1].

    Kelley's form of the equation (C. T. Kelley, *Iterative Methods for Linear and
    Nonlinear Equations*, SIAM 1995; Toth & Kelley 2015), discretised by n-point
    Gauss–Legendre quadrature on [0, 1] with nodes μ_i and weights w_i:

        g(H)_i = 1 / (1 − Σ_j K_ij H_j),   K_ij = (c/2) w_j μ_i / (μ_i + μ_j).

    The albedo c ∈ (0, 1]; forward iteration slows as c → 1, where the Jacobian at
    the solution becomes singular.  Cost of g: O(n²).

    Parameters
    ----------
    n : int, default 100
        Quadrature nodes, >= 1.
    c : float, default 0.9
        Albedo, 0 < c <= 1.
    backend : str or module, default "numpy"
    dtype, device : optional
        As for :func:`fixedpoint.problems.linear_contraction`.

    Returns
    -------
    Problem
        ``x0`` is ones (Kelley's initial iterate); ``solution`` is the discrete
        solution by Newton's method in float64; ``params["nodes"]``,
        ``params["weights"]`` hold μ_i, w_i (NumPy), and ``params["evaluate"]`` is
        :func:`~fixedpoint.problems.h_function` bound to this discretisation.
    """
    n = check_int("n", n, 1)
    c = check_real("c", c, 0.0, 1.0, low_open=True)
    t, w = np.polynomial.legendre.leggauss(n)
    mu, w = (t + 1) / 2, w / 2
    kmat = 0.5 * c * w[None, :] * mu[:, None] / (mu[:, None] + mu[None, :])
    kt, xp = placed(kmat.T, backend, dtype, device)
    exact = _newton(kmat)

    def g(h):
        return 1.0 / (1.0 - h @ kt)

    def evaluate(h, points):
        return h_function(h, points, nodes=mu, weights=w, c=c)

    x0 = xp.ones_like(placed(mu, backend, kt.dtype, device)[0])
    return Problem(f"Chandrasekhar H-equation (n={n}, c={c:g})", g, x0,
                   placed(exact, backend, kt.dtype, device)[0], xp,
                   dict(n=n, c=c, nodes=mu, weights=w, evaluate=evaluate))


def h_function(h: Any, points: Any, *, nodes: np.ndarray, weights: np.ndarray, c: float) -> Any:
    """H(μ) at any μ from the values ``h`` at the quadrature nodes (Nyström interpolation).

    H(μ) = 1 / (1 − (c/2) Σ_j w_j μ h_j / (μ + μ_j)): the discretised equation
    itself, evaluated off the nodes; exact at the nodes for the discrete solution.

    Parameters
    ----------
    h : array, shape (n,) or (B, n)
        Values at the nodes (any library).
    points : array_like, shape (p,)
        μ values in [0, 1].
    nodes, weights : ndarray, shape (n,)
        Quadrature nodes and weights on [0, 1].
    c : float
        Albedo.

    Returns
    -------
    array, shape (p,) or (B, p)
        In the library, dtype and device of ``h``.
    """
    xp = namespace_of(h)
    pts = np.asarray(points, dtype=np.float64).reshape(-1)
    kmat = 0.5 * c * weights[None, :] * pts[:, None] / (pts[:, None] + nodes[None, :])
    kt, _ = placed(kmat.T, xp, h.dtype, array_api_compat.device(h))
    return 1.0 / (1.0 - h @ kt)
