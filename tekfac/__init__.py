"""tekfac: Kronecker-factored second-order optimizers (KFAC, EKFAC, TKFAC, TEKFAC) for PyTorch.

See docs/design.md for the mathematics; :class:`KroneckerOptimizer` for the update rule.
"""

from tekfac import distributed
from tekfac.config import METHODS, CurvatureConfig
from tekfac.curvature import Curvature
from tekfac.optim import EKFAC, KFAC, TEKFAC, TKFAC, KroneckerOptimizer
from tekfac.preconditioner import Preconditioner

__all__ = ["EKFAC", "KFAC", "METHODS", "TEKFAC", "TKFAC", "Curvature", "CurvatureConfig",
           "KroneckerOptimizer", "Preconditioner", "distributed"]
__version__ = "0.1.0"
