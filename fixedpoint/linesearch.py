"""A backtracking line search on the residual norm around any method: derivative-free Armijo with a parabolic model.

:class:`Backtracking` wraps another method (the *inner* method: Anderson, Broyden, forward iteration, ...).
Every evaluation of g is one iteration of the driver loop.  Per sample the wrapper keeps a base point x_b
with its residual norm ‖f(x_b)‖, a direction p and a step length t, and each iteration tests the point just
evaluated, x = x_b + t·p:

* accepted when ‖f(x)‖ ≤ (1 − σ t)·‖f(x_b)‖, the derivative-free sufficient-decrease condition of Kelley,
  *Iterative Methods for Linear and Nonlinear Equations*, SIAM 1995, ch. 8 (eq. 8.1, σ = 1e-4), optionally
  relaxed by the summable slack η_j of Li & Fukushima (2000) (option ``eta``, default 0): x becomes
  the base, the inner method's proposal x_prop (made from x) gives the new direction p = x_prop − x, and the
  next point is x_prop (t = 1);
* rejected otherwise: the next point is x_b + t'·p, with t' the minimiser of the parabola through
  φ(0) = ‖f(x_b)‖², φ'(0) = −2 φ(0) (exact for a Newton direction) and φ(t) = ‖f(x)‖², safeguarded to
  [0.1 t, 0.5 t] (Kelley 1995, §8.3.1, the two-point parabolic model with σ₀ = 0.1, σ₁ = 0.5).

The inner method learns from the accepted points only: at a rejected point the wrapper calls the inner
state's :meth:`fixedpoint.method.MethodState.hold` between ``observe`` and ``step``, so that Anderson drops
that point's pair and Broyden keeps its base point, whose secant pair at the next accepted point x is
(x − x_b, f(x) − f(x_b)), the update of the step taken (as Broyden's method with a line search, Kelley 1995,
§8.3, and SciPy's nonlinear solvers, which update their Jacobian at accepted points).  A method that does
not implement ``hold`` learns from every point.

The search fails when the next step length would fall below ``min_step`` (default 0.01) or after
``max_backtracks`` rejections in a row (default 8).  Then, with ``fallback="full"`` (the default), the
full step x_b + p is evaluated once more and accepted whatever its residual, as SciPy's nonlinear solvers
do when their Armijo search fails (scipy.optimize.broyden1 and its siblings: "take the full step", minimum
step 0.01); with ``fallback="current"`` the last point tried is accepted instead.  Each failure counts as
a restart in :attr:`fixedpoint.FixedPointResult.n_restarts`.

What it costs: nothing where the inner method's steps decrease ‖f‖ enough (one comparison per sample and
one vector difference), one evaluation of g per backtrack where they do not, and one more per failed
search.  With a limited memory (Anderson's and Broyden's ``m``) a rejected point still takes a slot
until overwritten (the window counts evaluations), so a search that rejects often shortens the memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import numpy as np

from .backend import Array
from .checks import check_choice, check_int, check_real
from .kernels import Kernels
from .method import Method, MethodState, ObservedNorms

__all__ = ["Backtracking", "FALLBACKS"]

#: What :class:`Backtracking` does when its search fails (option ``fallback``).
FALLBACKS = ("current", "full")

_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Backtracking(Method):
    """Backtracking line search on ‖f‖ around another method (derivative-free Armijo; Kelley 1995, ch. 8).

    Parameters
    ----------
    inner : Method
        The method whose steps are globalised, e.g. :class:`fixedpoint.Broyden` or
        :class:`fixedpoint.Anderson`; it must derive what it learns from the iterates it is given (not
        from the step it proposed), as the built-in methods do.  It learns from the accepted points only
        where it implements :meth:`fixedpoint.method.MethodState.hold` (Anderson, Broyden), from every
        evaluated point otherwise.
    sigma : float, default 1e-4
        σ of the sufficient-decrease test ‖f(x_b + t p)‖ ≤ (1 + η_j − σ t)‖f(x_b)‖, in (0, 1).
    eta : float, default 0.0
        η₀ >= 0 of the nonmonotone slack η_j = η₀/j² after j accepted points (the summable sequence of
        Li & Fukushima, Optim. Methods Softw. 13 (2000) 181-201, eq. 2.6, here added to Kelley's test):
        0 keeps ‖f‖ decreasing at every accepted point; > 0 lets the first steps increase it.
    max_backtracks : int, default 8
        Rejections in a row after which the search fails (>= 1).
    min_step : float, default 0.01
        The search fails when the next step length would fall below it, in [0, 1) (0: only
        ``max_backtracks`` ends it); 0.01 is SciPy's minimum step of its nonlinear solvers' Armijo search.
    fallback : {"full", "current"}, default "full"
        What a failed search accepts: "full", the full step x_b + p, evaluated once more (SciPy's
        choice); "current", the last point tried.  Measured on SciPy's test problems through
        :func:`fixedpoint.root` (docs/root.md): "full" took 14/130/32 evaluations on F, F4_powell, F5
        with Anderson where "current" (with 8 backtracks) took 36/319/19, and Broyden converged on
        F4_powell (169) where it did not with "current" in 1000.

    Raises
    ------
    TypeError, ValueError
        At construction, for an ``inner`` that is not a method object, or an option out of range
        (the message names it).

    Notes
    -----
    Memory: three vectors per sample besides the inner method's (the base point, the direction, a
    scratch row) and a few numbers.  Work per iteration besides the inner method's: O(n) (a difference,
    and where some sample backtracks a scaled sum and a masked copy).  No host synchronisation; the
    samples of a batch search independently, and finished samples are packed out with the inner state.
    """

    name = "backtracking"

    inner: Method = dataclasses.field(default_factory=lambda: _default_inner())
    sigma: float = 1e-4
    eta: float = 0.0
    max_backtracks: int = 8
    min_step: float = 0.01
    fallback: str = "full"

    def __post_init__(self) -> None:
        """Validate the options (``TypeError``/``ValueError`` naming them)."""
        if not isinstance(self.inner, Method):
            raise TypeError(f"inner must be a method object (e.g. fixedpoint.Broyden()), got {self.inner!r}")
        if isinstance(self.inner, Backtracking):
            raise ValueError("inner must not itself be a Backtracking line search")
        self._set(sigma=check_real("sigma", self.sigma, 0.0, 1.0, low_open=True, high_open=True),
                  eta=check_real("eta", self.eta, 0.0, None),
                  max_backtracks=check_int("max_backtracks", self.max_backtracks, 1),
                  min_step=check_real("min_step", self.min_step, 0.0, 1.0, high_open=True),
                  fallback=check_choice("fallback", self.fallback, FALLBACKS))
        # complex vectors wherever the inner method takes them (the search itself compares norms only)
        object.__setattr__(self, "supports_complex", self.inner.supports_complex)

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> MethodState:
        """Allocate the inner method's state and the line search's buffers (three vectors per sample)."""
        return _BacktrackingState(kern, B, n, dtype, self.inner.init(kern, B, n, dtype), self)

    def options(self) -> dict[str, Any]:
        """Return the options, the inner method's under ``inner_method`` and their own names."""
        return {"inner_method": self.inner.name, **self.inner.options(), "sigma": self.sigma, "eta": self.eta,
                "max_backtracks": self.max_backtracks, "min_step": self.min_step, "fallback": self.fallback}


