"""Array libraries: namespace resolution, dtype and device rules, device synchronisation, what is usable here.

Everything the solvers do to arrays goes through the standard array API
(``array_api_compat.array_namespace``); the in-place operations of the solver loops
are in :mod:`fixedpoint.kernels`.  Nothing here imports torch or cupy at module
import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

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
    "backends",
    "cupy_usable",
    "emulate_accelerator",
    "emulation",
    "is_accelerator",
    "is_complex_dtype",
    "is_torch_cpu",
    "library_name",
    "namespace_of",
    "resolve_namespace",
    "solve_dtype",
    "synchronize",
    "working_dtype",
]

class Array(Protocol):
    """An array of NumPy, CuPy, PyTorch or another array API library, as the solvers use it.

    A structural type (``typing.Protocol``): ``numpy.ndarray``, ``torch.Tensor``,
    ``cupy.ndarray`` and the array API standard's arrays all match it, with no registration.
    It names what the solvers rely on: shape, dtype, device, indexing and arithmetic (the
    rest goes through the array's namespace, :func:`namespace_of`).
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """Sizes of the axes."""

    @property
    def dtype(self) -> Any:
        """Element type (a dtype object of the array's library)."""

    @property
    def device(self) -> Any:
        """Where the data lives (a device object of the array's library)."""

    @property
    def ndim(self) -> int:
        """Number of axes."""

    def __getitem__(self, key: Any, /) -> Array:
        """Return a view or copy of a part (basic or advanced indexing)."""

    def __setitem__(self, key: Any, value: Any, /) -> None:
        """Write into a part."""

    def __add__(self, other: Any, /) -> Array:
        """Elementwise sum."""

    def __radd__(self, other: Any, /) -> Array:
        """Elementwise sum."""

    def __sub__(self, other: Any, /) -> Array:
        """Elementwise difference."""

    def __rsub__(self, other: Any, /) -> Array:
        """Elementwise difference."""

    def __mul__(self, other: Any, /) -> Array:
        """Elementwise product."""

    def __rmul__(self, other: Any, /) -> Array:
        """Elementwise product."""

    def __truediv__(self, other: Any, /) -> Array:
        """Elementwise quotient."""

    def __rtruediv__(self, other: Any, /) -> Array:
        """Elementwise quotient."""

    def __pow__(self, other: Any, /) -> Array:
        """Elementwise power."""

    def __neg__(self) -> Array:
        """Elementwise negation."""

    def __invert__(self) -> Array:
        """Elementwise logical not (boolean arrays)."""

    def __and__(self, other: Any, /) -> Array:
        """Elementwise logical and (boolean arrays)."""

    def __or__(self, other: Any, /) -> Array:
        """Elementwise logical or (boolean arrays)."""

    def __float__(self) -> float:
        """Return the value of a one-element array as a Python float."""

    def __matmul__(self, other: Any, /) -> Array:
        """Matrix product."""

    def __lt__(self, other: Any, /) -> Array:
        """Elementwise comparison."""

    def __le__(self, other: Any, /) -> Array:
        """Elementwise comparison."""

    def __gt__(self, other: Any, /) -> Array:
        """Elementwise comparison."""

    def __ge__(self, other: Any, /) -> Array:
        """Elementwise comparison."""

    def __int__(self) -> int:
        """Return the value of a one-element array as a Python int."""


#: An array API namespace (a module such as ``numpy`` or array-api-compat's wrapper of ``torch``): its
#: functions are looked up by name, so it is typed as a module.
Namespace: TypeAlias = Any

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


def _native_numpy(xp: Namespace) -> Namespace:
    """Return NumPy itself for array-api-compat's NumPy namespace where NumPy is >= 2.1, else ``xp``.

    NumPy >= 2.1 implements the array API standard itself: use it directly and skip the compatibility
    wrappers, whose Python overhead dominates solves of small problems.
    """
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


def _real_float_dtypes(xp: Namespace, device: Any) -> dict[str, Any]:
    """Return the real floating dtypes of namespace ``xp`` on ``device``, by name."""
    info = xp.__array_namespace_info__()
    dtypes: dict[str, Any]
    try:
        dtypes = info.dtypes(device=device, kind="real floating")
    except TypeError:  # older namespaces without the device argument
        dtypes = info.dtypes(kind="real floating")
    return dtypes


def working_dtype(xp: Namespace, x: Array) -> Any:
    """Floating dtype the solver works in for an input array ``x``.

    Rule: a real floating ``x`` keeps its dtype, and so does a complex one of at least
    single precision (complex64, complex128); a boolean or integer ``x`` is promoted to
    the library's default real floating dtype on ``x``'s device (float64 for NumPy, CuPy
    and array-api-strict; ``torch.get_default_dtype()`` for PyTorch).

    Raises
    ------
    TypeError
        If ``x`` has a half-precision complex dtype (PyTorch's ``complex32``/``chalf``, whose
        range is too small for residual norms and which few operations support), or one that is
        neither floating, integer nor boolean.
    """
    if xp.isdtype(x.dtype, "real floating"):
        return x.dtype
    if xp.isdtype(x.dtype, "complex floating"):
        if xp.finfo(x.dtype).bits < 32:
            raise TypeError(f"x0 must not have the half-precision complex dtype {x.dtype}: complex dtypes are "
                            "supported in single and double precision (complex64, complex128); convert x0 (and "
                            "g's values) to complex64")
        return x.dtype
    if xp.isdtype(x.dtype, ("integral", "bool")):
        info = xp.__array_namespace_info__()
        try:
            return info.default_dtypes(device=array_api_compat.device(x))["real floating"]
        except TypeError:
            return info.default_dtypes()["real floating"]
    raise TypeError(f"x0 must have a real or complex floating, integer or boolean dtype, got {x.dtype}")


def is_complex_dtype(dtype: Any) -> bool:
    """Return whether ``dtype`` (a dtype object of NumPy, CuPy, PyTorch or another array API library) is complex.

    Cheap enough for the kernels to call once per operation: NumPy's and CuPy's ``dtype.kind``,
    PyTorch's ``dtype.is_complex``, else the dtype's name.
    """
    kind = getattr(dtype, "kind", None)
    if isinstance(kind, str):
        return kind == "c"
    flag = getattr(dtype, "is_complex", None)
    if isinstance(flag, bool):
        return flag
    return "complex" in str(dtype)


def buffer_dtype(xp: Namespace, dtype: Any) -> Any:
    """Dtype of the solver's buffers for iterates of floating ``dtype``.

    ``dtype`` itself, except float32 for the half-precision dtypes (float16, bfloat16), whose range and
    precision are too small for residual norms, Gram matrices and combinations (float16 overflows at 65504).
    Complex dtypes (complex64, complex128: :func:`working_dtype` refuses half-precision complex) are kept.

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


#: Test-only emulation of an accelerator on PyTorch CPU tensors (see :func:`emulate_accelerator`).
_EMULATION: dict[str, Any] = {"on": False, "float64": True}


@contextlib.contextmanager
def emulate_accelerator(*, float64: bool = True) -> Iterator[None]:
    """Within this context, treat PyTorch CPU tensors as if they lived on an accelerator (for tests).

    The solvers then take the paths they take on a GPU: the vector work in PyTorch itself (not
    through NumPy views), the small per-sample state in PyTorch instead of NumPy, no host-side
    checks of it (so no overflow rescue), the ``check_every`` cadence of 10, and, with
    ``float64=False``, the float32 small solve of a device without float64.  This lets CI,
    which has no GPU, run those code paths.

    Parameters
    ----------
    float64 : bool, default True
        Whether the emulated device has float64 (False: the small state and solve use float32).
    """
    before = dict(_EMULATION)
    _EMULATION.update(on=True, float64=float64)
    try:
        yield
    finally:
        _EMULATION.update(before)


def emulation() -> tuple[bool, bool]:
    """``(on, float64)``: whether :func:`emulate_accelerator` is in effect, and whether its device has float64."""
    return bool(_EMULATION["on"]), bool(_EMULATION["float64"])


def is_torch_cpu(lib: str, device: Any) -> bool:
    """Return whether ``lib`` is PyTorch (``lib == "torch"``) and ``device`` the CPU (None or a CPU device)."""
    return lib == "torch" and (device is None or importlib.import_module("torch").device(device).type == "cpu")


def is_accelerator(xp: Namespace, device: Any) -> bool:
    """Return whether ``device`` is not host memory (a CUDA/ROCm/... device), or :func:`emulate_accelerator` is on."""
    name = library_name(xp)
    if name == "cupy":
        return True
    if name == "torch":
        return not is_torch_cpu(name, device) or _EMULATION["on"]
    return False


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


def _probe_cupy() -> list[BackendInfo]:
    """Return CuPy's entries of :func:`backends`: one per CUDA device, or one saying why there is none."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken CUDA runtime raising at import
        return [BackendInfo("cupy", "cuda", False, f"not importable: {exc}")]
    try:
        if not cupy.cuda.is_available():
            return [BackendInfo("cupy", "cuda", False, f"cupy {cupy.__version__}: no usable CUDA device")]
        out: list[BackendInfo] = []
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
    """Return whether CuPy imports and at least one CUDA device really creates and computes an array.

    The probe of :func:`backends`, run once per process and then cached (so that code choosing a
    solver library on every call does not probe the GPU each time).

    Returns
    -------
    bool
    """
    return any(b.usable for b in _probe_cupy())


def _probe_torch() -> list[BackendInfo]:
    """Return PyTorch's entries of :func:`backends`: the CPU, and each CUDA device or why there is none."""
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
