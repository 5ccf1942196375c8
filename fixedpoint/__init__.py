"""fixedpoint: fixed points x = g(x) by forward iteration and Anderson acceleration, on any array library.

Written once over the Python array API (array-api-compat), so the same code runs
on NumPy, CuPy and PyTorch arrays (CPU and GPU).  Importing this package imports
neither torch nor cupy.
"""

from .anderson import AndersonHistory, anderson
from .backend import BackendInfo, backends
from .forward import forward_iteration
from .iteration import IterationInfo
from .result import STATUSES, FixedPointResult
from .solve import METHODS, solve

__version__ = "0.1.0"

__all__ = [
    "AndersonHistory",
    "BackendInfo",
    "FixedPointResult",
    "IterationInfo",
    "METHODS",
    "STATUSES",
    "anderson",
    "backends",
    "forward_iteration",
    "solve",
]
