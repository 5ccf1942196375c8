"""Bridges between array libraries through DLPack.

One function, :func:`convert`, moves an array from one library to another:
zero-copy through ``from_dlpack`` when both sides live on the same device, and
through a host copy otherwise.  It handles the usual DLPack pitfalls:

- a PyTorch tensor that requires grad is detached (the export is read-only data
  and carries no autograd graph);
- non-contiguous, negative-stride or read-only arrays are first copied to a
  contiguous writeable array (not every consumer accepts them);
- ``torch.bfloat16`` has no NumPy/CuPy counterpart and is exported as float32
  (a copy); pass ``dtype=`` to get it back on the way in;
- boolean arrays are exchanged as ``uint8`` and cast back to bool;
- CUDA stream order between PyTorch and CuPy is kept by the DLPack protocol
  itself: the consumer's ``from_dlpack`` passes its current stream to
  ``__dlpack__(stream=...)``, and the producer makes that stream wait for its
  pending work, so no explicit synchronisation is needed.

:func:`wrap_map` uses it so that a solver running in one library can iterate a
map ``g`` written for another, and :func:`call_map` calls a user's map the way
every solver does: on an argument it may not modify, checking what comes back.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import array_api_compat
import numpy as np

from .backend import Array, Namespace, library_name, namespace_of, resolve_namespace

if TYPE_CHECKING:  # for annotations only: neither is imported when fixedpoint is
    import cupy
    from torch import Tensor

__all__ = ["call_map", "check_unmodified", "convert", "lend", "to_numpy", "wrap_map", "same_memory",
           "may_share_memory"]


def _is_host(lib: str, x: Array) -> bool:
    """Return whether ``x``, an array of library ``lib``, is in host memory."""
    if lib == "cupy":
        return False
    if lib == "torch":
        return bool(x.device.type == "cpu")
    return True


def _exportable(x: Array, lib: str) -> Array:
    """Return ``x`` (or a copy) in a form every DLPack consumer accepts."""
    if lib == "torch":
        torch = importlib.import_module("torch")
        t = cast("Tensor", x).detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        elif t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        return t.contiguous()
    if lib in ("numpy", "cupy"):
        raw = np if lib == "numpy" else importlib.import_module("cupy")
        a = cast("np.ndarray | cupy.ndarray", x)  # the two share the attributes used here
        if a.dtype == raw.bool_:
            a = a.view(raw.uint8)
        if not a.flags.c_contiguous or (lib == "numpy" and not a.flags.writeable):
            a = raw.array(a, order="C", copy=True)
        return a
    return x


class _DLPackArray(Protocol):
    """An array that exports its memory through DLPack (what ``from_dlpack`` functions take)."""

    def __dlpack__(self, /, *, stream: None = None) -> Any:
        """Return a DLPack capsule of the array's memory."""

    def __dlpack_device__(self) -> tuple[int, int]:
        """Return the DLPack device type and index of the array's memory."""


def _dlpack(x: Array) -> _DLPackArray:
    """Return ``x`` as the DLPack exporter it is (every array of the libraries :func:`convert` handles)."""
    return cast(_DLPackArray, x)


def to_numpy(x: Array) -> np.ndarray:
    """Return a NumPy copy (or view, for host arrays) of ``x``, whatever its library and device.

    Meant for small arrays (statistics, histories) and for host-side references.
    bfloat16 tensors come back as float32.
    """
    if isinstance(x, np.ndarray):
        return x
    lib = library_name(namespace_of(x))
    if lib == "torch":
        t = cast("Tensor", x).detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    if lib == "cupy":
        host: np.ndarray = cast("cupy.ndarray", x).get()
        return host
    if lib == "array_api_strict":
        xp = namespace_of(x)
        return np.from_dlpack(xp.asarray(x, device=xp.Device("CPU_DEVICE"), copy=True))
    return np.from_dlpack(_dlpack(x))


