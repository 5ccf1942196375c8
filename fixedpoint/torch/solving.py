"""How a DEQ layer runs its fixed-point solves (forward and adjoint) and which rows of a batch they evaluate.

:func:`solve_layer` calls :func:`fixedpoint.solve` under ``torch.no_grad()`` and summarises the
result as a :class:`~fixedpoint.torch.stats.SolveStats`, timed (wall, CPU and, for CPU tensors,
the map's own seconds).  With compaction the solver passes the map the indices of the samples
still iterating; :class:`RowSet` tells when that set changes and :class:`RowsOf` gathers the
matching rows of a tensor (x, or the loss gradient) once per set.
"""

from __future__ import annotations

import time

import torch

from ..backend import synchronize
from ..solve import solve
from .stats import SolveStats


def _run_solve(g, u0, method, tol, max_iter, batch, options, backend, compact=False):
    """Solve u = g(u) for a torch tensor u0 under no_grad with a method object; return (result, SolveStats)."""
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {"compact": compact} if compact is not False else {}
    with torch.no_grad():
        res = solve(g, u0, method, tol=tol, max_iter=max_iter, batch=batch, backend=backend, **options, **extra)
    synchronize(u0.device)
    stats = SolveStats.from_result(res, backend, time.perf_counter() - t0)
    stats.cpu_time = time.process_time() - c0
    return res, stats


class TimedMap:
    """A map that adds the wall seconds spent in it to ``seconds`` (for maps on the CPU, which need no
    device synchronisation: :func:`_timed_solve` and ``benchmarks/bench_broyden.py``).

    Parameters
    ----------
    g : callable
        The map; called with the same arguments and its result returned unchanged (exceptions too).

    Attributes
    ----------
    seconds : float
        Wall seconds (``time.perf_counter``) spent inside ``g`` so far, starting at 0.
    """

    def __init__(self, g):
        self.g, self.seconds = g, 0.0

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.g(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def _timed_solve(g, u0, *args):
    """:func:`_run_solve` with the map's own time in ``SolveStats.map_time`` (CPU tensors only)."""
    if u0.device.type != "cpu":
        return _run_solve(g, u0, *args)
    timed = TimedMap(g)
    res, stats = _run_solve(timed, u0, *args)
    stats.map_time = timed.seconds
    return res, stats


def solve_layer(g, u0, method, tol, max_iter, batch, options, backend, compact):
    """The layer's solve of u = g(u); returns (x, SolveStats)."""
    res, stats = _timed_solve(g, u0, method, tol, max_iter, batch, options, backend, compact)
    return res.x, stats


class RowSet:
    """Tells whether the solver's ``rows`` are the set seen last time, without synchronising a GPU.

    The solver keeps one index array between host checks and only ever drops samples, so a set
    with as many rows is the same set: on a GPU the count and the array's address are compared;
    on the CPU, where it costs no synchronisation, the indices themselves.
    """

    def __init__(self):
        self.key, self.rows = None, None

    def changed(self, rows):
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

    def __init__(self, t):
        self.t, self.seen, self.value = t, RowSet(), None

    def __call__(self, rows):
        if self.t.dim() == 0 or rows.shape[0] == self.t.shape[0]:  # increasing and distinct: every row
            return self.t
        if self.seen.changed(rows):
            self.value = self.t.index_select(0, rows.to(self.t.device))
        return self.value
