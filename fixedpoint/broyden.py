"""Limited-memory "good" Broyden method on the residual F(x) = g(x) − x.

Broyden's method (C. G. Broyden, Math. Comp. 19, 1965) is a quasi-Newton method for
F(x) = 0: it keeps an approximation H_k of the inverse Jacobian of F and steps

    x_{k+1} = x_k + p_k,        p_k = −H_k F(x_k).

After each step the "good" update makes H satisfy the secant condition
H_{k+1} ΔF = Δx (Δx = x_{k+1} − x_k, ΔF = F(x_{k+1}) − F(x_k)) with the
Sherman–Morrison form of Broyden's rank-one update of the Jacobian:

    H_{k+1} = H_k + (Δx − H_k ΔF) Δxᵀ H_k / (Δxᵀ H_k ΔF).

Starting from H_0 = −β I (so that the first step is the mixing step x + β F,
forward iteration for β = 1), H_k = −β I + Σ_i u_i v_iᵀ is stored as the pairs
u_i = (Δx − H ΔF)/(Δxᵀ H ΔF), v_i = H_kᵀ Δx — the representation used for deep
equilibrium models by Bai, Kolter & Koltun (NeurIPS 2019).  Unlike their code, at
most m pairs are kept (a ring buffer; the oldest pair is dropped), so memory does
not grow with the iteration count.

With h = H_k F_{k+1} (one product with the pairs), the identities
H_k ΔF = h + p_k and u_new = −h / (p_kᵀ (h + p_k)) give the new pair and the next
step p_{k+1} = −h (1 − v_newᵀ F_{k+1} / p_kᵀ(h + p_k)) (+ u_old v_oldᵀ F_{k+1}
when the dropped pair is removed) from two products with the pairs per iteration:
O(m·n) work, no allocation of size n.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checks import check_int, check_real
from .kernels import Kernels
from .method import Method, MethodState

__all__ = ["Broyden"]


@dataclasses.dataclass(frozen=True)
class Broyden(Method):
    """Limited-memory "good" Broyden on F(x) = g(x) − x: the method object for :func:`fixedpoint.solve`.

    A quasi-Newton method (module docstring): the inverse Jacobian of F is
    approximated by −β I plus at most ``m`` rank-one updates, each step is
    x_{k+1} = x_k − H_k F(x_k) (no line search), and each iteration updates H with
    the secant pair of the last step.  Superlinear local convergence for smooth
    maps with unlimited memory (Broyden, Dennis & Moré 1973); with a window of m
    pairs the oldest pair is dropped.

    Parameters
    ----------
    m : int, default 20
        Number of update pairs kept (memory: 2(m + 1) vectors of size n per sample), >= 1.
    beta : float, default 1.0
        Initial inverse Jacobian −β I, i.e. the first step (and the first after a
        restart) is the mixing step x + β f; in (0, 1].
    degenerate_tol : float, default 1e-10
        Restart a sample's memory (its step becomes the mixing step) when the update's
        denominator is tiny: abs(Δxᵀ H ΔF) <= ``degenerate_tol`` · ‖Δx‖ ‖H ΔF‖ (the updated
        H would be singular), or not finite; in [0, 1).
    restart_growth : float, default 10
        Restart a sample whose residual norm ‖f_k‖₂ exceeds this factor times its
        smallest residual norm since the last restart (the quasi-Newton model has
        gone wrong); > 1.  Without a line search a limited-memory Broyden step can
        overshoot again and again: with 1e4 (Anderson's default) it diverged on the
        linear contraction (n = 1000, ρ = 0.95) and the Poisson–Jacobi sweep, with 10
        it converged on the first in 95 iterations (benchmarks/bench_solvers.py)
        without costing a single iteration on the H-equation or the tanh layer.

    Raises
    ------
    TypeError, ValueError
        At construction, for an option of the wrong type or out of range (the message names it).

    Notes
    -----
    Work per iteration besides g: two products with the stored pairs (4·m inner
    products and combinations of size n) and O(n) vector operations; the per-sample
    scalars are computed in float64 (float32 on a device without float64).  Batch
    mode keeps separate pairs, restarts and steps for each sample.

    References
    ----------
    C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations",
    Math. Comp. 19 (1965).  S. Bai, J. Z. Kolter & V. Koltun, "Deep Equilibrium Models",
    NeurIPS 2019.  C. T. Kelley, *Iterative Methods for Linear and Nonlinear Equations*,
    SIAM (1995), ch. 7.

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.solve(np.cos, np.zeros(2), method=fixedpoint.Broyden(), tol=1e-12)
    >>> res.method, round(float(res.x[0]), 9)
    ('broyden', 0.739085133)
    """

    name = "broyden"

    m: int = 20
    beta: float = 1.0
    degenerate_tol: float = 1e-10
    restart_growth: float = 10.0

    def __post_init__(self) -> None:
        self._set(
            m=check_int("m", self.m, 1),
            beta=check_real("beta", self.beta, 0.0, 1.0, low_open=True),
            degenerate_tol=check_real("degenerate_tol", self.degenerate_tol, 0.0, 1.0, high_open=True),
            restart_growth=check_real("restart_growth", self.restart_growth, 1.0, None, low_open=True,
                                      allow_inf=True),
        )

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> MethodState:
        """The state of one solve: the pairs, the last step and two scratch vectors per sample."""
        return _BroydenState(kern, B, n, dtype, self)


class _BroydenState(MethodState):
    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, method: Broyden) -> None:
        self.kern, self.n, self.dtype = kern, n, dtype
        self.m, self.beta = m, _ = method.m, method.beta
        self.degenerate_tol, self.restart_growth = method.degenerate_tol, method.restart_growth
        xp, dev, sxp, sdev, sdt = kern.xp, kern.device, kern.sxp, kern.sdevice, kern.sdtype
        # Stacks U: f_k in row 0 and the u_i in rows 1..m; V: the last step p in row 0 and the v_i in rows 1..m,
        # so that h = -beta f + sum c_i u_i and v_new = -beta p + sum d_i v_i are one product each over the
        # rows in use (rows are filled in order, so those are always the first ones; nothing is read unwritten).
        # Buffers for B samples; after pack() the state works on views of their first rows.
        self.U = xp.empty((m + 1, B, n), dtype=dtype, device=dev)
        self.V = xp.empty((m + 1, B, n), dtype=dtype, device=dev)
        # pack() keeps the stacks contiguous at the start of these flat views
        self._U_flat, self._V_flat = xp.reshape(self.U, (-1,)), xp.reshape(self.V, (-1,))
        self._h = xp.empty((B, n), dtype=dtype, device=dev)
        self._v_new = xp.empty((B, n), dtype=dtype, device=dev)
        self._rows = [xp.zeros((B, m), dtype=dtype, device=dev) for _ in range(3)]  # products c, d, e
        self._w = xp.zeros((B, m + 1), dtype=dtype, device=dev)
        self._w[:, 0] = -self.beta
        self.UG = sxp.zeros((B, m, m), dtype=sdt, device=sdev)  # the Gram matrix of the u_i, kept up to date
        self.valid = sxp.zeros((B, m), dtype=sxp.bool, device=sdev)
        self.ref_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        slots = sxp.arange(m, device=sdev)
        self.onehot_b = [slots == s for s in range(m)]
        self.k = 0  # iterations observed
        self.n_updates = 0  # pairs written (the next one goes to slot n_updates % m)
        #: A denominator below this times |p·h| + ‖p‖² is rounding noise (64 ulps of the vectors' dtype).
        self.cancel = 64.0 * float(xp.finfo(dtype).eps)
        self._bind(B)

    def _bind(self, B: int) -> None:
        """Work on ``B`` samples: the stacks U and V hold them; views of the first ``B`` rows of the rest."""
        self.B, m = B, self.m
        self.f, self.p = self.U[0, ...], self.V[0, ...]
        self.u_slots = [self.U[1 + s, ...] for s in range(m)]
        self.v_slots = [self.V[1 + s, ...] for s in range(m)]
        self.h, self.v_new, self.w = self._h[:B, ...], self._v_new[:B, ...], self._w[:B, ...]
        self.rows = [r[:B, ...] for r in self._rows]

    def pack(self, keep: Any) -> bool:
        """Keep the samples ``keep`` only, moved to the front in place (the update pairs, the last step, the
        Gram matrix of the u_i and the restart bookkeeping); see :meth:`fixedpoint.method.MethodState.pack`."""
        self.U = self.kern.pack_stack(self._U_flat, tuple(self.U.shape), keep)
        self.V = self.kern.pack_stack(self._V_flat, tuple(self.V.shape), keep)
        rows, sxp = self.kern.small_index(keep), self.kern.sxp
        self.UG, self.valid = sxp.take(self.UG, rows, axis=0), sxp.take(self.valid, rows, axis=0)
        self.ref_r = sxp.take(self.ref_r, rows, axis=0)  # (observe() computes the rest of the per-sample values anew)
        self._bind(len(keep))
        return True

    def observe(self, x: Any, gx: Any, f: Any, need_gnorm: bool = False) -> Any:
        """Every sum the iteration needs, in one reduction: c = Vᵀf, d = Uᵀp, e = Uᵀf, p·f, ‖p‖², ‖f‖² (‖g‖²)."""
        kern, sxp, used = self.kern, self.kern.sxp, min(self.n_updates, self.m)
        terms: list[tuple] = [("sqnorm", f)]
        if self.k > 0:
            terms += [("dot", self.p, f), ("sqnorm", self.p)]
            if used:
                terms += [("matvec", self.V[1:1 + used, ...], f, self.rows[0][:, :used]),
                          ("matvec", self.U[1:1 + used, ...], self.p, self.rows[1][:, :used]),
                          ("matvec", self.U[1:1 + used, ...], f, self.rows[2][:, :used])]
        if need_gnorm:
            terms.append(("sqnorm", gx))
        sums = kern.sums(*terms)
        self.ff = sums[0]
        self.r = kern.root(self.ff, ("sqnorm", f))
        if self.k > 0:
            self.pf, self.pp = sums[1], sums[2]
            zero = sxp.zeros((self.B, 0), dtype=kern.sdtype, device=kern.sdevice)
            valid = self.valid[:, :used]
            self.c, self.d, self.e = ((sxp.where(valid, v, 0.0) for v in sums[3:6]) if used else (zero, zero, zero))
        self.k += 1
        if need_gnorm:
            return self.r, kern.root(sums[-1], ("sqnorm", gx))
        return self.r

    def _combine(self, out, coef, basis, used):
        """out = −β · basis[0] + Σ_i coef_i basis[1 + i] over the ``used`` pairs (one product)."""
        self.w[:, 1:1 + used] = self.kern.big(coef, self.dtype)
        self.kern.vecmat(out, self.w[:, :1 + used], basis[:1 + used, ...])

    def step(self, x: Any, gx: Any, f: Any, active: Any, out: Any) -> Any:
        kern, sxp, beta = self.kern, self.kern.sxp, self.beta
        if self.k == 1:  # no step taken yet: the mixing step from H_0 = -beta I
            self.ref_r = self.r
            kern.scale(self.p, f, beta)
            kern.add_scaled(out, x, 1.0, self.p)
            return None
        s, used, full = self.n_updates % self.m, min(self.n_updates, self.m), self.n_updates >= self.m
        c, d, e, UG = self.c, self.d, self.e, self.UG[:, :used, :used]
        UGc = sxp.sum(UG * c[:, None, :], axis=2)                              # (UG c)_i = Σ_j u_i·u_j c_j
        hp = -beta * self.pf + sxp.sum(c * d, axis=1)                         # p·h, h = H f_k
        hh = beta * beta * self.ff - 2.0 * beta * sxp.sum(c * e, axis=1) + sxp.sum(c * UGc, axis=1)
        denom = hp + self.pp                                                  # p^T H (f_k - f_{k-1})
        norm_a = sxp.sqrt(sxp.maximum(hh + 2.0 * hp + self.pp, 0.0))         # ‖H (f_k - f_{k-1})‖
        growth = self.r > self.restart_growth * self.ref_r
        # degenerate: a tiny denominator relative to ‖p‖ ‖H Δf‖, or one lost to cancellation in p·h + ‖p‖²
        ok = ((sxp.abs(denom) > self.degenerate_tol * sxp.sqrt(self.pp) * norm_a)
              & (sxp.abs(denom) > self.cancel * (sxp.abs(hp) + self.pp)) & ~growth)  # False for NaN
        restart = active & ~ok
        safe = sxp.where(ok, denom, 1.0)
        self._combine(self.h, c, self.U, used)                                # h = H f_k
        self._combine(self.v_new, d, self.V, used)                            # v_new = H^T p
        # p_{k+1} = -h (1 - v_new.f / denom) + u_old (v_old.f) for a sample that updates (v_new.f = p.h);
        # beta f after a restart
        kern.scale(out, self.h, sxp.where(ok, hp / safe - 1.0, 0.0))
        if full:  # the pair in slot s is dropped: remove it from the step
            kern.add_scaled(self.p, out, sxp.where(ok, c[:, s], 0.0), self.u_slots[s])
        else:
            kern.copy(self.p, out)
        kern.copy_rows_where(self.p, f, ~ok)
        if beta != 1.0:
            kern.scale(out, self.p, sxp.where(ok, 1.0, beta))
            kern.copy_rows_where(self.p, out, ~ok)
        kern.add_scaled(out, x, 1.0, self.p)
        # the new pair (u_new = -h / denom, v_new) in slot s, and its row of the Gram matrix of the u_i
        kern.scale(self.u_slots[s], self.h, sxp.where(ok, -1.0 / safe, 0.0))
        kern.copy(self.v_slots[s], self.v_new)
        hu = -beta * e + UGc                                                  # h·u_i for the pairs in use
        new_row = sxp.zeros((self.B, self.m), dtype=kern.sdtype, device=kern.sdevice)
        new_row[:, :used] = -hu / safe[:, None]
        new_row[:, s] = hh / (safe * safe)
        self.UG[:, s, :] = new_row
        self.UG[:, :, s] = new_row
        self.valid = sxp.where(ok[:, None], self.valid | self.onehot_b[s], False)  # a restart forgets every pair
        self.ref_r = sxp.where(ok, sxp.minimum(self.ref_r, self.r), self.r)
        self.n_updates += 1
        return restart