def convert(x: Array, target: str | Namespace, *, device: Any = None, dtype: Any = None) -> Array:
    """Convert array ``x`` to the library ``target``, without a copy where possible.

    Parameters
    ----------
    x : array
        A NumPy, CuPy, PyTorch or array-api-strict array, any shape.
    target : str or module
        Library name (``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"``)
        or namespace to convert to.
    device : optional
        Device in the target library (e.g. ``"cuda:0"`` for torch). Default: the
        device ``x`` is on, or the target's default device when the target library
        cannot address it (NumPy for a GPU array: a device-to-host copy).
    dtype : optional
        Target dtype (in the target library).  Default: ``x``'s dtype, except
        bfloat16, which becomes float32, and bool, which stays bool.

    Returns
    -------
    array
        Same shape and values.  Shares memory with ``x`` when both libraries address
        the same device and no dtype change or contiguity copy was needed.

    Raises
    ------
    ValueError, ImportError
        From :func:`fixedpoint.backend.resolve_namespace` for an unknown or missing library.
    """
    src_lib = library_name(namespace_of(x))
    txp = resolve_namespace(target)
    tlib = library_name(txp)
    was_bool = str(x.dtype).endswith("bool")
    if src_lib == tlib and device is None:
        out = x
    else:
        out = _move(_exportable(x, src_lib), src_lib, txp, device)
    return _cast_to(out, tlib, bool_=was_bool, dtype=dtype)


def _move(y: Array, src_lib: str, txp: Namespace, device: Any) -> Array:
    """Return ``y`` (exportable, of library ``src_lib``) as an array of namespace ``txp`` on ``device``."""
    tlib = library_name(txp)
    if tlib == "torch":
        return _to_torch(y, src_lib, device)
    if tlib == "cupy":
        return _to_cupy(y, src_lib, device)
    if tlib == "numpy":
        return np.from_dlpack(_dlpack(y)) if src_lib in ("numpy", "torch") and _is_host(src_lib, y) else to_numpy(y)
    host = to_numpy(y)
    out: Array = txp.asarray(host) if device is None else txp.asarray(host, device=device)
    return out


def _to_torch(y: Array, src_lib: str, device: Any) -> Tensor:
    """Return ``y`` as a PyTorch tensor on ``device`` (default: the CPU for host arrays, else ``y``'s device)."""
    torch = importlib.import_module("torch")
    if device is not None:
        want = torch.device(device)
    else:
        want = torch.device("cpu") if _is_host(src_lib, y) else None
    if want is not None and want.type == "cpu" and not _is_host(src_lib, y):
        y = to_numpy(y)
    out: Tensor = torch.from_dlpack(y) if src_lib != "array_api_strict" else torch.from_dlpack(to_numpy(y))
    if want is not None and out.device != want:
        out = out.to(want)
    return out


def _to_cupy(y: Array, src_lib: str, device: Any) -> Array:
    """Return ``y`` as a CuPy array, on the CUDA device ``device`` if given."""
    cupy = importlib.import_module("cupy")
    if _is_host(src_lib, y):
        out: Array = cupy.asarray(to_numpy(y))
    else:
        out = cupy.from_dlpack(y)
    if device is not None:
        with cupy.cuda.Device(int(str(device).split(":")[-1])):
            out = cupy.asarray(out)
    return out


def _cast_to(out: Array, tlib: str, *, bool_: bool, dtype: Any) -> Array:
    """Return ``out`` (of library ``tlib``) cast back to bool if ``bool_`` (exported as uint8), then to ``dtype``."""
    oxp = resolve_namespace(tlib)
    if bool_ and not str(out.dtype).endswith("bool"):
        out = oxp.astype(out, oxp.bool)
    if dtype is not None and out.dtype != dtype:
        out = oxp.astype(out, dtype)
    return out


def same_memory(a: Array, b: Array) -> bool:
    """Return whether arrays ``a`` and ``b`` (any libraries) start at the same memory address."""

    def ptr(x: Array) -> int:
        lib = library_name(namespace_of(x))
        if lib == "torch":
            return cast("Tensor", x).data_ptr()
        if lib == "cupy":
            address: int = cast("cupy.ndarray", x).data.ptr
            return address
        if isinstance(x, np.ndarray):
            address = x.__array_interface__["data"][0]
            return address
        return np.from_dlpack(_dlpack(x)).ctypes.data

    return ptr(a) == ptr(b)


