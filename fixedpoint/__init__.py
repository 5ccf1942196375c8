"""fixedpoint: fixed points x = g(x) by forward iteration, Anderson acceleration and Broyden, on any array library.

Written once over the Python array API (array-api-compat), so the same code runs
on NumPy, CuPy and PyTorch arrays (CPU and GPU).  Importing this package imports
neither torch nor cupy.
"""

from .anderson import Anderson, AndersonHistory
from .backend import BackendInfo, backends
from .broyden import Broyden
from .forward import ForwardIteration
from .iteration import IterationInfo
from .kernels import Kernels
from .linesearch import Backtracking
from .method import Method, MethodState
from .options import COMMON_OPTIONS
from .registry import METHODS, register_method
from .result import STATUSES, ConvergenceError, ConvergenceWarning, FixedPointResult
from .root import root
from .solve import anderson, broyden, forward_iteration, solve

__version__ = "0.2.0"

__all__ = [
    "Anderson",
    "AndersonHistory",
    "BackendInfo",
    "Backtracking",
    "Broyden",
    "COMMON_OPTIONS",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointResult",
    "ForwardIteration",
    "IterationInfo",
    "Kernels",
    "METHODS",
    "Method",
    "MethodState",
    "STATUSES",
    "anderson",
    "backends",
    "broyden",
    "forward_iteration",
    "register_method",
    "root",
    "solve",
]
