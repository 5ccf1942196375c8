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

import cmath
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
    is_complex_dtype,
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
#: One system of :func:`ldl_solve_one` solved in Python floats or complex numbers (``None`` at a zero pivot).
LdlOne: TypeAlias = Callable[[list[Any], list[Any]], list[Any] | None]


#: Rows of at most this many elements use per-slot batched dot products for the Gram row (NumPy);
#: longer rows use one matrix-vector product per sample (BLAS).
SHORT_ROWS = 4096
#: Combinations (:meth:`Kernels.vecmat`) of rows of at most this many elements are formed slot by slot with
#: element-wise operations (NumPy): for rows this short NumPy's matmul picks kernels that depend on the batch
#: size, which would make a sample's iterates depend on its batch (measured with NumPy 2 and OpenBLAS: one
#: sample's combination differed in the last bit from the same sample's in a batch of 2 to 64 in about 1 case
#: in 2 for n = 2 and 3, in none of 400 cases for each n from 4 to 12, k from 2 to 42).
TINY_ROWS = 3
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
        #: The complex dtype of the small state of complex vectors: complex128 where :attr:`sdtype` is float64.
        self.csdtype = self.sxp.complex128 if self.sdtype == self.sxp.float64 else self.sxp.complex64
        #: True when the small state is NumPy, so reading it costs no device synchronisation.
        self.small_on_host = library_name(self.sxp) == "numpy"
        self._scratch: Array | None = None  # a block of _BLOCK elements for norms of differences and packing (_block)
        self._tiny: np.ndarray | None = None  # vecmat_tiny's scratch of B·n elements
        self._conj: Array | None = None  # complex vectors: a flat buffer for conj(v) in Hermitian products (_conj_of)

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

    def small_dtype(self, dtype: Any) -> Any:
        """Return the dtype of the small state that goes with vectors of ``dtype``.

        :attr:`sdtype` (real) for real vectors; for complex ones, the complex dtype of the same
        precision as :attr:`sdtype` (:attr:`csdtype`: complex128 where :attr:`sdtype` is float64, else
        complex64), in which the Hermitian products of :meth:`sums` (``"matvec"``, ``"dot"``) come back.
        Norms (``"sqnorm"``, ``"sqdiff"``) are real, in :attr:`sdtype`, whatever the vectors' dtype.
        """
        return self.csdtype if is_complex_dtype(dtype) else self.sdtype

    def _raw_torch(self) -> Any:
        return importlib.import_module("torch")

    def _host_float64(self, a: Array) -> np.ndarray:
        """Return the values of a vectors' array on the host as float64 NumPy, complex128 if complex (a copy)."""
        wide = np.complex128 if is_complex_dtype(a.dtype) else np.float64
        host: Any = a  # NumPy or array-api-strict: converted by np.asarray
        if self.lib == "torch":
            torch = self._raw_torch()
            host = cast("Tensor", a).detach().cpu().to(torch.complex128 if wide is np.complex128 else torch.float64)
        elif self.lib == "cupy":
            host = cast("cupy.ndarray", a).get()
        return np.asarray(host, dtype=wide)

    def _coef(self, alpha: float | complex | Array, like: Array) -> float | complex | Array:
        """Return a Python number as is; a per-sample small-state array ``(B,)`` as ``(B, 1)`` for the vector work.

        A complex coefficient (a Python complex, or complex small state) needs complex vectors.
        """
        if isinstance(alpha, (int, float)):
            return float(alpha)
        if isinstance(alpha, complex):
            return alpha
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

    def add_scaled(self, out: Array, a: Array, alpha: float | complex | Array, b: Array) -> None:
        """``out[...] = a + alpha * b``, ``alpha`` a Python number or a per-sample small-state array of shape ``(B,)``.

        ``out`` must not overlap ``a`` or ``b``.  A complex ``alpha`` (Python complex, or small state in
        :meth:`small_dtype`) needs complex vectors.
        """
        alpha = self._coef(alpha, out)
        if self.mode == "torch":
            if isinstance(alpha, (float, complex)):
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

    def scale(self, out: Array, a: Array, alpha: float | complex | Array) -> None:
        """``out[...] = alpha * a``, ``alpha`` a Python number or a per-sample small-state array of shape ``(B,)``.

        A complex ``alpha`` needs complex vectors.
        """
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

        For complex vectors ⟨a, b⟩ = Σ conj(a) b, the Hermitian inner product, conjugate-linear in the
        stack: computed as conj(A conj(v)), with conj(v) written into a buffer kept from call to call
        (NumPy, CuPy: no allocation of size n once it exists), or through PyTorch's lazy conjugate view.
        Real vectors take the same kernels as without that branch.

        NumPy chooses the kernel by n alone, never by B, so that a sample's products are the same
        to the bit in a batch of any size (alone, in a batch, after compaction): rows of at most
        :data:`SHORT_ROWS` entries use one dot product per stored vector, longer ones one
        matrix-vector product (BLAS gemv) per sample; the two round differently.
        """
        k, B, n = A.shape
        if self.mode == "numpy":
            A, v, out = self.numpy_view(A), self.numpy_view(v), self.numpy_view(out)
            hermitian = v.dtype.kind == "c"
            if hermitian:  # conj(A) v = conj(A conj(v))
                v = self._conj_of(v)
                if TYPE_CHECKING:  # NumPy mode: a NumPy buffer
                    assert isinstance(v, np.ndarray)
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
            if hermitian:
                np.conjugate(out, out=out)
        else:
            self._matvec_other(out, A, v)

    def _matvec_other(self, out: Array, A: Array, v: Array) -> None:
        """:meth:`matvec` for the modes other than NumPy: one batched matmul (PyTorch, CuPy), or the standard's."""
        if self.mode == "torch":
            if TYPE_CHECKING:  # PyTorch tensors
                assert isinstance(A, Tensor)
            stack = A.permute(1, 0, 2)
            self._raw.matmul(stack.conj() if v.dtype.is_complex else stack, v[:, :, None], out=out[:, :, None])
        elif self.mode == "cupy":
            hermitian = v.dtype.kind == "c"
            if hermitian:  # conj(A) v = conj(A conj(v))
                v = self._conj_of(v)
            self._raw.matmul(self.xp.permute_dims(A, (1, 0, 2)), v[:, :, None], out=out[:, :, None])
            if hermitian:
                self._raw.conjugate(out, out=out)
        else:
            stack = self.xp.permute_dims(A, (1, 0, 2))
            if is_complex_dtype(v.dtype):
                stack = self.xp.conj(stack)
            out[...] = (stack @ v[:, :, None])[:, :, 0]

    def _conj_of(self, v: Array) -> Array:
        """Return conj(v) for complex NumPy or CuPy ``v`` ``(B, n)``, written into a buffer kept between calls.

        The buffer is allocated on first use and again only when a larger ``v`` (or another dtype) comes:
        a solve's products all have the same ``v`` shape, or fewer rows after packing.
        """
        B, n = v.shape
        buf: Any = self._conj
        if buf is None or buf.dtype != v.dtype or buf.shape[0] < B * n:
            buf = self._conj = self._raw.empty_like(v).reshape(-1)
        out: Any = buf[: B * n].reshape(B, n)
        self._raw.conjugate(v, out=out)
        return cast("Array", out)

    def _as_real(self, a: Array) -> Array:
        """Return complex vectors ``a`` ``(B, n)`` as real ``(B, 2n)`` (real and imaginary parts interleaved).

        A view (no copy) for NumPy, CuPy and PyTorch when each row is contiguous; the sums of squares of
        these rows are the squared moduli Σ abs(a)² of ``a``'s.  Other libraries: a copy.
        """
        if self.lib == "torch":
            if TYPE_CHECKING:
                assert isinstance(a, Tensor)
            rows: Array = self._raw_torch().view_as_real(a).flatten(1)
            return rows
        if self.lib in ("numpy", "cupy"):
            if TYPE_CHECKING:
                assert isinstance(a, np.ndarray)
            view: Array = a.view(a.dtype.char.lower())  # complex64 -> float32, complex128 -> float64
            return view
        copy: Array = self.xp.concat([self.xp.real(a), self.xp.imag(a)], axis=1)
        return copy

    def vecmat(self, out: Array, w: Array, A: Array) -> None:
        """``out[b] = Σ_j w[b, j] A[j, b]`` for ``w`` ``(B, k)``, a stack ``A`` ``(k, B, n)``, ``out`` ``(B, n)``.

        With NumPy a sample's result does not depend on B: ``np.matmul`` for one sample as for many
        (``np.dot`` rounds differently for a few tiny n), and for rows of at most :data:`TINY_ROWS`
        entries, where matmul's kernel depends on B, a multiply and an add per slot in a scratch of B·n
        elements kept from call to call (:meth:`vecmat_tiny`).
        """
        k, B, n = A.shape
        if self.mode == "numpy":
            A, w, out = self.numpy_view(A), self.numpy_view(w), self.numpy_view(out)
            if k == 1:
                np.multiply(A[0], w, out=out)
            elif n <= TINY_ROWS:
                self.vecmat_tiny(out, w, A)
            elif B == 1:
                np.matmul(w[0], A[:, 0, :], out=out[0])
            else:
                np.matmul(w[:, None, :], A.transpose(1, 0, 2), out=out[:, None, :])
        elif self._raw is not None:
            self._raw.matmul(w[:, None, :], self.xp.permute_dims(A, (1, 0, 2)), out=out[:, None, :])
        else:
            out[...] = (w[:, None, :] @ self.xp.permute_dims(A, (1, 0, 2)))[:, 0, :]

    def vecmat_tiny(self, out: np.ndarray, w: np.ndarray, A: np.ndarray) -> None:
        """:meth:`vecmat` on NumPy arrays slot by slot, Σ_j left to right: the same bits for any B (tiny rows)."""
        k, B, n = A.shape
        tmp = self._tiny
        if tmp is None or tmp.size < B * n or tmp.dtype != out.dtype:
            tmp = self._tiny = np.empty(B * n, dtype=out.dtype)
        t = tmp[: B * n].reshape(B, n)
        np.multiply(A[0], w[:, 0, None], out=out)
        for j in range(1, k):
            np.multiply(A[j], w[:, j, None], out=t)
            np.add(out, t, out=out)

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
                o = self.numpy_view(out)
                return np.asarray(o, dtype=self.small_dtype(o.dtype))
            local: Array = self.sxp.astype(self.small(out), self.small_dtype(out.dtype))
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
        ``("sqdiff", a, b)`` (‖a − b‖², without a temporary of size n): shape ``(B,)``.  For
        complex vectors ⟨a, b⟩ = Σ conj(a) b (Hermitian, conjugate-linear in the stack or first
        argument: ⟨a, b⟩ = conj(⟨b, a⟩)), and ‖a‖² = Σ abs(a)² is real.  The local sums run in the
        vectors' dtype and are converted to small state in :meth:`small_dtype` of that dtype
        (:attr:`sdtype` for real vectors and for the norms, :attr:`csdtype` for the complex
        products); with a communicator (:mod:`fixedpoint.comm`) all the terms of one call
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
        # complex sums travel as their real and imaginary parts: one real buffer, whatever the terms' dtypes
        flat = [self._small_as_real(self.sxp.reshape(v, (v.shape[0], -1))) for v in local]
        total = self.comm.sum(self.sxp.concat(flat, axis=1))
        out: list[Array] = []
        start = 0
        for v, f in zip(local, flat):
            part = total[:, start:start + f.shape[1]]
            if is_complex_dtype(v.dtype):
                part = self._small_as_complex(part)
            out.append(self.sxp.reshape(part, v.shape))
            start += f.shape[1]
        return out

    def _small_as_real(self, a: Array) -> Array:
        """Return small state ``(B, c)`` as is if real, else as real ``(B, 2c)`` (real, imaginary interleaved)."""
        if not is_complex_dtype(a.dtype):
            return a
        if library_name(self.sxp) == "torch":
            if TYPE_CHECKING:
                assert isinstance(a, Tensor)
            rows: Array = self._raw_torch().view_as_real(a.contiguous()).flatten(1)
            return rows
        if TYPE_CHECKING:
            assert isinstance(a, np.ndarray)
        pairs: Array = a.copy().view(a.dtype.char.lower())  # NumPy, CuPy (a contiguous copy of a few numbers)
        return pairs

    def _small_as_complex(self, a: Array) -> Array:
        """Return the inverse of :meth:`_small_as_real`: real ``(B, 2c)`` as complex ``(B, c)``."""
        if library_name(self.sxp) == "torch":
            if TYPE_CHECKING:
                assert isinstance(a, Tensor)
            torch = self._raw_torch()
            pairs: Array = torch.view_as_complex(a.contiguous().reshape(a.shape[0], -1, 2))
            return pairs
        if TYPE_CHECKING:
            assert isinstance(a, np.ndarray)
        values: Array = a.copy().view(np.complex64 if a.dtype == np.float32 else np.complex128)
        return values

    def rescued(self, term: ReductionTerm, value: Array) -> Array:
        """Return ``value`` (the result of ``term`` in :meth:`sums`), recomputed where it is not finite.

        It is recomputed in float64 from scaled copies where the small state is on the host (a device
        would synchronise for the check).
        """
        if self.small_on_host:
            if TYPE_CHECKING:  # the small state of NumPy mode
                assert isinstance(value, np.ndarray)
            total = value.sum()  # a cheap first test; complex: both parts
            if not (math.isfinite(float(total)) if value.dtype.kind != "c" else cmath.isfinite(complex(total))) \
                    and not np.isfinite(value).all():
                return self._rescue(term, value)
        return value

    def _global_max(self, a: np.ndarray) -> np.ndarray:
        return self.comm.max(a) if self.comm is not None else a

    def _global_sum(self, a: np.ndarray) -> np.ndarray:
        if self.comm is None:
            return a
        if np.iscomplexobj(a):  # summed as real and imaginary parts
            total: np.ndarray = self.comm.sum(np.ascontiguousarray(a).view(np.float64)).view(np.complex128)
            return total
        summed: np.ndarray = self.comm.sum(a)
        return summed

    def _rescue(self, term: ReductionTerm, value: np.ndarray) -> np.ndarray:
        """Recompute a term whose sums overflowed, in float64 from copies scaled by their (global) largest entries."""
        if term[0] == "sqnorm" or term[0] == "sqdiff":
            return self._safe_norms(term) ** 2
        A = term[1] if term[0] == "matvec" else term[1][None, ...]
        stack64, v64 = self._host_float64(A), self._host_float64(term[2])  # complex128 for complex vectors
        sa = self._global_max(np.max(np.abs(stack64), axis=2).T.copy())  # (B, k)
        sv = self._global_max(np.max(np.abs(v64), axis=1))
        sa, sv = np.where(sa > 0, sa, 1.0), np.where(sv > 0, sv, 1.0)
        if np.iscomplexobj(stack64):  # the Hermitian product: conjugate-linear in the stack
            stack64 = np.conj(stack64)
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
            ss = self._global_sum(np.sum(np.abs(v / safe[:, None]) ** 2, axis=1))  # |.|: complex vectors
            return np.where(np.isfinite(scale), safe * np.sqrt(ss), scale)

    def _sqsum(self, a: Array) -> Array:
        """Σ_n |a[b, n]|² per row, local, in the vectors' dtype, as small state in :attr:`sdtype` (no temporary).

        Complex rows are summed as their real views (:meth:`_as_real`); PyTorch's norm takes complex itself.
        """
        if self.mode == "numpy":
            a = self.numpy_view(a)
            if a.dtype.kind == "c":
                a = a.view(a.dtype.char.lower())  # as _as_real: the squares of the real and imaginary parts
            if a.shape[0] == 1:
                return np.array([np.dot(a[0], a[0])], dtype=self.sdtype)
            return np.asarray((a[:, None, :] @ a[:, :, None])[:, 0, 0], dtype=self.sdtype)
        if self.mode == "torch":
            sq: Array = self._raw.linalg.vector_norm(a, dim=1).to(self.sdtype) ** 2
            return sq
        if is_complex_dtype(a.dtype):
            a = self._as_real(a)
        sq = self.sxp.astype((a[:, None, :] @ a[:, :, None])[:, 0, 0], self.sdtype)
        return sq

    def _sqdiff(self, a: Array, b: Array) -> Array:
        """Σ_n (a − b)[r, n]² per row, local, formed block by block in a fixed scratch (CuPy: one fused kernel)."""
        B, n = a.shape
        if self.mode == "cupy":
            if a.dtype.kind == "c":  # |a − b|² summed as the squares of the real and imaginary parts
                a, b = self._as_real(a), self._as_real(b)
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

        Complex ``A`` must be Hermitian positive definite (only its lower triangle is read by the LDLᴴ
        below, with D real).  Each sample's solution is the same to the bit whatever B is (with the small
        state on the host).

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
                if A.dtype.kind == "c":
                    return np.array([ldl_solve_one_hermitian(a, r) for a, r in
                                     zip(A.reshape(B, k * k).tolist(), b.tolist())], dtype=np.complex128).reshape(B, k)
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
    Complex128 ``A`` (Hermitian positive definite, lower triangle read): A = L D Lᴴ with D real
    (:func:`_ldl_solve_hermitian`).
    """
    if A.dtype.kind == "c":
        return _ldl_solve_hermitian(A, b)
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


def _ldl_solve_hermitian(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`ldl_solve` for complex Hermitian positive definite ``A``: A = L D Lᴴ (D real), L z = b, D w = z, Lᴴ y = w.

    The real and imaginary parts are kept in separate float64 arrays and every complex product is written out
    in real operations (no fused multiply-add, which NumPy's complex loops may use), in the order of the source
    of :func:`_ldl_hermitian_source`: sample i's result is the one :func:`ldl_solve_one_hermitian`
    computes for it alone, to the bit.
    """
    k, B = A.shape[-1], A.shape[0]
    wr, wi = A.real.transpose(1, 2, 0).copy(), A.imag.transpose(1, 2, 0).copy()  # (k, k, B): L below the diagonal
    d, p, q = np.empty((k, B)), np.empty((k, B)), np.empty((k, B))
    tr, ti = np.empty(B), np.empty(B)
    for j in range(k):
        for ell in range(j):
            np.multiply(wr[j, ell], d[ell], out=tr)  # t = conj(L_j,ell) d_ell
            np.multiply(wi[j, ell], d[ell], out=ti)
            np.negative(ti, out=ti)
            _csub_prod(wr[j:, j], wi[j:, j], wr[j:, ell], wi[j:, ell], tr, ti, p[: k - j], q[: k - j], conj=False)
        d[j] = wr[j, j]
        np.divide(wr[j + 1:, j], d[j], out=wr[j + 1:, j])
        np.divide(wi[j + 1:, j], d[j], out=wi[j + 1:, j])
    yr, yi = b.real.T.copy(), b.imag.T.copy()
    for ell in range(k - 1):  # L z = b
        _csub_prod(yr[ell + 1:], yi[ell + 1:], wr[ell + 1:, ell], wi[ell + 1:, ell], yr[ell], yi[ell],
                   p[: k - 1 - ell], q[: k - 1 - ell], conj=False)
    np.divide(yr, d, out=yr)  # D w = z
    np.divide(yi, d, out=yi)
    for ell in range(k - 1, 0, -1):  # Lᴴ y = w: the entries (i, ell) of Lᴴ are conj(L_ell,i)
        _csub_prod(yr[:ell], yi[:ell], wr[ell, :ell], wi[ell, :ell], yr[ell], yi[ell], p[:ell], q[:ell], conj=True)
    solution = np.empty((B, k), dtype=np.complex128)
    solution.real, solution.imag = yr.T, yi.T
    return solution


