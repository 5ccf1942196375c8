"""A linear contraction x ↦ A x + b with a chosen spectral radius."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Array
from ..checks import check_int, check_real
from .base import Problem, placed


def linear_contraction(n: int = 100, rho: float = 0.9, *, seed: int = 0, backend: Any = "numpy", dtype: Any = None,
                       device: Any = None) -> Problem:
    """Affine map g(x) = A x + b with A symmetric and spectral radius exactly ``rho``.

    A = Q diag(λ) Qᵀ with Q a random orthogonal matrix and eigenvalues λ evenly
    spaced in [−ρ, ρ]; b is standard normal.  Forward iteration converges at rate ρ;
    the fixed point is x* = (I − A)⁻¹ b, computed by a direct solve in float64.
    Cost of g: O(n²).

    Parameters
    ----------
    n : int, default 100
        Dimension, >= 1.
    rho : float, default 0.9
        Spectral radius ρ in [0, 1).
    seed : int, default 0
        Seed of NumPy's random generator.
    backend : str or module, default "numpy"
    dtype, device : optional
        Dtype (default: the library's default float) and device of the arrays.

    Returns
    -------
    Problem
        ``g`` accepts x of shape (n,) or (B, n); ``x0`` is zeros; ``solution`` is x*;
        ``params["A"]``, ``params["b"]`` are A and b (NumPy float64).
    """
    n = check_int("n", n, 1)
    rho = check_real("rho", rho, 0.0, 1.0, high_open=True)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.linspace(-rho, rho, n) if n > 1 else np.array([rho])
    a = (q * eig) @ q.T
    b = rng.standard_normal(n)
    exact = np.linalg.solve(np.eye(n) - a, b)
    at, xp = placed(a.T, backend, dtype, device)
    bb, _ = placed(b, backend, at.dtype, device)

    def g(x: Array) -> Array:
        return x @ at + bb

    solution = placed(exact, backend, at.dtype, device)[0]
    return Problem(f"linear contraction (n={n}, rho={rho:g})", g, xp.zeros_like(bb), solution,
                   xp, dict(n=n, rho=rho, seed=seed, A=a, b=b))
