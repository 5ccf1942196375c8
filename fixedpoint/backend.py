"""Array libraries: namespace resolution, dtype and device rules, in-place kernels.

Everything the solvers do to arrays goes through the standard array API
(``array_api_compat.array_namespace``).  The standard has no ``out=`` argument,
so the few operations that run on every iteration over arrays of size n are
collected in :class:`Kernels`, which writes into preallocated buffers with the
library's own ``out=`` support (NumPy, CuPy, PyTorch) and falls back to plain
array API assignment for any other conforming library (e.g. array-api-strict).

Nothing here imports torch or cupy at module import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import (
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = [
    "BackendInfo",
    "Kernels",
    "backends",
    "cupy_usable",
    "library_name",
    "namespace_of",
    "resolve_namespace",
    "solve_dtype",
    "synchronize",
    "working_dtype",
]

#: An array of NumPy, CuPy, PyTorch or another array API library (the solvers accept any of them).
Array = Any
#: An array API namespace (a module such as ``numpy`` or array-api-compat's wrapper of ``torch``).
Namespace = Any

_NUMPY_IS_STANDARD = np.lib.NumpyVersion(np.__version__) >= "2.1.0"

#: Library names accepted by ``backend=`` and by the problem constructors.
LIBRARIES = ("numpy", "cupy", "torch", "array_api_strict")


def namespace_of(*arrays: Array) -> Namespace:
    """Array API namespace of ``arrays`` (a thin wrapper of array-api-compat).

    Raises
    ------
    TypeError
        If the arrays are not array API arrays or come from different libraries.
    """
    try:
        xp = array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = ", ".join(sorted({type(a).__module__ + "." + type(a).__name__ for a in arrays}))
        raise TypeError(f"expected arrays of one array API library (NumPy, CuPy, PyTorch, ...), got {kinds}") from exc
    return _native_numpy(xp)


def _native_numpy(xp):
    """NumPy >= 2.1 implements the array API standard itself: use it directly and skip the
    compatibility wrappers, whose Python overhead dominates solves of small problems."""
    if is_numpy_namespace(xp) and _NUMPY_IS_STANDARD:
        return np
    return xp


def resolve_namespace(backend: str | Namespace) -> Namespace:
    """Array API namespace for a library name or module.

    Parameters
    ----------
    backend : str or module
        One of ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"``, or a
        module (``numpy``, ``torch``, an array-api-compat namespace, ...).

    Returns
    -------
    module
        An array API conforming namespace (array-api-compat's wrapper where one exists).

    Raises
    ------
    ValueError
        If ``backend`` is not a known library name.
    ImportError
        If the library is not installed.
    """
    if not isinstance(backend, str):
        name = getattr(backend, "__name__", "")
        for lib in LIBRARIES:
            if name == lib or name.endswith("." + lib):
                return resolve_namespace(lib)
        return backend
    if backend not in LIBRARIES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, LIBRARIES))} or a module, got {backend!r}")
    if backend == "array_api_strict":
        return importlib.import_module("array_api_strict")
    if backend == "numpy":
        return _native_numpy(array_api_compat.array_namespace(np.empty(0)))
    try:
        importlib.import_module(backend)
    except ImportError as exc:
        raise ImportError(f"backend {backend!r} is not installed ({exc}); see the README for the extras") from exc
    return importlib.import_module(f"array_api_compat.{backend}")


def library_name(xp: Namespace) -> str:
    """Short name of the library behind namespace ``xp`` (e.g. ``"torch"``)."""
    if is_numpy_namespace(xp):
        return "numpy"
    if is_torch_namespace(xp):
        return "torch"
    if is_cupy_namespace(xp):
        return "cupy"
    if is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", repr(xp))


def _real_float_dtypes(xp, device):
    info = xp.__array_namespace_info__()
    try:
        return info.dtypes(device=device, kind="real floating")
    except TypeError:  # older namespaces without the device argument
        return info.dtypes(kind="real floating")


def working_dtype(xp: Namespace, x: Array) -> Any:
    """Floating dtype the solver works in for an input array ``x``.

    Rule: a real floating ``x`` keeps its dtype; a boolean or integer ``x`` is
    promoted to the library's default real floating dtype on ``x``'s device
    (float64 for NumPy, CuPy and array-api-strict; ``torch.get_default_dtype()``
    for PyTorch).  Complex inputs are rejected.

    Raises
    ------
    TypeError
        If ``x`` has a complex (or otherwise non-real) dtype.
    """
    if xp.isdtype(x.dtype, "real floating"):
        return x.dtype
    if xp.isdtype(x.dtype, ("integral", "bool")):
        info = xp.__array_namespace_info__()
        try:
            return info.default_dtypes(device=array_api_compat.device(x))["real floating"]
        except TypeError:
            return info.default_dtypes()["real floating"]
    raise TypeError(f"x0 must have a real floating, integer or boolean dtype, got {x.dtype}")


def buffer_dtype(xp: Namespace, dtype: Any) -> Any:
    """Dtype of the solver's buffers for iterates of floating ``dtype``: ``dtype`` itself, except float32
    for the half-precision dtypes (float16, bfloat16), whose range and precision are too small for
    residual norms, Gram matrices and combinations (float16 overflows at 65504).

    The solve loop then calls g with the iterate rounded to ``dtype`` and rounds every new iterate
    to ``dtype``, so that the residuals it measures are those of ``dtype``-valued points.
    """
    if xp.isdtype(dtype, "real floating") and xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def solve_dtype(xp: Namespace, device: Any) -> Any:
    """Dtype for the small (m+1)x(m+1) Anderson system: float64 where the device has it, else float32."""
    dtypes = _real_float_dtypes(xp, device)
    return dtypes["float64"] if "float64" in dtypes else dtypes["float32"]


def is_accelerator(xp: Namespace, device: Any) -> bool:
    """True when ``device`` is not host memory (a CUDA/ROCm/... device)."""
    name = library_name(xp)
    if name == "cupy":
        return True
    if name == "torch":
        return device.type != "cpu"
    return False


class Kernels:
    """In-place array operations used inside the solver loops, and where the small per-sample state lives.

    Vectors are 2-D ``(B, n)`` or 3-D ``(B, k, n)`` arrays of one dtype on one
    device; ``out`` arguments are preallocated and are written, never reallocated,
    for NumPy, CuPy and PyTorch.  Other array API libraries get the same results
    through assignment (which allocates a temporary).

    The solvers also keep O(B·m²) *small* state (Gram matrix, masks, per-sample
    residuals).  It lives in :attr:`sxp` on :attr:`sdevice`: NumPy when the vectors
    are in host memory (PyTorch CPU tensors are viewed as NumPy arrays without a
    copy, since a NumPy operation on a few numbers costs a fraction of a PyTorch
    one), else the vectors' own library and device (no host synchronisation on
    GPUs).

    Parameters
    ----------
    xp : namespace
        Array API namespace of the vectors.
    device : optional
        Their device (default: the library's default, e.g. the CPU for PyTorch).
    """

    def __init__(self, xp: Namespace, device: Any = None) -> None:
        self.xp = xp
        self.device = device
        self.lib = library_name(xp)
        self._raw: Any = None  # the library's own module, for its out= operations
        if self.lib in ("numpy", "cupy", "torch"):
            self._raw = importlib.import_module(self.lib)
        self._torch_host = self.lib == "torch" and (device is None or self._raw.device(device).type == "cpu")
        if self.lib == "numpy" or self._torch_host:
            self.sxp, self.sdevice = resolve_namespace("numpy"), "cpu"
        else:
            self.sxp, self.sdevice = xp, device
        self.sdtype = solve_dtype(self.sxp, self.sdevice)
        #: True when the small state is NumPy, so reading it costs no device synchronisation.
        self.small_on_host = library_name(self.sxp) == "numpy"

    def small(self, a: Array) -> Array:
        """View an array of the vectors' library as an array of :attr:`sxp` (no copy)."""
        return a.numpy() if self._torch_host else a

    def _host_float64(self, a: Array) -> np.ndarray:
        """The values of a vectors' array on the host as float64 NumPy (a copy unless already so)."""
        if self.lib == "torch":
            a = a.detach().cpu().to(self._raw.float64)
        elif self.lib == "cupy":
            a = a.get()
        return np.asarray(a, dtype=np.float64)

    def big(self, a: Array, dtype: Any = None) -> Array:
        """An array of :attr:`sxp` as an array of the vectors' library, cast to ``dtype`` if given."""
        if self._torch_host:
            if not a.flags.writeable:  # e.g. a broadcast view: torch.from_numpy wants writeable memory
                a = np.array(a)
            a = self._raw.from_numpy(a)
            return a if dtype is None else a.to(dtype)
        return a if dtype is None else self.xp.astype(a, dtype)

    def solver_context(self) -> contextlib.ExitStack:
        """Context in which the solver runs: ``torch.no_grad()`` for PyTorch (the solve is not
        differentiated through; gradients come from implicit differentiation), and NumPy's floating
        point warnings off (the solver detects non-finite values itself; NumPy holds the small
        state on the host, and array-api-strict computes with NumPy)."""
        stack = contextlib.ExitStack()
        if self.lib == "torch":
            stack.enter_context(self._raw.no_grad())
        stack.enter_context(np.errstate(all="ignore"))
        return stack

    def sub(self, out: Array, a: Array, b: Array) -> None:
        """``out[...] = a - b``."""
        if self.lib == "torch":
            self._raw.sub(a, b, out=out)
        elif self._raw is not None:
            self._raw.subtract(a, b, out=out)
        else:
            out[...] = a - b

    def copy(self, out: Array, a: Array) -> None:
        """``out[...] = a``."""
        if self.lib == "torch":
            out.copy_(a)
        elif self._raw is not None:
            self._raw.copyto(out, a)
        else:
            out[...] = a

    def _coef(self, alpha, dtype):
        """A Python float as is; a per-sample small-state array ``(B,)`` as ``(B, 1)`` in the vectors' library."""
        if isinstance(alpha, (int, float)):
            return float(alpha)
        return self.big(alpha, dtype)[:, None]

    def add_scaled(self, out: Array, a: Array, alpha: float | Array, b: Array) -> None:
        """``out[...] = a + alpha * b``, ``alpha`` a Python float or a per-sample small-state array of shape ``(B,)``.

        ``out`` must not overlap ``a`` or ``b``.
        """
        alpha = self._coef(alpha, out.dtype)
        if self.lib == "torch" and isinstance(alpha, float):
            self._raw.add(a, b, alpha=alpha, out=out)
        elif self.lib == "torch":
            self._raw.addcmul(a, b, alpha, out=out)
        elif self._raw is not None:
            self._raw.multiply(b, alpha, out=out)
            self._raw.add(out, a, out=out)
        else:
            out[...] = a + alpha * b

    def scale(self, out: Array, a: Array, alpha: float | Array) -> None:
        """``out[...] = alpha * a``, ``alpha`` a Python float or a per-sample small-state array of shape ``(B,)``."""
        alpha = self._coef(alpha, out.dtype)
        if self._raw is not None:
            self._raw.multiply(a, alpha, out=out)
        else:
            out[...] = alpha * a

    def copy_rows_where(self, out: Array, a: Array, mask: Array) -> None:
        """``out[i] = a[i]`` for the rows ``i`` where the boolean ``mask`` (shape ``(B,)``, small state) is true.

        With the small state on the host, an all-false mask costs nothing and an all-true one a plain copy.
        """
        if self.small_on_host:
            if not mask.any():
                return
            if mask.all():
                self.copy(out, a)
                return
        m = self.big(mask)[:, None]
        if self.lib == "torch":
            self._raw.where(m, a, out, out=out)
        elif self._raw is not None:
            self._raw.copyto(out, a, where=m)
        else:
            out[...] = self.xp.where(m, a, out)

    def matvec(self, out: Array, A: Array, v: Array) -> None:
        """``out[b, :] = A[b] @ v[b]`` with ``A`` of shape ``(B, k, n)``, ``v`` ``(B, n)``, ``out`` ``(B, k)``."""
        if self._raw is not None:
            self._raw.matmul(A, v[:, :, None], out=out[:, :, None])
        else:
            out[...] = (A @ v[:, :, None])[:, :, 0]

    def vecmat(self, out: Array, w: Array, A: Array) -> None:
        """``out[b, :] = w[b] @ A[b]`` with ``w`` of shape ``(B, k)``, ``A`` ``(B, k, n)``, ``out`` ``(B, n)``."""
        if self._raw is not None and A.shape[1] == 1:  # NumPy's matmul is slow for an inner size of 1
            self._raw.multiply(A[:, 0, :], w, out=out)
        elif self._raw is not None:
            self._raw.matmul(w[:, None, :], A, out=out[:, None, :])
        else:
            out[...] = (w[:, None, :] @ A)[:, 0, :]

    def dot(self, a: Array, b: Array) -> Array:
        """Inner product of each row of ``a`` with the same row of ``b`` (both ``(B, n)``).

        Returns small state of shape ``(B,)`` in :attr:`sdtype`.  Computed in the vectors' dtype;
        with the small state on the host, a result that overflowed there is recomputed in float64
        with scaling (:meth:`matvec_small`).
        """
        return self.matvec_small(a[:, None, :], b)[:, 0]

    def matvec_small(self, A: Array, v: Array, out: Array | None = None) -> Array:
        """``A[b] @ v[b]`` for ``A`` of shape ``(B, k, n)``, ``v`` ``(B, n)``: small state ``(B, k)`` in :attr:`sdtype`.

        The product runs in the vectors' dtype (into ``out``, shape ``(B, k)`` of that dtype, when
        given).  With the small state on the host, entries that came out non-finite are recomputed
        in float64 from scaled copies: float32 data then never overflows (magnitudes up to 3.4e38),
        and float64 data only when the true value exceeds the float64 range.  On a device the
        check would synchronise, so there a non-finite entry stays as it is.
        """
        if out is None:
            prod = (A @ v[:, :, None])[:, :, 0]
        else:
            self.matvec(out, A, v)
            prod = out
        s = self.sxp.astype(self.small(prod), self.sdtype)
        if self.small_on_host and not np.isfinite(s).all():
            bad = np.nonzero(~np.isfinite(s).all(axis=1))[0]
            A64, v64 = self._host_float64(A[bad, ...]), self._host_float64(v[bad, ...])
            sa = np.max(np.abs(A64), axis=2, keepdims=True)
            sv = np.max(np.abs(v64), axis=1, keepdims=True)
            sa, sv = np.where(sa > 0, sa, 1.0), np.where(sv > 0, sv, 1.0)
            scaled = np.einsum("bkn,bn->bk", A64 / sa, v64 / sv)
            s = np.array(s, copy=True)
            s[bad, :] = scaled * sa[:, :, 0] * sv
        return s

    def norms(self, a: Array) -> Array:
        """Euclidean norm of each row of ``a`` (shape ``(B, n)``): small state of shape ``(B,)``, :attr:`sdtype`.

        The squared norm is accumulated in the vectors' dtype; with the small state on the host a
        norm that overflowed there is recomputed in float64 with scaling, so that it is finite
        whenever the vector is finite and its norm fits in float64 (see :meth:`matvec_small`).
        """
        sq = self.sxp.astype(self.small((a[:, None, :] @ a[:, :, None])[:, 0, 0]), self.sdtype)
        r = self.sxp.sqrt(sq)
        if self.small_on_host and not np.isfinite(r).all():
            r = np.array(r, copy=True)
            for i in np.nonzero(~np.isfinite(r))[0]:
                r[i] = self.safe_norm(self._host_float64(a[i, ...]))
        return r

    @staticmethod
    def safe_norm(v: np.ndarray) -> float:
        """Euclidean norm of a float64 NumPy vector, scaled so that it overflows only if the norm itself does."""
        scale = float(np.max(np.abs(v))) if v.size else 0.0
        if not np.isfinite(scale):
            return scale if not np.isnan(v).any() else float("nan")
        if scale == 0.0:
            return 0.0
        return scale * float(np.sqrt(np.dot(v / scale, v / scale)))

    def solve(self, A: Array, b: Array) -> Array:
        """Batched solve of ``A[i] @ x[i] = b[i]`` for small state ``A`` ``(B, k, k)`` and ``b`` ``(B, k)``.

        Never raises for a singular system and never synchronises with the host on
        GPUs: rows whose system is singular come back non-finite, which the caller
        treats as a failed extrapolation.
        """
        sxp, slib = self.sxp, library_name(self.sxp)
        if slib == "torch":
            return self._raw.linalg.solve_ex(A, b)[0]
        if slib == "cupy":  # cuSOLVER path: no singularity check, no synchronisation
            return sxp.linalg.solve(A, b[:, :, None])[:, :, 0]
        if slib == "numpy":
            sxp = np  # the wrapped namespace's solve adds tens of microseconds of checks
        try:
            return sxp.linalg.solve(A, b[:, :, None])[:, :, 0]
        except Exception:  # LinAlgError from a singular row: redo row by row, NaN for the singular ones
            rows = []
            for i in range(A.shape[0]):
                try:
                    rows.append(sxp.linalg.solve(A[i, ...], b[i, :, None])[:, 0])
                except Exception:
                    rows.append(sxp.full(b.shape[1:], float("nan"), dtype=b.dtype, device=array_api_compat.device(b)))
            return sxp.stack(rows)


def synchronize(where: Any) -> None:
    """Wait until the work queued on a device has finished (nothing to wait for on a CPU).

    Timed regions and wall times are bracketed by this, so that queued GPU work is counted.

    Parameters
    ----------
    where : array, torch.device, cupy.cuda.Device, str or None
        An array (its device is used), a device object, or a torch device string such as
        ``"cuda:0"``; ``None``, ``"cpu"`` and host arrays return at once.
    """
    if where is None or isinstance(where, (np.ndarray, np.generic)):
        return
    module = type(where).__module__.split(".")[0]
    if module == "cupy":
        dev = where.device if hasattr(where, "device") else where
        dev.synchronize()
        return
    if module == "torch" or isinstance(where, str):
        torch = importlib.import_module("torch")
        dev = torch.device(where) if not isinstance(where, torch.Tensor) else where.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)