def may_share_memory(a: Array, b: Array) -> bool:
    """Return whether arrays ``a`` and ``b`` (one library) may share memory.

    True for overlapping bounds, or the same PyTorch storage.  O(1); may say True for disjoint slices of
    one buffer.
    """
    lib = library_name(namespace_of(a, b))
    if lib == "cupy":
        return bool(importlib.import_module("cupy").may_share_memory(a, b))
    if lib == "torch":  # views share their storage
        ta, tb = cast("Tensor", a), cast("Tensor", b)
        return bool(ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr())
    if lib == "numpy":
        return bool(np.may_share_memory(cast(np.ndarray, a), cast(np.ndarray, b)))
    # host libraries: NumPy views
    return bool(np.may_share_memory(np.from_dlpack(_dlpack(a)), np.from_dlpack(_dlpack(b))))


def read_only_message(lib: str, who: str = "g") -> str:
    """Return the error for user code (the map ``g``, or a ``callback``) that wrote into an array it was lent."""
    if who == "g":
        return (f"g must not modify its argument in place: it is the solver's iterate ({lib} array). Compute the "
                "result into a new array (y = 0.5 * x + 1, not x *= 0.5; x += 1; return x)")
    return (f"{who} must not modify the arrays it is given in place ({lib} arrays of the solver's own state: "
            "info.x, info.residual, info.active); copy them first if you need to change them")


def lend(x: Array, *, copy: bool = True) -> tuple[Array, int | None]:
    """Hand ``x`` to user code so that an in-place write cannot go unnoticed.

    The one rule for every array the solvers pass to a user's function:

    - NumPy: a read-only view (a write raises NumPy's "read-only" ``ValueError``);
    - PyTorch (except inference-mode tensors): ``x`` itself, with its version counter as the token for
      :func:`check_unmodified`;
    - other libraries (CuPy, array-api-strict) and inference tensors, which offer neither: a copy when
      ``copy`` (callbacks), else ``x`` itself (maps, whose result :func:`call_map` checks instead).

    Parameters
    ----------
    x : array
        Any shape, dtype, library and device (the solver's iterate, residuals or flags).
    copy : bool, default True
        Copy where the library can neither mark ``x`` read-only nor count writes to it.

    Returns
    -------
    (array, int or None)
        The array to pass (``x``'s shape, dtype and device), and the token to give
        :func:`check_unmodified` after the call (None: nothing to check).
    """
    if isinstance(x, np.ndarray):
        view = x.view()
        view.flags.writeable = False
        return view, None
    lib = library_name(namespace_of(x))
    if lib == "torch":
        if TYPE_CHECKING:  # PyTorch tensors (narrowed for the type checker only: this runs at every call of g)
            assert isinstance(x, Tensor)
        if not x.is_inference():
            return x, x._version
    if copy:
        lent: Array = namespace_of(x).asarray(x, copy=True)
        return lent, None
    return x, None


def check_unmodified(x: Array, token: int | None, who: str = "g") -> None:
    """Check, after the call, that user code did not write into the array ``x`` that :func:`lend` lent with ``token``.

    Raises
    ------
    ValueError
        If ``token`` is a PyTorch version count and ``x``'s has changed; the message names ``who``
        (``"g"`` or ``"callback"``).  With ``token`` None nothing is checked.
    """
    if token is not None:
        if TYPE_CHECKING:  # a token is a PyTorch version count (lend); narrowed for the type checker only
            assert isinstance(x, Tensor)
        if x._version != token:
            raise ValueError(read_only_message("torch", who))


