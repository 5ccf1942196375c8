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
from typing import Any

import array_api_compat
import numpy as np

from .backend import namespace_of
from .checks import check_choice, check_int, check_real
from .interop import convert
from .kernels import Kernels
from .method import Method, MethodState

__all__ = ["Anderson", "AndersonHistory", "LAM_MODES"]

#: How the regularisation λ is measured (see :class:`Anderson`).
LAM_MODES = ("relative", "relative_max", "absolute")

# The one-sample restart flags _weights_one returns, indexed by whether the sample restarted (read-only).
_RESTARTED = (np.zeros(1, dtype=bool), np.ones(1, dtype=bool))
for _flag in _RESTARTED:
    _flag.flags.writeable = False


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
    delay : int, default 0
        Number of first iterations that take plain mixing steps
        x_{k+1} = x_k + β f_k before extrapolating (the history is still
        recorded).  The first step is always plain, so ``delay=1`` is the same as 0.
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

    References
    ----------
    D. G. Anderson, J. ACM 12 (1965).  H. F. Walker & P. Ni, SIAM J. Numer. Anal.
    49 (2011).  M. Al Dajani & D. Keyes, arXiv 2410.19460 (2024).

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.solve(np.cos, np.zeros(2), method=fixedpoint.Anderson(m=3), tol=1e-10)
    >>> res.method, round(float(res.x[0]), 6)
    ('anderson', 0.739085)
    """

    name = "anderson"

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-5
    lam_mode: str = "relative"
    delay: int = 0
    restart_growth: float = 1e4
    restart_weight: float = 1e6

    def __post_init__(self) -> None:
        self._set(
            m=check_int("m", self.m, 1),
            beta=check_real("beta", self.beta, 0.0, 1.0, low_open=True),
            lam=check_real("lam", self.lam, 0.0, None),
            lam_mode=check_choice("lam_mode", self.lam_mode, LAM_MODES),
            delay=check_int("delay", self.delay, 0),
            restart_growth=check_real("restart_growth", self.restart_growth, 1.0, None, low_open=True,
                                      allow_inf=True),
            restart_weight=check_real("restart_weight", self.restart_weight, 1.0, None, low_open=True,
                                      allow_inf=True),
        )

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> AndersonHistory:
        """An :class:`AndersonHistory` for ``B`` samples of length ``n``: the state of one solve."""
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
        self.kern, self.B, self.n, self.dtype, self.method = kern, B, n, dtype, method
        self.m = m = method.m
        self.beta, self.lam, self.lam_mode = method.beta, method.lam, method.lam_mode
        xp, dev, sxp, sdev, sdt = kern.xp, kern.device, kern.sxp, kern.sdevice, kern.sdtype
        self.R = xp.zeros((2 * m, B, n), dtype=dtype, device=dev)  # a stack: [:m] the g_j, [m:] the f_j
        self.g_slots = [self.R[s, ...] for s in range(m)]  # views made once: push() recognises its own buffer
        self.f_slots = [self.R[m + s, ...] for s in range(m)]
        self.row = xp.zeros((B, m), dtype=dtype, device=dev)
        self.w = xp.zeros((B, 2 * m), dtype=dtype, device=dev)
        self.G = sxp.zeros((B, m, m), dtype=sdt, device=sdev)
        self.valid = sxp.zeros((B, m), dtype=sxp.bool, device=sdev)
        self.ref_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        self.r = sxp.zeros((B,), dtype=sdt, device=sdev)
        self.k = 0  # number of pairs pushed so far
        self._alpha_one = sxp.zeros((1, m), dtype=sdt, device=sdev)  # the weights of _weights_one
        self._gstack_one = None  # combine()'s one-sample view, where it applies
        if B == 1 and kern.mode == "numpy":  # host views for _push_one and combine, made once (R is never replaced)
            stack = kern.small(self.R)
            self._f_one = [stack[m + s, 0] for s in range(m)]
            self._fstack_one, self._row_one = stack[m:, 0, :], kern.small(self.row)[0]
            if self.beta == 1.0 and stack.dtype == np.float64 == np.dtype(sdt):  # α needs no cast: one np.dot
                self._gstack_one = stack[:m, 0, :]
        slots = sxp.arange(m, device=sdev)
        self.onehot_b = [slots == s for s in range(m)]
        self.onehot = [sxp.astype(h, sdt) for h in self.onehot_b]
        self.eye = sxp.eye(m, dtype=sdt, device=sdev)
        self.H = sxp.zeros((B, m, m), dtype=sdt, device=sdev)  # the regularised, normalised Gram matrices
        self.ones = sxp.ones((B, m), dtype=sdt, device=sdev)

    # --- the pair (g_k, f_k) ---------------------------------------------------------------------

    def residual_buffer(self) -> Any:
        """The ring slot where the next f_k = g(x_k) − x_k is to be written, shape (B, n)."""
        return self.f_slots[self.k % self.m]

    def push(self, g: Any, f: Any, *, gnorm: bool = False) -> Any:
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
        if self.B == 1 and kern.mode == "numpy" and kern.comm is None:
            return self._push_one(s, g, gnorm)
        terms = [("matvec", self.R[self.m:, ...], self.f_slots[s], self.row)] + ([("sqnorm", g)] if gnorm else [])
        sums = kern.sums(*terms)
        row = sums[0]
        if kern.small_on_host and not math.isfinite(float(row[:, s].sum())):  # |f|^2 overflowed, so may the row
            row = kern.rescued(terms[0], row)
        self.r = kern.root(row[:, s], ("sqnorm", self.f_slots[s]))
        self.G[:, s, :] = row
        self.G[:, :, s] = row
        self.valid[:, s] = True
        self.k += 1
        if gnorm:
            return self.r, kern.root(sums[1], ("sqnorm", g))
        return self.r

    def _push_one(self, s: int, g: Any, gnorm: bool) -> Any:
        """The Gram row of :meth:`push` for one sample on the host: direct ``np.dot`` calls and Python scalars."""
        row = self._row_one
        np.dot(self._fstack_one, self._f_one[s], out=row)
        sq = float(row[s])
        if not math.isfinite(sq):  # |f|^2 overflowed in the vectors' dtype (so may have the row)
            row = self.kern.rescued(("matvec", self.R[self.m:, ...], self.f_slots[s]), row[None].astype(np.float64))[0]
            sq = float(row[s])
        G = self.G[0]
        G[s, :] = row
        G[:, s] = row
        self.valid[0, s] = True
        self.r = self._sqrt_one(sq, self.f_slots[s])
        self.k += 1
        if gnorm:
            g1 = self.kern.small(g)[0]
            return self.r, self._sqrt_one(float(np.dot(g1, g1)), g)
        return self.r

    def _sqrt_one(self, sq: float, v: Any) -> Any:
        """The norm of the one-sample vector ``v`` from its square ``sq``, rescued by the kernels when the square
        overflowed."""
        if math.isfinite(sq):
            return np.array([math.sqrt(sq)], dtype=self.kern.sdtype)
        return self.kern.root(np.array([sq], dtype=self.kern.sdtype), ("sqnorm", v))

    def size(self) -> Any:
        """Number of stored pairs each sample's next extrapolation combines: small-state integers, shape (B,)."""
        return self.kern.sxp.sum(self.kern.sxp.astype(self.valid, self.kern.sxp.int64), axis=1)

    # --- the extrapolation -----------------------------------------------------------------------

    def weights(self, active: Any) -> tuple[Any, Any]:
        """Mixing weights α (shape (B, m)) for the newest pair, and the samples that restarted (shape (B,)).

        Solves the normal equations of the module docstring with H normalised by its
        largest valid diagonal entry; "relative" λ multiplies each diagonal entry by
        1 + λ, "absolute" λ is added to it.  Slots outside a sample's current history get a decoupled unit
        row and column and a zero right-hand side, hence α_j = 0 exactly.  An ``active`` sample restarts
        (history cleared to the newest pair, plain step α = e_k) when a weight is
        non-finite or exceeds ``restart_weight`` in magnitude, or when ‖f_k‖ exceeds
        ``restart_growth`` times its smallest residual norm since the last restart.
        During the first ``delay`` iterations the weights are those of a plain step
        (the safeguards still run).  Part of :meth:`extrapolate`; updates the restart
        bookkeeping, so call it once per pushed pair.
        """
        if self.B == 1 and self.kern.small_on_host:
            return self._weights_one(active)
        if self.kern.small_on_host and bool(self.valid.all()):
            rhs = self._system_full()
        else:
            rhs = self._system_masked()
        xp, s, method = self.kern.sxp, (self.k - 1) % self.m, self.method
        y = self.kern.solve_spd(self.H, rhs)
        alpha = y / xp.sum(y, axis=1)[:, None]  # a singular system: non-finite, hence a restart below
        ok = (xp.max(xp.abs(alpha), axis=1) <= method.restart_weight) & (self.r <= method.restart_growth * self.ref_r)
        restart = active & ~ok  # NaN weights fail the comparison, hence restart
        self.valid = xp.where(restart[:, None], self.onehot_b[s], self.valid)
        self.ref_r = xp.where(restart, self.r, xp.minimum(self.ref_r, self.r))
        if self.k <= method.delay:
            return xp.broadcast_to(self.onehot[s], alpha.shape), restart
        return xp.where(restart[:, None], self.onehot[s], alpha), restart

    def _system_masked(self) -> Any:
        """The systems of :meth:`weights` in ``self.H``, any slots valid (array API: any device); returns their
        right-hand sides (1 on valid slots, 0 elsewhere)."""
        xp, v = self.kern.sxp, self.valid
        vf = xp.astype(v, self.kern.sdtype)
        diag = xp.where(v, xp.linalg.diagonal(self.G), 0.0)
        scale = xp.max(diag, axis=1)
        scale = xp.where(scale > 0.0, scale, 1.0)
        if self.lam_mode == "relative":  # λ ‖f_j‖² on entry j
            reg = self.lam * diag / scale[:, None]
        elif self.lam_mode == "relative_max":  # λ max_j ‖f_j‖² on every entry (H is divided by that max)
            reg = xp.full_like(diag, self.lam)
        else:  # absolute: λ in the units of H
            reg = xp.full_like(diag, self.lam) / scale[:, None]
        H = xp.where(v[:, :, None] & v[:, None, :], self.G, 0.0) / scale[:, None, None]
        self.H[...] = H + self.eye * xp.where(v, reg, 1.0)[:, None, :]
        return vf

    def _system_full(self) -> Any:
        """:meth:`_system_masked` when every slot of every sample is valid and the small state is NumPy: the
        same systems by in-place operations on views, without masks (the usual case once the window is full;
        a third of the time for thousands of samples)."""
        B, m, H = self.B, self.m, self.H
        scale = self.G.reshape(B, m * m)[:, :: m + 1].max(axis=1)
        scale[~(scale > 0.0)] = 1.0  # also for NaN
        np.divide(self.G, scale[:, None, None], out=H)
        h_diag = H.reshape(B, m * m)[:, :: m + 1]
        if self.lam_mode == "relative":
            h_diag *= 1.0 + self.lam
        elif self.lam_mode == "relative_max":
            h_diag += self.lam
        else:
            h_diag += self.lam / scale[:, None]
        return self.ones

    def _weights_one(self, active: Any) -> tuple[Any, Any]:
        """:meth:`weights` for one sample with the small state on the host: the system of the valid slots
        only, with Python scalars for the bookkeeping (the same weights; a fifth of the NumPy calls).

        While the largest diagonal entry of H lies in [1e-100, 1e100] the system is solved without
        dividing H by it (α does not depend on H's scale, and LU neither over- nor underflows there):
        one NumPy operation sets up the system instead of two.
        """
        s, method, m, G = (self.k - 1) % self.m, self.method, self.m, self.G[0]
        mk = int(np.count_nonzero(self.valid[0]))
        H, H_diag, ones, W = self._system_one(mk)
        if mk == m:  # the usual case: every slot in use
            sub, idx = G, None
        else:
            idx = self.valid[0].nonzero()[0]
            sub = G.take(idx, axis=0).take(idx, axis=1)
        scale = max(sub.diagonal().tolist())
        mode = self.lam_mode
        if 1e-100 <= scale <= 1e100 and mode != "relative_max":  # (False for NaN)
            if mode == "relative":  # H ⊙ W: each diagonal entry times 1 + λ
                np.multiply(sub, W, out=H)
            else:  # absolute: H + λI
                np.add(sub, W, out=H)
        else:
            scale = scale if scale > 0.0 else 1.0  # also for NaN
            np.divide(sub, scale, out=H)
            if mode == "relative":
                H_diag *= 1.0 + self.lam
            else:
                H_diag += self.lam if mode == "relative_max" else self.lam / scale
        y = self.kern.solve_one(H, ones)
        ys = y.tolist()
        total = sum(ys)
        inv = 1.0 / total if total != 0.0 else math.inf  # a singular system: non-finite, hence a restart below
        alpha = self._alpha_one
        if idx is None:
            np.multiply(y, inv, out=alpha[0])
        else:
            alpha[0] = 0.0
            alpha[0, idx] = y * inv
        r, ref = float(self.r[0]), float(self.ref_r[0])
        ok = max(map(abs, ys)) * abs(inv) <= method.restart_weight and r <= method.restart_growth * ref
        restart = bool(active[0]) and not ok  # NaN weights fail the comparison, hence restart
        if restart:
            self.valid[0] = self.onehot_b[s]
        self.ref_r[0] = r if restart else min(ref, r)
        if restart or self.k <= method.delay:
            alpha[0] = self.onehot[s]
        return alpha, _RESTARTED[restart]

    def _system_one(self, mk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """An mk×mk matrix for the system of :meth:`_weights_one`, a view of its diagonal, a vector of ones,
        and the constant that λ contributes (relative: 1 + λ on the diagonal and 1 elsewhere, a factor;
        absolute: λI, a term); buffers reused from call to call."""
        cache = self.__dict__.setdefault("_system_cache", {})
        if mk not in cache:
            H = np.zeros((mk, mk))
            eye = np.eye(mk)
            W = 1.0 + self.lam * eye if self.lam_mode == "relative" else self.lam * eye
            cache[mk] = (H, H.reshape(-1)[:: mk + 1], np.ones(mk), W)
        return cache[mk]

    def combine(self, alpha: Any, out: Any) -> None:
        """x_{k+1} = Σ_j α_j [g_j − (1 − β) f_j] into ``out`` (shape (B, n)) for weights α of shape (B, m)."""
        if self._gstack_one is not None:
            np.dot(alpha[0], self._gstack_one, out=self.kern.small(out)[0])
            return
        a = self.kern.big(alpha, self.dtype)
        if self.beta == 1.0:
            self.kern.vecmat(out, a, self.R[: self.m, ...])
        else:
            self.w[:, : self.m] = a
            self.w[:, self.m:] = (self.beta - 1.0) * a
            self.kern.vecmat(out, self.w, self.R)

    def extrapolate(self, active: Any, out: Any) -> Any:
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

    def observe(self, x: Any, gx: Any, f: Any, need_gnorm: bool = False) -> Any:
        return self.push(gx, f, gnorm=need_gnorm)

    def step(self, x: Any, gx: Any, f: Any, active: Any, out: Any) -> Any:
        return self.extrapolate(active, out)

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state arrays (:attr:`STATE`) by name, and ``"count"``, the number of pairs pushed."""
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