def _csub_prod(zr: np.ndarray, zi: np.ndarray, ar: np.ndarray, ai: np.ndarray, br: np.ndarray, bi: np.ndarray,
               p: np.ndarray, q: np.ndarray, *, conj: bool) -> None:
    """``z -= a * b`` (``conj``: ``z -= conj(a) * b``) in place, on real and imaginary parts, ``p``, ``q`` scratch.

    Real part: ``zr - (ar br - ai bi)`` (``conj``: ``+``); imaginary: ``zi - (ar bi + ai br)`` (``conj``: ``ar bi -
    ai br``): each operation rounded once, as in the Python source of :func:`_ldl_one_source`.
    """
    np.multiply(ar, br, out=p)
    np.multiply(ai, bi, out=q)
    (np.add if conj else np.subtract)(p, q, out=p)
    np.subtract(zr, p, out=zr)
    np.multiply(ar, bi, out=p)
    np.multiply(ai, br, out=q)
    (np.subtract if conj else np.add)(p, q, out=p)
    np.subtract(zi, p, out=zi)


def _ldl_hermitian_source(k: int) -> str:
    """Return the Python source of ``ldl{k}(A, b)`` for a complex Hermitian positive definite system.

    :func:`_ldl_solve_hermitian` for one system: A and b lists of Python complex numbers (A row-major, its
    lower triangle read), every complex operation written out on real and imaginary parts (``r``/``i``
    prefixes), in the same order.
    """
    out = [f"def ldl{k}(A, b):"]
    out += [f"    {part}{i}_{j} = A[{i * k + j}].{attr}" for i in range(k) for j in range(i + 1)
            for part, attr in (("r", "real"), ("i", "imag"))]
    for j in range(k):
        for ell in range(j):
            out += [f"    tr = r{j}_{ell} * d{ell}", f"    ti = -(i{j}_{ell} * d{ell})"]
            out += [line for i in range(j, k) for line in _sub_prod_source(f"{i}_{j}", f"{i}_{ell}", "tr", "ti")]
        out += [f"    d{j} = r{j}_{j}", f"    if d{j} == 0.0:", "        return None"]
        out += [f"    {part}{i}_{j} = {part}{i}_{j} / d{j}" for i in range(j + 1, k) for part in "ri"]
    out += [f"    {part}y{i} = b[{i}].{attr}" for i in range(k) for part, attr in (("r", "real"), ("i", "imag"))]
    out += [line for ell in range(k - 1) for i in range(ell + 1, k)
            for line in _sub_prod_source(f"y{i}", f"{i}_{ell}", f"ry{ell}", f"iy{ell}")]
    out += [f"    {part}y{i} = {part}y{i} / d{i}" for i in range(k) for part in "ri"]
    out += [line for ell in range(k - 1, 0, -1) for i in range(ell)
            for line in _sub_prod_source(f"y{i}", f"{ell}_{i}", f"ry{ell}", f"iy{ell}", conj=True)]
    out.append("    return [" + ", ".join(f"complex(ry{i}, iy{i})" for i in range(k)) + "]")
    return "\n".join(out)


