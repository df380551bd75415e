"""Geometric low-rank optimizers."""

from .adam import LowRankAdam
from .base import MODES, LowRankOptimizer
from .sgd import LowRankSGD

__all__ = ["LowRankAdam", "LowRankSGD", "LowRankOptimizer", "MODES"]
