"""In-place array kernels of the solver loops, and where the small per-sample state lives (:class:`Kernels`).

Everything a method does to its vectors of size n goes through a :class:`Kernels`:
in-place operations into preallocated buffers (the standard has no ``out=``), the
products with a stack of stored vectors, and the reductions into per-sample *small
state* (summed over the processes of a sharded solve, rescued from overflow on the
host), and the small batched solve.  The kernels are chosen by library (NumPy,
PyTorch CPU tensors through NumPy views, CuPy, PyTorch on accelerators, any other
array API library) and by shape.

Nothing here imports torch or cupy at module import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

import array_api_compat
import numpy as np

from .backend import (
    Array,
    Namespace,
    emulation,
    is_torch_cpu,
    library_name,
    resolve_namespace,
    solve_dtype,
)
from .comm import as_communicator

if TYPE_CHECKING:  # for annotations only: neither is imported when fixedpoint is
    import cupy
    from torch import Tensor

__all__ = ["Kernels", "ReductionTerm"]

#: ``("matvec", A, v)`` or ``("matvec", A, v, out)``: ⟨A[j, b], v[b]⟩ for a stack ``A`` ``(k, B, n)`` and ``v``
#: ``(B, n)``, optionally computed into ``out`` ``(B, k)`` (in the vectors' dtype).
MatvecTerm: TypeAlias = tuple[Literal["matvec"], Array, Array] | tuple[Literal["matvec"], Array, Array, Array]
#: ``("dot", a, b)``: ⟨a[b], b[b]⟩ per row.
DotTerm: TypeAlias = tuple[Literal["dot"], Array, Array]
#: ``("sqnorm", a)``: ‖a[b]‖² per row.
SqnormTerm: TypeAlias = tuple[Literal["sqnorm"], Array]
#: ``("sqdiff", a, b)``: ‖a[b] − b[b]‖² per row, without a temporary of size n.
SqdiffTerm: TypeAlias = tuple[Literal["sqdiff"], Array, Array]
#: The terms whose sums are squared norms (:meth:`Kernels.root` takes their square roots).
NormTerm: TypeAlias = SqnormTerm | SqdiffTerm
#: One reduction of :meth:`Kernels.sums`, tagged by its kind.
ReductionTerm: TypeAlias = MatvecTerm | DotTerm | NormTerm
#: One system of :func:`ldl_solve_one` solved in Python floats (``None`` at a zero pivot).
LdlOne: TypeAlias = Callable[[list[float], list[float]], list[float] | None]


#: Rows of at most this many elements use per-slot batched dot products for the Gram row (NumPy);
#: longer rows use one matrix-vector product per sample (BLAS).
SHORT_ROWS = 4096
#: Elements of the scratch block with which residual norms are computed without a temporary of size n.
_BLOCK = 1 << 16


class Kernels:
    """In-place array operations used inside the solver loops, and where the small per-sample state lives.

    Vectors are ``(B, n)`` arrays (B samples of length n) of one dtype on one device;
    a *stack* of k vectors is a ``(k, B, n)`` array (vector j of every sample
    contiguous).  ``out`` arguments are preallocated and are written, never
    reallocated, for NumPy, CuPy and PyTorch.  Other array API libraries get the
    same results through assignment (which allocates a temporary).

    The vector work runs in NumPy for NumPy arrays and for PyTorch CPU tensors
    (through zero-copy ``.numpy()`` views: NumPy's batched products and reductions
    are several times faster than PyTorch's on the CPU), in CuPy for CuPy arrays, in
    PyTorch for PyTorch tensors on an accelerator, and through the standard for any
    other library.  Which kernel serves an operation also depends on the shape:
    e.g. the products with a stack use one batched dot product per stored vector
    for many short samples, one BLAS call per sample for long ones, and plain
    ``np.dot`` for a single sample.

    The solvers also keep O(B·m²) *small* state (Gram matrix, masks, per-sample
    residuals).  It lives in :attr:`sxp` on :attr:`sdevice`: NumPy when the vectors
    are in host memory (a NumPy operation on a few numbers costs a fraction of a
    PyTorch one, and reading it costs no synchronisation), else the vectors' own
    library and device (no host synchronisation on GPUs).

    Parameters
    ----------
    xp : namespace
        Array API namespace of the vectors.
    device : optional
        Their device (default: the library's default, e.g. the CPU for PyTorch).
    comm : optional
        A communicator (:mod:`fixedpoint.comm`) when the vectors are shards: every reduction
        (:meth:`sums`) is then summed over its processes.
    """

    def __init__(self, xp: Namespace, device: Any = None, comm: Any = None) -> None:
        self.xp = xp
        self.device = device
        #: The :class:`fixedpoint.comm.Communicator` over whose processes the vectors are sharded, or None.
        self.comm = as_communicator(comm)
        self.lib = lib = library_name(xp)
        self._torch_cpu = is_torch_cpu(lib, device)
        if lib == "torch" and not self._torch_cpu:
            torch = importlib.import_module("torch")
            if torch.device(device).type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(f"device {device} was asked for, but torch {torch.__version__} sees no usable "
                                   "CUDA device")
        emulating, emulated_float64 = emulation()
        emulated = self._torch_cpu and emulating
        #: Which library does the vector work: "numpy", "cupy", "torch" or "generic".
        self.mode = "numpy" if lib == "numpy" or (self._torch_cpu and not emulated) else (
            lib if lib in ("cupy", "torch") else "generic")
        self._raw: Any = None  # the module whose out= operations do the vector work
        if self.mode != "generic":
            self._raw = importlib.import_module(self.mode)
        self._views = self.mode == "numpy" and lib == "torch"  # torch CPU tensors seen as NumPy arrays
        if self.mode == "numpy":
            self.sxp, self.sdevice = resolve_namespace("numpy"), "cpu"
        else:
            self.sxp, self.sdevice = xp, device
        self.sdtype = solve_dtype(self.sxp, self.sdevice)
        if emulated and not emulated_float64:
            self.sdtype = self.sxp.float32
        #: True when the small state is NumPy, so reading it costs no device synchronisation.
        self.small_on_host = library_name(self.sxp) == "numpy"
        self._scratch: Array | None = None  # a block of _BLOCK elements for norms of differences and packing (_block)

    # --- conversions ---------------------------------------------------------------------------

    # The library-specific branches below narrow ``Array`` to the concrete type of their branch with
    # ``if TYPE_CHECKING: assert isinstance(...)``: checked by the type checker, free at run time (the
    # kernels run several times per iteration, where a ``typing.cast`` would add a function call).

    def small(self, a: Array) -> Array:
        """View an array of the vectors' library as an array of :attr:`sxp` (no copy).

        A NumPy view of a PyTorch CPU tensor, else ``a`` itself.  The vector work of NumPy mode runs on these
        views too (:meth:`numpy_view`).
        """
        if self._views:
            if TYPE_CHECKING:  # NumPy mode on PyTorch CPU tensors
                assert isinstance(a, Tensor)
            return a.detach().numpy()
        return a

    def numpy_view(self, a: Array) -> np.ndarray:
        """View an array of the vectors' library as a NumPy array, in NumPy mode only (no copy).

        :meth:`small` typed for the NumPy code paths (``mode == "numpy"``, equivalently :attr:`small_on_host`):
        a NumPy view of a PyTorch CPU tensor, else ``a`` itself, a NumPy array.
        """
        if self._views:
            if TYPE_CHECKING:  # NumPy mode on PyTorch CPU tensors
                assert isinstance(a, Tensor)
            return a.detach().numpy()
        if TYPE_CHECKING:  # NumPy mode on NumPy arrays
            assert isinstance(a, np.ndarray)
        return a

    def big(self, a: Array, dtype: Any = None) -> Array:
        """Return an array of :attr:`sxp` as an array of the vectors' library, cast to ``dtype`` if given."""
        if self._views:
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(a, np.ndarray)
            if not a.flags.writeable:  # e.g. a broadcast view: torch.from_numpy wants writeable memory
                a = np.array(a)
            t: Tensor = self._raw_torch().from_numpy(a)
            return t if dtype is None else t.to(dtype)
        if self.mode == "numpy":
            if TYPE_CHECKING:  # NumPy arrays
                assert isinstance(a, np.ndarray)
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        if dtype is None:
            return a
        out: Array = self.xp.astype(a, dtype)
        return out

    def _raw_torch(self) -> Any:
        return importlib.import_module("torch")

    def _host_float64(self, a: Array) -> np.ndarray:
        """Return the values of a vectors' array on the host as float64 NumPy (a copy unless already so)."""
        host: Any = a  # NumPy or array-api-strict: converted by np.asarray
        if self.lib == "torch":
            host = cast("Tensor", a).detach().cpu().to(self._raw_torch().float64)
        elif self.lib == "cupy":
            host = cast("cupy.ndarray", a).get()
        return np.asarray(host, dtype=np.float64)

    def _coef(self, alpha: float | Array, like: Array) -> float | Array:
        """Return a Python float as is; a per-sample small-state array ``(B,)`` as ``(B, 1)`` for the vector work."""
        if isinstance(alpha, (int, float)):
            return float(alpha)
        if self.mode == "numpy":
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(alpha, np.ndarray)
            return np.asarray(alpha, dtype=self.small(like).dtype)[:, None]
        coef: Array = self.xp.astype(alpha, like.dtype)
        return coef[:, None]

    def solver_context(self) -> contextlib.ExitStack:
        """Return the context in which the solver runs.

        ``torch.no_grad()`` for PyTorch (the solve is not differentiated through; gradients come from
        implicit differentiation), and NumPy's floating point warnings off (the solver detects non-finite
        values itself; NumPy holds the small state on the host, and array-api-strict computes with NumPy).
        """
        stack = contextlib.ExitStack()
        if self.lib == "torch":
            stack.enter_context(self._raw_torch().no_grad())
        stack.enter_context(np.errstate(all="ignore"))
        return stack

    # --- elementwise -----------------------------------------------------------------------------

    def sub(self, out: Array, a: Array, b: Array) -> None:
        """``out[...] = a - b``."""
        if self.mode == "torch":
            self._raw.sub(a, b, out=out)
        elif self._raw is not None:
            n = self.small
            self._raw.subtract(n(a), n(b), out=n(out))
        else:
            out[...] = a - b

    def copy(self, out: Array, a: Array) -> None:
        """``out[...] = a``."""
        if self.mode == "torch":
            if TYPE_CHECKING:  # PyTorch tensors
                assert isinstance(out, Tensor) and isinstance(a, Tensor)
            out.copy_(a)
        elif self._raw is not None:
            self._raw.copyto(self.small(out), self.small(a))
        else:
            out[...] = a

    def add_scaled(self, out: Array, a: Array, alpha: float | Array, b: Array) -> None:
        """``out[...] = a + alpha * b``, ``alpha`` a Python float or a per-sample small-state array of shape ``(B,)``.

        ``out`` must not overlap ``a`` or ``b``.
        """
        alpha = self._coef(alpha, out)
        if self.mode == "torch":
            if isinstance(alpha, float):
                self._raw.add(a, b, alpha=alpha, out=out)
            else:
                self._raw.addcmul(a, b, alpha, out=out)
        elif self._raw is not None:
            n = self.small
            o = n(out)
            self._raw.multiply(n(b), alpha, out=o)
            self._raw.add(o, n(a), out=o)
        else:
            out[...] = a + alpha * b

    def scale(self, out: Array, a: Array, alpha: float | Array) -> None:
        """``out[...] = alpha * a``, ``alpha`` a Python float or a per-sample small-state array of shape ``(B,)``."""
        alpha = self._coef(alpha, out)
        if self.mode == "torch":
            self._raw.mul(a, alpha, out=out)
        elif self._raw is not None:
            self._raw.multiply(self.small(a), alpha, out=self.small(out))
        else:
            out[...] = alpha * a

    def lerp(self, out: Array, a: Array, b: Array, weight: float) -> None:
        """``out[...] = a + weight * (b - a)`` for a Python float ``weight``; ``out`` may not overlap ``a``, ``b``."""
        if self.mode == "torch":
            self._raw.lerp(a, b, weight, out=out)
        elif self._raw is not None:
            n = self.small
            o = n(out)
            self._raw.subtract(n(b), n(a), out=o)
            self._raw.multiply(o, weight, out=o)
            self._raw.add(o, n(a), out=o)
        else:
            out[...] = a + weight * (b - a)

    def copy_rows_where(self, out: Array, a: Array, mask: Array) -> None:
        """``out[i] = a[i]`` for the rows ``i`` where the boolean ``mask`` (shape ``(B,)``, small state) is true.

        With the small state on the host, an all-false mask costs nothing and an all-true one a plain copy.
        """
        if self.small_on_host:
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(mask, np.ndarray)
            if not mask.any():
                return
            if mask.all():
                self.copy(out, a)
                return
        if self.mode == "torch":
            self._raw.where(mask[:, None], a, out, out=out)
        elif self._raw is not None:
            self._raw.copyto(self.small(out), self.small(a), where=mask[:, None])
        else:
            out[...] = self.xp.where(mask[:, None], a, out)

    # --- products with a stack of vectors ----------------------------------------------------------

    def matvec(self, out: Array, A: Array, v: Array) -> None:
        """``out[b, j] = ⟨A[j, b], v[b]⟩`` for a stack ``A`` ``(k, B, n)``, ``v`` ``(B, n)``, ``out`` ``(B, k)``.

        NumPy chooses the kernel by n alone, never by B, so that a sample's products are the same
        to the bit in a batch of any size (alone, in a batch, after compaction): rows of at most
        :data:`SHORT_ROWS` entries use one dot product per stored vector, longer ones one
        matrix-vector product (BLAS gemv) per sample; the two round differently.
        """
        k, B, n = A.shape
        if self.mode == "numpy":
            A, v, out = self.numpy_view(A), self.numpy_view(v), self.numpy_view(out)
            if n <= SHORT_ROWS:  # per slot, one dot product per sample (for one sample, all slots in one call)
                if B == 1:
                    np.matmul(A[:, 0, None, :], v[0][:, None], out=out[0][:, None, None])
                else:
                    for j in range(k):
                        np.matmul(A[j][:, None, :], v[:, :, None], out=out[:, j, None, None])
            elif B == 1:  # gemv through np.dot: a third of matmul's call overhead, the same bits
                np.dot(A[:, 0, :], v[0], out=out[0])
            else:
                np.matmul(A.transpose(1, 0, 2), v[:, :, None], out=out[:, :, None])
        elif self._raw is not None:
            self._raw.matmul(self.xp.permute_dims(A, (1, 0, 2)), v[:, :, None], out=out[:, :, None])
        else:
            out[...] = (self.xp.permute_dims(A, (1, 0, 2)) @ v[:, :, None])[:, :, 0]

    def vecmat(self, out: Array, w: Array, A: Array) -> None:
        """``out[b] = Σ_j w[b, j] A[j, b]`` for ``w`` ``(B, k)``, a stack ``A`` ``(k, B, n)``, ``out`` ``(B, n)``.

        With NumPy a sample's result does not depend on B (``np.matmul`` for one sample as for many:
        ``np.dot`` rounds differently for a few tiny n).
        """
        k, B, n = A.shape
        if self.mode == "numpy":
            A, w, out = self.numpy_view(A), self.numpy_view(w), self.numpy_view(out)
            if k == 1:
                np.multiply(A[0], w, out=out)
            elif B == 1:
                np.matmul(w[0], A[:, 0, :], out=out[0])
            else:
                np.matmul(w[:, None, :], A.transpose(1, 0, 2), out=out[:, None, :])
        elif self._raw is not None:
            self._raw.matmul(w[:, None, :], self.xp.permute_dims(A, (1, 0, 2)), out=out[:, None, :])
        else:
            out[...] = (w[:, None, :] @ self.xp.permute_dims(A, (1, 0, 2)))[:, 0, :]

    # --- packing the samples still iterating to the front ----------------------------------------

    def take_rows(self, out: Array, a: Array, rows: Array) -> None:
        """``out[i] = a[rows[i]]`` into a preallocated ``out`` of ``len(rows)`` rows.

        ``rows`` is an index array of the vectors' library and device.
        """
        if self.lib == "torch":
            self._raw_torch().index_select(a, 0, rows, out=out)
        elif self.lib in ("numpy", "cupy"):
            importlib.import_module(self.lib).take(a, rows, axis=0, out=out)
        else:
            out[...] = self.xp.take(a, rows, axis=0)

    def put_rows(self, out: Array, rows: Array, a: Array) -> None:
        """``out[rows[i]] = a[i]``."""
        if self.lib == "torch":
            if TYPE_CHECKING:  # PyTorch tensors
                assert isinstance(out, Tensor) and isinstance(rows, Tensor) and isinstance(a, Tensor)
            out.index_copy_(0, rows, a)
        elif self.lib in ("numpy", "cupy"):
            out[rows] = a
        else:  # the standard has no scatter: one row at a time
            for i in range(a.shape[0]):
                out[int(rows[i]), ...] = a[i, ...]

    def pack_rows(self, a: Array, keep: np.ndarray) -> None:
        """Move the rows ``keep`` of ``a`` (along its first axis) to the front, in order, in place.

        Row ``keep[i]`` goes to row ``i``.  ``keep`` is an increasing host array of row indices.  Rows before
        the first one that moves stay; from there, a long run of consecutive rows is copied directly in pieces
        that cannot overwrite a row not yet moved (or through the scratch block when it moves by less than a
        block), and scattered rows are gathered a block at a time into the fixed scratch block of
        :data:`_BLOCK` elements and copied back.  Every destination lies before its source, so nothing is
        overwritten before it moves, and nothing of size n is allocated; the copies (one kernel launch each on
        a GPU, no synchronisation) number about twice the rows moved over the rows per block, or one per long
        run.
        """
        keep = np.asarray(keep, dtype=np.int64)
        moved = np.nonzero(keep != np.arange(keep.size))[0]
        if moved.size == 0:
            return
        row = math.prod(a.shape[1:])
        per_block = max(1, _BLOCK // row)
        ends = np.append(np.nonzero(np.diff(keep) != 1)[0] + 1, keep.size)  # one past each run of consecutive rows
        run_end = np.repeat(ends, np.diff(ends, prepend=0))  # run_end[i]: the end of the run that holds i
        i = int(moved[0])
        while i < keep.size:
            length, gap = int(run_end[i]) - i, int(keep[i]) - i
            if length >= per_block:  # a long run: directly, or through the block when it moves by less
                piece = gap if gap >= per_block else per_block
                for off in range(0, length, piece):
                    c = min(piece, length - off)
                    to, frm = a[i + off:i + off + c, ...], a[keep[i] + off:keep[i] + off + c, ...]
                    if gap >= per_block:
                        self.copy(to, frm)
                    else:
                        tmp = self._block_rows(a, c)
                        self.copy(tmp, frm)
                        self.copy(to, tmp)
                i += length
            else:  # scattered rows: a block of them gathered, then written back in order
                c = min(per_block, keep.size - i)
                tmp = self._block_rows(a, c)
                self.take_rows(tmp, a, self.xp.asarray(keep[i:i + c], device=self.device))
                self.copy(a[i:i + c, ...], tmp)
                i += c

    def _block_rows(self, a: Array, c: int) -> Array:
        """Return the scratch block as ``c`` rows shaped like those of ``a``."""
        rows: Array = self.xp.reshape(self._block(a.dtype)[: c * math.prod(a.shape[1:])], (c,) + tuple(a.shape[1:]))
        return rows

    def _block(self, dtype: Any) -> Array:
        """Return the scratch block of :data:`_BLOCK` elements in ``dtype`` (made on first use, or for a new dtype)."""
        if self._scratch is None or self._scratch.dtype != dtype:
            self._scratch = self.xp.empty((_BLOCK,), dtype=dtype, device=self.device)
        return self._scratch

    def pack_stack(self, flat: Array, shape: tuple[int, int, int], keep: np.ndarray) -> Array:
        """Pack a contiguous stack at the start of the 1-d buffer ``flat`` to the samples ``keep``.

        The stack of ``shape`` ``(s, w, n)`` becomes a contiguous ``(s, len(keep), n)`` stack at the start
        of ``flat``, which is returned (a view).

        The rows move in place in the order of their addresses (:meth:`pack_rows` on the ``(s·w, n)``
        rows): every destination lies before its source, so nothing is overwritten before it moves
        and nothing of size n is allocated.  Keeping a stack contiguous, rather than every k-th row of
        a B-sample one, keeps the products of the samples left as fast as in a batch of k (gemv on
        rows 1 sample apart instead of B apart: half the time for one sample of 37,632 left of 100).
        """
        s, w, n = shape
        k = len(keep)
        self.pack_rows(self.xp.reshape(flat[: s * w * n], (s * w, n)),
                       (np.arange(s)[:, None] * w + np.asarray(keep)[None, :]).reshape(-1))
        packed: Array = self.xp.reshape(flat[: s * k * n], (s, k, n))
        return packed

    def small_index(self, rows: np.ndarray) -> Array:
        """Return a host array of row indices as an index array of the small state (its library and device)."""
        index: Array = self.sxp.asarray(np.asarray(rows, dtype=np.int64), device=self.sdevice)
        return index

    # --- reductions into small state ---------------------------------------------------------------

    def _local(self, term: ReductionTerm) -> Array:
        """Return the local partial sums of one reduction term, as small state in :attr:`sdtype`."""
        if term[0] == "matvec":  # ("matvec", A (k, B, n), v (B, n)[, out (B, k) in the vectors' dtype])
            a = term[1]
            out = term[3] if len(term) > 3 else None
            if out is None:
                out = self.xp.empty((a.shape[1], a.shape[0]), dtype=term[2].dtype, device=self.device)
            self.matvec(out, a, term[2])
            if self.mode == "numpy":
                return np.asarray(self.numpy_view(out), dtype=self.sdtype)
            local: Array = self.sxp.astype(self.small(out), self.sdtype)
            return local
        if term[0] == "dot":
            return self._local(("matvec", term[1][None, ...], term[2]))[:, 0]
        if term[0] == "sqnorm":
            return self._sqsum(term[1])
        if term[0] == "sqdiff":
            return self._sqdiff(term[1], term[2])
        raise ValueError(f"unknown reduction {term[0]!r}")

    def sums(self, *terms: ReductionTerm) -> list[Array]:
        """Sum over the vectors' entries, over every shard when the solve is sharded, in one collective.

        Each term is one of ``("matvec", A, v[, out])`` (⟨A[j, b], v[b]⟩ for a stack ``A``
        ``(k, B, n)``: shape ``(B, k)``), ``("dot", a, b)``, ``("sqnorm", a)`` or
        ``("sqdiff", a, b)`` (‖a − b‖², without a temporary of size n): shape ``(B,)``.  The
        local sums run in the vectors' dtype and are converted to small state in
        :attr:`sdtype`; with a communicator (:mod:`fixedpoint.comm`) all the terms of one call
        are summed over the processes in a single allreduce, so every process gets the same
        values.  The results may have overflowed in the vectors' dtype: :meth:`root` (for norms)
        and :meth:`rescued` recompute them in float64 from scaled copies where the small state
        is on the host (a float32 problem then never overflows, a float64 one only where the
        true value exceeds the float64 range); on a device that check would synchronise.

        Returns
        -------
        list of small-state arrays
            One per term, in order.  A ``"matvec"`` result may share memory with its ``out`` (where
            ``out`` is already small state in :attr:`sdtype`): read it before writing ``out`` again.
        """
        local = [self._local(t) for t in terms]
        if self.comm is None:
            return local
        flat = [self.sxp.reshape(v, (v.shape[0], -1)) for v in local]
        total = self.comm.sum(self.sxp.concat(flat, axis=1))
        out: list[Array] = []
        start = 0
        for v, f in zip(local, flat):
            out.append(self.sxp.reshape(total[:, start:start + f.shape[1]], v.shape))
            start += f.shape[1]
        return out

    def rescued(self, term: ReductionTerm, value: Array) -> Array:
        """Return ``value`` (the result of ``term`` in :meth:`sums`), recomputed where it is not finite.

        It is recomputed in float64 from scaled copies where the small state is on the host (a device
        would synchronise for the check).
        """
        if self.small_on_host:
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(value, np.ndarray)
            if not math.isfinite(float(value.sum())) and not np.isfinite(value).all():
                return self._rescue(term, value)
        return value

    def _global_max(self, a: np.ndarray) -> np.ndarray:
        return self.comm.max(a) if self.comm is not None else a

    def _global_sum(self, a: np.ndarray) -> np.ndarray:
        return self.comm.sum(a) if self.comm is not None else a

    def _rescue(self, term: ReductionTerm, value: np.ndarray) -> np.ndarray:
        """Recompute a term whose sums overflowed, in float64 from copies scaled by their (global) largest entries."""
        if term[0] == "sqnorm" or term[0] == "sqdiff":
            return self._safe_norms(term) ** 2
        A = term[1] if term[0] == "matvec" else term[1][None, ...]
        stack64, v64 = self._host_float64(A), self._host_float64(term[2])
        sa = self._global_max(np.max(np.abs(stack64), axis=2).T.copy())  # (B, k)
        sv = self._global_max(np.max(np.abs(v64), axis=1))
        sa, sv = np.where(sa > 0, sa, 1.0), np.where(sv > 0, sv, 1.0)
        scaled = self._global_sum(np.einsum("kbn,bn->bk", stack64 / sa.T[:, :, None], v64 / sv[:, None]))
        out: np.ndarray = scaled * sa * sv[:, None]
        return out[:, 0] if term[0] == "dot" else out

    def _safe_norms(self, term: NormTerm) -> np.ndarray:
        """Return ‖a‖ (or ‖a − b‖) per row in float64, scaled by the largest entry: finite when it fits in float64."""
        v = self._host_float64(term[1])
        if term[0] == "sqdiff":
            v = v - self._host_float64(term[2])
        with np.errstate(all="ignore"):
            scale = self._global_max(np.max(np.abs(v), axis=1))
            safe = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)
            ss = self._global_sum(np.sum((v / safe[:, None]) ** 2, axis=1))
            return np.where(np.isfinite(scale), safe * np.sqrt(ss), scale)

    def _sqsum(self, a: Array) -> Array:
        """Σ_n a[b, n]² per row, local, in the vectors' dtype, as small state in :attr:`sdtype` (no temporary)."""
        if self.mode == "numpy":
            a = self.numpy_view(a)
            if a.shape[0] == 1:
                return np.array([np.dot(a[0], a[0])], dtype=self.sdtype)
            return np.asarray((a[:, None, :] @ a[:, :, None])[:, 0, 0], dtype=self.sdtype)
        if self.mode == "torch":
            sq: Array = self._raw.linalg.vector_norm(a, dim=1).to(self.sdtype) ** 2
            return sq
        sq = self.sxp.astype((a[:, None, :] @ a[:, :, None])[:, 0, 0], self.sdtype)
        return sq

    def _sqdiff(self, a: Array, b: Array) -> Array:
        """Σ_n (a − b)[r, n]² per row, local, formed block by block in a fixed scratch (CuPy: one fused kernel)."""
        B, n = a.shape
        if self.mode == "cupy":
            fused: Array = self.sxp.astype(_cupy_sqdiff()(a, b, axis=1), self.sdtype)
            return fused
        if self.mode == "generic" or B * n <= _BLOCK:
            return self._sqsum(a - b)
        scratch = self._block(a.dtype)
        acc: Array = self.sxp.zeros((B,), dtype=self.sdtype, device=self.sdevice)
        if n >= _BLOCK:  # long rows: column blocks of each row
            for i in range(B):
                for c in range(0, n, _BLOCK):
                    tmp = scratch[: min(_BLOCK, n - c)][None, :]
                    self.sub(tmp, a[i:i + 1, c:c + _BLOCK], b[i:i + 1, c:c + _BLOCK])
                    acc[i:i + 1] = acc[i:i + 1] + self._sqsum(tmp)
        else:  # short rows: blocks of whole rows
            rows = _BLOCK // n
            for r in range(0, B, rows):
                tmp = self.xp.reshape(scratch[: min(rows, B - r) * n], (-1, n))
                self.sub(tmp, a[r:r + rows], b[r:r + rows])
                acc[r:r + rows] = self._sqsum(tmp)
        return acc

    def dot(self, a: Array, b: Array) -> Array:
        """Inner product of each row of ``a`` with the same row of ``b`` (both ``(B, n)``): small state ``(B,)``."""
        term: DotTerm = ("dot", a, b)
        return self.rescued(term, self.sums(term)[0])

    def norms(self, a: Array) -> Array:
        """Euclidean norm of each row of ``a`` (shape ``(B, n)``): small state of shape ``(B,)``, :attr:`sdtype`.

        Summed over the shards with a communicator; with the small state on the host it is finite
        whenever the vector is finite and its norm fits in float64 (see :meth:`sums`).
        """
        return self.root(self.sums(("sqnorm", a))[0], ("sqnorm", a))

    def diff_norms(self, a: Array, b: Array) -> Array:
        """‖a[i] − b[i]‖₂ per row of ``(B, n)`` arrays, as :meth:`norms`, without a temporary of size n."""
        return self.root(self.sums(("sqdiff", a, b))[0], ("sqdiff", a, b))

    def root(self, sq: Array, term: NormTerm) -> Array:
        """Return the square root of a reduced squared norm, recomputed by scaling where it overflowed.

        On the host, a norm whose square overflowed float64 is recomputed by scaling (``term`` is the
        ``("sqnorm", a)`` or ``("sqdiff", a, b)`` it came from).
        """
        r: Array = self.sxp.sqrt(sq)
        if self.small_on_host:
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(r, np.ndarray)
            if not math.isfinite(float(r[0] if r.size == 1 else r.sum())) \
                    and not np.isfinite(r).all():  # the sum: a cheap first test
                return self._safe_norms(term)
        return r

    # --- the small solve -----------------------------------------------------------------------------

    def solve_spd(self, A: Array, b: Array) -> Array:
        """Solve as :meth:`solve` for symmetric positive definite ``A`` ``(B, k, k)``, ``b`` ``(B, k)``.

        Each sample's solution is the same to the bit whatever B is (with the small state on the host).

        With the small state on the host and k ≤ :data:`LDL_MAX_K`: an LDLᵀ factorisation without
        pivoting (stable for positive definite systems) whose every sum runs left to right, vectorised
        over the batch (:func:`ldl_solve`, O(k²) NumPy operations on length-B columns) or, for fewer
        than :data:`LDL_SCALAR_BELOW` systems, one system at a time in Python floats
        (:func:`ldl_solve_one`): the same operations in the same order, hence the same bits.  For
        larger k, LAPACK one system at a time (:meth:`solve`, also independent of B).  A singular
        system (a zero pivot) gives non-finite values instead of an error.
        """
        B, k = b.shape
        if self.small_on_host and k <= LDL_MAX_K:
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(A, np.ndarray) and isinstance(b, np.ndarray)
            if B < LDL_SCALAR_BELOW:
                return np.array([ldl_solve_one(a, r) for a, r in zip(A.reshape(B, k * k).tolist(), b.tolist())],
                                dtype=np.float64).reshape(B, k)
            return ldl_solve(A, b)
        return self.solve(A, b)

    def solve(self, A: Array, b: Array) -> Array:
        """Batched solve of ``A[i] @ x[i] = b[i]`` for small state ``A`` ``(B, k, k)`` and ``b`` ``(B, k)``.

        Never raises for a singular system and never synchronises with the host on
        GPUs: rows whose system is singular come back non-finite, which the caller
        treats as a failed extrapolation.  With NumPy the batch goes straight to NumPy's
        LAPACK gufunc (``numpy.linalg.solve`` adds its checks: twice the time for
        thousands of small systems).
        """
        sxp, slib = self.sxp, library_name(self.sxp)
        x: Array
        if slib == "torch":
            x = self._raw_torch().linalg.solve_ex(A, b)[0]
            return x
        if slib == "cupy":  # cuSOLVER path: no singularity check, no synchronisation
            x = sxp.linalg.solve(A, b[:, :, None])[:, :, 0]
            return x
        if slib == "numpy":
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(A, np.ndarray) and isinstance(b, np.ndarray)
            if _lapack_solve1 is not None:  # NumPy's own kernel without numpy.linalg.solve's 15 µs of checks:
                return _lapack_solve1(A, b)  # a singular system gives NaN (under solver_context's errstate)
            sxp = np
        try:
            x = sxp.linalg.solve(A, b[:, :, None])[:, :, 0]
            return x
        except Exception:  # LinAlgError from a singular row: redo row by row, NaN for the singular ones
            rows = []
            for i in range(A.shape[0]):
                try:
                    rows.append(sxp.linalg.solve(A[i, ...], b[i, :, None])[:, 0])
                except Exception:
                    rows.append(sxp.full(b.shape[1:], float("nan"), dtype=b.dtype, device=array_api_compat.device(b)))
            x = sxp.stack(rows)
            return x


#: :meth:`Kernels.solve_spd` solves systems of at most this size by LDLᵀ (O(k²) NumPy operations over the
#: batch, ~55 µs for k = 5 and ~80 µs for k = 6 however small the batch; LAPACK one system at a time beyond,
#: ~0.25 µs a system of 5 in a large batch against the LDLᵀ's ~0.05 µs).
LDL_MAX_K = 6
#: ... and fewer than this many systems one at a time in Python floats (measured on one core, k = 5: the
#: vectorised form costs ~55 µs for up to a hundred systems, a system in Python floats ~1.5 µs; k = 6: ~75
#: and ~2 µs).  From 28 to a few hundred systems LAPACK would be faster (4–30 µs for 16–100 systems of 5), but
#: its rounding differs, and a sample's weights must not depend on its batch.
LDL_SCALAR_BELOW = 28


def ldl_solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``A[i] y[i] = b[i]`` for symmetric positive definite float64 ``A`` ``(B, k, k)``, ``b`` ``(B, k)``.

    A = L D Lᵀ (L unit lower triangular, no pivoting), then L z = b, D w = z, Lᵀ y = w; every
    operation acts on the length-B column of one matrix entry, and every sum is accumulated left
    to right, so that sample i's result is the one :func:`ldl_solve_one` computes for it alone.
    """
    k, B = A.shape[-1], A.shape[0]
    W = A.transpose(1, 2, 0).copy()  # (k, k, B): W[i, j] the batch of entries (i, j); becomes L below the diagonal
    d, t, tmp = np.empty((k, B)), np.empty((k, B)), np.empty((k, B))
    for j in range(k):
        col = W[j:, j]  # column j from the diagonal down
        for q in range(j):
            np.multiply(W[j, q], d[q], out=t[q])  # L_jq d_q
            np.multiply(W[j:, q], t[q], out=tmp[: k - j])
            np.subtract(col, tmp[: k - j], out=col)  # W_ij − Σ_q L_iq L_jq d_q
        d[j] = col[0]
        np.divide(col[1:], d[j], out=col[1:])  # column j of L
    y = b.T.copy()
    for q in range(k - 1):  # L z = b, column by column
        np.multiply(W[q + 1:, q], y[q], out=tmp[: k - 1 - q])
        np.subtract(y[q + 1:], tmp[: k - 1 - q], out=y[q + 1:])
    np.divide(y, d, out=y)  # D w = z
    for q in range(k - 1, 0, -1):  # Lᵀ y = w, column by column from the last
        np.multiply(W[q, :q], y[q], out=tmp[:q])
        np.subtract(y[:q], tmp[:q], out=y[:q])
    solution: np.ndarray = y.T  # (B, k)
    return solution


def _ldl_one_source(k: int) -> str:
    """Return the Python source of ``ldl{k}(A, b)``: :func:`ldl_solve` for one k×k system, operation by operation.

    A is row-major as a flat list of floats, b a list; only A's lower triangle is read.
    """
    w = [[f"w{i}_{j}" for j in range(k)] for i in range(k)]
    out = [f"def ldl{k}(A, b):"]
    out += [f"    {w[i][j]} = A[{i * k + j}]" for i in range(k) for j in range(i + 1)]
    for j in range(k):
        for ell in range(j):
            out.append(f"    t = {w[j][ell]} * d{ell}")
            out += [f"    {w[i][j]} = {w[i][j]} - {w[i][ell]} * t" for i in range(j, k)]
        out.append(f"    d{j} = {w[j][j]}")
        out.append(f"    if d{j} == 0.0:")
        out.append("        return None")
        out += [f"    {w[i][j]} = {w[i][j]} / d{j}" for i in range(j + 1, k)]
    out += [f"    y{i} = b[{i}]" for i in range(k)]
    for ell in range(k - 1):
        out += [f"    y{i} = y{i} - {w[i][ell]} * y{ell}" for i in range(ell + 1, k)]
    out += [f"    y{i} = y{i} / d{i}" for i in range(k)]
    for ell in range(k - 1, 0, -1):
        out += [f"    y{i} = y{i} - {w[ell][i]} * y{ell}" for i in range(ell)]
    out.append("    return [" + ", ".join(f"y{i}" for i in range(k)) + "]")
    return "\n".join(out)


@functools.cache
def _ldl_one(k: int) -> LdlOne:
    """Return the compiled ``ldl{k}`` of :func:`_ldl_one_source`."""
    scope: dict[str, Any] = {}
    exec(compile(_ldl_one_source(k), f"<fixedpoint.kernels.ldl{k}>", "exec"), scope)  # noqa: S102
    solve_one: LdlOne = scope[f"ldl{k}"]
    return solve_one


def ldl_solve_one(A: list[float], b: list[float]) -> list[float]:
    """Solve as :func:`ldl_solve` for one system, ``A`` row-major as a flat list of k² Python floats, ``b`` of k.

    The same operations in the same order (Python floats are IEEE doubles, as NumPy's float64), hence the same
    bits.  Written out operation by operation for each k (compiled once): a few µs for k = 5.  Where NumPy would
    divide by a zero pivot (giving non-finite values), every entry is NaN.
    """
    y = _ldl_one(len(b))(A, b)
    return [math.nan] * len(b) if y is None else y


def _numpy_solve1() -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """Return NumPy's LAPACK solver gufunc (``numpy.linalg._umath_linalg.solve1``, (k, k), (k) -> (k)), or None."""
    try:
        solve1: Callable[[np.ndarray, np.ndarray], np.ndarray] = importlib.import_module(
            "numpy.linalg._umath_linalg").solve1
    except (ImportError, AttributeError):
        return None
    return solve1


_lapack_solve1 = _numpy_solve1()


@functools.cache
def _cupy_sqdiff() -> Any:
    """Return a CuPy reduction kernel: Σ (a − b)² along an axis, in one pass and without a temporary."""
    cupy = importlib.import_module("cupy")
    return cupy.ReductionKernel("T a, T b", "T y", "(a - b) * (a - b)", "a + b", "y = a", "0", "fixedpoint_sqdiff")
