"""A DEQ-like layer z ↦ tanh(W z + U x + b), batched."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Array
from ..checks import check_int, check_real
from .base import Problem, placed


def tanh_layer(d: int = 64, batch: int = 8, p: int | None = None, rho: float = 0.9, *, seed: int = 0,
               backend: Any = "numpy", dtype: Any = None, device: Any = None) -> Problem:
    """Build the implicit layer of a small DEQ: g(z) = tanh(z Wᵀ + x Uᵀ + b) for a batch of inputs x.

    W has spectral norm ``rho`` < 1 (a scaled Gaussian matrix), so g is a
    contraction (tanh is 1-Lipschitz) with a unique fixed point per sample.
    There is no closed form; check solutions with a root finder.

    Parameters
    ----------
    d : int, default 64
        Width of the hidden state z.
    batch : int, default 8
        Number of inputs x (rows of z).
    p : int, optional
        Input width (default ``d``).
    rho : float, default 0.9
        Spectral norm of W, in [0, 1).
    seed : int, default 0
    backend, dtype, device : optional
        As for :func:`fixedpoint.problems.linear_contraction`.

    Returns
    -------
    Problem
        ``g`` maps z of shape (batch, d); ``x0`` is zeros of that shape;
        ``solution`` is None; ``params`` holds W, U, b, x as NumPy float64 arrays.
    """
    d = check_int("d", d, 1)
    batch = check_int("batch", batch, 1)
    p = d if p is None else check_int("p", p, 1)
    rho = check_real("rho", rho, 0.0, 1.0, high_open=True)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, d))
    w *= rho / np.linalg.norm(w, 2)
    u = rng.standard_normal((d, p)) / np.sqrt(p)
    b = 0.1 * rng.standard_normal(d)
    x = rng.standard_normal((batch, p))
    wt, xp = placed(w.T, backend, dtype, device)
    injection, _ = placed(x @ u.T + b, backend, wt.dtype, device)

    def g(z: Array) -> Array:
        gz: Array = xp.tanh(z @ wt + injection)
        return gz

    return Problem(f"tanh layer (d={d}, batch={batch}, rho={rho:g})", g, xp.zeros_like(injection), None, xp,
                   dict(W=w, U=u, b=b, x=x, rho=rho, seed=seed))
