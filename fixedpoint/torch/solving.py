"""How a DEQ layer runs its fixed-point solves (forward and adjoint) and which rows of a batch they evaluate.

:func:`solve_layer` calls :func:`fixedpoint.solve` under ``torch.no_grad()`` and summarises the
result as a :class:`~fixedpoint.torch.stats.SolveStats`, timed (wall, CPU and, for CPU tensors,
the map's own seconds).  With compaction the solver passes the map the indices of the samples
still iterating; :class:`RowSet` tells when that set changes and :class:`RowsOf` gathers the
matching rows of a tensor (x, or the loss gradient) once per set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import torch

from ..backend import Array, synchronize
from ..method import Method
from ..result import FixedPointResult
from ..solve import solve
from .stats import SolveStats

R = TypeVar("R")


def _run_solve(g: Callable[..., Array], u0: torch.Tensor, method: Method, tol: float, max_iter: int, batch: bool,
               options: dict[str, Any], backend: str,
               compact: bool | str = False) -> tuple[FixedPointResult, SolveStats]:
    """Solve u = g(u) for a torch tensor u0 under no_grad with a method object; return (result, SolveStats)."""
    t0, c0 = time.perf_counter(), time.process_time()
    extra: dict[str, Any] = {"compact": compact} if compact is not False else {}
    with torch.no_grad():
        res = solve(g, u0, method, tol=tol, max_iter=max_iter, batch=batch, backend=backend, **options, **extra)
    synchronize(u0.device)
    stats = SolveStats.from_result(res, backend, time.perf_counter() - t0)
    stats.cpu_time = time.process_time() - c0
    return res, stats


class TimedMap(Generic[R]):
    """Wrap a map and add the wall seconds spent in it to ``seconds``.

    For maps on the CPU, which need no device synchronisation (:func:`_timed_solve` and
    ``benchmarks/bench_broyden.py``).

    Parameters
    ----------
    g : callable
        The map; called with the same arguments and its result returned unchanged (exceptions too).

    Attributes
    ----------
    seconds : float
        Wall seconds (``time.perf_counter``) spent inside ``g`` so far, starting at 0.
    """

    def __init__(self, g: Callable[..., R]) -> None:
        self.g, self.seconds = g, 0.0

    def __call__(self, *args: Any) -> R:
        """Return ``g(*args)``, adding the time it took to ``seconds``."""
        t0 = time.perf_counter()
        try:
            return self.g(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def _timed_solve(g: Callable[..., Array], u0: torch.Tensor, method: Method, tol: float, max_iter: int,
                 batch: bool, options: dict[str, Any], backend: str,
                 compact: bool | str) -> tuple[FixedPointResult, SolveStats]:
    """Run :func:`_run_solve` with the map's own time in ``SolveStats.map_time`` (CPU tensors only)."""
    args = (method, tol, max_iter, batch, options, backend, compact)
    if u0.device.type != "cpu":
        return _run_solve(g, u0, *args)
    timed = TimedMap(g)
    res, stats = _run_solve(timed, u0, *args)
    stats.map_time = timed.seconds
    return res, stats


def solve_layer(g: Callable[..., Array], u0: torch.Tensor, method: Method, tol: float, max_iter: int, batch: bool,
                options: dict[str, Any], backend: str, compact: bool | str) -> tuple[torch.Tensor, SolveStats]:
    """Solve u = g(u) from ``u0`` as the layer does; return (the solution, SolveStats).

    Parameters
    ----------
    g : callable
        The map, on torch tensors of u0's shape: ``g(u)``, or ``g(u, rows)`` with compaction.
    u0 : torch.Tensor
        Initial guess (detached).
    method, tol, max_iter, batch, options, backend, compact
        The solve's method object, tolerance, iteration cap, batch mode, common solver options,
        solver library ("numpy", "cupy" or "torch") and compaction, as checked by
        :func:`~fixedpoint.torch.config.make_config`.

    Returns
    -------
    x : torch.Tensor
        The solver's best iterate, shape, dtype and device of ``u0``.
    stats : SolveStats
        The solve's statistics, timed (``map_time`` for CPU tensors only).
    """
    res, stats = _timed_solve(g, u0, method, tol, max_iter, batch, options, backend, compact)
    # fixedpoint.solve returns x in x0's library: a tensor for the tensor u0
    return cast(torch.Tensor, res.x), stats


class RowSet:
    """Tells whether the solver's ``rows`` are the set seen last time, without synchronising a GPU.

    The solver keeps one index array between host checks and only ever drops samples, so a set
    with as many rows is the same set: on a GPU the count and the array's address are compared;
    on the CPU, where it costs no synchronisation, the indices themselves.
    """

    def __init__(self) -> None:
        self.key: tuple[int, int, torch.device] | None = None
        self.rows: torch.Tensor | None = None

    def changed(self, rows: torch.Tensor) -> bool:
        """Return whether ``rows`` (a 1-D index tensor) differs from the last set, and remember it if so."""
        key = (rows.shape[0], rows.data_ptr(), rows.device)
        if rows.device.type == "cpu":
            same = self.rows is not None and self.rows.shape == rows.shape and bool(torch.equal(self.rows, rows))
        else:
            same = key == self.key
        if same:
            return False
        self.key, self.rows = key, rows.clone()
        return True


class RowsOf:
    """``t[rows]`` for the sample indices the solver passes, gathered once per set of rows.

    The set changes only at the solver's host checks, and ``rows`` covers the whole batch
    (then ``t`` itself is returned) until compaction starts.
    """

    def __init__(self, t: torch.Tensor) -> None:
        # value is read only after seen.changed() has set it: the first set of fewer rows is always new
        self.t, self.seen, self.value = t, RowSet(), t

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Return ``t[rows]`` for the 1-D index tensor ``rows`` (``t`` itself for every row or a 0-d ``t``)."""
        if self.t.dim() == 0 or rows.shape[0] == self.t.shape[0]:  # increasing and distinct: every row
            return self.t
        if self.seen.changed(rows):
            self.value = self.t.index_select(0, rows.to(self.t.device))
        return self.value
