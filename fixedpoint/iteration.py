"""The one driver loop of every method (forward iteration, Anderson, Broyden, user-written ones).

A method supplies a state (:class:`fixedpoint.method.MethodState`, made by
:meth:`fixedpoint.method.Method.init`) that owns its buffers and computes the next
iterate; this module owns everything else: input checks, the batch layout,
calling ``g`` and checking what it returns, residuals and the stopping test,
per-sample convergence and freezing, the best iterate, the residual history,
restart counts, callbacks, ``check_every`` host synchronisation, the ``backend=``
bridge and the result.

Internally every problem is a batch: ``x0`` of any shape is viewed as ``(B, n)``
with ``B = 1`` unless ``batch=True``.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import array_api_compat
import numpy as np

from .backend import (
    Array,
    Namespace,
    buffer_dtype,
    is_accelerator,
    is_complex_dtype,
    library_name,
    namespace_of,
    resolve_namespace,
    working_dtype,
)
from .checks import user_stacklevel
from .comm import Communicator, agreed, as_communicator
from .interop import call_map, check_unmodified, convert, lend, read_only_message, to_numpy, wrap_map
from .kernels import Kernels, NormTerm, ReductionTerm
from .method import Method, MethodState
from .options import check_common
from .registry import METHODS
from .result import ConvergenceWarning, FixedPointResult
from .samples import INACTIVE, SampleRecord

__all__ = ["IterationInfo", "run"]

_INF = float("inf")

#: ε in the relative residual ‖g(x) − x‖ / (‖g(x)‖ + ε).
REL_EPS = 1e-12

#: The relative stopping test credits growth of ‖g(x)‖ beyond the sample's starting scale s₀ = max(‖g(x₀)‖, ‖f₀‖)
#: only once its residual has fallen to this fraction of ‖f₀‖ (docs/algorithm.md, "Stopping criteria"): iterates
#: running off to infinity (a map with no fixed point, x + 1 + 0.1·sin x) cannot make a residual that never fell
#: look small.
REL_REDUCTION = 0.5


@dataclass
class IterationInfo:
    """What a ``callback`` receives after each evaluation of ``g``.

    The arrays show the solver's own state, valid only during the call, and may not
    be written to: read-only views with NumPy, tensors whose version counter is
    checked with PyTorch (a write raises ``ValueError``), copies with other libraries.
    They belong to the library the solver runs in (see ``backend=``).  Reading their
    values on a GPU synchronises with the host.

    Attributes
    ----------
    iteration : int
        0-based index k of the iterate x_k that was just evaluated.
    x : array, shape of x0
        The iterate x_k (a sample that has left the working arrays: its result).
        Once samples have left, the whole-batch arrays are assembled for the call
        (a copy of the batch per iteration: a callback costs that much more).
    residual : array, shape (B,)
        Its residual in the solve's ``stop_mode``, in the small-system dtype
        (float64 where the device has it); for a sample that has stopped, the
        residual of its frozen iterate (once it has left the working arrays at a host
        check: of its best iterate, the one it returns).
    active : array of bool, shape (B,)
        Samples still iterating after this step.
    """

    iteration: int
    x: Array
    residual: Array
    active: Array


#: With ``compact="auto"``, compaction starts once at most this fraction of the samples is still iterating.
COMPACT_AUTO = 0.5


class _MapCall:
    """Call g as :func:`fixedpoint.interop.call_map` does, with the checks of g's result made cheap.

    The expected library, shape, dtype and device are taken once from the iterate, and the full check
    runs only when the quick one fails.
    """

    def __init__(self, g: Callable[..., Array], like: Array) -> None:
        self.g = g
        self.numpy = isinstance(like, np.ndarray)
        self.type, self.shape, self.dtype = type(like), tuple(like.shape), like.dtype

    def __call__(self, x: Array, *args: Any) -> Array:
        """Return ``g(x, *args)``, checked; a NumPy ``x`` is passed read-only."""
        if self.numpy:
            view = cast(np.ndarray, x).view()
            view.flags.writeable = False
            try:
                y = self.g(view, *args)
            except ValueError as exc:
                if "read-only" in str(exc):
                    raise ValueError(read_only_message("numpy")) from exc
                raise
            if type(y) is np.ndarray and y.shape == self.shape and y.dtype == self.dtype:
                return y  # even a view of its argument: read-only, so unmodified
            return call_map(lambda _x, *_a: y, x, *args)  # the full checks, with their messages
        return call_map(self.g, x, *args)


def _check_complex(method: Method, dtype: Any) -> None:
    """Raise TypeError if ``dtype`` is complex and ``method`` does not declare ``supports_complex = True``.

    A method whose state reduces through :class:`fixedpoint.kernels.Kernels` gets Hermitian products and
    real norms for complex vectors, but its own small state (dtypes, comparisons, Python-float paths) must
    be written for them: it says so by the class attribute.
    """
    if is_complex_dtype(dtype) and not method.supports_complex:
        able = ", ".join(repr(name) for name, cls in METHODS.items() if cls.supports_complex)
        raise TypeError(f"x0 has the complex dtype {dtype}, which method {method.name!r} does not support; "
                        f"these methods iterate complex x0: {able}")


def _settings(method: Method | None, x0: Array, opts: dict[str, Any]) -> str:
    """Describe what every process of a sharded solve must have in common, as text (compared by a hash)."""
    shape = getattr(x0, "shape", None)
    batch = shape[0] if opts.get("batch") and shape else None
    settings = {k: v for k, v in opts.items() if k not in ("callback", "comm")}
    return (f"method={method!r}, options={settings!r}, x0 dtype={getattr(x0, 'dtype', None)}, "
            f"library={type(x0).__module__.split('.')[0]}, batch size={batch}")


def _check_takes_rows(g: Callable[..., Any], compact: bool | str, batch: bool) -> None:
    """Refuse, under ``compact``, a solve without ``batch`` or a ``g`` that cannot be called as ``g(x_rows, rows)``."""
    if not batch:
        raise ValueError(f"compact={compact!r} evaluates g on the samples still iterating, so it needs batch=True")
    fix = "define it as g(x, rows), rows being the indices of the samples in x (e.g. lambda x, rows: np.cos(x))"
    if isinstance(g, np.ufunc):
        raise TypeError(f"compact={compact!r} calls g(x_rows, rows), and the NumPy ufunc {g.__name__} would take "
                        f"rows as its output array; {fix}")
    try:
        signature = inspect.signature(g)
    except (TypeError, ValueError):  # builtins without a signature: the first call tells
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(f"compact={compact!r} calls g(x_rows, rows) with two arguments, but g takes "
                        f"{signature}; {fix}") from None


def run(method: Method | None, g: Callable[..., Array], x0: Array, opts: dict[str, Any],
        failed: Exception | None = None) -> FixedPointResult:
    """Solve x = g(x) with ``method``; see :func:`fixedpoint.solve`.

    ``opts`` holds the options common to every method (``tol``, ``max_iter``,
    ``stop_mode``, ``batch``, ``check_every``, ``callback``, ``backend``, ``comm``), not yet validated.
    ``failed``: an error the caller met on this process while preparing the solve (with ``comm``, raised
    on every process, together with the loop's own checks), in which case ``method`` may be None.
    """
    loop = _Loop(method, g, x0, opts, failed)
    with loop.kern.solver_context():
        return loop.run()


@dataclass
class _OneSample:
    """The bookkeeping of :meth:`_Loop._run_one`: Python scalars where a batch has small-state arrays."""

    hist: list[float] = field(default_factory=list)
    best_r: float = _INF
    active: bool = True
    diverged: bool = False
    restarts: int = 0
    f0: float = _INF  # ‖f_0‖
    scale: float = _INF  # max(‖g_0‖, ‖f_0‖), with stop_mode "rel"
    on: np.ndarray = field(default_factory=lambda: np.ones(1, dtype=bool))  # the step's "active" arrays
    off: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=bool))


class _Loop:
    """State of one solve: set up from the inputs, iterated by :meth:`run`, summarised by :meth:`result`."""

    # set by _check_inputs
    opts: dict[str, Any]
    tol: float
    max_iter: int
    stop_mode: str
    rel: bool  # stop_mode == "rel"
    divtol: float | None
    x0: Array
    shape: tuple[int, ...]
    caller_xp: Namespace
    caller_lib: str
    caller_device: Any
    caller_dtype: Any
    solver_xp: Namespace
    narrow: bool
    eps: float
    # set by _allocate
    method: Method
    xp: Namespace
    lib: str
    device: Any
    dtype: Any
    g: Callable[..., Array]
    wrapped: bool
    B: int
    n: int
    compact: bool | str
    check_every: int
    kern: Kernels
    state: MethodState
    rec: SampleRecord
    packs: bool
    n_rows: int
    every_row: Array
    rows: Array
    n_rows_now: int
    x_rows: Array | None
    gx_full: Array | None
    gx_rows: Array | None
    n_fev: int
    t0: float

    def __init__(self, method: Method | None, g: Callable[..., Array], x0: Array, opts: dict[str, Any],
                 failed: Exception | None = None) -> None:
        comm = as_communicator(opts.get("comm"))
        # Every check and allocation of this process, then (with comm) one collective: the same outcome, and
        # the same settings, on every process before any of them raises or calls g.
        with agreed(comm) as agreement:
            if failed is not None:
                raise failed
            self._check_inputs(g, x0, {**opts, "comm": None}, comm is not None)
            self.opts = opts = {**self.opts, "comm": comm}
            if comm is not None:
                agreement.compare("the method, the options, x0's dtype and library, and the batch size",
                                  _settings(method, self.x0, opts))
            assert method is not None  # None only with an error to raise (failed)
            _check_complex(method, self.caller_dtype)
            self.method = method
            self._allocate(method, g, comm)

    def _allocate(self, method: Method, g: Callable[..., Array], comm: Communicator | None) -> None:
        """Set up the solver's library, the map, the kernels, the method's state and the per-sample record."""
        x0, xp, shape, opts = self.x0, self.caller_xp, self.shape, self.opts
        if library_name(self.solver_xp) != self.caller_lib:
            xp = self.solver_xp
            x0 = convert(x0, xp)
        self.xp, self.lib = xp, library_name(xp)
        self.device = device = array_api_compat.device(x0)
        self.dtype = dtype = buffer_dtype(xp, working_dtype(xp, x0))
        self.g = wrap_map(g, self.caller_lib, xp, caller_device=self.caller_device, caller_dtype=self.caller_dtype,
                          solver_dtype=dtype)
        self.wrapped = self.g is not g  # the wrapper converts and calls g through call_map itself
        self.B = B = shape[0] if opts["batch"] else 1
        n = 1
        for s in shape:
            n *= s
        self.n = n = n // B
        self.compact = opts["compact"]
        self.check_every = opts["check_every"] or (10 if is_accelerator(xp, device) else 1)
        self.kern = kern = Kernels(xp, device, comm)
        with self.kern.solver_context():
            try:
                self.state = method.init(kern, B, n, dtype)
                # The per-sample record: the working rows of the samples still iterating, the others' results.
                self.rec = SampleRecord(kern, x0, dtype, B, n, self.check_every)
            except MemoryError as exc:
                window = f" (its window m={method.m} is kept for every sample)" if hasattr(method, "m") else ""
                raise MemoryError(f"{method!r}{window} could not allocate its working arrays for {B} sample(s) "
                                  f"of {n} elements in {dtype}: {exc}") from exc
        self.packs = B > 1  # False once the method's state turns out not to support pack()
        self.n_rows = 0  # samples passed to g in all
        if self.compact is not False:
            # g(x_rows, rows): the rows still iterating and their indices in the batch.  Until compaction starts
            # rows is every sample and x_rows the iterate itself; with a method that cannot pack, the rows are
            # gathered into x_rows and g's values scattered into gx_full (_choose_rows, _call_rows).
            self.rows = xp.arange(B, device=device)
            self.every_row = self.rows
            self.n_rows_now = B
            self.x_rows = None
            self.gx_full = None
        self.gx_rows = None  # (B, n): g's rows of the working samples when g sees the whole batch
        self.n_fev = 0

    def _check_inputs(self, g: Callable[..., Array], x0: Array, opts: dict[str, Any], sharded: bool) -> None:
        """Validate the options and x0 on this process (no collective).

        Sets ``opts``, ``x0``, ``shape`` and the caller's library, device and dtype.
        """
        self.opts = opts = check_common(opts)
        self.tol, self.max_iter, self.stop_mode = opts["tol"], opts["max_iter"], opts["stop_mode"]
        self.rel, self.divtol = self.stop_mode == "rel", opts["divtol"]
        if not callable(g):
            raise TypeError(f"g must be callable, got {g!r}")
        if isinstance(x0, np.matrix):
            raise TypeError("x0 must be an array, got a numpy.matrix (whose products and shapes follow matrix "
                            "rules); pass np.asarray(x0)")
        self.caller_xp = caller_xp = namespace_of(x0)
        self.caller_lib = library_name(caller_xp)
        self.caller_device = array_api_compat.device(x0)
        if str(self.caller_device) == "meta":
            raise ValueError("x0 is a tensor on torch's 'meta' device, which holds no values; create it on a real "
                             "device ('cpu', 'cuda')")
        self.caller_dtype = working_dtype(caller_xp, x0)
        if x0.dtype != self.caller_dtype:  # integer or boolean: promoted in x0's own library, whatever backend=
            x0 = caller_xp.astype(x0, self.caller_dtype)
        self.x0, self.shape = x0, tuple(x0.shape)
        if any(s == 0 for s in self.shape):
            raise ValueError(f"x0 must not be empty, got shape {self.shape}"
                             + ("; with comm, every process must hold at least one element" if sharded else ""))
        if opts["batch"] and not self.shape:
            raise ValueError("batch=True needs x0 with a leading batch axis, got a 0-d array")
        if not bool(caller_xp.all(caller_xp.isfinite(x0))):
            raise ValueError("x0 contains NaN or Inf")
        backend = opts["backend"]
        self.solver_xp = caller_xp if backend is None else resolve_namespace(backend)
        if opts["compact"] is not False:
            _check_takes_rows(g, opts["compact"], opts["batch"])
        # Half precision is iterated in float32 (fixedpoint.backend.buffer_dtype), every iterate rounded to it.
        self.narrow = buffer_dtype(caller_xp, self.caller_dtype) != self.caller_dtype
        self.eps = eps = float(caller_xp.finfo(self.caller_dtype).eps)  # the iterates' rounding (x0's dtype)
        if self.stop_mode == "rel" and self.tol < eps and self.narrow:
            # half precision: iterates rounded to x0's dtype cannot get a relative residual much below epsilon
            warnings.warn(f"tol={self.tol:g} is below the machine epsilon of x0's dtype {self.caller_dtype} "
                          f"({eps:.3g}): iterates rounded to it seldom reach a relative residual that low, and the "
                          f"solve may run to max_iter; choose tol >= {4 * eps:.0e} or iterate in float32",
                          ConvergenceWarning, stacklevel=user_stacklevel())

    def run(self) -> FixedPointResult:
        """Iterate and return the result: one sample with its small state on the host takes :meth:`_run_one`."""
        if self.B == 1 and self.kern.small_on_host and self.compact is False:
            return self._run_one()
        return self._run_batch()

    def _run_batch(self) -> FixedPointResult:
        """Iterate with the per-sample bookkeeping in small-state arrays (a batch, or state on a device)."""
        rec, callback = self.rec, self.opts["callback"]
        call: Callable[..., Array] = self.g if self.wrapped else functools.partial(call_map, self.g)
        status: str | None = None
        self.t0 = time.perf_counter()
        try:
            for k in range(self.max_iter):
                x = rec.x
                gx = self._evaluate(call, x) if k else self._first(functools.partial(self._evaluate, call, x))
                self.n_fev += 1
                r, active = self._step_batch(x, gx)
                del gx  # g's result is not kept alive while g computes the next one
                if callback is not None and self._call_back(callback, *self._info(k, x, r, active)):
                    status = "stopped"
                rec.swap()
                if status is not None or (k + 1) % self.check_every == 0 or k + 1 == self.max_iter:
                    rec.flush_history()
                    if status is not None or not bool(self.kern.sxp.any(active)):
                        break
                    self._shrink(active)
        except BaseException as exc:
            rec.flush_history()
            self._attach_result(exc)
            raise
        return self.result(status)

    def _step_batch(self, x: Array, gx: Array) -> tuple[Array, Array]:
        """Test x_k = ``x`` for every sample and write x_{k+1} into ``rec.x_next``; return (residual, active)."""
        kern, state, rec, rel = self.kern, self.state, self.rec, self.rel
        f = state.residual_buffer()
        if f is not None:
            kern.sub(f, gx, x)
        fnorm, gnorm = self._norms(state.observe(x, gx, f, rel), x, gx, f, rel)
        r, active = self._stopping_test(fnorm, gnorm)
        restarted = state.step(x, gx, f, active, rec.x_next)
        if restarted is not None:
            rec.n_restarts = rec.n_restarts + kern.sxp.astype(restarted, kern.sxp.int64)
        if self.B > 1:  # samples that stopped do not move
            kern.copy_rows_where(rec.x_next, x, ~active)
        if self.narrow:
            self._round(rec.x_next)
        return r, active

    def _stopping_test(self, fnorm: Array, gnorm: Array | None) -> tuple[Array, Array]:
        """Apply the stopping test and divergence test to the norms of x_k; return (residual, still active).

        Also records the residual and marks the samples whose iterate is their best so far.
        """
        rec, sxp = self.rec, self.kern.sxp
        r = fnorm
        if self.rel:  # a non-finite ‖g(x)‖ makes the residual non-finite, never 0
            assert gnorm is not None  # _norms computes it for "rel"
            if rec.f0 is None:  # the first iteration: the references of the tests below
                rec.f0, rec.scale = fnorm, sxp.maximum(gnorm, fnorm)
            r = self._relative(fnorm, gnorm, rec.f0, rec.scale)
        elif rec.f0 is None:
            rec.f0 = fnorm
        active = rec.active
        divtol = self.divtol
        if divtol is not None:
            diverging = active & (fnorm > divtol * rec.f0)
            rec.diverged = rec.diverged | diverging
            active = active & ~diverging
        rec.keep_best(active & (r < rec.best_r), r)  # False for NaN
        rec.record(r)
        rec.active = active = active & (r > self.tol) & (r < _INF)  # converged or non-finite: stop
        return r, active

    def _attach_result(self, exc: BaseException) -> None:
        """Attach the partial result to ``exc``; with ``comm``, abort the job unless every process raises it."""
        exc.fixedpoint_result = self.result("error")  # type: ignore[attr-defined]  # documented in solve()
        if self.kern.comm is not None and not getattr(exc, "fixedpoint_agreed", False):
            self.kern.comm.abort(exc)

    def _first(self, evaluate: Callable[[], Array]) -> Array:
        """Make the first evaluation of g.

        With ``comm``, a failure on one process (g raised, or returned another shape, dtype or library)
        raises the same error on every process; under ``compact``, a g that cannot take the rows is told so.
        """
        with agreed(self.kern.comm):
            try:
                return evaluate()
            except TypeError as exc:
                if self.compact is False or "positional argument" not in str(exc):
                    raise
                raise TypeError(f"compact={self.compact!r} calls g(x_rows, rows) with two arguments, and g "
                                f"refused them ({exc}); define it as g(x, rows), rows being the indices of the "
                                "samples in x") from exc

    def _g_sees_rows(self) -> bool:
        """Whether g is called on the working rows alone (``g(x_rows, rows)``) rather than the whole batch."""
        if self.compact is True:
            return True
        return self.compact == "auto" and self.rec.w <= COMPACT_AUTO * self.B

    def _evaluate(self, call: Callable[..., Array], x: Array) -> Array:
        """Evaluate g on the working rows ``x`` (shape ``(w, n)``) as the ``compact`` option has it.

        Returns g's rows of those samples, ``(w, n)``.
        """
        xp, B, n, w, rec = self.xp, self.B, self.n, self.rec.w, self.rec
        compact = self.compact is not False
        if compact and not self.packs and self.x_rows is not None:  # a method without pack(): rows gathered
            self.n_rows += self.n_rows_now
            return self._call_rows(call, x)
        y: Array
        if w == B:  # every sample, in place
            self.n_rows += B
            args = (self.rows,) if compact else ()
            y = xp.reshape(call(xp.reshape(x, self.shape), *args), (B, n))
            return y
        if self._g_sees_rows():
            self.n_rows += w
            y = xp.reshape(call(xp.reshape(x, (w,) + self.shape[1:]), self.rows), (w, n))
            return y
        # g sees the whole batch: the working rows written into out_x (which holds the finished samples'
        # results), g's rows of the working samples gathered
        self.kern.put_rows(rec.out_x, rec.rows, x)
        full = xp.reshape(rec.out_x, self.shape)
        y = call(full, self.every_row) if compact else call(full)
        if self.gx_rows is None:
            self.gx_rows = xp.empty((B, n), dtype=self.dtype, device=self.device)
        self.kern.take_rows(self.gx_rows[:w, ...], xp.reshape(y, (B, n)), rec.rows)
        self.n_rows += B
        return self.gx_rows[:w, ...]

    def _call_back(self, callback: Callable[[IterationInfo], Any], k: int, x: Array, r: Array, active: Array) -> bool:
        """Call ``callback(IterationInfo(k, x, r, active))``; return True if it asks to stop.

        The arrays are lent by :func:`fixedpoint.interop.lend`, so that a callback writing into them raises
        instead of changing the solve.  With ``comm``, a callback asking on any process stops every process
        at the same iteration.
        """
        lent = [lend(a) for a in (x, r, active)]
        try:
            stop = bool(callback(IterationInfo(k, *(a for a, _ in lent))))
        except ValueError as exc:
            if "read-only" in str(exc):
                raise ValueError(read_only_message(self.lib, "callback")) from exc
            raise
        for a, token in lent:
            check_unmodified(a, token, "callback")
        comm = self.kern.comm
        if comm is not None:
            stop = bool(comm.max(np.array([1.0 if stop else 0.0]))[0])
        return stop

    def _info(self, k: int, x: Array, r: Array, active: Array) -> tuple[int, Array, Array, Array]:
        """Return the fields of the callback's :class:`IterationInfo` (``k, x, residual, active``).

        They are whole-batch arrays even when the working arrays are packed.
        """
        xp, kern, rec = self.xp, self.kern, self.rec
        if rec.w == self.B:
            return k, xp.reshape(x, self.shape), kern.big(r), kern.big(active)
        x_all = xp.asarray(rec.out_x, copy=True)
        kern.put_rows(x_all, rec.rows, x)
        r_all, on = rec.out_r.copy(), np.zeros(self.B, dtype=bool)
        r_all[rec.idx] = np.asarray(to_numpy(r), dtype=np.float64)
        on[rec.idx] = np.asarray(to_numpy(active), dtype=bool)
        lib, dev = self.lib, self.device
        return (k, xp.reshape(x_all, self.shape), convert(r_all, lib, device=dev, dtype=None),
                convert(on, lib, device=dev, dtype=None))

    def _shrink(self, active: Array) -> None:
        """At a host check, drop the samples that have stopped from every working array.

        Those are the record's and the method's; with a method that cannot pack its state, g is evaluated
        on the samples still iterating only.
        """
        if self.packs:
            mask = np.asarray(to_numpy(active), dtype=bool)
            if not mask.all():
                keep = np.nonzero(mask)[0]
                if self.state.pack(keep):
                    self.rec.pack(keep)
                    if self.compact is not False:
                        self.rows = self.rec.rows
                else:  # a method without pack(): its state, and so the record, stay per batch
                    self.packs = False
        if not self.packs and self.compact is not False:
            self._choose_rows(active)

    def _run_one(self) -> FixedPointResult:
        """Iterate one sample whose small state is on the host, its bookkeeping in Python floats.

        The same steps as :meth:`_run_batch` at a tenth of its cost per iteration on tiny problems, where
        one-element arrays would cost more than the problem.
        """
        xp, shape, n, rec = self.xp, self.shape, self.n, self.rec
        callback = self.opts["callback"]
        call: Callable[..., Array] = self.g if self.wrapped else _MapCall(self.g, xp.reshape(rec.x, shape))
        one = _OneSample()
        status: str | None = None
        self.t0 = time.perf_counter()
        try:
            for k in range(self.max_iter):
                x = rec.x
                xk = xp.reshape(x, shape)
                gx = xp.reshape(call(xk) if k else self._first(functools.partial(call, xk)), (1, n))
                self.n_fev += 1
                r = self._step_one(one, k, x, gx)
                del gx  # g's result is not kept alive while g computes the next one
                if callback is not None and self._call_back(callback, k, xk, self.kern.big(np.array([r])),
                                                            self.kern.big(np.array([one.active]))):
                    status = "stopped"
                rec.swap()
                if status is not None or ((k + 1) % self.check_every == 0 and not one.active):
                    break
        except BaseException as exc:
            self._keep_one(one)
            self._attach_result(exc)
            raise
        self._keep_one(one)
        return self.result(status)

    def _step_one(self, one: _OneSample, k: int, x: Array, gx: Array) -> float:
        """:meth:`_step_batch` for :meth:`_run_one`: test x_k, write x_{k+1}; return the residual."""
        kern, state, rec, rel = self.kern, self.state, self.rec, self.rel
        f = state.residual_buffer()
        if f is not None:
            kern.sub(f, gx, x)
        fnorm, gnorm = self._norms(state.observe(x, gx, f, rel), x, gx, f, rel)
        fn = float(fnorm[0])
        if k == 0:  # the references of the tests below
            one.f0 = fn
        r = fn
        if rel:
            assert gnorm is not None  # _norms computes it for "rel"
            r = self._relative_one(one, k, fn, float(gnorm[0]))
        was_active = one.active
        divtol = self.divtol
        if divtol is not None and one.active and fn > divtol * one.f0:
            one.diverged, one.active = True, False
        improved = one.active and r < one.best_r  # False for NaN
        if improved:
            one.best_r = r
        if rec.best_buf is not None and rec.best_pending[0] and not improved:
            kern.copy(rec.best_x, rec.best_buf)  # x_next, about to be overwritten by the step
        rec.best_buf, rec.best_pending = x, (one.on if improved else one.off)
        one.hist.append(r if was_active else INACTIVE)
        one.active = one.active and self.tol < r < _INF  # converged or non-finite: stop
        restarted = state.step(x, gx, f, one.on if one.active else one.off, rec.x_next)
        if restarted is not None and restarted[0]:
            one.restarts += 1
        if self.narrow:
            self._round(rec.x_next)
        return r

    def _relative_one(self, one: _OneSample, k: int, fn: float, gn: float) -> float:
        """:meth:`_relative` for one sample in Python floats (``fn`` = ‖f_k‖, ``gn`` = ‖g_k‖)."""
        if k == 0:
            one.scale = max(gn, fn)
        if not math.isfinite(gn):  # a non-finite ‖g(x)‖ makes the residual non-finite, never 0
            return _INF
        if gn <= one.scale or fn + self.eps * gn <= REL_REDUCTION * one.f0:
            return fn / (gn + REL_EPS)
        return (fn + self.eps * gn) / (one.scale + REL_EPS)

    def _keep_one(self, one: _OneSample) -> None:
        """Store the Python-scalar state of :meth:`_run_one` where :meth:`result` reads it."""
        rec = self.rec
        rec.hist_host = [np.array(one.hist, dtype=np.float64).reshape(-1, 1)]
        rec.best_r = np.array([one.best_r])
        rec.active, rec.diverged = np.array([one.active]), np.array([one.diverged])
        rec.n_restarts = np.array([one.restarts], dtype=np.int64)

    def _relative(self, fnorm: Array, gnorm: Array, f0: Array, scale: Array) -> Array:
        """Return the relative residual per sample (small state).

        It is ‖f‖ / (‖g(x)‖ + ε), except where ‖g(x)‖ has grown past the starting ``scale`` while the
        residual (with the rounding error eps·‖g(x)‖ of f = g(x) − x at that magnitude) has not fallen to
        :data:`REL_REDUCTION` of ``f0`` (‖f_0‖): there (‖f‖ + eps·‖g(x)‖) / ``scale``.  Infinite where
        ‖g(x)‖ is not finite.
        """
        sxp = self.kern.sxp
        plain = fnorm / (gnorm + REL_EPS)
        grown = gnorm > scale
        if not self.kern.small_on_host or bool(sxp.any(grown)):  # on the host: the guard's work only where it acts
            floor = fnorm + self.eps * gnorm
            guarded = floor / (scale + REL_EPS)
            plain = sxp.where(grown & (floor > REL_REDUCTION * f0), guarded, plain)
        r: Array = sxp.where(sxp.isfinite(gnorm), plain, _INF)
        return r

    def _norms(self, observed: Array | tuple[Array, Array] | None, x: Array, gx: Array, f: Array | None,
               rel: bool) -> tuple[Array, Array | None]:
        """Return (‖f_k‖, ‖g_k‖ or None) from what the method's observe returned.

        What it left out is computed in one reduction, so one collective when sharded.
        """
        if isinstance(observed, tuple):
            return observed
        if observed is not None and not rel:
            return observed, None
        kern = self.kern
        fterm: NormTerm = ("sqnorm", f) if f is not None else ("sqdiff", gx, x)
        terms: list[ReductionTerm] = [] if observed is not None else [fterm]
        if rel:
            terms.append(("sqnorm", gx))
        sums = kern.sums(*terms)
        fnorm = observed if observed is not None else kern.root(sums[0], fterm)
        return fnorm, (kern.root(sums[-1], ("sqnorm", gx)) if rel else None)

    def _choose_rows(self, active: Array) -> None:
        """At a host check: evaluate g from now on only on the samples still iterating (see ``compact``)."""
        mask = np.asarray(to_numpy(active), dtype=bool)
        count = int(mask.sum())
        if count == self.n_rows_now or (self.compact == "auto" and self.x_rows is None
                                         and count > COMPACT_AUTO * self.B):
            return
        xp = self.xp
        if self.x_rows is None:  # compaction starts: a gather buffer, and g's values kept for every sample
            self.x_rows = xp.empty((self.B, self.n), dtype=self.dtype, device=self.device)
            self.gx_full = xp.zeros((self.B, self.n), dtype=self.dtype, device=self.device)
        self.rows = xp.asarray(np.nonzero(mask)[0], device=self.device)
        self.n_rows_now = count

    def _call_rows(self, call: Callable[..., Array], x: Array) -> Array:
        """Evaluate g on the rows in ``self.rows`` only; scatter their values into ``gx_full`` and return it."""
        xp, k = self.xp, self.n_rows_now
        assert self.x_rows is not None and self.gx_full is not None  # allocated by _choose_rows
        rows_x = self.x_rows[:k, ...]
        self.kern.take_rows(rows_x, x, self.rows)
        y = call(xp.reshape(rows_x, (k,) + self.shape[1:]), self.rows)
        self.kern.put_rows(self.gx_full, self.rows, xp.reshape(y, (k, self.n)))
        return self.gx_full

    def _round(self, buf: Array) -> None:
        """Round the iterate in ``buf`` to the caller's (half-precision) dtype, in place."""
        rounded = convert(buf, self.caller_lib, device=self.caller_device, dtype=self.caller_dtype)
        self.kern.copy(buf, convert(rounded, self.lib, device=self.device, dtype=self.dtype))

    def result(self, status: str | None) -> FixedPointResult:
        """Return the :class:`FixedPointResult` of what has been computed so far."""
        xp = self.xp
        with self.kern.solver_context():
            self.rec.settle_best()
            x, best_r, restarts, diverged = self.rec.whole_batch()
        x = xp.reshape(x, self.shape)
        if self.lib != self.caller_lib or self.narrow:
            x = convert(x, self.caller_lib, device=self.caller_device, dtype=self.caller_dtype)
        hist = self.rec.history()
        ran = hist != INACTIVE
        with np.errstate(invalid="ignore"):
            conv = np.asarray(((hist >= 0) & (hist <= self.tol)).any(axis=0))
        fail = np.asarray((~np.isfinite(hist)).any(axis=0))
        iters = ran.sum(axis=0)
        history = np.where(ran, hist, np.nan)
        div = diverged & ~conv & ~fail
        sample_status = np.where(conv, "converged", np.where(fail, "nonfinite", np.where(div, "diverged", "max_iter")))
        if status is None:
            status = ("converged" if conv.all() else "nonfinite" if fail.any() else "diverged" if div.any()
                      else "max_iter")
        elif status == "stopped":
            sample_status = np.where(conv | fail, sample_status, "stopped")
        residual = best_r
        wall = time.perf_counter() - self.t0
        per_sample: dict[str, Any] = dict(converged=conv, sample_status=sample_status, n_iter=iters, residual=residual,
                                          n_restarts=restarts, residual_history=history)
        if not self.opts["batch"]:  # one problem: Python scalars
            per_sample.update(converged=bool(conv[0]), sample_status=str(sample_status[0]), n_iter=int(iters[0]),
                              residual=float(residual[0]), n_restarts=int(restarts[0]), residual_history=history[:, 0])
        return FixedPointResult(
            x=x, status=status, n_fev=self.n_fev, n_rows=self.n_rows, wall_time=wall, method=self.method.name,
            **per_sample,
            options={**{key: val for key, val in self.opts.items() if key != "callback"}, **self.method.options()},
        )