def _default_inner() -> Method:
    from .broyden import Broyden  # the method layer: same layer, imported when a default is needed
    return Broyden()


class _BacktrackingState(MethodState):
    """The inner state, plus per sample: base point, direction, ‖f(x_b)‖, step length and backtracks in a row."""

    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, inner: MethodState, method: Backtracking) -> None:
        super().__init__(kern, B, n, dtype, residual=False)
        xp, dev = kern.xp, kern.device
        self.inner, self.sigma, self.eta, self.max_backtracks = inner, method.sigma, method.eta, method.max_backtracks
        self.min_step, self.fallback = method.min_step, method.fallback
        self.full: Array | None = None  # samples whose current point is the full step after a failed search
        # the inner method's residual buffer, or one of our own: the test needs f_k (forward iteration forms none)
        self.own_f: Array | None = (xp.empty((B, n), dtype=dtype, device=dev)
                                    if inner.residual_buffer() is None else None)
        self.base = xp.empty((B, n), dtype=dtype, device=dev)
        self.p = xp.empty((B, n), dtype=dtype, device=dev)
        self.trial = xp.empty((B, n), dtype=dtype, device=dev)
        sxp, sdt, sdev = kern.sxp, kern.sdtype, kern.sdevice
        self.fbase = sxp.full((B,), _INF, dtype=sdt, device=sdev)  # ‖f(x_b)‖: infinite until the first point
        self.t = sxp.zeros((B,), dtype=sdt, device=sdev)
        self.back = sxp.zeros((B,), dtype=sdt, device=sdev)
        self.slack = sxp.zeros((B,), dtype=sdt, device=sdev)  # η_j of the current base (0 before the first)
        self.j = sxp.zeros((B,), dtype=sdt, device=sdev)  # bases accepted so far
        self.fnorm: Array | None = None  # ‖f_k‖ of the point being tested (set by observe, used by step)

    def residual_buffer(self) -> Array | None:
        """Return the inner method's residual buffer, or the line search's own where the inner has none."""
        buf = self.inner.residual_buffer()
        return buf if buf is not None else self.own_f

    def observe(self, x: Array, gx: Array, f: Array | None, need_gnorm: bool = False) -> ObservedNorms | None:
        """Let the inner method observe (g_k, f_k); keep ‖f_k‖ for the test and return what the loop needs."""
        assert f is not None  # residual_buffer is never None
        kern = self.kern
        observed = self.inner.observe(x, gx, f, need_gnorm)
        if isinstance(observed, tuple):
            self.fnorm = observed[0]
            return observed
        if observed is not None and not need_gnorm:
            self.fnorm = observed
            return observed
        if need_gnorm:
            sums = kern.sums(("sqnorm", f), ("sqnorm", gx))
            fn = observed if observed is not None else kern.root(sums[0], ("sqnorm", f))
            self.fnorm = fn
            return fn, kern.root(sums[1], ("sqnorm", gx))
        self.fnorm = kern.norms(f)
        return self.fnorm

    def _all(self, mask: Array) -> bool:
        """Whether every entry of ``mask`` is true, known without synchronising (False on a device)."""
        return self.kern.small_on_host and bool(np.all(cast(np.ndarray, mask)))  # host small state: NumPy

    def step(self, x: Array, gx: Array, f: Array | None, active: Array, out: Array) -> Array | None:
        """Write the inner method's proposal (accepted samples) or the backtracked point x_b + t'p into ``out``."""
        kern, sxp = self.kern, self.kern.sxp
        fn, fbase, t = self.fnorm, self.fbase, self.t
        assert fn is not None  # observe ran
        accept = fn <= (1.0 + self.slack - self.sigma * t) * fbase  # False for NaN
        if self.full is not None:
            accept = accept | self.full  # the full step after a failed search: accepted as it is
        shorter = self._shorter(fn, fbase, t)
        gave_up = ~accept & ((self.back >= self.max_backtracks) | (shorter < self.min_step))
        if self.fallback == "full":  # SciPy's: the full step x_b + p, evaluated once more and accepted
            self.full = gave_up
        else:
            accept = accept | gave_up
        every = self._all(accept)
        if not every:  # the inner method learns nothing from the rejected trial points
            self.inner.hold(~accept)
        restarted = self.inner.step(x, gx, f, active, out)
        kern.copy_rows_where(self.base, x, accept)
        if every:
            kern.sub(self.p, out, x)
        else:
            kern.sub(self.trial, out, x)
            kern.copy_rows_where(self.p, self.trial, accept)
        t_next = sxp.where(accept | gave_up, sxp.ones_like(t), shorter)
        if not every:
            kern.add_scaled(self.trial, self.base, t_next, self.p)
            kern.copy_rows_where(out, self.trial, ~accept)
        self.fbase = sxp.where(accept, fn, fbase)
        self.j = sxp.where(accept, self.j + 1.0, self.j)
        self.slack = self.eta / (self.j * self.j)
        self.t = t_next
        self.back = sxp.where(accept, sxp.zeros_like(t), self.back + 1.0)
        self.fnorm = None
        done: Array = gave_up if restarted is None else (restarted | gave_up)
        return done

    @staticmethod
    def _parabola(fn: Array, fbase: Array, t: Array) -> Array:
        """Return the minimiser of the parabola through φ(0) = ‖f_b‖², φ'(0) = −2φ(0), φ(t) = ‖f‖² (Kelley, §8.3.1)."""
        phi0, phit = fbase * fbase, fn * fn
        curvature = phit - phi0 * (1.0 - 2.0 * t)  # t² times the parabola's coefficient of t²
        return phi0 * t * t / curvature

    def _shorter(self, fn: Array, fbase: Array, t: Array) -> Array:
        """Return the next step length of a rejected sample: the parabola's minimiser, safeguarded to [0.1 t, 0.5 t]."""
        sxp = self.kern.sxp
        with np.errstate(all="ignore"):
            lam = self._parabola(fn, fbase, t)
        lam = sxp.where(sxp.isfinite(lam) & (lam > 0), lam, 0.5 * t)
        result: Array = sxp.minimum(sxp.maximum(lam, 0.1 * t), 0.5 * t)
        return result

    def pack(self, keep: np.ndarray) -> bool:
        """Keep the samples ``keep`` in the inner state and the line search's arrays; False if the inner cannot."""
        if not self.inner.pack(keep):
            return False
        k = len(keep)
        for name in ("base", "p", "trial", "own_f"):  # vectors: moved in place, nothing of size n allocated
            a = getattr(self, name)
            if a is not None:
                self.kern.pack_rows(a, keep)
                setattr(self, name, a[:k, ...])
        rows, sxp = self.kern.small_index(keep), self.kern.sxp
        if self.full is not None:
            self.full = sxp.take(self.full, rows, axis=0)
        for name in ("fbase", "t", "back", "slack", "j"):  # small state: gathered
            setattr(self, name, sxp.take(getattr(self, name), rows, axis=0))
        self.B = k
        return True
