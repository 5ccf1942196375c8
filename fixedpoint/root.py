"""The root-finding entry point :func:`root`: F(x) = 0 on the driver loop of :func:`fixedpoint.solve`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .backend import Array, namespace_of, working_dtype
from .checks import check_callable, check_choice, check_real
from .interop import to_numpy
from .iteration import IterationInfo, run
from .linesearch import Backtracking
from .method import Method
from .options import DEFAULTS, STOP_MODES
from .registry import resolve_method
from .result import FixedPointResult

__all__ = ["root", "ROOT_DEFAULTS", "LINE_SEARCHES"]

#: Values of ``line_search``: the backtracking Armijo search of :class:`fixedpoint.linesearch.Backtracking`, or none.
LINE_SEARCHES = ("armijo", None)

#: The options in which :func:`root` differs from the method's own defaults, per method name (measured on SciPy's
#: test problems, docs/root.md): a window as long as the problems of SciPy's tests (n <= 20), so that the 20x20 linear
#: system is solved in about n + 5 evaluations as by GMRES; a damped first step (beta); extrapolation from the second
#: evaluation on (delay=0: a linear F is solved in 3); Broyden with a long memory.
ROOT_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "anderson": MappingProxyType({"m": 25, "lam": 1e-12, "beta": 0.7, "delay": 0}),
    "broyden": MappingProxyType({"m": 50}),
})

#: SciPy's default step factor: alpha = 0.5·max(‖x0‖, 1)/‖F(x0)‖ (scipy.optimize.broyden1, parameter alpha).
ALPHA_FACTOR = 0.5


def root(F: Callable[..., Any], x0: Any, method: str | Method = "anderson", *,  # noqa: N803 (F: the field's name)
         line_search: str | None = None, alpha: float | None = None, tol: float = 6e-6,
         max_iter: int = DEFAULTS["max_iter"], stop_mode: str = "abs", divtol: float | None = None,
         batch: bool = DEFAULTS["batch"], check_every: int | None = DEFAULTS["check_every"],
         callback: Callable[..., Any] | None = DEFAULTS["callback"], backend: Any = DEFAULTS["backend"],
         **method_options: Any) -> FixedPointResult:
    """Find x with F(x) = 0 by Anderson acceleration (default) or Broyden, optionally with a line search on ‖F‖.

    The solve runs the driver loop of :func:`fixedpoint.solve` on the fixed-point map
    g(y) = y + F(s y)/c in the scaled variable y = x/s, whose residual g(y) − y is F/c: with
    ``stop_mode="abs"`` c = 1 and s = alpha, so forward iteration is x ← x + alpha·F(x) and the
    methods' first step is SciPy's (the sign convention of scipy.optimize.broyden1: initial Jacobian
    guess −1/alpha).  Every evaluation of F is one iteration (``n_fev`` counts them, F(x0) included).

    Parameters
    ----------
    F : callable
        ``F(x) -> array`` of x's shape (a list or tuple is converted with NumPy); in batch mode each
        sample's rows of F depend on that sample's rows of x only.
    x0 : array or sequence of numbers
        Initial guess: a NumPy, CuPy or PyTorch array (or a list, taken as a NumPy array).
    method : str or Method, default "anderson"
        ``"anderson"``, ``"broyden"``, ``"forward"`` (with their options as further keyword arguments) or a
        method object.  Given by name, Anderson takes ``m=25, lam=1e-12, beta=0.7, delay=0`` and Broyden ``m=50``
        unless told otherwise (:data:`ROOT_DEFAULTS`; docs/root.md gives the measurements behind them).
    line_search : {None, "armijo"}, default None
        "armijo": :class:`fixedpoint.Backtracking` around the method, a derivative-free Armijo search on
        ‖F‖ (Kelley 1995, ch. 8) with SciPy's fallback (a failed search takes the full step); the method
        learns from the accepted points only, as SciPy's solvers.  It costs nothing while the method's
        steps decrease ‖F‖ and one evaluation per backtrack otherwise.  It rescues problems on which full
        steps overshoot (a flat F, where the defaults run off), and it converges on all of SciPy's test
        problems with Anderson and ``m=50`` (Broyden needs ``m=200`` for the 20×20 linear system: rejected
        points take slots of the memory); but it costs more evaluations than the defaults wherever their
        residual must rise before it falls (the 20×20 linear system: 76 against 25, Powell's function: 130
        against 83, docs/root.md), hence not the default.  None: the method's steps as they are.
    alpha : float, optional
        Step of the first iteration, x1 = x0 + alpha·F(x0) (> 0).  Default, per sample, SciPy's
        0.5·max(‖x0‖₂, 1)/‖F(x0)‖₂ (1 where F(x0) = 0), which makes badly scaled problems work.
    tol : float, default 6e-6
        Stop a sample once ‖F(x)‖₂ ≤ tol (``stop_mode="abs"``, as SciPy's ``f_tol``, whose default
        is this value, though SciPy's norm is the maximum norm), or ‖F(x)‖₂ ≤ tol·‖F(x0)‖₂ ("rel"); > 0.
    max_iter : int, default 1000
        Most evaluations of F, >= 1.
    stop_mode : {"abs", "rel"}, default "abs"
        See ``tol``.
    divtol : float or None, default None
        Stop a sample as "diverged" once ‖F(x)‖ exceeds divtol·‖F(x0)‖ (> 1); None, the default: never
        (the line search keeps ‖F‖ at its accepted points from growing, while a trial point may be large).
    batch, check_every, callback, backend
        As for :func:`fixedpoint.solve`.  The callback's ``info.x`` is the iterate x (not y) and
        ``info.residual`` is ‖F(x)‖₂ (with "rel": divided by ‖F(x0)‖₂).
    **method_options
        With a method name: that method's options (e.g. ``m`` for Broyden and Anderson).

    Returns
    -------
    FixedPointResult
        ``res.x`` is the root (the iterate with the smallest ‖F‖ seen), in x0's library, dtype, device
        and shape; ``res.residual`` and ``res.residual_history`` are ‖F(x)‖₂ (divided by ‖F(x0)‖₂ with
        "rel"); ``res.n_fev`` counts evaluations of F.  ``res.options`` records ``alpha`` (None when chosen
        per sample) and ``line_search``.

    Raises
    ------
    TypeError
        For an ``F`` that is not callable, an option the method does not take, a ``x0`` that is not an array
        or a sequence of numbers, and as :func:`fixedpoint.solve` for the rest.
    ValueError
        For an unknown ``line_search``, ``stop_mode`` or method, an ``alpha`` that is not > 0, an ``F(x0)``
        that is not finite, and as :func:`fixedpoint.solve`.

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.root(lambda x: x**3 - 8.0, np.ones(2), tol=1e-10)
    >>> bool(res.converged), np.round(res.x, 6).tolist()
    (True, [2.0, 2.0])
    """
    if check_callable("F", F) is None:
        raise TypeError("F must be callable, got None")
    check_choice("line_search", line_search, LINE_SEARCHES)
    check_choice("stop_mode", stop_mode, STOP_MODES)
    if alpha is not None:
        alpha = check_real("alpha", alpha, 0.0, None, low_open=True)
    inner = _method(method, method_options)
    method_obj: Method = inner if line_search is None else Backtracking(inner=inner)
    x0 = _as_array(x0)
    scaled = _ScaledProblem(F, x0, alpha, stop_mode == "rel", batch)
    opts = dict(tol=tol, max_iter=max_iter, stop_mode="abs", divtol=divtol, batch=batch, compact=False,
                check_every=check_every, callback=None if callback is None else scaled.callback(callback),
                backend=backend, comm=None)
    res = run(method_obj, scaled, scaled.y0, opts)
    res = dataclasses.replace(res, x=scaled.x_of(res.x),
                              options={**res.options, "stop_mode": stop_mode, "alpha": alpha,
                                       "line_search": line_search})
    return scaled.verify(res, tol)


def _method(method: str | Method, options: dict[str, Any]) -> Method:
    """Return the method object: a name takes :data:`ROOT_DEFAULTS` under the options given."""
    if isinstance(method, str):
        options = {**ROOT_DEFAULTS.get(method, {}), **options}
    obj, common = resolve_method(method, options, where="root")
    if common:
        raise TypeError(f"root() got unexpected keyword argument(s) {sorted(common)}")
    return obj


def _as_array(x0: Any) -> Array:
    """``x0`` as given when it is an array; a list or tuple of numbers as a NumPy array."""
    if isinstance(x0, (list, tuple)):
        try:
            return np.asarray(x0, dtype=np.result_type(float, *np.asarray(x0).ravel()[:1]))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"x0 must be an array or a sequence of numbers, got {x0!r}") from exc
    if not hasattr(x0, "shape") or not hasattr(x0, "dtype"):
        raise TypeError(f"x0 must be an array or a sequence of numbers, got {type(x0).__name__}")
    arr: Array = x0
    return arr


class _ScaledProblem:
    """The fixed-point map g(y) = y + F(s y)/c of :func:`root`, s and c per sample, F(x0) kept for its first call."""

    def __init__(self, F: Callable[..., Any], x0: Array, alpha: float | None, rel: bool,  # noqa: N803
                 batch: bool) -> None:
        xp = namespace_of(x0)
        self.F, self.xp, self.shape = F, xp, tuple(x0.shape)
        dtype = working_dtype(xp, x0)
        x0 = xp.astype(x0, dtype) if x0.dtype != dtype else x0
        self.F0: Array | None = self._call(x0)
        B = self.shape[0] if batch and self.shape else 1
        xnorm = _row_norms(xp, x0, B)
        fnorm = _row_norms(xp, self.F0, B)
        if not np.all(np.isfinite(fnorm)):
            raise ValueError("F(x0) is not finite")
        c = fnorm if rel else np.ones(B)
        c = np.where(c > 0, c, 1.0)
        a = (ALPHA_FACTOR * np.maximum(xnorm, 1.0) / np.where(fnorm > 0, fnorm, 1.0) if alpha is None
             else np.full(B, alpha))
        a = np.where(fnorm > 0, a, 1.0)
        self.s, self.c = self._per_sample(a * c, x0, B, batch), self._per_sample(c, x0, B, batch)
        self.s_host, self.c_host, self.B, self.batch = a * c, c, B, batch
        self.eps = float(np.finfo(to_numpy(x0).dtype).eps)
        self.y0 = x0 / self.s

    def _per_sample(self, v: np.ndarray, like: Array, B: int, batch: bool) -> Any:
        """Return a Python float (one problem) or an array broadcasting over a sample's entries (batch)."""
        if not batch:
            return float(v[0])
        xp = self.xp
        col = xp.asarray(v.reshape((B,) + (1,) * (len(self.shape) - 1)), dtype=like.dtype)
        device = getattr(like, "device", None)
        if device is not None and xp.__name__.split(".")[-1] != "numpy":
            col = xp.asarray(col, device=device)
        return col

    def _call(self, x: Array) -> Array:
        fx = self.F(x)
        if not hasattr(fx, "shape"):
            fx = np.asarray(fx, dtype=x.dtype)
        if tuple(fx.shape) != self.shape and int(np.prod(fx.shape)) == int(np.prod(self.shape)):
            fx = self.xp.reshape(fx, self.shape)
        out: Array = fx
        return out

    def __call__(self, y: Array) -> Array:
        """Return g(y) = y + F(s y)/c (F(x0) on the first call, which is at y0)."""
        fx = self.F0
        if fx is None:
            fx = self._call(y * self.s)
        self.F0 = None
        if isinstance(self.c, float) and self.c == 1.0:  # "abs", one problem: no division (nor its temporary)
            out: Array = y + fx
        else:
            out = y + fx / self.c
        return out

    def verify(self, res: FixedPointResult, tol: float) -> FixedPointResult:
        """Re-evaluate F where the loop's residual g(y) − y cannot resolve F/c ≤ tol; correct those samples.

        The loop forms (y + F/c) − y, exact to about eps·‖y‖: where 4·eps·‖y‖ ≥ tol at a sample reported
        converged (iterates that ran off to where F is below the rounding of y), F is evaluated once more at
        the result (counted in ``n_fev``), and a sample with ‖F‖/c > tol becomes "diverged".
        """
        conv = np.atleast_1d(np.asarray(res.converged, dtype=bool))
        ynorm = _row_norms(self.xp, res.x, self.B) / self.s_host
        flagged = conv & (4.0 * self.eps * ynorm >= tol)
        if not flagged.any():
            return res
        fnorm = _row_norms(self.xp, self._call(res.x), self.B) / self.c_host
        bad = flagged & ~(fnorm <= tol)
        conv = conv & ~bad
        status = np.where(bad, "diverged", np.atleast_1d(np.asarray(res.sample_status)))
        residual = np.where(bad, fnorm, np.atleast_1d(np.asarray(res.residual, dtype=np.float64)))
        overall = "converged" if conv.all() else ("diverged" if bad.any() else res.status)
        if self.batch:
            return dataclasses.replace(res, converged=conv, sample_status=status, residual=residual,
                                       status=overall, n_fev=res.n_fev + 1)
        return dataclasses.replace(res, converged=bool(conv[0]), sample_status=str(status[0]),
                                   residual=float(residual[0]), status=overall, n_fev=res.n_fev + 1)

    def x_of(self, y: Array) -> Array:
        """Return the iterate x = s·y (in the result's library: the solver converts back before this)."""
        x: Array = y * self.s
        return x

    def callback(self, callback: Callable[..., Any]) -> Callable[[IterationInfo], Any]:
        """Wrap a user's callback so that it sees x rather than y."""
        def wrapped(info: IterationInfo) -> Any:
            return callback(dataclasses.replace(info, x=info.x * self.s))
        return wrapped


def _row_norms(xp: Any, a: Array, B: int) -> np.ndarray:
    """‖row‖₂ of each of the B samples of ``a``, on the host in float64."""
    host = np.asarray(to_numpy(a)).reshape(B, -1)
    return np.asarray(np.linalg.norm(host, axis=1), dtype=np.float64)