@dataclass(frozen=True)
class BackendInfo:
    """One array library on one device, as reported by :func:`backends`.

    Attributes
    ----------
    library : str
        ``"numpy"``, ``"torch"``, ``"cupy"`` or ``"array_api_strict"``.
    device : str
        ``"cpu"`` or ``"cuda:<i>"``.
    usable : bool
        True when an array could be created and computed on there.
    detail : str
        Version and device name, or why it is not usable.
    """

    library: str
    device: str
    usable: bool
    detail: str


def _probe_cupy():
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken CUDA runtime raising at import
        return [BackendInfo("cupy", "cuda", False, f"not importable: {exc}")]
    try:
        if not cupy.cuda.is_available():
            return [BackendInfo("cupy", "cuda", False, f"cupy {cupy.__version__}: no usable CUDA device")]
        out = []
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            with cupy.cuda.Device(i):
                float((cupy.arange(4, dtype=cupy.float32) ** 2).sum())  # creating and computing really works
                name = cupy.cuda.runtime.getDeviceProperties(i)["name"].decode()
            out.append(BackendInfo("cupy", f"cuda:{i}", True, f"cupy {cupy.__version__}, {name}"))
        return out
    except Exception as exc:
        return [BackendInfo("cupy", "cuda", False, f"cupy {cupy.__version__}: {type(exc).__name__}: {exc}")]


