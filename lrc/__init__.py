"""lrc — compress neural networks by dynamical low-rank training.

    from lrc import factorize, LowRankAdam
    factorize(model, rank=64, tau=0.1)
    opt = LowRankAdam(model, lr=1e-3, tau=0.1)
"""

from .layers import LowRankConv2d, LowRankLinear, LowRankMatrixModule, TuckerConv2d
from .optim import LowRankAdam, LowRankSGD
from .surgery import FactorizeReport, compression_ratio, count_parameters, densify, factorize

__version__ = "0.1.0"

__all__ = [
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankMatrixModule",
    "TuckerConv2d",
    "LowRankAdam",
    "LowRankSGD",
    "factorize",
    "densify",
    "compression_ratio",
    "count_parameters",
    "FactorizeReport",
    "__version__",
]