def _sub_prod_source(z: str, a: str, br: str, bi: str, conj: bool = False) -> list[str]:
    """Return the two lines of ``z -= a * b`` (``conj``: ``z -= conj(a) * b``) as :func:`_csub_prod` computes it."""
    plus, minus = ("+", "-") if conj else ("-", "+")
    return [f"    r{z} = r{z} - (r{a} * {br} {plus} i{a} * {bi})",
            f"    i{z} = i{z} - (r{a} * {bi} {minus} i{a} * {br})"]


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
def _ldl_one(k: int, hermitian: bool = False) -> LdlOne:
    """Return the compiled ``ldl{k}`` of :func:`_ldl_one_source`."""
    scope: dict[str, Any] = {}
    name = f"<fixedpoint.kernels.ldl{k}{'h' if hermitian else ''}>"
    source = _ldl_hermitian_source(k) if hermitian else _ldl_one_source(k)
    exec(compile(source, name, "exec"), scope)  # noqa: S102
    solve_one: LdlOne = scope[f"ldl{k}"]
    return solve_one


def ldl_solve_one(A: list[float], b: list[float]) -> list[float]:
    """Solve as :func:`ldl_solve` for one system, ``A`` row-major as a flat list of k² Python floats, ``b`` of k.

    The same operations in the same order (Python floats are IEEE doubles, as NumPy's float64), hence the same
    bits.  Written out operation by operation for each k (compiled once): a few µs for k = 5.  Where NumPy would
    divide by a zero pivot (giving non-finite values), every entry is NaN.  Complex systems:
    :func:`ldl_solve_one_hermitian`.
    """
    y = _ldl_one(len(b))(A, b)
    return [math.nan] * len(b) if y is None else y


def ldl_solve_one_hermitian(A: list[complex], b: list[complex]) -> list[complex]:
    """:func:`ldl_solve_one` for a complex Hermitian positive definite system (``A``, ``b`` Python complex numbers).

    The LDLᴴ of :func:`ldl_solve` for complex ``A``, operation by operation on real and imaginary parts: the
    same bits.  Every entry is NaN at a zero pivot.
    """
    y = _ldl_one(len(b), True)(A, b)
    return [complex(math.nan, math.nan)] * len(b) if y is None else y


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
