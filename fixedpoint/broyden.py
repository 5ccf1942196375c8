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

Work per iteration.  With f = F(x_k), p = p_{k−1} the step just taken and
U = [u_i], V = [v_i] the pairs in use, every vector the iteration needs comes from
four products with the pairs,

    c = Vᵀf,   e = Uᵀf,   h = H_{k−1} f = −β f + U c,   v_new = H_{k−1}ᵀ p = −β p + V d,

and the identities H_{k−1} ΔF = h + p, u_new = −h / (pᵀ(h + p)) and
v_newᵀf = pᵀh, which give the next step
p_k = −h (1 − pᵀh / pᵀ(h + p)) (+ u_old c_old when the ring buffer drops the
pair (u_old, v_old)).  Everything else is small (per sample, O(m²)):

* d = Uᵀp is derived, not computed: p is a h_prev + b u_old, so
  u_iᵀp = a u_iᵀh_prev + b u_iᵀu_old and u_newᵀp = −(a ‖h_prev‖² + b h_prevᵀu_old) /
  denom, from the Gram matrix UᵀU (kept up to date) and Uᵀh = −β e + UᵀU c of the
  previous iteration (after a restart p = β f and no pair is in use: d = 0);
* pᵀh = −β pᵀf + c·d, ‖h‖² = β²‖f‖² − 2β c·e + cᵀ(UᵀU)c, and the new row of UᵀU
  (−Uᵀh / denom, ‖h‖² / denom²);
* ‖f‖², pᵀf and ‖p‖² (reductions over f and p alone).

So each iteration reads each stored pair twice (U for e and h, V for c and v_new)
— once from memory where the vector work is NumPy's on rows longer than
:data:`fixedpoint.kernels.SHORT_ROWS` (without a communicator): each sample's pairs
are then one contiguous block, and the two products with it are one BLAS call each,
the second finding the block in cache — and writes h, v_new, the new pair and the
step: O(m·n) work over the pairs in use (min(k, m) of them), no allocation of size
n, no host synchronisation.  Elsewhere (PyTorch or CuPy vectors, short
rows, sharded vectors) the pairs are stacks ``(m + 1, B, n)`` and each product is
one batched call over the samples; c and e are then taken in the iteration's one
reduction (one collective when sharded).  Samples that stop leave the working
arrays: per sample, their blocks are only renumbered (the step p alone moves);
stacked, the rows in use move to the front in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .backend import Array
from .checks import check_int, check_real
from .kernels import SHORT_ROWS, Kernels, ReductionTerm
from .method import Method, MethodState, ObservedNorms
from .registry import register_method

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
        Number of update pairs kept (memory: 2m + 4 vectors of size n per sample: the pairs,
        f, the last step and two scratch vectors), >= 1.
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
    Work per iteration besides g (module docstring): four products with the pairs in
    use (Vᵀf, Uᵀf, U c, V d: 4·min(k, m) inner products and combinations of size n,
    each stored vector read twice, once from memory for NumPy on long rows) and O(n)
    vector operations; d = Uᵀp and the Gram matrix UᵀU are derived from small
    quantities, and the per-sample scalars are computed in float64 (float32 on a
    device without float64).  Batch mode keeps separate pairs, restarts and steps for
    each sample, and a sample that stops costs nothing more.

    Dropping the oldest rank-one term u vᵀ leaves an H that no sequence of Broyden
    updates produces (each later v was computed with the dropped term in H), and it
    takes the restarts of ``restart_growth`` = 10 to keep such steps in check.  On
    maps with many slow modes those restarts are what stalls it: on z = tanh(W z + u)
    with W symmetric, ‖W‖₂ = 0.99, float32 (``benchmarks/bench_broyden.py --problems
    hard``), 7 of 10 samples converge within 300 iterations (0 of 10 with
    ``restart_growth=1e3``), against 10 of 10 in 172 on average for Anderson and in
    98 for ``m=300, restart_growth=1e3`` (no pair dropped).

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
        """Validate and normalise the options (``TypeError``/``ValueError`` naming the option)."""
        self._set(
            m=check_int("m", self.m, 1),
            beta=check_real("beta", self.beta, 0.0, 1.0, low_open=True),
            degenerate_tol=check_real("degenerate_tol", self.degenerate_tol, 0.0, 1.0, high_open=True),
            restart_growth=check_real("restart_growth", self.restart_growth, 1.0, None, low_open=True,
                                      allow_inf=True),
        )

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> MethodState:
        """Allocate the state of one solve: the pairs, the last step and two scratch vectors per sample."""
        return _BroydenState(kern, B, n, dtype, self)


