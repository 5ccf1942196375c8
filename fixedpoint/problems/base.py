"""The :class:`Problem` record and the array placement shared by the problem constructors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import Array, Namespace, resolve_namespace

__all__ = ["Problem", "placed"]


@dataclass
class Problem:
    """A fixed-point problem x = g(x).

    Attributes
    ----------
    name : str
        Short description with its parameters.
    g : callable
        The map, for arrays of shape ``(n,)`` or ``(B, n)`` of the problem's library,
        dtype and device.
    x0 : array, shape (n,)
        The customary initial guess.
    solution : array, shape (n,), or None
        The exact fixed point of the discrete problem, computed independently of
        fixedpoint's solvers (direct solve, Newton's method or closed form) in
        float64 and cast to the problem's dtype; None where there is none.
    xp : namespace
        The array API namespace of the arrays.
    params : dict
        The parameters the problem was built with.
    """

    name: str
    g: Callable[[Array], Array]
    x0: Array
    solution: Array | None
    xp: Namespace
    params: dict[str, Any] = field(default_factory=dict)


def placed(a: np.ndarray, backend: str | Namespace, dtype: Any, device: Any) -> tuple[Array, Namespace]:
    """Place the host float64 NumPy array ``a`` as an array of ``backend`` with ``dtype`` on ``device``.

    ``dtype=None`` means the library's default real floating dtype; a dtype may
    also be named ("float32", "float64").  Returns the namespace too.
    """
    xp = resolve_namespace(backend)
    kw = {} if device is None else {"device": device}
    out = xp.asarray(np.ascontiguousarray(a, dtype=np.float64), **kw)
    if dtype is None:
        info = xp.__array_namespace_info__()
        dtype = info.default_dtypes(**kw)["real floating"]
    elif isinstance(dtype, str):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32', 'float64' or a dtype of the library, got {dtype!r}")
        dtype = getattr(xp, dtype)
    placed_a: Array = xp.astype(out, dtype)
    return placed_a, xp
