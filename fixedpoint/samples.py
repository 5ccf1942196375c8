"""The per-sample record of one solve: the samples still iterating in working arrays, the others' results.

The driver loop (:mod:`fixedpoint.iteration`) keeps, for each sample still iterating, its
iterate, next iterate, best iterate and best residual, its flags (active, diverged, a best
iterate not yet copied), its restart count, its reference residual for the divergence test and
its index in the batch, all as rows of *working arrays*: the first ``w`` rows of buffers made
for the ``B`` samples.  At a host check where samples have stopped, :meth:`SampleRecord.pack`
writes their results (best iterate, best residual, restarts, divergence) to the output record
once and moves the others' rows to the front in place, so that from then on every operation of
an iteration runs on ``w`` rows.  The residual history is kept for the whole batch on the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .interop import to_numpy
from .kernels import Kernels

__all__ = ["SampleRecord", "INACTIVE"]

#: History entry of a sample that had stopped (residuals are >= 0 or NaN).
INACTIVE = -1.0


class SampleRecord:
    """Working rows of the samples still iterating and the results of those that have stopped.

    Parameters
    ----------
    kern : Kernels
        The solve's kernels (vectors' library and device, small-state namespace).
    x0 : array with B·n entries
        The initial iterates (copied, in ``dtype``, as ``(B, n)``).
    dtype, B, n
        The solve's dtype, samples and sample length.
    check_every : int
        Iterations between host checks: the device-side history holds that many rows.

    Attributes
    ----------
    x, x_next, best_x : arrays, shape (w, n)
        The working samples' iterate, next iterate (scratch of the step) and best iterate.
    best_r, active, n_restarts, diverged, best_pending : small state, shape (w,)
        Their best residual, whether they still iterate, restart counts, divergence flags, and
        whether their best iterate still lies in ``best_buf`` (copied lazily: :meth:`keep_best`).
    f0 : small state, shape (w,), or None
        ‖f_0‖ per sample, the reference of the divergence test and of the relative stopping test's
        guard (:data:`fixedpoint.iteration.REL_REDUCTION`); None before the first iteration.
    scale : small state, shape (w,), or None
        max(‖g(x_0)‖, ‖f_0‖), the starting scale of the relative stopping test (None before the
        first iteration, and without ``stop_mode="rel"``).
    idx : numpy.ndarray of int64, shape (w,)
        Their indices in the batch, on the host; ``rows`` is the same as an index array of the
        vectors' library and device (None until the first pack).
    """

    def __init__(self, kern: Kernels, x0: Any, dtype: Any, B: int, n: int, check_every: int) -> None:
        xp, sxp, sdev, sdt = kern.xp, kern.sxp, kern.sdevice, kern.sdtype
        self.kern, self.B, self.n = kern, B, n
        self.x = xp.reshape(xp.astype(x0, dtype, copy=True), (B, n))
        self.x_next = xp.empty_like(self.x)
        self.best_x = xp.asarray(self.x, copy=True)
        self.best_buf: Any = None
        self.best_pending = sxp.zeros((B,), dtype=sxp.bool, device=sdev)
        self.best_r = sxp.full((B,), float("inf"), dtype=sdt, device=sdev)
        self.active = sxp.ones((B,), dtype=sxp.bool, device=sdev)
        self.n_restarts = sxp.zeros((B,), dtype=sxp.int64, device=sdev)
        self.diverged = sxp.zeros((B,), dtype=sxp.bool, device=sdev)
        self.f0: Any = None
        self.scale: Any = None
        self.idx = np.arange(B)
        self.w = B
        self.rows: Any = None
        # The finished samples' results: the best iterates (made at the first pack) and their small state.
        self.out_x: Any = None
        self.out_r = np.full(B, np.inf)
        self.out_restarts = np.zeros(B, dtype=np.int64)
        self.out_diverged = np.zeros(B, dtype=bool)
        # Residual history: one row per iteration, INACTIVE for samples that had stopped; rows buffered on the
        # device between host checks.  Convergence, failure and iteration counts are derived from it.
        self.inactive = sxp.full((B,), INACTIVE, dtype=sdt, device=sdev)
        self.hist = sxp.empty((check_every, B), dtype=sdt, device=sdev)
        self.hist_host: list[np.ndarray] = []
        self.pending = 0

    # --- each iteration ----------------------------------------------------------------------------

    def record(self, r: Any) -> None:
        """Add the residuals ``r`` of this iteration's working samples (INACTIVE where a sample had stopped)."""
        self.hist[self.pending, : self.w] = self.kern.sxp.where(self.active, r, self.inactive[: self.w])
        self.pending += 1

    def keep_best(self, improved: Any, r: Any) -> None:
        """Remember the best iterate of the samples ``improved``, which lies in ``x``.

        The best rows that were pending in ``best_buf`` (the buffer the step is about to overwrite) are copied
        for the samples that did not improve.

        The best iterate is copied into ``best_x`` lazily: a sample whose best iterate is its latest one
        leaves it in the iterate buffer (``best_pending``), and it is copied only when that buffer is about
        to be overwritten without the sample having improved again.  For a steadily converging sample
        this saves a copy of size n every iteration.
        """
        self.best_r = self.kern.sxp.where(improved, r, self.best_r)
        if self.best_buf is not None:
            self.kern.copy_rows_where(self.best_x, self.best_buf, self.best_pending & ~improved)
        self.best_buf, self.best_pending = self.x, improved

    def swap(self) -> None:
        """Make the next iterate the iterate."""
        self.x, self.x_next = self.x_next, self.x

    # --- at host checks ------------------------------------------------------------------------------

    def flush_history(self) -> None:
        """Copy the buffered residuals to the host, as rows of the whole batch."""
        if self.pending:
            block = np.array(to_numpy(self.hist[: self.pending, : self.w]), dtype=np.float64)
            if self.w < self.B:
                full = np.full((self.pending, self.B), INACTIVE)
                full[:, self.idx] = block
                block = full
            self.hist_host.append(block)
            self.pending = 0

    def settle_best(self) -> None:
        """Copy the best-iterate rows that still lie in an iterate buffer into ``best_x``."""
        if self.best_buf is not None:
            self.kern.copy_rows_where(self.best_x, self.best_buf, self.best_pending)
            self.best_buf = None

    def pack(self, keep: np.ndarray) -> None:
        """Write out the working samples not in ``keep``, and move the rows ``keep`` to the front, in place.

        The results of the working samples not in ``keep`` (increasing positions among the working rows) go to
        the output record; the rows ``keep`` of every working array move to the front.
        """
        kern, xp, sxp = self.kern, self.kern.xp, self.kern.sxp
        gone = np.setdiff1d(np.arange(self.w), keep)
        k = keep.size
        self.settle_best()
        if self.out_x is None:
            self.out_x = xp.empty((self.B, self.n), dtype=self.x.dtype, device=kern.device)
        scratch = self.x_next[: gone.size, ...]  # free: the step overwrites it next
        kern.take_rows(scratch, self.best_x, xp.asarray(gone, device=kern.device))
        kern.put_rows(self.out_x, xp.asarray(self.idx[gone], device=kern.device), scratch)
        at = self.idx[gone]
        self.out_r[at] = np.asarray(to_numpy(self.best_r), dtype=np.float64)[gone]
        self.out_restarts[at] = np.asarray(to_numpy(self.n_restarts), dtype=np.int64)[gone]
        self.out_diverged[at] = np.asarray(to_numpy(self.diverged), dtype=bool)[gone]
        kern.pack_rows(self.x, keep)
        kern.pack_rows(self.best_x, keep)
        self.x, self.x_next, self.best_x = self.x[:k, ...], self.x_next[:k, ...], self.best_x[:k, ...]
        rows = kern.small_index(keep)
        self.best_r, self.active = sxp.take(self.best_r, rows, axis=0), sxp.take(self.active, rows, axis=0)
        self.n_restarts, self.diverged = sxp.take(self.n_restarts, rows, axis=0), sxp.take(self.diverged, rows, axis=0)
        self.best_pending = self.best_pending[:k]
        if self.f0 is not None:
            self.f0 = sxp.take(self.f0, rows, axis=0)
        if self.scale is not None:
            self.scale = sxp.take(self.scale, rows, axis=0)
        self.idx, self.w = self.idx[keep], k
        self.rows = xp.asarray(self.idx, device=kern.device)

    # --- the results ---------------------------------------------------------------------------------

    def whole_batch(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """Return the best iterates ``(B, n)`` and, on the host, best residuals, restart counts and divergence flags.

        For every sample, the working ones' joined to the finished ones' (call :meth:`settle_best` first).
        """
        best_r = to_numpy(self.best_r).astype(np.float64)
        restarts, diverged = to_numpy(self.n_restarts).astype(np.int64), to_numpy(self.diverged).astype(bool)
        if self.out_x is None:  # never packed: the working arrays are the whole batch
            return self.best_x, best_r, restarts, diverged
        self.kern.put_rows(self.out_x, self.rows, self.best_x)
        for out, value in ((self.out_r, best_r), (self.out_restarts, restarts), (self.out_diverged, diverged)):
            out[self.idx] = value
        return self.out_x, self.out_r, self.out_restarts, self.out_diverged

    def history(self) -> np.ndarray:
        """Return the residual history on the host, ``(iterations, B)``, INACTIVE where a sample had stopped."""
        return np.concatenate(self.hist_host) if self.hist_host else np.empty((0, self.B))
