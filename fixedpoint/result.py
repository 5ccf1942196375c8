"""The result type shared by every solver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Array

__all__ = ["ConvergenceError", "ConvergenceWarning", "FixedPointResult", "STATUSES"]


class ConvergenceWarning(UserWarning):
    """Warning that a solve ended unconverged where the caller does not return its status.

    Issued for the forward or adjoint solve inside :class:`fixedpoint.torch.DEQ`.  Turn it into an error with
    ``warnings.simplefilter("error", fixedpoint.ConvergenceWarning)``, or with the layer's ``unconverged="raise"``.
    """


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` where the caller asked for it (``unconverged="raise"``).

    Attributes
    ----------
    stats : object
        The statistics of the solve that did not converge (:class:`fixedpoint.torch.SolveStats` for a DEQ).
    """

    def __init__(self, message: str, stats: Any = None) -> None:
        super().__init__(message)
        self.stats = stats

#: Possible values of :attr:`FixedPointResult.status`, with their meaning.
STATUSES = {
    "converged": "every sample reached the tolerance",
    "max_iter": "the iteration limit was reached before every sample converged",
    "nonfinite": "g returned NaN or Inf for some sample (or a norm overflowed); the best finite iterate is returned",
    "diverged": "the residual of some sample grew beyond divtol times its initial one; its best iterate is returned",
    "stopped": "the callback asked to stop",
    "error": "g or the callback raised; the exception carries this result as .fixedpoint_result",
}


@dataclass
class FixedPointResult:
    """Outcome of a fixed-point solve.  Not converging is a status, not an exception.

    In batch mode (``batch=True``) the per-sample fields are NumPy arrays of shape
    ``(B,)``; otherwise they are Python scalars.

    Attributes
    ----------
    x : array
        The solution: for each sample the iterate with the smallest residual seen
        (the converged iterate when it converged).  Same library, device, shape as
        ``x0``, and ``x0``'s floating dtype, complex for complex ``x0`` (see
        :func:`fixedpoint.backend.working_dtype`).
    converged : bool or ndarray of bool, shape (B,)
        Whether the residual of ``x`` is at most ``tol``.
    status : str
        One of :data:`STATUSES`.  ``"stopped"`` or ``"error"`` when the callback
        or ``g`` ended the solve; otherwise ``"converged"`` if all samples
        converged, else ``"nonfinite"`` if any sample met a NaN/Inf (from ``g``,
        or a residual norm that overflowed), else ``"diverged"`` if any sample's
        residual grew beyond ``divtol`` times its initial one, else ``"max_iter"``.
    sample_status : ndarray of str, shape (B,), or str
        ``"converged"``, ``"max_iter"``, ``"nonfinite"``, ``"diverged"`` or (after a
        callback stop) ``"stopped"`` for each sample.
    n_iter : int or ndarray of int, shape (B,)
        Evaluations of ``g`` each sample took until it converged (or stopped).
    n_fev : int
        Evaluations of ``g`` done in all (one per iteration, whole batch at once).
        May exceed ``max(n_iter)`` by up to ``check_every - 1``.
    n_rows : int
        Samples passed to ``g`` in all: ``B * n_fev`` (1 per evaluation without batch
        mode), fewer with ``compact``, which evaluates only the samples still iterating.
    residual : float or ndarray of float64, shape (B,)
        Residual of ``x`` in the solve's ``stop_mode`` (dimensionless for "rel",
        units of x for "abs"); real for complex ``x0`` too (a Euclidean norm).
    residual_history : ndarray of float64, shape (n_fev,) or (n_fev, B)
        Residual of every iterate, on the host; NaN after a sample stopped.
    n_restarts : int or ndarray of int, shape (B,)
        Restarts of the method's memory triggered by its safeguards (Anderson, Broyden;
        always 0 for forward iteration).
    wall_time : float
        Seconds spent in the solve, measured on the host after the final synchronisation.
    method : str
        The method's name (``"anderson"``, ``"forward"``, ``"broyden"``, or a user method's).
    options : dict
        The options the solve ran with, defaults filled in: the common ones and the method's.
    """

    x: Array
    converged: bool | np.ndarray
    status: str
    sample_status: str | np.ndarray
    n_iter: int | np.ndarray
    n_fev: int
    n_rows: int
    residual: float | np.ndarray
    residual_history: np.ndarray
    n_restarts: int | np.ndarray
    wall_time: float
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when every sample converged."""
        return self.status == "converged"

    def __repr__(self) -> str:
        """Summarise: method, status, evaluations, the largest residual, restarts and wall time."""
        res = np.max(self.residual) if np.size(self.residual) else float("nan")
        return (
            f"FixedPointResult(method={self.method!r}, status={self.status!r}, n_fev={self.n_fev}, "
            f"max residual={res:.3e}, restarts={int(np.sum(self.n_restarts))}, wall_time={self.wall_time:.3g}s)"
        )
