"""Chandrasekhar's H-equation in Kelley's form, discretised by Gauss–Legendre or composite midpoint quadrature."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ..backend import Array, namespace_of
from ..checks import check_choice, check_int, check_real
from .base import Problem, placed


def _newton(kmat: np.ndarray, tol: float = 1e-15, max_steps: int = 200) -> np.ndarray:
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


RULES = ("gauss-legendre", "midpoint")


def _quadrature(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the n-point rule on [0, 1]."""
    if rule == "midpoint":
        return (np.arange(1, n + 1) - 0.5) / n, np.full(n, 1.0 / n)
    t, w = np.polynomial.legendre.leggauss(n)
    return (t + 1) / 2, w / 2


def chandrasekhar(n: int = 100, c: float = 0.9, *, rule: str = "gauss-legendre", backend: Any = "numpy",
                  dtype: Any = None, device: Any = None) -> Problem:
    """Chandrasekhar's H-equation, H(μ) = 1 / (1 − (c/2) ∫₀¹ μ H(ν) / (μ + ν) dν), μ ∈ [0, 1].

    Kelley's form of the equation (C. T. Kelley, *Iterative Methods for Linear and
    Nonlinear Equations*, SIAM 1995; Toth & Kelley 2015), discretised by an n-point
    quadrature rule on [0, 1] with nodes μ_i and weights w_i, Gauss–Legendre or
    Kelley's composite midpoint rule (μ_i = (i − 1/2)/n, w_i = 1/n, the form of
    Kelley's book and of Toth & Kelley 2015, section 5):

        g(H)_i = 1 / (1 − Σ_j K_ij H_j),   K_ij = (c/2) w_j μ_i / (μ_i + μ_j).

    The albedo c ∈ (0, 1]; forward iteration slows as c → 1, where the Jacobian at
    the solution becomes singular.  Cost of g: O(n²).

    Parameters
    ----------
    n : int, default 100
        Quadrature nodes, >= 1.
    c : float, default 0.9
        Albedo, 0 < c <= 1.
    rule : {"gauss-legendre", "midpoint"}, default "gauss-legendre"
        Quadrature rule.
    backend : str or module, default "numpy"
    dtype, device : optional
        As for :func:`fixedpoint.problems.linear_contraction`.

    Two roots.  For c < 1 the discrete equation has two positive solutions; the
    physical one (the limit of forward iteration from H = 1, and Newton's from
    there) has the zeroth moment (c/2) Σ w_i H_i = 1 − √(1 − c), the other
    1 + √(1 − c) (exactly, for the discrete solutions of either rule: summing the
    equation gives (c/4) a² − a + 1 = 0 for a = Σ w_i H_i).  Near c = 1 the two are
    close and an extrapolating solver can land on the non-physical one: from H = 1 at
    tol 1e-10, Anderson extrapolating from the second iterate on (``delay=0``, the
    default before issue 22; m = 5, β = 1) reaches the non-physical root in 6 of the
    8 cases c ∈ {0.999, 0.9999}, n ∈ {100, 1000}, both rules (midpoint c = 0.9999;
    Gauss–Legendre c = 0.999 and 0.9999; at n = 100, c = 0.9999 Gauss–Legendre,
    H(1) = 2.959 instead of 2.858).  The default Anderson (two plain steps first,
    :class:`fixedpoint.Anderson`'s ``delay``), ``delay=3``, β = 0.5, Broyden and
    forward iteration find the physical root (benchmarks/h_equation_study.py).  ``params["root"](h)``
    says which one a solution is (:func:`h_equation_root`).

    Returns
    -------
    Problem
        ``x0`` is ones (Kelley's initial iterate); ``solution`` is the physical
        discrete solution by Newton's method in float64; ``params["nodes"]``,
        ``params["weights"]`` hold μ_i, w_i (NumPy), ``params["evaluate"]`` is
        :func:`~fixedpoint.problems.h_function` and ``params["root"]`` is
        :func:`~fixedpoint.problems.h_equation_root`, both bound to this discretisation.

    Raises
    ------
    ValueError
        If ``n`` < 1, ``c`` is outside (0, 1] or ``rule`` is not one of the two.
    """
    n = check_int("n", n, 1)
    c = check_real("c", c, 0.0, 1.0, low_open=True)
    rule = check_choice("rule", rule, RULES)
    mu, w = _quadrature(rule, n)
    kmat = 0.5 * c * w[None, :] * mu[:, None] / (mu[:, None] + mu[None, :])
    kt, xp = placed(kmat.T, backend, dtype, device)
    exact = _newton(kmat)

    def g(h: Array) -> Array:
        return 1.0 / (1.0 - h @ kt)

    def evaluate(h: Array, points: Any) -> Array:
        return h_function(h, points, nodes=mu, weights=w, c=c)

    def root(h: Array) -> str:
        return h_equation_root(h, weights=w, c=c)

    x0 = xp.ones_like(placed(mu, backend, kt.dtype, device)[0])
    label = "" if rule == "gauss-legendre" else f", {rule}"
    return Problem(f"Chandrasekhar H-equation (n={n}, c={c:g}{label})", g, x0,
                   placed(exact, backend, kt.dtype, device)[0], xp,
                   dict(n=n, c=c, rule=rule, nodes=mu, weights=w, evaluate=evaluate, root=root))


def h_equation_root(h: Array, *, weights: np.ndarray, c: float) -> str:
    """Tell which solution of the discrete H-equation ``h`` is, by the moment test.

    The discrete solutions have (c/2) Σ_i w_i H_i = 1 ∓ √(1 − c): "physical" for the
    minus sign (the solution of radiative transfer), "non-physical" for the plus
    sign (see :func:`chandrasekhar`).  ``h`` is assigned to the nearer of the two.

    Parameters
    ----------
    h : array, shape (n,)
        Values at the quadrature nodes (any library).
    weights : ndarray, shape (n,)
        Quadrature weights on [0, 1].
    c : float
        Albedo.

    Returns
    -------
    str
        "physical" or "non-physical" ("physical" at c = 1, where the two coincide).
    """
    from ..interop import to_numpy

    moment = 0.5 * c * float(np.dot(weights, np.asarray(to_numpy(h), dtype=np.float64)))
    gap = np.sqrt(max(1.0 - c, 0.0))
    return "physical" if abs(moment - (1 - gap)) <= abs(moment - (1 + gap)) else "non-physical"


def h_function(h: Array, points: Any, *, nodes: np.ndarray, weights: np.ndarray, c: float) -> Array:
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
