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

import array_api_compat

from .backend import namespace_of
from .checks import check_choice, check_int, check_real
from .interop import convert
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

    Preallocates ``(B, 2m, n)`` values (the last m map values g_j and residuals f_j)
    in the vectors' library, and the ``(B, m, m)`` Gram matrix with O(B·m²)
    bookkeeping as small state (:class:`fixedpoint.backend.Kernels`: NumPy for
    host memory, the device otherwise); nothing of size n is allocated afterwards
    on NumPy, CuPy or PyTorch.  Used by the :func:`anderson` loop; usable by any
    other loop that produces (g_k, f_k) pairs, e.g.
    :class:`fixedpoint.torch.AndersonAcceleration`.

    Parameters
    ----------
    kern : fixedpoint.backend.Kernels
        Kernels for the vectors' library and device.
    B, n : int
        Batch size and vector length.
    dtype
        Dtype of the vectors (the Gram matrix and the small solve use ``kern.sdtype``,
        float64 where the device has it).
    m, beta, lam, lam_mode, delay, restart_growth, restart_weight
        As in :func:`anderson`.
    """

    #: Arrays that make up the history's state (:meth:`state_dict`); the rest is scratch or constant.
    STATE = ("R", "G", "valid", "ref_r", "r", "n_restarts")

    def __init__(self, kern, B, n, dtype, *, m, beta, lam, lam_mode, delay, restart_growth, restart_weight):
        self.kern, self.m = kern, m
        self.beta, self.lam, self.relative, self.delay = beta, lam, lam_mode == "relative", delay
        self.restart_growth, self.restart_weight = restart_growth, restart_weight
        xp, dev, sxp, sdev, sdt = kern.xp, kern.device, kern.sxp, kern.sdevice, kern.sdtype
        self.dtype = dtype
        self.R = xp.zeros((B, 2 * m, n), dtype=dtype, device=dev)  # [:, :m] g_j, [:, m:] f_j
        self.row = xp.zeros((B, m), dtype=dtype, device=dev)
        self.w = xp.zeros((B, 2 * m), dtype=dtype, device=dev)
        self.G = sxp.zeros((B, m, m), dtype=sdt, device=sdev)
        self.valid = sxp.zeros((B, m), dtype=sxp.bool, device=sdev)
        self.ref_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        self.r = sxp.zeros((B,), dtype=sdt, device=sdev)
        self.n_restarts = sxp.zeros((B,), dtype=sxp.int64, device=sdev)
        slots = sxp.arange(m, device=sdev)
        self.onehot_b = [slots == s for s in range(m)]
        self.onehot = [sxp.astype(h, sdt) for h in self.onehot_b]
        self.eye = sxp.eye(m, dtype=sdt, device=sdev)
        self.A = sxp.zeros((B, m + 1, m + 1), dtype=sdt, device=sdev)  # the bordered system
        self.rhs = sxp.concat([sxp.ones((B, 1), dtype=sdt, device=sdev), sxp.zeros((B, m), dtype=sdt, device=sdev)], axis=1)

    def residual_buffer(self, k):
        """The ring slot where f_k = g(x_k) − x_k is to be written, shape (B, n)."""
        return self.R[:, self.m + k % self.m, :]

    def observe(self, k, gx):
        """Store g_k and add the Gram row ⟨f_j, f_k⟩; return ‖f_k‖ per sample (small state, shape (B,))."""
        kern, s = self.kern, k % self.m
        kern.copy(self.R[:, s, :], gx)
        kern.matvec(self.row, self.R[:, self.m:, :], self.R[:, self.m + s, :])
        row = kern.sxp.astype(kern.small(self.row), kern.sdtype)
        self.G[:, s, :] = row
        self.G[:, :, s] = row
        self.valid[:, s] = True
        self.r = kern.sxp.sqrt(row[:, s])
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
        xp, s, v = self.kern.sxp, k % self.m, self.valid
        vf = xp.astype(v, self.kern.sdtype)
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
        a = self.kern.big(alpha, self.dtype)
        if self.beta == 1.0:
            self.kern.vecmat(out, a, self.R[:, : self.m, :])
        else:
            self.w[:, : self.m] = a
            self.w[:, self.m:] = (self.beta - 1.0) * a
            self.kern.vecmat(out, self.w, self.R)

    def state_dict(self):
        """Copies of the state arrays (:attr:`STATE`), by name, for checkpointing."""
        return {name: namespace_of(getattr(self, name)).asarray(getattr(self, name), copy=True) for name in self.STATE}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned, in place (values may come from another library or device).

        Raises
        ------
        ValueError
            If a state array is missing or its shape differs from this history's.
        """
        for name in self.STATE:
            mine = getattr(self, name)
            if name not in state:
                raise ValueError(f"Anderson history state lacks {name!r}")
            if tuple(state[name].shape) != tuple(mine.shape):
                raise ValueError(f"Anderson history state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(mine.shape)}")
        for name in self.STATE:
            mine = getattr(self, name)
            mine[...] = convert(state[name], namespace_of(mine), device=array_api_compat.device(mine), dtype=mine.dtype)

    def reset(self):
        """Forget the stored pairs: the next :meth:`weights` uses only pairs observed after this call."""
        self.valid = self.kern.sxp.zeros_like(self.valid)
        self.ref_r = self.kern.sxp.full_like(self.ref_r, float("inf"))

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

    def make(kern, B, n, dtype):
        return AndersonHistory(kern, B, n, dtype, **own)

    return run("anderson", make, g, x0, opts)
