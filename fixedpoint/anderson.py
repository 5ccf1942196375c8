"""Type-II Anderson acceleration (Walker & Ni 2011) in the Gram formulation.

With iterates x_j, map values g_j = g(x_j) and residuals f_j = g_j − x_j for the
last m_k ≤ m iterations, Type-II AA takes the weights α solving

    min ‖Σ_j α_j f_j‖₂   subject to   Σ_j α_j = 1,

and steps to x_{k+1} = Σ_j α_j [g_j − (1 − β) f_j] = (1 − β) Σ α_j x_j + β Σ α_j g_j.
The weights solve the (m+1)×(m+1) bordered system of the normal equations

    [ 0   1ᵀ      ] [ ν ]   [ 1 ]
    [ 1   H + λ'I ] [ α ] = [ 0 ],       H_ij = ⟨f_i, f_j⟩,

(the form used in the Deep Implicit Layers tutorial, Kolter, Duvenaud & Johnson,
and by Al Dajani & Keyes, arXiv 2410.19460), computed with ν eliminated:
α = y / Σ_j y_j with (H + λ'I) y = 1, an m×m symmetric positive definite solve
(LDLᵀ vectorised over the batch for thousands of samples).  H is kept across iterations: each
iteration adds one row, ⟨F, f_k⟩, in one matrix-vector product over the ring
buffer, so AA's own work per iteration is O(m·n): that product, the combination
Σ α_j g_j (over 2m stored vectors when β < 1), and O(n) copies; the small
solve is in float64 (float32 on a device without float64).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .backend import Array, is_complex_dtype, namespace_of
from .checks import check_choice, check_int, check_real
from .interop import convert
from .kernels import LDL_MAX_K, SHORT_ROWS, TINY_ROWS, Kernels, ReductionTerm, ldl_solve_one
from .method import ONE_SAMPLE_RESTARTED, Method, MethodState, ObservedNorms
from .registry import register_method

__all__ = ["Anderson", "AndersonHistory", "LAM_MODES", "SOLVE_DELAY"]

#: How the regularisation λ is measured (see :class:`Anderson`).
LAM_MODES = ("relative", "relative_max", "absolute")

#: The plain steps that ``Anderson(delay=None)`` (the default) takes first (see :class:`Anderson`).
SOLVE_DELAY = 2


@dataclasses.dataclass(frozen=True)
class Anderson(Method):
    """Type-II Anderson acceleration (Walker & Ni 2011): the method object for :func:`fixedpoint.solve`.

    Each iteration evaluates g once and steps to the β-mixed combination of the
    last m map values whose residuals' combination is smallest (module docstring;
    docs/algorithm.md).  Defaults m = 5, β = 1.0, λ = 1e-5 are those of Al Dajani &
    Keyes, arXiv 2410.19460.

    Parameters
    ----------
    m : int, default 5
        Window (memory): the number of past residuals combined, >= 1 (Walker &
        Ni's m counts differences, i.e. their m is this m − 1); ``m=1`` is forward
        iteration damped by β.
    beta : float, default 1.0
        Mixing β in (0, 1].
    lam : float, default 1e-5
        Regularisation λ >= 0, finite, of the Gram matrix H.
    lam_mode : {"relative", "relative_max", "absolute"}, default "relative"
        "relative": each diagonal entry grows by λ times itself, H_jj ← (1 + λ) H_jj
        = ‖f_j‖² (1 + λ), so that the regularisation keeps its effect as the
        residuals shrink and does not swamp the newest (smallest) residuals when the
        window spans several orders of magnitude (the ridge of SciPy's ``anderson``,
        whose w0 = 0.01 is λ = 1e-4); "relative_max": λ · max_j ‖f_j‖² is added to
        every diagonal entry (a uniform ridge at the scale of the largest residual:
        stronger on the small ones; the "relative" of fixedpoint 0.1, kept for the
        optimizer wrapper); "absolute": exactly λ is added to the diagonal, as in
        arXiv 2410.19460 (it dominates H once ‖f‖² < λ and stalls high-accuracy
        solves).
    delay : int or None, default None
        Number of first iterations that take plain mixing steps
        x_{k+1} = x_k + β f_k before extrapolating (the history is still
        recorded).  The first step is always plain, so ``delay=1`` is the same as 0.
        None (the default) is :data:`SOLVE_DELAY` = 2, kept apart from an explicit 2 so that a
        driver with its own notion of delay (the optimizer wrapper
        :class:`fixedpoint.torch.AndersonAcceleration`) can tell "not set" from a request.
        With 2 the first extrapolation combines three iterates (two secant pairs) instead of
        two: the one-difference step from x_0, x_1 is replaced by a plain step.  When it acts:
        at the second step of every solve (not after a restart).  What it costs: no work; in
        evaluations, the one-difference step where it would have helped (H-equation c = 0.5:
        7 instead of 6; none on the other problems of benchmarks/compare_peers.py; a few
        either way where AA stagnates, e.g. shifted Poisson–Jacobi, n = 1000/10⁴: 31/27
        instead of 34/24; docs/algorithm.md).  What it buys: on
        Chandrasekhar's H-equation near c = 1 the extrapolations from one and two differences
        overshoot past the turning point between the two roots and the solve ends on the
        non-physical one (``delay=0``: 6 of the 16 cases c >= 0.9 of
        benchmarks/h_equation_study.py and 21 of its 72-case grid; the default: none).
        ``delay=0`` switches it off (fixedpoint's behaviour before issue 22).  Why: the
        higher-order terms of Anderson's error bound grow with the distance between the
        combined iterates (Evans, Pollock, Rebholz & Xiao 2020), largest at the first steps;
        docs/algorithm.md.
    restart_growth : float, default 1e4
        Restart the history of a sample whose residual norm ‖f_k‖₂ (whatever
        ``stop_mode``) exceeds this factor times its smallest ‖f_j‖₂ since the
        last restart; > 1.
    restart_weight : float, default 1e6
        Restart when a mixing weight is non-finite or larger than this in magnitude; > 1.

    Raises
    ------
    TypeError, ValueError
        At construction, for an option of the wrong type or out of range (the message names it).

    Notes
    -----
    Memory: 2m vectors of size n per sample (the last m map values and residuals),
    plus O(m²) small state.  Work per iteration besides g: one Gram row (m inner
    products), one combination of m (2m when β < 1) vectors, O(n) copies, and an
    m×m solve of the normal equations in float64 (float32 on a device without float64).

    Complex vectors (complex64, complex128): the Gram matrix is Hermitian, H_ij = ⟨f_i, f_j⟩ =
    Σ conj(f_i) f_j, its solve is an LDLᴴ (or LAPACK's) in complex128 (complex64 without float64),
    and the weights are complex: the same least-squares problem, min ‖Σ α_j f_j‖₂ with Σ α_j = 1,
    over ℂ.  Residual norms, the safeguards and the stopping test stay real.

    References
    ----------
    D. G. Anderson, J. ACM 12 (1965).  H. F. Walker & P. Ni, SIAM J. Numer. Anal.
    49 (2011).  M. Al Dajani & D. Keyes, arXiv 2410.19460 (2024).  C. Evans, S. Pollock,
    L. G. Rebholz & M. Xiao, SIAM J. Numer. Anal. 58 (2020), 788–810 (``delay``).

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.solve(np.cos, np.zeros(2), method=fixedpoint.Anderson(m=3), tol=1e-10)
    >>> res.method, round(float(res.x[0]), 6)
    ('anderson', 0.739085)
    """

    name = "anderson"
    #: Complex vectors are accepted: the Gram matrix is Hermitian, ⟨f_i, f_j⟩ = Σ conj(f_i) f_j, and the
    #: weights α = y / Σ y with H y = 1 are complex (the same least-squares problem over ℂ).
    supports_complex: ClassVar[bool] = True

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-5
    lam_mode: str = "relative"
    delay: int | None = None
    restart_growth: float = 1e4
    restart_weight: float = 1e6

    def __post_init__(self) -> None:
        """Validate and normalise the options (``TypeError``/``ValueError`` naming the option)."""
        self._set(
            m=check_int("m", self.m, 1),
            beta=check_real("beta", self.beta, 0.0, 1.0, low_open=True),
            lam=check_real("lam", self.lam, 0.0, None),
            lam_mode=check_choice("lam_mode", self.lam_mode, LAM_MODES),
            delay=None if self.delay is None else check_int("delay", self.delay, 0),
            restart_growth=check_real("restart_growth", self.restart_growth, 1.0, None, low_open=True,
                                      allow_inf=True),
            restart_weight=check_real("restart_weight", self.restart_weight, 1.0, None, low_open=True,
                                      allow_inf=True),
        )

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> AndersonHistory:
        """Allocate an :class:`AndersonHistory` for ``B`` samples of length ``n``: the state of one solve."""
        return AndersonHistory(kern, B, n, dtype, self)


class AndersonHistory(MethodState):
    """Ring buffers and Gram matrix of Type-II Anderson acceleration for a batch of B vectors of size n.

    Preallocates ``(2m, B, n)`` values (the last m map values g_j and residuals f_j)
    in the vectors' library, and the ``(B, m, m)`` Gram matrix with O(B·m²)
    bookkeeping as small state (:class:`fixedpoint.kernels.Kernels`: NumPy for
    host memory, the device otherwise); nothing of size n is allocated afterwards
    on NumPy, CuPy or PyTorch.  It is the state :meth:`Anderson.init` gives the
    solve loop, and is driven the same way by any other loop that produces
    (g_k, f_k) pairs, e.g. :class:`fixedpoint.torch.AndersonAcceleration`:

    1. write f_k into :meth:`residual_buffer` (or pass any array to :meth:`push`);
    2. :meth:`push` (g_k, f_k): stores the pair and adds its Gram row;
    3. :meth:`extrapolate` into an output buffer: the next iterate, and which samples restarted.

    Parameters
    ----------
    kern : fixedpoint.kernels.Kernels
        Kernels for the vectors' library and device.
    B, n : int
        Batch size and vector length.
    dtype
        Dtype of the vectors (the Gram matrix and the small solve use ``kern.sdtype``,
        float64 where the device has it).
    method : Anderson
        The options (window, mixing, regularisation, delay, safeguards).
    """

    #: Arrays that make up the history's state (:meth:`state_dict`); the rest is scratch or constant.
    STATE = ("R", "G", "valid", "ref_r", "r")

    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, method: Anderson) -> None:
        self.kern, self.n, self.dtype, self.method = kern, n, dtype, method
        self.m = m = method.m
        self.beta, self.lam, self.lam_mode = method.beta, method.lam, method.lam_mode
        self.delay = SOLVE_DELAY if method.delay is None else method.delay  # plain steps first
        self.lam_factor = 1.0 + method.lam  # "relative": each diagonal entry times 1 + λ
        xp, dev, sxp, sdev, sdt = kern.xp, kern.device, kern.sxp, kern.sdevice, kern.sdtype
        #: Complex vectors: a Hermitian Gram matrix and complex weights in ``cdt``; the norms stay real (``sdt``).
        self.complex = is_complex_dtype(dtype)
        cdt = kern.small_dtype(dtype)
        # Buffers for B samples; after pack() the state works on views of their first rows.  The small state
        # (kern.sxp arrays: NumPy on the host, else the vectors' library) is typed by that namespace.
        self.R: Array = xp.zeros((2 * m, B, n), dtype=dtype, device=dev)  # a stack: [:m] the g_j, [m:] the f_j
        self._R_flat: Array = xp.reshape(self.R, (-1,))  # pack() keeps the stack contiguous at its start
        self._row: Array = xp.zeros((B, m), dtype=dtype, device=dev)
        self._w: Array = xp.zeros((B, 2 * m), dtype=dtype, device=dev)
        self._H = sxp.zeros((B, m, m), dtype=cdt, device=sdev)  # the regularised, normalised Gram matrices
        self._ones = sxp.ones((B, m), dtype=cdt, device=sdev)
        self.G = sxp.zeros((B, m, m), dtype=cdt, device=sdev)
        self.valid = sxp.zeros((B, m), dtype=sxp.bool, device=sdev)
        self.ref_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        self.r = sxp.zeros((B,), dtype=sdt, device=sdev)
        self.k = 0  # number of pairs pushed so far
        self._held: Array | None = None  # the samples hold() marked, until the next weights()
        self._alpha_one = sxp.zeros((1, m), dtype=cdt, device=sdev)  # the weights of _weights_one
        self._ones_one = [1.0] * m
        slots = sxp.arange(m, device=sdev)
        self.onehot_b = [slots == s for s in range(m)]
        self.onehot = [sxp.astype(h, cdt) for h in self.onehot_b]
        self.eye = sxp.eye(m, dtype=sdt, device=sdev)
        self.eye_b = self.eye > 0.5
        self._bind(B)

    def _bind(self, B: int) -> None:
        """Work on ``B`` samples: the stack ``self.R`` holds them; views of the first ``B`` rows of the rest."""
        kern, m = self.kern, self.m
        self.B = B
        self.g_slots = [self.R[s, ...] for s in range(m)]  # views made once: push() recognises its own buffer
        self.f_slots = [self.R[m + s, ...] for s in range(m)]
        self.row, self.w = self._row[:B, ...], self._w[:B, ...]
        self.H, self.ones = self._H[:B, ...], self._ones[:B, ...]
        self._gstack_one: np.ndarray | None = None  # combine()'s one-sample view, where it applies
        if B == 1 and kern.mode == "numpy":  # host views for _push_one and combine, made once per layout
            stack = kern.numpy_view(self.R)
            self._row_one: np.ndarray = kern.numpy_view(self.row)[0]
            # the Gram row by Kernels.matvec's kernel for one sample (by n: dot products per slot, or gemv)
            self._gram_one: tuple[np.ndarray, list[np.ndarray], np.ndarray, Callable[..., Any]]
            if self.n <= SHORT_ROWS:
                self._gram_one = (stack[m:, 0, None, :], [stack[m + s, 0][:, None] for s in range(m)],
                                  self._row_one[:, None, None], np.matmul)
            else:
                self._gram_one = (stack[m:, 0, :], [stack[m + s, 0] for s in range(m)], self._row_one, np.dot)
            if (self.beta == 1.0 and stack.dtype == np.float64 == np.dtype(kern.sdtype)  # α needs no cast
                    and self.n > TINY_ROWS):  # (tiny rows: Kernels.vecmat's kernel, whatever B)
                self._gstack_one = stack[:m, 0, :]

    def pack(self, keep: np.ndarray) -> bool:
        """Keep only the samples ``keep`` (increasing indices among the current ones), moved to the front in place.

        That is the stored pairs (no buffer of size n is allocated), the Gram matrices and the restart
        bookkeeping.  Part of the solve loop's protocol (:meth:`fixedpoint.method.MethodState.pack`).
        """
        slots, rows_now, n = self.R.shape
        self.R = self.kern.pack_stack(self._R_flat, (slots, rows_now, n), keep)
        rows = self.kern.small_index(keep)
        sxp = self.kern.sxp
        self.G, self.valid = sxp.take(self.G, rows, axis=0), sxp.take(self.valid, rows, axis=0)
        self.ref_r = sxp.take(self.ref_r, rows, axis=0)  # (push() computes ‖f_k‖ anew)
        self._bind(len(keep))
        return True

    # --- the pair (g_k, f_k) ---------------------------------------------------------------------

    def residual_buffer(self) -> Array:
        """Return the ring slot where the next f_k = g(x_k) − x_k is to be written, shape (B, n)."""
        return self.f_slots[self.k % self.m]

    def push(self, g: Array, f: Array, *, gnorm: bool = False) -> ObservedNorms:
        """Store the pair (g_k, f_k), both ``(B, n)``, and add the Gram row ⟨f_j, f_k⟩.

        ``f`` may be the :meth:`residual_buffer` itself (no copy) or any array of that shape.
        The oldest pair is dropped once m are stored.  The row (and ‖g_k‖² with ``gnorm``) is
        one reduction: one collective when the vectors are shards (``Kernels.comm``).

        Returns
        -------
        small-state array, shape (B,), or a pair of them
            ‖f_k‖₂ per sample (from the Gram diagonal), in :attr:`Kernels.sdtype`; with
            ``gnorm=True`` the pair (‖f_k‖₂, ‖g_k‖₂).
        """
        kern, s = self.kern, self.k % self.m
        if f is not self.f_slots[s]:
            kern.copy(self.f_slots[s], f)
        kern.copy(self.g_slots[s], g)
        if self.B == 1 and kern.mode == "numpy" and kern.comm is None and not self.complex:
            return self._push_one(s, g, gnorm)
        terms: list[ReductionTerm] = [("matvec", self.R[self.m:, ...], self.f_slots[s], self.row)]
        if gnorm:
            terms.append(("sqnorm", g))
        sums = kern.sums(*terms)
        row: Any = sums[0]  # small state: NumPy (with its .sum()) where kern.small_on_host
        if kern.small_on_host and not math.isfinite(float(row[:, s].real.sum())):  # |f|^2 overflowed, so may the row
            row = kern.rescued(terms[0], row)
        if self.complex:  # row_j = ⟨f_j, f_k⟩ is column k of the Hermitian G; row k is its conjugate
            sq = kern.sxp.real(row[:, s])
            self.G[:, s, :] = kern.sxp.conj(row)
        else:
            sq = row[:, s]
            self.G[:, s, :] = row
        self.r = r = kern.root(sq, ("sqnorm", self.f_slots[s]))
        self.G[:, :, s] = row
        self.valid[:, s] = True
        self.k += 1
        if gnorm:
            return r, kern.root(sums[1], ("sqnorm", g))
        return r

    def _push_one(self, s: int, g: Array, gnorm: bool) -> ObservedNorms:
        """Compute the Gram row of :meth:`push` for one sample on the host: direct ``np.dot`` calls, Python scalars."""
        row = self._row_one
        fstack, f_one, out, product = self._gram_one
        product(fstack, f_one[s], out=out)  # Kernels.matvec's one-sample kernel: the batch path's bits
        sq = float(row[s])
        if not math.isfinite(sq):  # |f|^2 overflowed in the vectors' dtype (so may have the row)
            term: ReductionTerm = ("matvec", self.R[self.m:, ...], self.f_slots[s])
            row = np.asarray(self.kern.rescued(term, row[None].astype(np.float64)))[0]  # host small state: NumPy
            sq = float(row[s])
        G = self.G[0]
        G[s, :] = row
        G[:, s] = row
        self.valid[0, s] = True
        self.r = r = self._sqrt_one(sq, self.f_slots[s])
        self.k += 1
        if gnorm:
            g1 = self.kern.numpy_view(g)[0]
            return r, self._sqrt_one(float(np.dot(g1, g1)), g)
        return r

    def _sqrt_one(self, sq: float, v: Array) -> Array:
        """Return the norm of the one-sample vector ``v`` from its square ``sq`` (rescued if the square overflowed)."""
        if math.isfinite(sq):
            return np.array([math.sqrt(sq)], dtype=self.kern.sdtype)
        return self.kern.root(np.array([sq], dtype=self.kern.sdtype), ("sqnorm", v))

    def size(self) -> Array:
        """Return how many stored pairs each sample's next extrapolation combines: small-state integers, shape (B,)."""
        counts: Array = self.kern.sxp.sum(self.kern.sxp.astype(self.valid, self.kern.sxp.int64), axis=1)
        return counts

    # --- the extrapolation -----------------------------------------------------------------------

    def weights(self, active: Array) -> tuple[Array, Array]:
        """Mixing weights α (shape (B, m)) for the newest pair, and the samples that restarted (shape (B,)).

        Solves the normal equations of the module docstring with H divided by its
        largest valid diagonal entry; "relative" λ multiplies each diagonal entry by
        1 + λ, "absolute" λ is added to it.  Slots outside a sample's current history get a decoupled unit
        row and column and a zero right-hand side, hence α_j = 0 exactly.  An ``active`` sample restarts
        (history cleared to the newest pair, plain step α = e_k) when a weight is
        non-finite or exceeds ``restart_weight`` in magnitude, or when ‖f_k‖ exceeds
        ``restart_growth`` times its smallest residual norm since the last restart.
        During the first ``delay`` iterations (:class:`Anderson`; None: :data:`SOLVE_DELAY`) the weights
        are those of a plain step
        (the safeguards still run).  Part of :meth:`extrapolate`; updates the restart
        bookkeeping, so call it once per pushed pair.

        With the small state on the host a sample's weights are the same to the bit whatever the
        batch (:meth:`fixedpoint.kernels.Kernels.solve_spd`; the one-sample path does the same
        operations in Python floats).
        """
        if self.B == 1 and self.kern.small_on_host and self.m <= LDL_MAX_K and not self.complex:
            return self._weights_one(active)  # (complex: the batch path, whose bits do not depend on B)
        rhs = self._system()
        xp, s, method = self.kern.sxp, (self.k - 1) % self.m, self.method
        y: Any = self.kern.solve_spd(self.H, rhs)  # small state: NumPy (with its .copy()) where kern.small_on_host
        if self.kern.small_on_host:  # Σ_j y_j left to right, as _weights_one
            total = y[:, 0].copy()
            for j in range(1, self.m):
                total += y[:, j]
        else:
            total = xp.sum(y, axis=1)
        alpha = y / total[:, None]  # a singular system: non-finite, hence a restart below
        ok = (xp.max(xp.abs(alpha), axis=1) <= method.restart_weight) & (self.r <= method.restart_growth * self.ref_r)
        restart = active & ~ok  # NaN weights fail the comparison, hence restart
        ref_r = xp.where(restart, self.r, xp.minimum(self.ref_r, self.r))
        held, self._held = self._held, None
        if held is not None:  # held samples (hold()): no restart, no bookkeeping; their weights are not used
            restart = restart & ~held
            ref_r = xp.where(held, self.ref_r, ref_r)
        self.valid = xp.where(restart[:, None], self.onehot_b[s], self.valid)
        self.ref_r = ref_r
        weights: Array = (xp.broadcast_to(self.onehot[s], alpha.shape) if self.k <= self.delay
                          else xp.where(restart[:, None], self.onehot[s], alpha))
        return weights, restart

    def _system(self) -> Array:
        """Write the systems of :meth:`weights` into ``self.H``; return their right-hand sides.

        The right-hand sides are 1 on valid slots, 0 elsewhere.  H = G / (largest valid diagonal entry), then
        the regularisation on the valid diagonal entries; invalid slots get a unit diagonal.  Once every slot
        is valid and the small state is NumPy, the same values by in-place operations without masks (a third
        of the time for thousands of samples).
        """
        xp, v, lam, mode = self.kern.sxp, self.valid, self.lam, self.lam_mode
        full = self.kern.small_on_host and bool(v.all())
        if full:
            B, m, H = self.B, self.m, self.H
            scale = self.G.reshape(B, m * m)[:, :: m + 1].real.max(axis=1)
        else:
            gdiag = xp.linalg.diagonal(self.G)
            scale = xp.max(xp.where(v, xp.real(gdiag) if self.complex else gdiag, 0.0), axis=1)
        scale = xp.where(scale > 0.0, scale, 1.0)  # also for NaN
        if full:
            np.divide(self.G, scale[:, None, None], out=H)
            diag = H.reshape(B, m * m)[:, :: m + 1]
            if mode == "relative":
                diag *= self.lam_factor
            elif mode == "relative_max":
                diag += lam
            else:
                diag += lam / scale[:, None]
            ones: Array = self.ones
            return ones
        H = xp.where(v[:, :, None] & v[:, None, :], self.G, 0.0) / scale[:, None, None]
        diag = xp.linalg.diagonal(H)
        if mode == "relative":
            diag = diag * self.lam_factor
        elif mode == "relative_max":
            diag = diag + lam
        else:
            diag = diag + lam / scale[:, None]
        self.H[...] = xp.where(self.eye_b, xp.where(v, diag, 1.0)[:, None, :], H)
        rhs: Array = xp.astype(v, self.H.dtype)
        return rhs

    def _weights_one(self, active: Array) -> tuple[Array, Array]:
        """Compute :meth:`weights` for one sample with the small state on the host, in Python floats.

        The same operations in the same order as the batch path (:meth:`_system`,
        :func:`fixedpoint.kernels.ldl_solve_one`), so the same weights to the bit, with a fraction of
        the NumPy calls: the system (:meth:`_system_one`), its solve, the normalised weights
        (:meth:`_normalised_one`), then the safeguards.
        """
        s, method = (self.k - 1) % self.m, self.method
        held, self._held = self._held, None
        if held is not None and bool(held[0]):  # host small state; hold(): a step nobody reads, nothing learnt
            self._alpha_one[0] = self.onehot[s]
            return self._alpha_one, ONE_SAMPLE_RESTARTED[False]
        on: list[bool] = self.valid[0].tolist()
        every = all(on)
        y = ldl_solve_one(self._system_one(on, every), self._ones_one if every else [1.0 if v else 0.0 for v in on])
        ys, finite = self._normalised_one(y)
        r: float = self.r.item()
        ref: float = self.ref_r.item()
        bound = method.restart_weight
        # finite: every α_j is, so max and min see no NaN; False for NaN r
        ok = finite and max(ys) <= bound and min(ys) >= -bound and r <= method.restart_growth * ref
        restart = bool(active[0]) and not ok  # NaN weights fail the comparison, hence restart
        if restart:
            self.valid[0] = self.onehot_b[s]
        self.ref_r[0] = r if restart else (math.nan if r != r or ref != ref else min(ref, r))
        alpha = self._alpha_one
        if restart or self.k <= self.delay:
            alpha[0] = self.onehot[s]
        else:
            alpha[0] = ys
        return alpha, ONE_SAMPLE_RESTARTED[restart]

    def _system_one(self, on: list[bool], every: bool) -> list[float]:
        """Return the regularised, normalised Gram matrix of :meth:`_system` for one sample, row-major in floats.

        ``on`` flags the sample's valid slots (``every``: all of them).
        """
        m = self.m
        g_flat: list[float] = self.G[0].ravel().tolist()
        diag = g_flat[:: m + 1] if every else [g_flat[j * (m + 1)] if on[j] else 0.0 for j in range(m)]
        scale = max(diag)
        if not scale > 0.0 or any(d != d for d in diag):  # NumPy's max is NaN when any entry is
            scale = 1.0
        if every:  # the usual case: every slot in use
            H = [x / scale for x in g_flat]
        else:
            H = [g_flat[i * m + j] / scale if on[i] and on[j] else 0.0 for i in range(m) for j in range(m)]
        mode, lam = self.lam_mode, self.lam
        if every and mode == "relative":
            factor = self.lam_factor
            for jj in range(0, m * m, m + 1):
                H[jj] *= factor
            return H
        for j in range(m):
            jj = j * (m + 1)
            if not on[j]:
                H[jj] = 1.0
            elif mode == "relative":
                H[jj] *= self.lam_factor
            elif mode == "relative_max":
                H[jj] += lam
            else:
                H[jj] += lam / scale
        return H

    def _normalised_one(self, y: list[float]) -> tuple[list[float], bool]:
        """Return the weights α_j = y_j / Σ_j y_j (summed left to right) and whether they are finite (else NaN)."""
        total = y[0]
        for j in range(1, self.m):
            total += y[j]
        if total == 0.0 or not math.isfinite(total):  # some y_j, hence some α_j, not finite (NumPy: inf or NaN)
            return [math.nan] * self.m, False
        return [yj / total for yj in y], True

    def combine(self, alpha: Array, out: Array) -> None:
        """x_{k+1} = Σ_j α_j [g_j − (1 − β) f_j] into ``out`` (shape (B, n)) for weights α of shape (B, m)."""
        if self._gstack_one is not None:  # Kernels.vecmat's one-sample product without its casts
            # NumPy mode (_bind): the weights (host small state) and the view of out are NumPy arrays
            alpha_one: Any = alpha[0]
            out_one = self.kern.numpy_view(out)[0]
            np.matmul(alpha_one, self._gstack_one, out=out_one)
            return
        a = self.kern.big(alpha, self.dtype)
        if self.beta == 1.0:
            self.kern.vecmat(out, a, self.R[: self.m, ...])
        else:
            self.w[:, : self.m] = a
            self.w[:, self.m:] = (self.beta - 1.0) * a
            self.kern.vecmat(out, self.w, self.R)

    def extrapolate(self, active: Array, out: Array) -> Array:
        """Write the Anderson extrapolate of the stored pairs into ``out`` (shape (B, n)).

        Parameters
        ----------
        active : small-state bool array, shape (B,)
            Samples the restart safeguards apply to (inactive samples keep their history).
        out : array, shape (B, n)
            Output buffer; must not overlap the history.

        Returns
        -------
        small-state bool array, shape (B,)
            The samples whose history was restarted by a safeguard (their step is the plain
            mixing step from the newest pair).
        """
        alpha, restart = self.weights(active)
        self.combine(alpha, out)
        return restart

    # --- the solve loop's protocol (fixedpoint.method.MethodState) -------------------------------

    def observe(self, x: Array, gx: Array, f: Array | None, need_gnorm: bool = False) -> ObservedNorms:
        """Push the pair (g_k, f_k) (:meth:`push`); return ‖f_k‖₂ (and ‖g_k‖₂ with ``need_gnorm``)."""
        assert f is not None  # the loop passes the residual_buffer(), which is never None here
        return self.push(gx, f, gnorm=need_gnorm)

    def hold(self, held: Array) -> None:
        """Drop the held samples' newest pair (:meth:`fixedpoint.method.MethodState.hold`); for the next step only.

        Their slot of the pair just pushed is marked invalid (the pair takes no part in any later
        extrapolation and is overwritten in turn), and the following :meth:`extrapolate` neither restarts
        them nor updates their restart bookkeeping; what it writes into their rows is not meant to be used.
        The window still counts pushes: a held pair takes a slot until overwritten.  Samples not held are
        unaffected, to the bit.  O(B·m) small-state work; nothing read on the host.
        """
        s, xp = (self.k - 1) % self.m, self.kern.sxp
        self.valid = xp.where(held[:, None] & self.onehot_b[s], False, self.valid)
        self._held = held

    def step(self, x: Array, gx: Array, f: Array | None, active: Array, out: Array) -> Array:
        """Write the extrapolate into ``out`` (:meth:`extrapolate`); return the samples that restarted."""
        return self.extrapolate(active, out)

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return copies of the state arrays (:attr:`STATE`) by name, and ``"count"``, the number of pairs pushed."""
        state = {name: namespace_of(getattr(self, name)).asarray(getattr(self, name), copy=True) for name in self.STATE}
        state["count"] = self.kern.sxp.asarray(self.k, dtype=self.kern.sxp.int64, device=self.kern.sdevice)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, in place (values may come from another library or device).

        Raises
        ------
        ValueError
            If a state array is missing or its shape differs from this history's.
        """
        if "count" not in state:
            raise ValueError("Anderson history state lacks 'count'")
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
        self.k = int(state["count"])

    def reset(self) -> None:
        """Forget the stored pairs: the next :meth:`extrapolate` uses only pairs pushed after this call."""
        self.valid = self.kern.sxp.zeros_like(self.valid)
        self.ref_r = self.kern.sxp.full_like(self.ref_r, float("inf"))


register_method("anderson", Anderson)
