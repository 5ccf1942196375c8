"""Type-II Anderson acceleration (Walker & Ni 2011) in the Gram formulation.

With iterates x_j, map values g_j = g(x_j) and residuals f_j = g_j − x_j for the
last m_k ≤ m iterations, Type-II AA takes the weights α solving

    min ‖Σ_j α_j f_j‖₂   subject to   Σ_j α_j = 1,

and steps to x_{k+1} = Σ_j α_j [g_j − (1 − β) f_j] = (1 − β) Σ α_j x_j + β Σ α_j g_j.
The weights come from the (m+1)×(m+1) bordered system of the normal equations

    [ 0   1ᵀ      ] [ ν ]   [ 1 ]
    [ 1   H + λ'I ] [ α ] = [ 0 ],       H_ij = ⟨f_i, f_j⟩,

(the form used in the Deep Implicit Layers tutorial, Kolter, Duvenaud & Johnson,
and by Al Dajani & Keyes, arXiv 2410.19460).  H is kept across iterations: each
iteration adds one row, ⟨F, f_k⟩, in one matrix-vector product over the ring
buffer, so AA's own work per iteration is O(m·n): that product, the combination
Σ α_j g_j (over 2m stored vectors when β < 1), and O(n) copies; the small
solve is in float64 (float32 on a device without float64).
"""

from __future__ import annotations

from .checks import check_choice, check_int, check_real
from .iteration import COMMON_DEFAULTS, Stepper, run

__all__ = ["anderson", "AndersonHistory", "ANDERSON_DEFAULTS"]

#: Options of :func:`anderson` beyond :data:`fixedpoint.iteration.COMMON_DEFAULTS`.
ANDERSON_DEFAULTS = dict(m=5, beta=1.0, lam=1e-5, lam_mode="relative", delay=0, restart_growth=1e4,
                         restart_weight=1e6)


def check_anderson_options(m, beta, lam, lam_mode, delay, restart_growth, restart_weight):
    """Validate Anderson's own options; returns them normalised (ints and floats)."""
    return dict(
        m=check_int("m", m, 1),
        beta=check_real("beta", beta, 0.0, 1.0, low_open=True),
        lam=check_real("lam", lam, 0.0, None),
        lam_mode=check_choice("lam_mode", lam_mode, ("relative", "absolute")),
        delay=check_int("delay", delay, 0),
        restart_growth=check_real("restart_growth", restart_growth, 1.0, None, low_open=True),
        restart_weight=check_real("restart_weight", restart_weight, 1.0, None, low_open=True),
    )