class _BroydenState(MethodState):
    """The pairs, the last step and the per-sample bookkeeping of one solve (module docstring: work per iteration).

    Two layouts of the pairs, chosen by the kernels and n alone (never by B, so that a sample's iterates do
    not depend on its batch):

    * *per sample* (NumPy vector work, rows longer than :data:`fixedpoint.kernels.SHORT_ROWS`, no
      communicator): ``U`` and ``V`` are ``(B, m, n)``, each sample's pairs one contiguous block, and every
      product is one BLAS call per sample in which the two products with a block follow each other while
      it is in cache.  A sample keeps its block when others stop: :meth:`pack` renumbers the blocks
      (``blocks``) instead of moving them, and moves the last step p only.
    * *stacked* (other libraries and devices, short rows, sharded vectors): ``U`` and ``V`` are
      ``(m + 1, B, n)`` stacks with f_k in row 0 of U and the last step p in row 0 of V, so that
      h = −β f + Σ c_i u_i and v_new = −β p + Σ d_i v_i are one batched product each over the rows in use
      (rows are filled in order: those are always the first ones, and nothing is read unwritten); the
      products with f_k are taken in the one reduction of :meth:`observe` (one collective when sharded).
    """

    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, method: Broyden) -> None:
        self.kern, self.n, self.dtype = kern, n, dtype
        self.m, self.beta = m, _ = method.m, method.beta
        self.degenerate_tol, self.restart_growth = method.degenerate_tol, method.restart_growth
        xp, dev, sxp, sdev, sdt = kern.xp, kern.device, kern.sxp, kern.sdevice, kern.sdtype
        self.per_sample = kern.mode == "numpy" and kern.comm is None and n > SHORT_ROWS
        self._h: Array = xp.empty((B, n), dtype=dtype, device=dev)
        self._v_new: Array = xp.empty((B, n), dtype=dtype, device=dev)
        if self.per_sample:
            self.U: Array = xp.empty((B, m, n), dtype=dtype, device=dev)
            self.V: Array = xp.empty((B, m, n), dtype=dtype, device=dev)
            self._U_host, self._V_host = kern.numpy_view(self.U), kern.numpy_view(self.V)
            self._f: Array = xp.empty((B, n), dtype=dtype, device=dev)
            self._p: Array = xp.empty((B, n), dtype=dtype, device=dev)
            self.blocks = list(range(B))  # the block of U and V that holds each sample's pairs
            # the raw products Vᵀf and Uᵀf, a row per sample, in the vectors' dtype (masked into c and e)
            self._cr = np.zeros((B, m), dtype=self._U_host.dtype)
            self._er = np.zeros((B, m), dtype=self._U_host.dtype)
        else:
            # Buffers for B samples; after pack() the state works on views of their first rows.
            self.U = xp.empty((m + 1, B, n), dtype=dtype, device=dev)
            self.V = xp.empty((m + 1, B, n), dtype=dtype, device=dev)
            # pack() keeps the stacks contiguous at the start of these flat views
            self._U_flat: Array = xp.reshape(self.U, (-1,))
            self._V_flat: Array = xp.reshape(self.V, (-1,))
            self._rows: list[Array] = [xp.zeros((B, m), dtype=dtype, device=dev) for _ in range(2)]  # products c, e
            self._w: Array = xp.zeros((B, m + 1), dtype=dtype, device=dev)
            self._w[:, 0] = -self.beta
        self.UG = sxp.zeros((B, m, m), dtype=sdt, device=sdev)  # the Gram matrix of the u_i, kept up to date
        self.valid = sxp.zeros((B, m), dtype=sxp.bool, device=sdev)
        self.d = sxp.zeros((B, m), dtype=sdt, device=sdev)  # u_i·p for the step p about to be taken (derived)
        self.ref_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        slots = sxp.arange(m, device=sdev)
        self.onehot_b = [slots == s for s in range(m)]
        self.k = 0  # iterations observed
        self.n_updates = 0  # pairs written (the next one goes to slot n_updates % m)
        #: A denominator below this times |p·h| + ‖p‖² is rounding noise (64 ulps of the vectors' dtype).
        self.cancel = 64.0 * float(xp.finfo(dtype).eps)
        self._bind(B)

    def _bind(self, B: int) -> None:
        """Work on ``B`` samples: views of the first ``B`` rows of the buffers (the stacks' samples when stacked)."""
        self.B, m, view = B, self.m, self.kern.numpy_view
        self.h, self.v_new = self._h[:B, ...], self._v_new[:B, ...]
        if self.per_sample:  # with NumPy views of the vectors for the products
            self.f, self.p = self._f[:B, ...], self._p[:B, ...]
            self._f_host, self._p_host = view(self.f), view(self.p)
            self._h_host, self._v_new_host = view(self.h), view(self.v_new)
        else:
            self.f, self.p = self.U[0, ...], self.V[0, ...]
            self.u_slots = [self.U[1 + s, ...] for s in range(m)]
            self.v_slots = [self.V[1 + s, ...] for s in range(m)]
            self.w = self._w[:B, ...]
            self.rows = [r[:B, ...] for r in self._rows]

    def pack(self, keep: np.ndarray) -> bool:
        """Keep the samples ``keep`` only, in order (see :meth:`fixedpoint.method.MethodState.pack`).

        That is the pairs in use (per sample: renumbered, not moved; stacked: moved to the front in place),
        the last step, the Gram matrix of the u_i, the derived products d and the restart bookkeeping.
        """
        kern, sxp, used = self.kern, self.kern.sxp, min(self.n_updates, self.m)
        k = len(keep)
        if self.per_sample:
            self.blocks = [self.blocks[i] for i in np.asarray(keep).tolist()]
            kern.pack_rows(self.p, keep)
        else:  # rows 0..used of the stacks (the rest is unwritten), contiguous at the start of the flat buffers
            m1, w, n = tuple(self.U.shape)
            for flat in (self._U_flat, self._V_flat):
                kern.pack_stack(flat, (1 + used, w, n), keep)
            self.U = kern.xp.reshape(self._U_flat[: m1 * k * n], (m1, k, n))
            self.V = kern.xp.reshape(self._V_flat[: m1 * k * n], (m1, k, n))
        rows = kern.small_index(keep)
        self.UG, self.valid = sxp.take(self.UG, rows, axis=0), sxp.take(self.valid, rows, axis=0)
        self.d, self.ref_r = sxp.take(self.d, rows, axis=0), sxp.take(self.ref_r, rows, axis=0)
        self._bind(k)  # (observe() computes the rest of the per-sample values anew)
        return True

    def observe(self, x: Array, gx: Array, f: Array | None, need_gnorm: bool = False) -> ObservedNorms:
        """Return ‖f‖ (and ‖g‖) from one reduction; stacked, p·f, ‖p‖², c = Vᵀf and e = Uᵀf are in it.

        Per sample, those are taken in :meth:`step`, each beside the combination that reads the same pairs.
        """
        assert f is not None  # the loop passes the residual_buffer(), which is never None here
        kern, sxp, used = self.kern, self.kern.sxp, min(self.n_updates, self.m)
        terms: list[ReductionTerm] = [("sqnorm", f)]
        stacked = self.k > 0 and not self.per_sample
        if stacked:
            terms += [("dot", self.p, f), ("sqnorm", self.p)]
            if used:
                terms += [("matvec", self.V[1:1 + used, ...], f, self.rows[0][:, :used]),
                          ("matvec", self.U[1:1 + used, ...], f, self.rows[1][:, :used])]
        if need_gnorm:
            terms.append(("sqnorm", gx))
        sums = kern.sums(*terms)
        self.ff = sums[0]
        self.r = r = kern.root(self.ff, ("sqnorm", f))
        if stacked:
            self.pf, self.pp = sums[1], sums[2]
            valid = self.valid[:, :used]
            self.c, self.e = ((sxp.where(valid, v, 0.0) for v in sums[3:5]) if used
                              else (sxp.zeros((self.B, 0), dtype=kern.sdtype, device=kern.sdevice),) * 2)
        self.k += 1
        if need_gnorm:
            return r, kern.root(sums[-1], ("sqnorm", gx))
        return r

    def _combine(self, out: Array, coef: Array, basis: Array, used: int) -> None:
        """Write, stacked, out = −β · basis[0] + Σ_i coef_i basis[1 + i] over the ``used`` pairs (one product)."""
        self.w[:, 1:1 + used] = self.kern.big(coef, self.dtype)
        self.kern.vecmat(out, self.w[:, :1 + used], basis[:1 + used, ...])

    def _products_per_sample(self, used: int) -> None:
        """Compute, per sample, c = Vᵀf and v_new = −β p + V d in one read of V, then e = Uᵀf and h = −β f + U c.

        The second product of each read finds the block in cache; p·f and ‖p‖² are taken beside them.
        Sets ``pf``, ``pp``, ``c``, ``e`` (small state) and fills ``h`` and ``v_new``.
        """
        sxp, sdt, beta, B = self.kern.sxp, self.kern.sdtype, self.beta, self.B
        f, p, cr, er = self._f_host, self._p_host, self._cr, self._er
        pf, pp = np.empty(B, dtype=sdt), np.empty(B, dtype=sdt)
        valid = self.valid[:, :used]
        # v = −β (y − W (coef / β)) = W coef − β y: the combination, then y subtracted (and β applied) in place
        wd = np.asarray(self.d[:, :used] / beta, dtype=cr.dtype)
        self._pass(self._V_host, used, f, cr, wd, p, self._v_new_host, (pf, pp))
        self.pf, self.pp = pf, pp
        self.c = sxp.where(valid, cr[:B, :used], 0.0).astype(sdt)
        wc = np.asarray(self.c / beta, dtype=cr.dtype)
        self._pass(self._U_host, used, f, er, wc, f, self._h_host)
        self.e = sxp.where(valid, er[:B, :used], 0.0).astype(sdt)

    def _pass(self, stack: np.ndarray, used: int, vec: np.ndarray, products: np.ndarray, coef: np.ndarray,
              y: np.ndarray, out: np.ndarray, dots: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Compute ``products[i] = W vec[i]``, then ``out[i] = β (Wᵀ coef[i] − y[i])`` while W is in cache.

        Per sample i, with W = its block of ``stack`` (the ``used`` pairs in use); with ``dots = (pf, pp)``
        also p·f and ‖p‖² (p = ``y``, f = ``vec``).
        """
        beta = self.beta
        for i, blk in enumerate(self.blocks):
            vi, yi, oi = vec[i], y[i], out[i]
            if dots is not None:
                dots[0][i], dots[1][i] = np.dot(yi, vi), np.dot(yi, yi)
            if used:
                block = stack[blk, :used]
                np.dot(block, vi, out=products[i, :used])
                np.matmul(coef[i], block, out=oi)
                np.subtract(oi, yi, out=oi)
            else:
                np.multiply(yi, -1.0, out=oi)
            if beta != 1.0:
                np.multiply(oi, beta, out=oi)

    def step(self, x: Array, gx: Array, f: Array | None, active: Array, out: Array) -> Array | None:
        """Write x_{k+1} = x_k − H_k f_k into ``out`` and update H; return the samples that restarted."""
        assert f is not None  # the loop passes the residual_buffer(), which is never None here
        kern, sxp, beta = self.kern, self.kern.sxp, self.beta
        if self.k == 1:  # no step taken yet: the mixing step from H_0 = -beta I
            self.ref_r = self.r
            kern.scale(self.p, f, beta)
            kern.add_scaled(out, x, 1.0, self.p)
            return None
        s, used, full = self.n_updates % self.m, min(self.n_updates, self.m), self.n_updates >= self.m
        if self.per_sample:
            self._products_per_sample(used)
        c, d, e, UG = self.c, self.d[:, :used], self.e, self.UG[:, :used, :used]
        ugc = sxp.sum(UG * c[:, None, :], axis=2)                              # (UG c)_i = Σ_j u_i·u_j c_j
        hp = -beta * self.pf + sxp.sum(c * d, axis=1)                         # p·h, h = H f_k
        hh = beta * beta * self.ff - 2.0 * beta * sxp.sum(c * e, axis=1) + sxp.sum(c * ugc, axis=1)
        denom = hp + self.pp                                                  # p^T H (f_k - f_{k-1})
        norm_a = sxp.sqrt(sxp.maximum(hh + 2.0 * hp + self.pp, 0.0))         # ‖H (f_k - f_{k-1})‖
        growth = self.r > self.restart_growth * self.ref_r
        # degenerate: a tiny denominator relative to ‖p‖ ‖H Δf‖, or one lost to cancellation in p·h + ‖p‖²
        ok = ((sxp.abs(denom) > self.degenerate_tol * sxp.sqrt(self.pp) * norm_a)
              & (sxp.abs(denom) > self.cancel * (sxp.abs(hp) + self.pp)) & ~growth)  # False for NaN
        restart: Array = active & ~ok
        safe = sxp.where(ok, denom, 1.0)
        if not self.per_sample:
            self._combine(self.h, c, self.U, used)                            # h = H f_k
            self._combine(self.v_new, d, self.V, used)                        # v_new = H^T p
        # p_{k+1} = a h + b u_old for a sample that updates (a = p.h / denom - 1 since v_new.f = p.h; the dropped
        # pair u_old in slot s, b = v_old.f = c_s, is removed from the step); beta f after a restart
        a = sxp.where(ok, hp / safe - 1.0, 0.0)
        b = sxp.where(ok, c[:, s], 0.0) if full else None
        u_scale = sxp.where(ok, -1.0 / safe, 0.0)                             # u_new = -h / denom
        kern.scale(out, self.h, a)
        if self.per_sample:
            self._write_pair_per_sample(s, out, b, u_scale)
        else:
            if b is not None:
                kern.add_scaled(self.p, out, b, self.u_slots[s])
            else:
                kern.copy(self.p, out)
            # the new pair (u_new, v_new) in slot s
            kern.scale(self.u_slots[s], self.h, u_scale)
            kern.copy(self.v_slots[s], self.v_new)
        kern.copy_rows_where(self.p, f, ~ok)
        if beta != 1.0:
            kern.scale(out, self.p, sxp.where(ok, 1.0, beta))
            kern.copy_rows_where(self.p, out, ~ok)
        kern.add_scaled(out, x, 1.0, self.p)
        # the Gram matrix's row of the new pair, and d = U'ᵀ p_{k+1} for the next iteration from small quantities:
        # u_i·h = hu_i, u_i·u_old = UG_is (before the row is replaced), u_new·p_{k+1} = -(a h·h + b h·u_old) / denom
        hu = -beta * e + ugc                                                  # h·u_i for the pairs in use
        d_new = sxp.zeros((self.B, self.m), dtype=kern.sdtype, device=kern.sdevice)
        d_new[:, :used] = a[:, None] * hu
        hp_new = a * hh
        if b is not None:
            d_new[:, :used] = d_new[:, :used] + b[:, None] * self.UG[:, :used, s]
            hp_new = hp_new + b * hu[:, s]
        d_new[:, s] = -hp_new / safe
        new_row = sxp.zeros((self.B, self.m), dtype=kern.sdtype, device=kern.sdevice)
        new_row[:, :used] = -hu / safe[:, None]
        new_row[:, s] = hh / (safe * safe)
        self.UG[:, s, :] = new_row
        self.UG[:, :, s] = new_row
        self.valid = sxp.where(ok[:, None], self.valid | self.onehot_b[s], False)  # a restart forgets every pair
        self.d = sxp.where(self.valid, d_new, 0.0)
        self.ref_r = sxp.where(ok, sxp.minimum(self.ref_r, self.r), self.r)
        self.n_updates += 1
        return restart

    def _write_pair_per_sample(self, s: int, out: Array, b: Array | None, u_scale: Array) -> None:
        """Write, per sample, p = out + b u_old, then the new pair u_new = u_scale · h, v_new into slot ``s``.

        u_old is the pair in slot ``s`` of the sample's block before it is replaced; p = out when ``b`` is None.
        """
        dt = self._cr.dtype
        o = self.kern.numpy_view(out)  # NumPy mode (per sample)
        Us, Vs, p = self._U_host, self._V_host, self._p_host
        h, v_new = self._h_host, self._v_new_host
        us = np.asarray(u_scale, dtype=dt)
        if b is None:
            np.copyto(p, o)
        else:
            bs = np.asarray(b, dtype=dt)
        for i, blk in enumerate(self.blocks):
            u_slot = Us[blk, s]
            if b is not None:
                np.multiply(u_slot, bs[i], out=p[i])
                np.add(p[i], o[i], out=p[i])
            np.multiply(h[i], us[i], out=u_slot)
            np.copyto(Vs[blk, s], v_new[i])


register_method("broyden", Broyden)
