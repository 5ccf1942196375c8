"""PyTorch integration: deep equilibrium layers and Anderson acceleration of optimizers.

Importing this subpackage imports torch; ``import fixedpoint`` alone does not.
"""

from .deq import DEQ, DEQStats, SolveStats, deq_fixed_point, jacobian_frobenius, solver_backend_for
from .optim import AndersonAcceleration, ExtrapolationRecord

__all__ = ["AndersonAcceleration", "ExtrapolationRecord", "DEQ", "DEQStats", "SolveStats", "deq_fixed_point",
           "jacobian_frobenius", "solver_backend_for"]