@functools.cache
def cupy_usable() -> bool:
    """True when CuPy imports and at least one CUDA device really creates and computes an array.

    The probe of :func:`backends`, run once per process and then cached (so that code choosing a
    solver library on every call does not probe the GPU each time).

    Returns
    -------
    bool
    """
    return any(b.usable for b in _probe_cupy())


def _probe_torch():
    try:
        torch = importlib.import_module("torch")
    except Exception as exc:
        return [BackendInfo("torch", "cpu", False, f"not importable: {exc}")]
    out = [BackendInfo("torch", "cpu", True, f"torch {torch.__version__}")]
    if not torch.cuda.is_available():
        out.append(BackendInfo("torch", "cuda", False, f"torch {torch.__version__}: no usable CUDA device"))
        return out
    for i in range(torch.cuda.device_count()):
        try:
            float((torch.arange(4.0, device=f"cuda:{i}") ** 2).sum())
            name = torch.cuda.get_device_name(i)
            out.append(BackendInfo("torch", f"cuda:{i}", True, f"torch {torch.__version__}, {name}"))
        except Exception as exc:
            out.append(BackendInfo("torch", f"cuda:{i}", False, f"{type(exc).__name__}: {exc}"))
    return out


def backends(usable_only: bool = False) -> list[BackendInfo]:
    """Array libraries and devices that fixedpoint can solve on, here and now.

    A library counts as usable on a device only if an array can really be created
    and computed on there: CuPy imports without a GPU, but is reported usable only
    when a CUDA device works.  Imports torch and cupy when they are installed.

    Parameters
    ----------
    usable_only : bool, default False
        Leave out the entries that are not usable.

    Returns
    -------
    list of BackendInfo
    """
    import numpy

    found = [BackendInfo("numpy", "cpu", True, f"numpy {numpy.__version__}")]
    found += _probe_torch() + _probe_cupy()
    try:
        strict = importlib.import_module("array_api_strict")
        found.append(BackendInfo("array_api_strict", "cpu", True, f"array-api-strict {strict.__version__}"))
    except ImportError as exc:
        found.append(BackendInfo("array_api_strict", "cpu", False, f"not importable: {exc}"))
    return [b for b in found if b.usable or not usable_only]