class AndersonHistory(Stepper):
    """Ring buffers and Gram matrix of Type-II Anderson acceleration for a batch of B vectors of size n.

    Preallocates ``(B, 2m, n)`` values (the last m map values g_j and residuals f_j),
    the ``(B, m, m)`` Gram matrix in ``fdtype`` and O(B·m) bookkeeping; nothing of
    size n is allocated afterwards on NumPy, CuPy or PyTorch.  Used by the
    :func:`anderson` loop; usable by any other loop that produces (g_k, f_k) pairs.

    Parameters
    ----------
    xp : namespace
        Array API namespace.
    kern : fixedpoint.backend.Kernels
        In-place kernels for ``xp``.
    B, n : int
        Batch size and vector length.
    dtype, device
        Dtype and device of the vectors.
    fdtype
        Dtype of the Gram matrix and the small solve (float64 where available).
    m, beta, lam, lam_mode, delay, restart_growth, restart_weight
        As in :func:`anderson`.
    """

    def __init__(self, xp, kern, B, n, dtype, device, fdtype, *, m, beta, lam, lam_mode, delay,
                 restart_growth, restart_weight):
        self.xp, self.kern, self.m, self.fdtype = xp, kern, m, fdtype
        self.beta, self.lam, self.relative, self.delay = beta, lam, lam_mode == "relative", delay
        self.restart_growth, self.restart_weight = restart_growth, restart_weight
        self.R = xp.zeros((B, 2 * m, n), dtype=dtype, device=device)  # [:, :m] g_j, [:, m:] f_j
        self.G = xp.zeros((B, m, m), dtype=fdtype, device=device)
        self.row = xp.zeros((B, m), dtype=dtype, device=device)
        self.w = xp.zeros((B, 2 * m), dtype=dtype, device=device)
        self.valid = xp.zeros((B, m), dtype=xp.bool, device=device)
        self.ref_r = xp.full((B,), float("inf"), dtype=fdtype, device=device)
        self.r = xp.zeros((B,), dtype=fdtype, device=device)
        self.n_restarts = xp.zeros((B,), dtype=xp.int64, device=device)
        slots = xp.arange(m, device=device)
        self.onehot_b = [slots == s for s in range(m)]
        self.onehot = [xp.astype(h, fdtype) for h in self.onehot_b]
        self.eye = xp.eye(m, dtype=fdtype, device=device)
        self.A = xp.zeros((B, m + 1, m + 1), dtype=fdtype, device=device)  # the bordered system
        rhs = xp.zeros((B, m + 1), dtype=fdtype, device=device)
        rhs[:, 0] = 1.0
        self.rhs = rhs

    def residual_buffer(self, k):
        """The ring slot where f_k = g(x_k) − x_k is to be written, shape (B, n)."""
        return self.R[:, self.m + k % self.m, :]

    def observe(self, k, gx):
        """Store g_k and add the Gram row ⟨f_j, f_k⟩; return ‖f_k‖ per sample, shape (B,), dtype ``fdtype``."""
        xp, s = self.xp, k % self.m
        self.kern.copy(self.R[:, s, :], gx)
        self.kern.matvec(self.row, self.R[:, self.m:, :], self.R[:, self.m + s, :])
        row = xp.astype(self.row, self.fdtype)
        self.G[:, s, :] = row
        self.G[:, :, s] = row
        self.valid[:, s] = True
        self.r = xp.sqrt(row[:, s])
        return self.r

    def weights(self, k, active):
        """Mixing weights α, shape (B, m), with the restart safeguards applied.

        Solves the bordered system of the module docstring with H normalised by its
        largest valid diagonal entry (so "relative" λ is added to a unit-scale
        diagonal).  Slots outside a sample's current history get a decoupled unit
        row and column, hence α_j = 0 exactly.  A sample restarts (history cleared
        to the current iterate, plain step α = e_k) when a weight is non-finite or
        exceeds ``restart_weight`` in magnitude, or when ‖f_k‖ exceeds
        ``restart_growth`` times its smallest residual norm since the last restart.
        """
        xp, s, v = self.xp, k % self.m, self.valid
        vf = xp.astype(v, self.fdtype)
        scale = xp.max(xp.where(v, xp.linalg.diagonal(self.G), 0.0), axis=1)
        scale = xp.where(scale > 0.0, scale, 1.0)
        reg = self.lam if self.relative else self.lam / scale[:, None]
        H = xp.where(v[:, :, None] & v[:, None, :], self.G, 0.0) / scale[:, None, None]
        A = self.A
        A[:, 1:, 1:] = H + self.eye * (1.0 - vf * (1.0 - reg))[:, None, :]
        A[:, 0, 1:] = vf
        A[:, 1:, 0] = vf
        alpha = self.kern.solve(A, self.rhs)[:, 1:]
        ok = (xp.max(xp.abs(alpha), axis=1) <= self.restart_weight) & (self.r <= self.restart_growth * self.ref_r)
        restart = active & ~ok  # NaN weights fail the comparison, hence restart
        self.valid = xp.where(restart[:, None], self.onehot_b[s], v)
        self.ref_r = xp.where(restart, self.r, xp.minimum(self.ref_r, self.r))
        self.n_restarts = self.n_restarts + xp.astype(restart, xp.int64)
        if k < self.delay:
            return xp.broadcast_to(self.onehot[s], alpha.shape)
        return xp.where(restart[:, None], self.onehot[s], alpha)

    def combine(self, alpha, out):
        """x_{k+1} = Σ_j α_j [g_j − (1 − β) f_j] into ``out`` (shape (B, n))."""
        a = self.xp.astype(alpha, self.R.dtype)
        if self.beta == 1.0:
            self.kern.vecmat(out, a, self.R[:, : self.m, :])
        else:
            self.w[:, : self.m] = a
            self.w[:, self.m:] = (self.beta - 1.0) * a
            self.kern.vecmat(out, self.w, self.R)

    def step(self, k, x, gx, active, out):
        self.combine(self.weights(k, active), out)


