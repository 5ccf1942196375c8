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
map ``g`` written for another.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .backend import Array, Namespace, library_name, namespace_of, resolve_namespace

__all__ = ["convert", "to_numpy", "wrap_map", "same_memory"]


def _is_host(lib, x):
    if lib == "cupy":
        return False
    if lib == "torch":
        return x.device.type == "cpu"
    return True


def _exportable(x, lib):
    """Return ``x`` (or a copy) in a form every DLPack consumer accepts."""
    if lib == "torch":
        torch = importlib.import_module("torch")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        elif x.dtype == torch.bool:
            x = x.to(torch.uint8)
        if x.is_conj():
            x = x.resolve_conj()
        if x.is_neg():
            x = x.resolve_neg()
        return x.contiguous()
    if lib in ("numpy", "cupy"):
        raw = np if lib == "numpy" else importlib.import_module("cupy")
        if x.dtype == raw.bool_:
            x = x.view(raw.uint8)
        if not x.flags.c_contiguous or (lib == "numpy" and not x.flags.writeable):
            x = raw.array(x, order="C", copy=True)
        return x
    return x


def to_numpy(x: Array) -> np.ndarray:
    """A NumPy copy (or view, for host arrays) of ``x``, whatever its library and device.

    Meant for small arrays (statistics, histories) and for host-side references.
    bfloat16 tensors come back as float32.
    """
    if isinstance(x, np.ndarray):
        return x
    lib = library_name(namespace_of(x))
    if lib == "torch":
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.cpu().numpy()
    if lib == "cupy":
        return x.get()
    if lib == "array_api_strict":
        xp = namespace_of(x)
        return np.from_dlpack(xp.asarray(x, device=xp.Device("CPU_DEVICE"), copy=True))
    return np.from_dlpack(x)


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
        y = _exportable(x, src_lib)
        if tlib == "torch":
            torch = importlib.import_module("torch")
            if device is not None:
                want = torch.device(device)
            else:
                want = torch.device("cpu") if _is_host(src_lib, y) else None
            if want is not None and want.type == "cpu" and not _is_host(src_lib, y):
                y = to_numpy(y)
            out = torch.from_dlpack(y) if src_lib != "array_api_strict" else torch.from_dlpack(to_numpy(y))
            if want is not None and out.device != want:
                out = out.to(want)
        elif tlib == "cupy":
            cupy = importlib.import_module("cupy")
            if _is_host(src_lib, y):
                out = cupy.asarray(to_numpy(y))
            else:
                out = cupy.from_dlpack(y)
            if device is not None:
                with cupy.cuda.Device(int(str(device).split(":")[-1])):
                    out = cupy.asarray(out)
        elif tlib == "numpy":
            out = np.from_dlpack(y) if src_lib in ("numpy", "torch") and _is_host(src_lib, y) else to_numpy(y)
        else:
            host = to_numpy(y)
            out = txp.asarray(host) if device is None else txp.asarray(host, device=device)
    oxp = resolve_namespace(tlib)
    if was_bool and not str(out.dtype).endswith("bool"):
        out = oxp.astype(out, oxp.bool)
    if dtype is not None and out.dtype != dtype:
        out = oxp.astype(out, dtype)
    return out


def same_memory(a: Array, b: Array) -> bool:
    """True when arrays ``a`` and ``b`` (any libraries) start at the same memory address."""

    def ptr(x):
        lib = library_name(namespace_of(x))
        if lib == "torch":
            return x.data_ptr()
        if lib == "cupy":
            return x.data.ptr
        return x.__array_interface__["data"][0] if isinstance(x, np.ndarray) else np.from_dlpack(x).ctypes.data

    return ptr(a) == ptr(b)


def wrap_map(g: Callable[[Array], Array], caller: str | Namespace, solver: str | Namespace, *,
             caller_device: Any = None, caller_dtype: Any = None) -> Callable[[Array], Array]:
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

    Returns
    -------
    callable
        ``h(x_solver) -> array of the solver's library``, converting both ways
        with :func:`convert` (zero-copy on a shared device).
    """
    if library_name(resolve_namespace(caller)) == library_name(resolve_namespace(solver)):
        return g

    @functools.wraps(g)
    def wrapped(x):
        y = g(convert(x, caller, device=caller_device, dtype=caller_dtype))
        return convert(y, solver, device=None)

    return wrapped
