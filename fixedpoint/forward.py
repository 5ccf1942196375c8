"""Forward (Picard) iteration, optionally damped: x_{k+1} = (1 − ω) x_k + ω g(x_k)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .backend import Array
from .checks import check_real
from .kernels import Kernels
from .method import Method, MethodState
from .registry import register_method

__all__ = ["ForwardIteration"]


@dataclasses.dataclass(frozen=True)
class ForwardIteration(Method):
    """Forward (Picard) iteration x_{k+1} = (1 − ω) x_k + ω g(x_k): the method object for :func:`fixedpoint.solve`.

    Converges for any x0 when the damped map is a contraction (Banach fixed-point
    theorem), and locally, at a linear rate equal to the spectral radius of the
    damped map's Jacobian at the fixed point, whenever that radius is below 1.

    Parameters
    ----------
    damping : float, default 1.0
        ω in (0, 1]; 1 is the plain iteration x_{k+1} = g(x_k).

    Raises
    ------
    TypeError, ValueError
        At construction, for a damping that is not a real number in (0, 1].

    Notes
    -----
    Memory: nothing besides the loop's iterates (the residual norm is computed
    without forming the residual).  Work per iteration besides g: O(n).  Complex
    iterates (complex64, complex128) are iterated as real ones; the residual norms
    are real.
    """

    name = "forward"
    #: Complex x0 (complex64, complex128) is accepted: the step is linear in the iterates.
    supports_complex: ClassVar[bool] = True

    damping: float = 1.0

    def __post_init__(self) -> None:
        """Validate the option (``TypeError``/``ValueError`` naming it)."""
        self._set(damping=check_real("damping", self.damping, 0.0, 1.0, low_open=True))

    def init(self, kern: Kernels, B: int, n: int, dtype: Any) -> MethodState:
        """Allocate the state of one solve (no buffer of size n: the loop forms no residual)."""
        return _ForwardState(kern, B, n, dtype, self.damping)


class _ForwardState(MethodState):
    """No buffer of its own: the loop measures ‖g(x) − x‖ without forming the residual."""

    PACKED_ROWS = ()  # nothing to move

    def __init__(self, kern: Kernels, B: int, n: int, dtype: Any, damping: float) -> None:
        super().__init__(kern, B, n, dtype, residual=False)
        self.damping = damping

    def step(self, x: Array, gx: Array, f: Array | None, active: Array, out: Array) -> None:
        """Write x_{k+1} = (1 − ω) x_k + ω g(x_k) into ``out``; nothing restarts."""
        if self.damping == 1.0:
            self.kern.copy(out, gx)
        else:
            self.kern.lerp(out, x, gx, self.damping)


register_method("forward", ForwardIteration)