def call_map(g: Callable[..., Array], x: Array, *args: Any) -> Array:
    """Evaluate a user's map ``g`` at ``x`` as the solvers do, and check what it returns.

    ``g`` must not modify its argument (the solver's iterate) and must return an array of
    ``x``'s library, shape, dtype and device.  What is enforced, by library (:func:`lend`):

    - NumPy: ``g`` receives a read-only view of ``x`` (an in-place write raises);
    - PyTorch: the tensor's version counter is compared before and after the call
      (except for inference-mode tensors, which have none);
    - CuPy and other libraries, which offer neither: ``g`` may not return ``x`` or a view
      of it (a bounds check), since its contents could then not be trusted.

    Parameters
    ----------
    g : callable
        ``g(x, *args) -> array``.
    x : array
        The argument, any shape.
    *args
        Further arguments passed on unchecked (e.g. the sample indices of a compacted batch).

    Returns
    -------
    array
        ``g(x, *args)``.

    Raises
    ------
    ValueError
        If ``g`` modified ``x`` in place, returned memory shared with ``x`` where that cannot be
        checked, or returned another shape or device.
    TypeError
        If ``g`` returned something other than an array of ``x``'s library, or another dtype.
    """
    lib = library_name(namespace_of(x))
    x, version = lend(x, copy=False)
    try:
        y = g(x, *args)
    except ValueError as exc:
        if lib == "numpy" and "read-only" in str(exc):
            raise ValueError(read_only_message(lib)) from exc
        raise
    check_unmodified(x, version)
    try:
        ylib = library_name(namespace_of(y))
    except TypeError:
        raise TypeError(f"g must return an array of the same library as its input ({lib}), "
                        f"got {type(y).__name__}") from None
    if ylib != lib:
        raise TypeError(f"g must return an array of the same library as its input ({lib}), got a {ylib} array")
    if isinstance(y, np.matrix):
        raise TypeError("g must return a numpy.ndarray, got a numpy.matrix (whose products and shapes follow "
                        "matrix rules); return np.asarray(...) of it")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"g must return an array of the input's shape {tuple(x.shape)}, got shape {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"g must return the input's dtype {x.dtype}, got {y.dtype} (cast inside g, e.g. with astype)")
    device = array_api_compat.device(x)
    if array_api_compat.device(y) != device:
        raise ValueError(f"g must return an array on the input's device {device}, "
                         f"got one on {array_api_compat.device(y)}")
    if lib not in ("numpy", "torch") and may_share_memory(x, y):
        raise ValueError(f"g returned its argument or a view of it; on {lib} the solver cannot check that g left "
                         "its argument unchanged, so g must return a new array")
    return y


def wrap_map(g: Callable[[Array], Array], caller: str | Namespace, solver: str | Namespace, *,
             caller_device: Any = None, caller_dtype: Any = None,
             solver_dtype: Any = None) -> Callable[[Array], Array]:
    """Make a map written for library ``caller`` callable with arrays of library ``solver``.

    Parameters
    ----------
    g : callable
        ``g(x) -> array`` taking and returning arrays of the caller's library.
    caller, solver : str or module
        Library names or namespaces.
    caller_device, caller_dtype : optional
        Device and dtype the caller's arrays must have when ``g`` is called
        (e.g. ``torch.bfloat16`` when the solver works in float32).
    solver_dtype : optional
        Dtype of the solver's arrays, to which g's results are cast (default: no cast).

    Returns
    -------
    callable
        ``h(x_solver, *args) -> array of the solver's library``, converting both ways (``args``
        are arrays too, converted to the caller's library and device) with
        :func:`convert` (zero-copy on a shared device) and calling ``g`` through
        :func:`call_map`; ``g`` itself when both libraries and dtypes are the same.
    """
    same_lib = library_name(resolve_namespace(caller)) == library_name(resolve_namespace(solver))
    if same_lib and (caller_dtype is None or caller_dtype == solver_dtype or solver_dtype is None):
        return g

    @functools.wraps(g)
    def wrapped(x: Array, *args: Array) -> Array:
        extra = [convert(a, caller, device=caller_device) for a in args]  # e.g. sample indices
        y = call_map(g, convert(x, caller, device=caller_device, dtype=caller_dtype), *extra)
        return convert(y, solver, device=None, dtype=solver_dtype)

    return wrapped
