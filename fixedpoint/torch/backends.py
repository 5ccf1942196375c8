"""The solver backend of a DEQ layer: the array library its fixed-point solves run in, chosen per device.

The layer's map f always receives and returns torch tensors; the solver itself runs in NumPy
(CPU tensors), CuPy (CUDA tensors) or PyTorch, exchanging buffers with f through DLPack
without copies (:mod:`fixedpoint.interop`).
"""

from __future__ import annotations

import warnings

import torch

from ..backend import cupy_usable
from ..checks import check_choice

__all__ = ["SOLVER_BACKENDS", "solver_backend_for"]

#: Values of the ``backend`` argument of :class:`DEQ` and :func:`deq_fixed_point`.
SOLVER_BACKENDS = ("auto", "numpy", "cupy", "torch")


def solver_backend_for(backend: str, device: torch.device | str) -> str:
    """Return the array library the solver runs in for tensors on ``device``.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy", "torch"}
        "auto": NumPy for CPU tensors, CuPy for CUDA tensors (PyTorch itself,
        with a ``RuntimeWarning``, when CuPy is not installed or has no usable
        GPU; PyTorch for any other device type).
    device : torch.device or str
        Device of the tensors.

    Returns
    -------
    str
        "numpy", "cupy" or "torch".

    Raises
    ------
    ValueError
        For an unknown ``backend``, or "cupy" with tensors that are not on a CUDA device.
    ImportError
        For "cupy" when CuPy is not importable or sees no GPU.
    """
    check_choice("backend", backend, SOLVER_BACKENDS)
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cpu":
            return "numpy"
        if dev.type == "cuda":
            if cupy_usable():
                return "cupy"
            warnings.warn("backend='auto': CuPy is not installed or sees no GPU, so the DEQ solver runs in "
                          "PyTorch; install the cuda12 or cuda13 extra for the CuPy solver", RuntimeWarning,
                          stacklevel=3)
        return "torch"
    if backend == "cupy":
        if dev.type != "cuda":
            raise ValueError(f"backend='cupy' needs tensors on a CUDA device, got tensors on {dev}")
        if not cupy_usable():
            raise ImportError("backend='cupy' needs CuPy with a usable GPU (pip install '.[cuda12]' or "
                              "'.[cuda13]'); use backend='torch' to solve on the tensors themselves")
    return backend
