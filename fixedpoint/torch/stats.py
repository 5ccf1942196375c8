"""Statistics of a DEQ layer's solves.

:class:`SolveStats` for one fixed-point solve (forward or adjoint), :class:`DEQStats` for one call of
the layer (its forward solve and what its backward pass cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..result import FixedPointResult

__all__ = ["DEQStats", "SolveStats"]


@dataclass
class SolveStats:
    """Statistics of one fixed-point solve of a DEQ layer (the forward solve or the adjoint solve).

    Attributes
    ----------
    method : str
        Name of the method ("anderson", "forward", "broyden", or a user method's name).
    backend : str
        Library the solver ran in: "numpy", "cupy" or "torch".
    batch_size : int
        Number of samples solved together (1 when ``batch=False``).
    n_fev : int
        Evaluations of the map (of f in the forward solve, of the vector–Jacobian
        product J_fᵀ u in the adjoint solve), each on the whole batch or, with
        compaction, on the samples still iterating.
    n_iter_mean, n_iter_max : float, int
        Mean and largest number of iterations per sample until it converged or stopped.
    residual_mean, residual_max : float
        Mean and largest final residual per sample (relative residual
        ‖f(z) − z‖ / (‖f(z)‖ + ε) with the default ``stop_mode="rel"``).
    converged_fraction : float
        Fraction of the samples that reached the tolerance, in [0, 1].
    status : str
        The solve's :attr:`fixedpoint.FixedPointResult.status`.
    wall_time : float
        Seconds spent in the solve, conversions included (CUDA work synchronised).
    n_rows : int
        The cost in samples: in the forward solve the samples f was evaluated on, in
        all (:attr:`fixedpoint.FixedPointResult.n_rows`; ``batch_size * n_fev`` without
        compaction); in the adjoint solve the samples of the graphs the products were
        taken on (with compaction, a product on a graph that still holds samples that
        have stopped costs all its rows).
    n_graph_rows : int
        Adjoint solve with compaction: samples on which f was evaluated again with
        autograd, to take the products on a smaller graph (0 otherwise).
    compacted : bool
        Whether the solve evaluated its map on fewer samples than the batch at some point.
    cpu_time : float
        CPU seconds this process used during the solve (``time.process_time``): on a
        shared machine a measure of the cost that other processes do not inflate.
    map_time : float or None
        Seconds of ``wall_time`` spent inside the map (f, or the product with its
        graph rebuilds), the rest being the solver's own work; measured for CPU
        tensors only (None on other devices, where it would need a synchronisation
        per evaluation).
    residual_history : ndarray of float64, shape (n_fev, batch_size)
        Residual of every iterate of every sample, NaN once a sample has stopped.
    """

    method: str
    backend: str
    batch_size: int
    n_fev: int
    n_iter_mean: float
    n_iter_max: int
    residual_mean: float
    residual_max: float
    converged_fraction: float
    status: str
    wall_time: float
    n_rows: int = 0
    n_graph_rows: int = 0
    compacted: bool = False
    cpu_time: float = 0.0
    map_time: float | None = None
    residual_history: np.ndarray = field(repr=False, default_factory=lambda: np.empty((0, 0)))

    @classmethod
    def from_result(cls, res: FixedPointResult, backend: str, wall_time: float) -> SolveStats:
        """Summarise a batch-mode or single :class:`fixedpoint.FixedPointResult`."""
        iters = np.atleast_1d(np.asarray(res.n_iter))
        resid = np.atleast_1d(np.asarray(res.residual, dtype=np.float64))
        conv = np.atleast_1d(np.asarray(res.converged, dtype=bool))
        hist = np.asarray(res.residual_history, dtype=np.float64)
        return cls(method=res.method, backend=backend, batch_size=int(iters.size), n_fev=int(res.n_fev),
                   n_iter_mean=float(iters.mean()), n_iter_max=int(iters.max()),
                   residual_mean=float(resid.mean()), residual_max=float(resid.max()),
                   converged_fraction=float(conv.mean()), status=str(res.status), wall_time=float(wall_time),
                   n_rows=int(res.n_rows), compacted=int(res.n_rows) < int(iters.size) * int(res.n_fev),
                   residual_history=hist.reshape(hist.shape[0], -1))

    def as_dict(self) -> dict[str, Any]:
        """Return the statistics as a dict of Python scalars (no residual history), for logging."""
        return {key: getattr(self, key) for key in self.__dataclass_fields__ if key != "residual_history"}


@dataclass
class DEQStats:
    """Statistics of one call of a DEQ layer: its forward solve and what its backward pass cost.

    Attributes
    ----------
    forward : SolveStats
        The forward solve z* = f(z*, x).
    gradient : str
        The layer's ``gradient`` mode: "implicit", "phantom" or "jfb".
    graph_evals : int
        Evaluations of f with autograd after the solve, on the whole batch: 1, or
        ``gradient_steps`` for phantom gradients (the output is then z_k).
    backward : SolveStats or None
        The adjoint solve u = J_fᵀ u + ∂L/∂z* (implicit gradients), filled in when the
        backward pass through this call has run; None before, for calls without
        autograd, and for phantom and Jacobian-free gradients, which solve nothing.
    backward_vjps : int or None
        Vector–Jacobian products through f in the backward pass, filled in when it runs:
        the adjoint solve's ``n_fev`` plus the one that carries u to x and the
        parameters (implicit), ``gradient_steps`` (phantom) or 1 (JFB).
    backward_rows : int or None
        The samples those products were taken on, in all (each product on the whole
        batch counts ``batch_size``): the cost of the backward pass in samples.
    backward_time : float or None
        Seconds of the layer's backward pass, from the gradient's arrival at the layer's
        output to its arrival at x (CUDA work synchronised): the adjoint solve and the
        final product (implicit) or the products through the unrolled steps.  None when
        x does not require grad (the end is then not observed) or before the backward pass.
    """

    forward: SolveStats
    gradient: str = "implicit"
    graph_evals: int = 1
    backward: SolveStats | None = None
    backward_vjps: int | None = None
    backward_rows: int | None = None
    backward_time: float | None = None
