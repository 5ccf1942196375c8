"""The entry point :func:`solve` and the per-method shortcuts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .comm import as_communicator
from .iteration import run
from .method import Method
from .options import DEFAULTS
from .registry import resolve_method
from .result import FixedPointResult

__all__ = ["solve", "anderson", "forward_iteration", "broyden"]


def solve(g: Callable[..., Any], x0: Any, method: str | Method = "anderson", *,
          tol: float = DEFAULTS["tol"], max_iter: int = DEFAULTS["max_iter"], stop_mode: str = DEFAULTS["stop_mode"],
          divtol: float | None = DEFAULTS["divtol"], batch: bool = DEFAULTS["batch"],
          compact: bool | str = DEFAULTS["compact"], check_every: int | None = DEFAULTS["check_every"],
          callback: Callable[..., Any] | None = DEFAULTS["callback"], backend: Any = DEFAULTS["backend"],
          comm: Any = DEFAULTS["comm"], **method_options: Any) -> FixedPointResult:
    """Find x with x = g(x) by Anderson acceleration (default), forward iteration, Broyden, or any method object.

    Parameters
    ----------
    g : callable
        The fixed-point map, ``g(x) -> array`` of the same library, shape, dtype
        and device as ``x`` (which has ``x0``'s shape).  In batch mode it maps the
        whole batch at once, each sample independently.  ``g`` must not modify
        its argument, which is the solver's iterate: NumPy passes it read-only,
        PyTorch's version counter is checked, and on CuPy ``g`` may not return its
        argument or a view of it (:func:`fixedpoint.interop.call_map`); a breach
        raises ``ValueError`` rather than give a wrong result.
    x0 : array
        Initial guess, any shape, a NumPy/CuPy/PyTorch/array-api-strict array.
        Integer and boolean inputs are promoted to the default float dtype of
        x0's own library (:func:`fixedpoint.backend.working_dtype`), whatever
        ``backend`` says.  Half-precision x0 (float16, bfloat16) is iterated in
        float32 with every iterate rounded to x0's dtype, so g always sees and the
        result has that dtype (:func:`fixedpoint.backend.buffer_dtype`).  Complex
        x0 (complex64, complex128; not torch's complex32) is iterated in its own
        dtype by the methods that declare ``supports_complex`` (forward iteration
        today): g must return that complex dtype, inner products are Hermitian
        (⟨a, b⟩ = Σ conj(a) b) and the residual norms, ``tol``, ``residual`` and
        ``residual_history`` are real; other methods raise ``TypeError``.  A torch
        x0 that requires grad is detached: the solve is not differentiated through
        (for gradients of a fixed point use :class:`fixedpoint.torch.DEQ`).
    method : str or Method, default "anderson"
        A method object (:class:`fixedpoint.Anderson`, :class:`fixedpoint.ForwardIteration`,
        :class:`fixedpoint.Broyden`, or one written to the protocol of
        :mod:`fixedpoint.method`), or a registered name (:data:`fixedpoint.METHODS`,
        :func:`fixedpoint.register_method`) whose options are then
        given as further keyword arguments (``solve(g, x0, method="anderson", m=10)`` is
        ``solve(g, x0, method=Anderson(m=10))``).
    tol : float, default 1e-5
        Stop a sample once its residual (``stop_mode``) is at most ``tol``; > 0.
    max_iter : int, default 1000
        Most evaluations of g (iterations), >= 1.
    stop_mode : {"rel", "abs"}, default "rel"
        "rel": ‖g(x) − x‖₂ / (‖g(x)‖₂ + 1e-12) (dimensionless), where growth of ‖g(x)‖₂
        beyond the sample's starting scale max(‖g(x0)‖₂, ‖g(x0) − x0‖₂) counts only once the
        residual has halved, so that iterates running off to infinity (a map with no fixed
        point) never look converged (docs/algorithm.md, "Stopping criteria"); "abs":
        ‖g(x) − x‖₂ (units of x); norms per sample in batch mode.  Norms are computed so that
        they do not overflow where the vectors are finite (on the CPU; see
        docs/algorithm.md); a residual that is not finite stops the sample as
        ``"nonfinite"``, never as converged.
    divtol : float or None, default 1e10
        Divergence tolerance: a sample whose residual norm ‖g(x) − x‖₂ exceeds
        ``divtol`` times that of x0 stops with status ``"diverged"`` (its best
        iterate is returned); > 1, or None to iterate on regardless.
    batch : bool, default False
        Treat the leading axis of ``x0`` as B independent problems: per-sample
        residuals, stopping, weights and iteration counts; converged samples stop
        moving.  At each host check (``check_every``) the samples that have stopped
        leave every working array (the iterates, the best iterates, the method's
        history), so that an iteration costs what the samples still iterating cost.
        A sample's iterates do not depend on how it was batched (alone, in any batch,
        with or without ``compact``) wherever g's rows do not, to the bit with NumPy
        and PyTorch CPU tensors (docs/algorithm.md, "Batch mode").  Otherwise ``x0``
        is one vector.
    compact : {False, True, "auto"}, default False
        With ``batch=True``: evaluate g only on the samples still iterating.  g is then
        called as ``g(x_rows, rows)``, with ``x_rows`` of shape ``(k, *x0.shape[1:])``
        holding the k samples still iterating and ``rows`` their indices in the batch
        (integers, increasing, same library and device), and returns the k rows of
        g(x).  True compacts from the first host check on; "auto" once at most half
        the samples (:data:`fixedpoint.iteration.COMPACT_AUTO`) are still iterating.
        The set of rows is updated at host checks (every ``check_every`` iterations);
        the answers are the same as without compaction.  Without compaction, once
        samples have stopped, g is called on the whole batch (the stopped samples'
        rows holding their results) and the working samples' rows are scattered into
        it and gathered from it: one vector of memory more, and g's full cost.
    check_every : int, optional
        Check for convergence on the host every this many iterations (default 1
        on CPUs, 10 on GPUs, where each check synchronises).  Up to
        ``check_every - 1`` extra evaluations of g may happen; the result is the
        same iterate as with 1.
    callback : callable, optional
        ``callback(info)`` with an :class:`fixedpoint.IterationInfo` after every
        evaluation of g; returning True stops the solve (status ``"stopped"``; with
        ``comm``, True on any process stops every process).  Its arrays may not be
        written to (``ValueError``).
    backend : str or module, optional
        Run the solver in another array library than ``x0``'s (``"numpy"``,
        ``"torch"``, ``"cupy"``, ``"array_api_strict"``): x0 is converted (zero-copy
        through DLPack on the same device), g is still called with arrays of x0's
        library, and the result comes back in x0's library, dtype and device.
    comm : mpi4py communicator or torch.distributed process group, optional
        Solve one problem sharded over processes (:mod:`fixedpoint.comm`): ``x0`` is this
        process's shard (shards may differ in size; in batch mode each process holds a
        shard of every sample), ``g`` maps the local shard (any exchange between shards is
        g's own), and every inner product and norm is summed over the processes, in one
        allreduce of O(B·m) numbers per iteration for the built-in methods.  Every process
        takes the same decisions and returns its shard of the solution.  All processes
        must call with the same method and options (checked: otherwise ``ValueError`` on
        every process).  An error on one process before or at the first evaluation of g
        (a bad option, an empty or non-finite shard, g returning another shape) is raised
        on every process, with the same message.  If g raises on one process later, that
        process raises (with the partial result) and, under MPI, aborts the job; under
        torch.distributed the others fail when it exits or at the process group's timeout.
    **method_options
        With a method name: that method's options (e.g. ``m``, ``beta``, ``lam`` for
        Anderson; ``damping`` for forward iteration); see the method classes.

    Returns
    -------
    FixedPointResult
        Not converging is a status (``"max_iter"``, ``"nonfinite"``, ...), never an
        exception; the best iterate seen is returned.

    Raises
    ------
    ValueError
        For an unknown ``method`` name or a bad option value (the message names it),
        NaN/Inf in ``x0``, an empty ``x0``, a ``x0`` on torch's meta device, a ``g`` that
        returns another shape or device, a ``g`` or ``callback`` that modifies its argument
        in place.
    TypeError
        For an option the method does not take (never silently ignored), method options
        beside a method object, a non-array ``x0`` (or a ``numpy.matrix``), a ``g`` that
        returns another library or dtype, or, with ``compact``, a ``g`` that cannot take
        ``(x_rows, rows)``.
    MemoryError
        When the method's buffers do not fit (the message names its window ``m``).

    Any exception raised by ``g`` or ``callback`` propagates with the partial result attached
    as ``exc.fixedpoint_result``.

    Examples
    --------
    >>> import numpy as np, fixedpoint
    >>> res = fixedpoint.solve(np.cos, np.zeros(3), tol=1e-10)
    >>> bool(res.converged), round(float(res.x[0]), 6)
    (True, 0.739085)
    >>> fixedpoint.solve(np.cos, np.zeros(3), method=fixedpoint.Broyden(m=4), tol=1e-10).n_iter < 10
    True
    """
    comm = as_communicator(comm)
    opts = dict(tol=tol, max_iter=max_iter, stop_mode=stop_mode, divtol=divtol, batch=batch, compact=compact,
                check_every=check_every, callback=callback, backend=backend, comm=comm)
    method_obj: Method | None = None
    failed: Exception | None = None
    try:
        method_obj = resolve_method(method, method_options)[0]
    except (TypeError, ValueError) as exc:
        if comm is None:
            raise
        failed = exc  # raised on every process by the loop's collective check
    return run(method_obj, g, x0, opts, failed)


def anderson(g: Callable[..., Any], x0: Any, **options: Any) -> FixedPointResult:
    """Solve x = g(x) by Type-II Anderson acceleration: ``solve(g, x0, method="anderson", **options)``.

    Options: those of :class:`fixedpoint.Anderson` (``m``, ``beta``, ``lam``, ``lam_mode``,
    ``delay``, ``restart_growth``, ``restart_weight``) and of :func:`solve`.  Returns a
    :class:`fixedpoint.FixedPointResult` whose ``n_restarts`` counts safeguard restarts; raises
    as :func:`solve`.
    """
    return solve(g, x0, "anderson", **options)


def forward_iteration(g: Callable[..., Any], x0: Any, **options: Any) -> FixedPointResult:
    """Solve x = g(x) by forward (Picard) iteration: ``solve(g, x0, method="forward", **options)``.

    Options: ``damping`` (:class:`fixedpoint.ForwardIteration`) and those of :func:`solve`.
    Returns a :class:`fixedpoint.FixedPointResult`; raises as :func:`solve`.
    """
    return solve(g, x0, "forward", **options)


def broyden(g: Callable[..., Any], x0: Any, **options: Any) -> FixedPointResult:
    """Solve x = g(x) by limited-memory Broyden: ``solve(g, x0, method="broyden", **options)``.

    Options: those of :class:`fixedpoint.Broyden` and of :func:`solve`.  Returns a
    :class:`fixedpoint.FixedPointResult` whose ``n_restarts`` counts restarts after
    degenerate updates; raises as :func:`solve`.
    """
    return solve(g, x0, "broyden", **options)
