"""Built-in fixed-point problems with known answers, for tests, benchmarks and demos.

Each constructor takes ``backend`` (library name or namespace), ``dtype`` and
``device`` and returns a :class:`Problem` whose map ``g`` works on arrays of that
library, unbatched (shape ``(n,)``) or batched (shape ``(B, n)``).
"""

from .base import Problem
from .chandrasekhar import chandrasekhar, h_equation_root, h_function
from .deq import tanh_layer
from .linear import linear_contraction
from .poisson import poisson_jacobi

__all__ = ["Problem", "chandrasekhar", "h_equation_root", "h_function", "linear_contraction", "poisson_jacobi",
           "tanh_layer"]