def anderson(g, x0, *, m=5, beta=1.0, lam=1e-5, lam_mode="relative", delay=0, restart_growth=1e4,
             restart_weight=1e6, tol=1e-5, max_iter=1000, stop_mode="rel", batch=False, check_every=None,
             callback=None, backend=None):
    """Solve x = g(x) by Type-II Anderson acceleration (Walker & Ni 2011).

    Each iteration evaluates g once and steps to the β-mixed combination of the
    last m map values whose residuals' combination is smallest (module docstring;
    docs/algorithm.md).  Defaults m = 5, β = 1.0, λ = 1e-5 and max_iter = 1000 are
    those of Al Dajani & Keyes, arXiv 2410.19460.

    Parameters
    ----------
    g : callable
        The fixed-point map, ``g(x) -> array`` of the same library, shape, dtype
        and device as ``x`` (which has ``x0``'s shape).  In batch mode it maps the
        whole batch at once, each sample independently.
    x0 : array
        Initial guess, any shape, a NumPy/CuPy/PyTorch/array-api-strict array.
        Integer and boolean inputs are promoted to the library's default float
        dtype (:func:`fixedpoint.backend.working_dtype`).
    m : int, default 5
        Window (memory): the number of past residuals combined, >= 1 (Walker &
        Ni's m counts differences, i.e. their m is this m − 1); ``m=1`` is forward
        iteration damped by β.
    beta : float, default 1.0
        Mixing β in (0, 1].
    lam : float, default 1e-5
        Regularisation λ >= 0 added to the diagonal of the Gram matrix H.
    lam_mode : {"relative", "absolute"}, default "relative"
        "relative": the added term is λ·max_j ‖f_j‖², so that the regularisation
        keeps its effect as the residuals shrink (an absolute λ = 1e-5 dominates H
        once ‖f‖² < 1e-5 and stalls high-accuracy solves); "absolute": exactly λ,
        as in arXiv 2410.19460.
    delay : int, default 0
        Number of first iterations that take plain mixing steps
        x_{k+1} = x_k + β f_k before extrapolating (the history is still
        recorded).  The first step is always plain, so ``delay=1`` is the same as 0.
    restart_growth : float, default 1e4
        Restart the history of a sample whose residual norm ‖f_k‖₂ (whatever
        ``stop_mode``) exceeds this factor times its smallest ‖f_j‖₂ since the
        last restart.
    restart_weight : float, default 1e6
        Restart when a mixing weight is non-finite or larger than this in magnitude.
    tol, max_iter, stop_mode, batch, check_every, callback, backend
        As in :func:`fixedpoint.forward_iteration`.

    Returns
    -------
    FixedPointResult
        See :class:`fixedpoint.FixedPointResult`; ``n_restarts`` counts safeguard restarts.

    Raises
    ------
    ValueError, TypeError
        For a bad option (the message names it: m < 1, β outside (0, 1],
        λ < 0, tol <= 0, max_iter < 1, ...), NaN/Inf in ``x0``, or a ``g`` that
        returns another library, shape, dtype or device.  Any exception raised by
        ``g`` or ``callback`` propagates with the partial result attached as
        ``exc.fixedpoint_result``.

    References
    ----------
    D. G. Anderson, J. ACM 12 (1965).  H. F. Walker & P. Ni, SIAM J. Numer. Anal.
    49 (2011).  M. Al Dajani & D. Keyes, arXiv 2410.19460 (2024).
    """
    own = check_anderson_options(m, beta, lam, lam_mode, delay, restart_growth, restart_weight)
    opts = dict(COMMON_DEFAULTS, tol=tol, max_iter=max_iter, stop_mode=stop_mode, batch=batch,
                check_every=check_every, callback=callback, backend=backend, **own)

    def make(xp, kern, B, n, dtype, device, fdtype):
        return AndersonHistory(xp, kern, B, n, dtype, device, fdtype, **own)

    return run("anderson", make, g, x0, opts)
