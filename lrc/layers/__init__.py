"""Factorized layers."""

from .lora import LoRAConv2d, LoRALinear, LoRAModule
from .lowrank import LowRankConv2d, LowRankLinear, LowRankMatrixModule, initial_rank
from .tucker import TuckerConv2d

FACTORIZED = (LowRankMatrixModule, TuckerConv2d, LoRAModule)  # every layer kind that replaces a dense one

__all__ = ["LowRankMatrixModule", "LowRankLinear", "LowRankConv2d", "LoRAModule", "LoRALinear", "LoRAConv2d",
           "TuckerConv2d", "FACTORIZED", "initial_rank"]
