"""Limited-memory "good" Broyden method on the residual F(x) = g(x) − x, in the compact representation.

Broyden's method (C. G. Broyden, Math. Comp. 19, 1965) is a quasi-Newton method for
F(x) = 0: it keeps an approximation H_k of the inverse Jacobian of F and steps

    x_{k+1} = x_k + p_k,        p_k = −H_k F(x_k).

The "good" update makes H satisfy the secant condition H_{k+1} y_k = s_k for the secant
pair s_k = x_{k+1} − x_k, y_k = F(x_{k+1}) − F(x_k):

    H_{k+1} = H_k + (s_k − H_k y_k) s_kᵀ H_k / (s_kᵀ H_k y_k).

Limited memory.  Only the last m secant pairs are kept, and H is *the* matrix that m
good Broyden updates with those pairs make from H_0 = −β I (so that the first step, and
the first after a restart, is the mixing step x + β F, forward iteration for β = 1).
Byrd, Nocedal & Schnabel (Math. Program. 63, 1994), Section 6, Theorem 6.1, write the
direct matrix after k updates as B_k = B_0 + (Y − B_0 S) N⁻¹ Sᵀ, S = [s_0 … s_{k−1}],
Y = [y_0 … y_{k−1}], N the upper triangle (diagonal included) of SᵀS.  The
Sherman–Morrison–Woodbury formula turns it into the inverse used here (derived here,
not copied: N − SᵀS = −L and Sᵀ H_0 B_0 S = SᵀS):

    H = H_0 + (S − H_0 Y) (Sᵀ H_0 Y − L)⁻¹ Sᵀ H_0
      = −β I + (S + β Y) M⁻¹ (−β Sᵀ),      M = −β SᵀY − L,

L the strictly lower triangle of SᵀS (pairs ordered oldest first).  Dropping the oldest
pair is then consistent (the result is again a product of Broyden updates), which a
product form H = −β I + Σ u_i v_iᵀ that forgets its oldest term is not: each later v_i
was computed with the forgotten term in H.  The step is

    p = −H f = β (f + S z + β Y z),        M z = Sᵀ f.

Work per iteration (B samples, u ≤ m pairs in use).  The products with vectors: ‖f‖²,
Sᵀf, Sᵀs and Yᵀs for the new s (the new row of M) and Sᵀy for the new y (its new
column), 4u + 1 inner products of length n; the step is one combination of the stack
[x, f, y_0, s_0, y_1, s_1, …] (2u + 2 vectors): O(u·n) in all, only the pairs in use
are read, and nothing of size n is allocated.  M itself is kept by slot and updated with
one row and one column per iteration (the new pair is always the newest, so the rest of
L keeps its entries); it is solved per sample in :attr:`fixedpoint.Kernels.sdtype` with
:meth:`fixedpoint.Kernels.solve` (LAPACK's LU with partial pivoting, one small system
per sample, O(u³): a few µs for u = 20).  Two ways to run it:

* Batch path (PyTorch or CuPy devices, NumPy on short rows, sharded vectors): the
  products are one :meth:`fixedpoint.Kernels.sums` call (one collective when sharded),
  the solves one batched call, the step one batched combination; no host
  synchronisation.
* Host path (NumPy vector work on rows longer than :data:`fixedpoint.kernels.SHORT_ROWS`
  without a communicator, and one sample on the host): sample by sample, its products,
  its row and column of M, its solve and its combination in direct NumPy calls on views,
  so that the combination finds the sample's rows in cache and a tiny problem pays a few
  NumPy calls per iteration.  On long rows each sample's pairs are one contiguous block,
  which samples that stop only renumber.  The operations are the batch path's (the same kernels, in
  the same order), so one sample's iterates are the same to the bit alone or in a batch.

The secant pair is the difference of the iterates the loop hands over (x_k − x_{k−1},
f_k − f_{k−1}, with x_{k−1} and f_{k−1} kept in the method's own buffers), never the step
the method proposed: a caller that replaces rows of the proposed x_{k+1} (a line search
backtracking along p) gets the update of the pair actually taken.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import numpy as np

from .backend import Array, is_complex_dtype
from .checks import check_int, check_real
from .kernels import SHORT_ROWS, TINY_ROWS, Kernels, ReductionTerm
from .method import ONE_SAMPLE_RESTARTED, Method, MethodState, ObservedNorms
from .registry import register_method

__all__ = ["Broyden"]


@functools.lru_cache(maxsize=1024)
def _constant(m: int, kind: str, i: int) -> np.ndarray:
    """Return a read-only NumPy constant of a window of ``m`` slots.

    ``("onehot", q)``: (m,), True at slot q; ``("eye", u)``: the float64 identity of size u.
    """
    out: np.ndarray
    if kind == "onehot":
        out = np.arange(m) == i
    else:
        out = np.eye(i)
    out.flags.writeable = False
    return out


@dataclasses.dataclass(frozen=True)
class Broyden(Method):
    """Limited-memory "good" Broyden on F(x) = g(x) − x: the method object for :func:`fixedpoint.solve`.

    A quasi-Newton method (module docstring): the inverse Jacobian of F is the matrix
    that the good Broyden updates with the last ``m`` secant pairs make from −β I, kept
    in the compact representation of Byrd, Nocedal & Schnabel (1994, Section 6,
    Theorem 6.1, inverted with Sherman–Morrison–Woodbury); each step is
    x_{k+1} = x_k − H_k F(x_k) (no line search).  Superlinear local convergence for
    smooth maps with unlimited memory (Broyden, Dennis & Moré 1973); with m pairs the
    oldest is dropped, and H stays a product of Broyden updates.

    Parameters
    ----------
    m : int, default 20
        Number of secant pairs kept, >= 1.  Memory: 2m + 3 vectors of size n per sample (the pairs,
        x_{k−1}, f_k and f_{k−1}) and one m×m matrix M of small state.  With 10 pairs the hard map below
        needed 122 iterations on average, with 20 97, with 300 (no pair ever dropped) 102.
    beta : float, default 1.0
        Initial inverse Jacobian −β I, i.e. the first step (and the first after a
        restart) is the mixing step x + β f; in (0, 1].
    degenerate_tol : float, default 1e-10
        Restart a sample's memory (its step becomes the mixing step) when its small system
        M z = Sᵀf is numerically singular: a weight z_i not finite or larger than
        1 / ``degenerate_tol`` in magnitude (0: only non-finite weights); in [0, 1).
    restart_growth : float, default 1000
        Restart a sample whose residual norm ‖f_k‖₂ exceeds this factor times its
        smallest residual norm since the last restart (the quasi-Newton model has gone
        wrong); > 1.  A restart forgets every pair and takes the mixing step.  The
        compact form needs few: on the hard map of ``benchmarks/bench_broyden.py
        --problems hard`` (z = tanh(W z + u), W symmetric, ‖W‖₂ = 0.99, float32, 10
        samples, tol 1e-6) all 10 converge in 97 iterations on average (118 at most)
        without a restart, against 8 of 10 with 10, whose restarts undo the model
        (``benchmarks/results/broyden_hard.txt``).  The product form used before needed
        10 (7 of 10 converged).  No value makes the 1-D Poisson–Jacobi sweep of
        ``benchmarks/bench_solvers.py`` converge with m = 20 (nor did the product form).

    Raises
    ------
    TypeError, ValueError
        At construction, for an option of the wrong type or out of range (the message names it).

    Notes
    -----
    Work per iteration besides g (module docstring): 4u + 1 inner products of length n
    (u ≤ m pairs in use; one reduction, one collective when sharded), one combination of
    2u + 2 vectors, O(n) copies, and per sample O(u²) small updates and a u×u solve in
    float64 (float32 on a device without float64).  Nothing of size n is allocated and
    nothing is read on the host inside the loop on a device.  Batch mode keeps separate
    pairs, restarts and steps for each sample (a sample's iterates do not depend on its
    batch), and a sample that stops costs nothing more (its rows are packed out).  One
    sample on the host, and NumPy on long rows, take a path in direct NumPy calls on views,
    sample by sample, with the batch path's operations (hence the same iterates): at
    n = 5 an iteration costs about what one of ``scipy.optimize.broyden1`` costs
    (``benchmarks/results/broyden_small.txt``).

    The secant pair of each iteration is s = x_k − x_{k−1}, y = f_k − f_{k−1} from the
    iterates the loop passes (x_{k−1} and f_{k−1} are kept), not from the proposed step:
    a wrapper may replace the proposed x_{k+1} (e.g. a backtracking line search along the
    step) and the update stays the Broyden update of the pair actually taken.

    Complex vectors (complex64, complex128): every ᵀ above is a Hermitian transpose ᴴ (the
    products of :meth:`fixedpoint.Kernels.sums`), M and the weights are complex, and the
    norms and restart tests real; such solves take the batch path.

    References
    ----------
    C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations",
    Math. Comp. 19 (1965).  R. H. Byrd, J. Nocedal & R. B. Schnabel, "Representations of
    quasi-Newton matrices and their use in limited memory methods", Math. Program. 63
    (1994), Section 6.  C. T. Kelley, *Iterative Methods for Linear and Nonlinear
    Equations*, SIAM (1995), ch. 7.

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.solve(np.cos, np.zeros(2), method=fixedpoint.Broyden(), tol=1e-12)
    >>> res.method, round(float(res.x[0]), 9)
    ('broyden', 0.739085133)
    """

    name = "broyden"
    #: Complex vectors are accepted: the secant products are Hermitian (Sᴴf, Sᴴs, …), M = −β SᴴY − L with L
    #: the strict lower triangle of SᴴS, and the weights z are complex; norms and restart tests stay real.
    supports_complex: ClassVar[bool] = True

    m: int = 20
    beta: float = 1.0
    degenerate_tol: float = 1e-10
    restart_growth: float = 1e3

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
        """Allocate the state of one solve: the stack of pairs, x_{k−1}, f_k and f_{k−1} per sample."""
        return _BroydenState(kern, B, n, dtype, self)


class _BroydenState(MethodState):
    """The secant pairs, x_{k−1}, f_{k−1} and the small matrices of one solve (module docstring).

    Two layouts of the vectors, chosen by the kernels and n alone (never by B, so that a sample's
    iterates do not depend on its batch):

    * *stacked* (the batch path, and one sample on short rows): one stack ``P`` of shape
      ``(2m + 2, B, n)``: row 0 is x_{k−1} (x_k once the step is taken), row 1 is f_k (the loop's
      residual buffer), slot j of the ring buffer is y_j in row 2 + 2j and s_j in row 3 + 2j, so the
      step is one combination of the first 2u + 2 rows; :meth:`pack` moves the rows in use to the
      front in place.
    * *per sample* (NumPy vector work on long rows without a communicator): ``Pb`` of shape
      ``(B, 2m, n)``, each sample's pairs one contiguous block [y_0, s_0, y_1, …], x_{k−1} and f_k
      in their own ``(B, n)`` buffers; :meth:`pack` renumbers the blocks (``blocks``) instead of
      moving them.

    Slots are filled in order, so the u slots in use are the first ones and nothing unwritten is
    read; the new pair goes to slot q = (pairs written) mod m, over the oldest.  The small state keeps
    M = −β SᵀY − L itself by slot, (B, m, m): the new pair is always the
    newest, so its row and column are all that change (:meth:`_update_small`), and the pairs left keep
    their age order, hence their entries of L; M indexed by slot is M in age order with rows and
    columns permuted alike, which changes no solution.  A restart only clears the sample's ``valid``
    slots: a masked slot enters M as a row and column of the identity and Sᵀf as 0, so its weight is 0.
    """

    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, method: Broyden) -> None:
        self.kern, self.n, self.dtype = kern, n, dtype
        self.m, self.beta = m, _ = method.m, method.beta
        self.restart_growth = method.restart_growth
        self.zmax = 1.0 / method.degenerate_tol if method.degenerate_tol > 0 else float("inf")
        xp, dev, sxp, sdev, sdt = kern.xp, kern.device, kern.sxp, kern.sdevice, kern.sdtype
        #: Complex vectors: M and the weights in ``cdt`` (the host paths' direct products do not conjugate: the
        #: batch path serves them, whose bits do not depend on B either).
        self.complex, self.cdt = is_complex_dtype(dtype), kern.small_dtype(dtype)
        #: NumPy vector work on long rows without a communicator: per-sample blocks of pairs (class docstring).
        self.host_long = kern.mode == "numpy" and kern.comm is None and n > SHORT_ROWS and not self.complex
        # zeros: the slots not yet written are never read, but zeros cost nothing to be sure of it
        if self.host_long:
            self.Pb: Array = xp.zeros((B, 2 * m, n), dtype=dtype, device=dev)  # sample i's pairs: block blocks[i]
            self.blocks = list(range(B))
            self._x_prev: Array = xp.zeros((B, n), dtype=dtype, device=dev)
            self._fk: Array = xp.zeros((B, n), dtype=dtype, device=dev)
        else:
            self.P: Array = xp.zeros((2 * m + 2, B, n), dtype=dtype, device=dev)
            self._P_flat: Array = xp.reshape(self.P, (-1,))  # pack() keeps the stack contiguous at its start
        self._f_prev: Array = xp.zeros((B, n), dtype=dtype, device=dev)
        self.M = sxp.zeros((B, m, m), dtype=self.cdt, device=sdev)  # M = −β SᵀY − L by slot (class docstring)
        self.valid = sxp.zeros((B, m), dtype=sxp.bool, device=sdev)
        self.ref_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        self._masks: dict[tuple[str, int], Array] = {}  # the masks of _mask, made when first needed
        self.k = 0  # iterations observed
        self._held: Array | None = None  # the samples hold() marked, until the next step()
        self.n_pairs = 0  # secant pairs written (the next goes to slot n_pairs % m)
        self._bind(B)

    def _bind(self, B: int) -> None:
        """Work on ``B`` samples: views of the stack's rows and of the first ``B`` rows of the buffers."""
        self.B, kern = B, self.kern
        if self.host_long:
            self.x_prev, self.fk = self._x_prev[:B, ...], self._fk[:B, ...]
        else:
            self.x_prev, self.fk = self.P[0, ...], self.P[1, ...]
        self.f = self.fk
        self.f_prev = self._f_prev[:B, ...]
        #: One sample on the host: the NumPy calls of :meth:`_observe_host` and :meth:`_step_host` on views.
        self.one = B == 1 and kern.mode == "numpy" and kern.comm is None and not self.complex
        if self.one or self.host_long:
            view = kern.numpy_view
            self._fprev_n, self._xprev_n, self._fk_n = view(self.f_prev), view(self.x_prev), view(self.fk)
            if self.host_long:
                self._Pbn = view(self.Pb)
            else:
                self._Pn3 = view(self.P)
            m, dt = self.m, self._fprev_n.dtype
            if getattr(self, "_prod", None) is None:  # (B rows at the start: pack() keeps them)
                # the raw products (‖f‖², Sᵀf), (Yᵀs, Sᵀs interleaved), Sᵀy, in the vectors' dtype
                self._prod = (np.empty((B, m + 1), dtype=dt), np.empty((B, 2 * m), dtype=dt),
                              np.empty((B, m), dtype=dt))
                self._w_one = np.empty(2 * m + 2, dtype=dt)

    def _mask(self, kind: str, i: int) -> Array:
        """Return a constant of small state (:func:`_constant`).

        One NumPy array shared by every solve on the host; else made once per solve when first asked for.
        """
        kern = self.kern
        if kern.small_on_host:
            return _constant(self.m, kind, i)
        key = (kind, i)
        mask = self._masks.get(key)
        if mask is None:
            mask = kern.sxp.asarray(np.array(_constant(self.m, kind, i)), device=kern.sdevice)  # a writable copy
            if kind == "eye":
                mask = kern.sxp.astype(mask, self.cdt)
            self._masks[key] = mask
        return mask

    def residual_buffer(self) -> Array:
        """Return f_k's row of the stack (the loop writes f_k = g(x_k) − x_k there)."""
        return self.fk

    def pack(self, keep: np.ndarray) -> bool:
        """Keep the samples ``keep`` only, in order (see :meth:`fixedpoint.method.MethodState.pack`).

        The rows in use of the stack move to the front in place (nothing of size n is allocated), as do
        f_{k−1} and the small state.
        """
        kern, sxp, used = self.kern, self.kern.sxp, min(self.n_pairs, self.m)
        k = len(keep)
        if self.host_long:  # the blocks are renumbered, not moved
            self.blocks = [self.blocks[i] for i in np.asarray(keep).tolist()]
            kern.pack_rows(self.x_prev, keep)
        else:
            rows_, w, n = tuple(self.P.shape)
            kern.pack_stack(self._P_flat, (2 + 2 * used, w, n), keep)
            self.P = kern.xp.reshape(self._P_flat[: rows_ * k * n], (rows_, k, n))
        kern.pack_rows(self.f_prev, keep)
        rows = kern.small_index(keep)
        self.M = sxp.take(self.M, rows, axis=0)
        self.valid, self.ref_r = sxp.take(self.valid, rows, axis=0), sxp.take(self.ref_r, rows, axis=0)
        self._bind(k)
        return True

    def observe(self, x: Array, gx: Array, f: Array | None, need_gnorm: bool = False) -> ObservedNorms:
        """Write the new secant pair into its slot; return ‖f_k‖ (and ‖g_k‖) from the iteration's one reduction.

        The same reduction takes Sᵀf_k, Sᵀs, Yᵀs (interleaved) and Sᵀy for :meth:`step`.
        """
        assert f is not None  # the loop passes the residual_buffer(), which is never None here
        if self.k > 0 and (self.one or self.host_long):
            return self._observe_host(x, gx, f, need_gnorm)
        kern = self.kern
        terms: list[ReductionTerm] = []
        u = 0
        if self.k == 0:
            terms.append(("sqnorm", f))
        else:
            stack = self.P
            q, u = self.n_pairs % self.m, min(self.n_pairs + 1, self.m)
            y, s = stack[2 + 2 * q, ...], stack[3 + 2 * q, ...]
            kern.sub(y, f, self.f_prev)
            kern.sub(s, x, self.x_prev)
            # each "matvec" is ⟨row, vector⟩, the rows conjugated for complex vectors (Sᴴf, Sᴴs, Yᴴs, Sᴴy)
            terms += [("matvec", stack[1:2 + 2 * u:2, ...], f),       # ‖f‖², s_jᵀf
                      ("matvec", stack[2:2 + 2 * u, ...], s),         # y_0ᵀs, s_0ᵀs, y_1ᵀs, ...
                      ("matvec", stack[3:2 + 2 * u:2, ...], y)]       # s_jᵀy
        if need_gnorm:
            terms.append(("sqnorm", gx))
        sums = self.kern.sums(*terms)
        if self.k == 0:
            self.ff = sums[0]
        else:
            self.ff, self.sf, self.sy = sums[0][:, 0], sums[0][:, 1:], sums[2]
            if self.complex:  # ⟨f, f⟩ is real (up to rounding in its imaginary part)
                self.ff = kern.sxp.real(self.ff)
            self.ys, self.ss = sums[1][:, 0::2], sums[1][:, 1::2]  # y_jᵀs, s_jᵀs
        self.u = u
        self.r = r = kern.root(self.ff, ("sqnorm", f))
        self.k += 1
        if need_gnorm:
            return r, kern.root(sums[-1], ("sqnorm", gx))
        return r

    def hold(self, held: Array) -> None:
        """Learn nothing from the held samples' current point (:meth:`fixedpoint.method.MethodState.hold`).

        For the following :meth:`step` only: a held sample keeps x_{k−1}, f_{k−1} (its base point) instead
        of taking x_k, f_k, the slot of the pair just formed becomes invalid for it (its weight 0 from then
        on), its restart tests are skipped, and its row of ``out`` is not meant to be used (on the host
        paths it is not written).  So when a later point x is not held, its secant pair is
        (x − x_base, f(x) − f(x_base)): the update of the step actually taken, as Broyden's method with a
        line search makes it (Kelley 1995, §8.3).  The memory still counts iterations: a held pair takes a
        slot until overwritten.  Samples not held are unaffected, to the bit; nothing read on the host.
        """
        self._held = held

    def step(self, x: Array, gx: Array, f: Array | None, active: Array, out: Array) -> Array | None:
        """Write x_{k+1} = x_k − H_k f_k into ``out``; keep x_k, f_k; return the samples that restarted."""
        assert f is not None  # the loop passes the residual_buffer(), which is never None here
        kern, sxp, beta = self.kern, self.kern.sxp, self.beta
        held, self._held = self._held, None
        if held is None or self.k == 1:  # (the first point is every sample's base: never held)
            kern.copy(self.x_prev, x)  # row 0 of the stack: x_k, in the combination below with weight 1
        else:  # held samples keep their base x_{k-1}, f_{k-1} (hold())
            kern.copy_rows_where(self.x_prev, x, ~held)
        if self.k > 1 and (self.one or self.host_long):
            return self._step_host(active, out, held)
        if self.k == 1:  # no pair yet: the mixing step from H_0 = -beta I
            # a copy: self.r is the norm array observe() returned to the loop, which keeps it (the first one as
            # the relative test's reference); the host path updates ref_r in place
            self.ref_r = kern.sxp.asarray(self.r, copy=True)
            kern.add_scaled(out, x, beta, f)
            kern.copy(self.f_prev, f)
            return None
        q, u = self.n_pairs % self.m, self.u
        growth = self.r > self.restart_growth * self.ref_r  # False for NaN (caught by the solve below)
        self._update_small(q, u)
        onehot = self._mask("onehot", q)
        if held is not None:  # the pair of a held sample's trial point enters nothing (its slot: invalid)
            growth = growth & ~held
            valid = sxp.where(held[:, None], self.valid & ~onehot, self.valid | onehot)
            valid = sxp.where(growth[:, None], False, valid)
        else:
            valid = sxp.where(growth[:, None], False, self.valid | onehot)
        z, ok = self._weights(q, u, valid[:, :u])
        ok = ok & ~growth
        restart: Array = active & ~ok
        ref_r = sxp.where(ok, sxp.minimum(self.ref_r, self.r), self.r)
        if held is None:
            self.valid = sxp.where(ok[:, None], valid, False)
        else:  # no restart, no bookkeeping: their step is not used
            restart = restart & ~held
            self.valid = sxp.where((ok | held)[:, None], valid, False)
            ref_r = sxp.where(held, self.ref_r, ref_r)
        self.ref_r = ref_r
        # x_{k+1} = x_k + β f + Σ_j (β² z_j y_j + β z_j s_j): one combination of the stack's first 2u + 2 rows
        w = sxp.empty((self.B, 2 + 2 * u), dtype=self.cdt, device=kern.sdevice)
        w[:, 0], w[:, 1] = 1.0, beta
        w[:, 2::2], w[:, 3::2] = (beta * beta) * z, beta * z
        kern.vecmat(out, kern.big(w, self.dtype), self.P[:2 + 2 * u, ...])
        if held is None:
            kern.copy(self.f_prev, f)
        else:
            kern.copy_rows_where(self.f_prev, f, ~held)
        self.n_pairs += 1
        return restart

    def _update_small(self, q: int, u: int) -> None:
        """Write the new pair's row and column of M (slot ``q``) from the products of :meth:`observe`.

        The new pair is the newest, so row q of the strict lower triangle L is s_qᵀs_j for every other slot
        and column q has none: M[q, j] = −β s_qᵀy_j − s_qᵀs_j (j ≠ q), M[j, q] = −β s_jᵀy_q; entries between
        older slots keep their age order, hence their values.
        """
        beta = self.beta
        row = -beta * self.ys - self.ss  # (B, u): from y_jᵀs and s_jᵀs
        # complex vectors: s_qᴴy_j = conj(y_jᴴs_q) and s_qᴴs_j = conj(s_jᴴs_q)
        self.M[:, q, :u] = self.kern.sxp.conj(row) if self.complex else row
        self.M[:, :u, q] = -beta * self.sy

    def _weights(self, q: int, u: int, valid: Array) -> tuple[Array, Array]:
        """Solve M z = Sᵀf per sample over the ``u`` slots (masked slots: identity rows, weight 0); return (z, ok)."""
        kern, sxp = self.kern, self.kern.sxp
        both = valid[:, :, None] & valid[:, None, :]
        mat = sxp.where(both, self.M[:, :u, :u], self._mask("eye", u))
        z = kern.solve(mat, sxp.where(valid, self.sf, 0.0))  # Sᴴf
        ok = sxp.all(sxp.abs(z) <= self.zmax, axis=1)  # False for NaN
        return sxp.where(ok[:, None], z, 0.0), ok


    # --- one sample on the host: the same operations in direct NumPy calls on views ---------------------------

    def _observe_host(self, x: Array, gx: Array, f: Array, need_gnorm: bool) -> ObservedNorms:
        """:meth:`observe` in direct NumPy calls on views: one sample, or NumPy vector work on long rows.

        Writes the new pair.  On short rows (one sample) it takes the products here, with
        :meth:`Kernels.matvec`'s one-sample kernel (the batch path's bits); on long rows :meth:`_step_host`
        takes them sample by sample beside the combination that reads the same rows, and only the norms are
        taken here.
        """
        kern, view = self.kern, self.kern.numpy_view
        q, u = self.n_pairs % self.m, min(self.n_pairs + 1, self.m)
        fn, fp, xn, xp_ = self._fk_n, self._fprev_n, view(x), self._xprev_n
        if self.host_long:
            for b, blk in enumerate(self.blocks):
                np.subtract(fn[b], fp[b], out=self._Pbn[blk, 2 * q])
                np.subtract(xn[b], xp_[b], out=self._Pbn[blk, 2 * q + 1])
        else:
            stack = self._Pn3
            np.subtract(fn, fp, out=stack[2 + 2 * q])
            np.subtract(xn, xp_, out=stack[3 + 2 * q])
        self.u = u
        self.k += 1
        if self.host_long:
            terms: list[ReductionTerm] = [("sqnorm", f)]
            if need_gnorm:
                terms.append(("sqnorm", gx))
            sums = kern.sums(*terms)
            self.r = r = kern.root(sums[0], ("sqnorm", f))
            return (r, kern.root(sums[1], ("sqnorm", gx))) if need_gnorm else r
        self._products(0, q, u)
        self.r = r = self._sqrt_one(float(self._prod[0][0, 0]), f)
        if need_gnorm:
            g1 = view(gx)[0]
            return r, self._sqrt_one(float(np.dot(g1, g1)), gx)
        return r

    def _products(self, b: int, q: int, u: int) -> None:
        """Take sample ``b``'s raw products (‖f‖², Sᵀf), (Yᵀs, Sᵀs interleaved) and Sᵀy into ``_prod``."""
        pf, pys, psy = self._prod
        # (real vectors only: complex ones take the batch path, whose products conjugate)
        if self.host_long:  # the sample's block [y_0, s_0, y_1, ...]; gemv through matmul (strided rows as they are)
            blk, f = self._Pbn[self.blocks[b]], self._fk_n[b]
            y, s = blk[2 * q], blk[2 * q + 1]
            for rows, v, out in ((blk[1:2 * u:2], f, pf[b, 1:u + 1]), (blk[:2 * u], s, pys[b, :2 * u]),
                                 (blk[1:2 * u:2], y, psy[b, :u])):
                np.matmul(rows, v[:, None], out=out[:, None])
            return
        stack = self._Pn3
        f, y, s = stack[1, b], stack[2 + 2 * q, b], stack[3 + 2 * q, b]
        for rows, v, out in ((stack[1:2 + 2 * u:2, b], f, pf[b, :u + 1]), (stack[2:2 + 2 * u, b], s, pys[b, :2 * u]),
                             (stack[3:2 + 2 * u:2, b], y, psy[b, :u])):
            np.matmul(rows[:, None, :], v[:, None], out=out[:, None, None])

    def _sqrt_one(self, sq: float, v: Array) -> Array:
        """Return the norm of the one-sample vector ``v`` from its square ``sq`` (rescued if the square overflowed)."""
        if math.isfinite(sq):
            return np.array([math.sqrt(sq)], dtype=self.kern.sdtype)
        return self.kern.root(np.array([sq], dtype=self.kern.sdtype), ("sqnorm", v))

    def _combine_host(self, b: int, u: int, out: np.ndarray) -> None:
        """Write sample ``b``'s x_{k+1} = x_k + β f + Σ_j w_j (pair j) into ``out`` (weights ``_w_one``), f_{k−1}."""
        w, fprev, f = self._w_one[:2 + 2 * u], self._fprev_n[b], self._fk_n[b]
        if not self.host_long:  # Kernels.vecmat's one-sample product over [x, f, y_0, s_0, ...]
            if self.n <= TINY_ROWS:  # (its kernel for tiny rows, whatever B)
                self.kern.vecmat_tiny(out[None], w[None], self._Pn3[:2 + 2 * u, b:b + 1])
            else:
                np.matmul(w, self._Pn3[:2 + 2 * u, b], out=out)
            np.copyto(fprev, f)
            return
        np.matmul(w[2:], self._Pbn[self.blocks[b], :2 * u], out=out)
        np.add(out, self._xprev_n[b], out=out)
        if self.beta != 1.0:  # f_{k−1}'s row as scratch for β f before it takes f_k
            np.multiply(f, self.beta, out=fprev)
            np.add(out, fprev, out=out)
        else:
            np.add(out, f, out=out)
        np.copyto(fprev, f)

    def _step_host(self, active: Array, out: Array, held: Array | None = None) -> Array:
        """:meth:`step` sample by sample on the host (after x_k is kept), in the batch path's operations.

        Per sample: on long rows its products (:meth:`_products`), then its row and column of M, its restart
        tests, its solve and its combination, so that the combination finds the sample's rows in cache.  The
        masks of a restarted sample's slots are applied only where some slot is masked (where none is they
        change nothing).
        """
        kern, beta, B = self.kern, self.beta, self.B
        q, u = self.n_pairs % self.m, self.u
        outn, sdt = kern.numpy_view(out), kern.sdtype
        pf, pys, psy = self._prod
        restarted = np.zeros(B, dtype=bool) if B > 1 else None
        ok = False
        for b in range(B):
            if held is not None and held[b]:  # hold(): slot q invalid, nothing else learnt, no step (not used)
                self.valid[b, q] = False
                continue
            if self.host_long:
                self._products(b, q, u)
            ys_ss = np.asarray(pys[b, :2 * u], dtype=sdt)
            mat: Any = self.M[b]  # host small state: NumPy
            mat[q, :u] = -beta * ys_ss[0::2] - ys_ss[1::2]  # as _update_small
            mat[:u, q] = -beta * np.asarray(psy[b, :u], dtype=sdt)
            mat = mat[:u, :u]
            sf: Any = np.asarray(pf[b, 1:u + 1], dtype=sdt)
            r, ref = float(self.r[b]), float(self.ref_r[b])
            growth = r > self.restart_growth * ref
            valid = self.valid[b] | self._mask("onehot", q)
            if growth:
                valid[:] = False
            v = valid[:u]
            if not v.all():
                eye: Any = self._mask("eye", u)
                mat = np.where(v[:, None] & v[None, :], mat, eye)
                sf = np.where(v, sf, 0.0)
            z: Any = kern.solve(mat[None], sf[None])[0]
            ok = not growth and bool(np.abs(z).max() <= self.zmax)  # False for NaN
            if ok:
                self.valid[b] = valid
                self.ref_r[b] = min(ref, r)
            else:
                self.valid[b] = False
                self.ref_r[b] = r
                z[:] = 0.0
                if restarted is not None:
                    restarted[b] = True
            w = self._w_one[:2 + 2 * u]
            w[0], w[1] = 1.0, beta
            w[2::2], w[3::2] = (beta * beta) * z, beta * z
            self._combine_host(b, u, outn[b])
        self.n_pairs += 1
        if restarted is None:
            return ONE_SAMPLE_RESTARTED[bool(active[0]) and not ok and not (held is not None and held[0])]
        flags: Array = restarted & active
        return flags

register_method("broyden", Broyden)
