"""Factorized layers."""

from .lowrank import LowRankConv2d, LowRankLinear, LowRankMatrixModule, initial_rank

__all__ = ["LowRankMatrixModule", "LowRankLinear", "LowRankConv2d", "initial_rank"]
