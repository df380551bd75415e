"""lrc — compress neural networks by dynamical low-rank training.

    from lrc import factorize, LowRankAdam
    factorize(model, rank=64, tau=0.1)
    opt = LowRankAdam(model, lr=1e-3, tau=0.1)

The names below are imported on first use (PEP 562), so that ``import lrc`` — and the
``lrc`` command's start — does not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LowRankLinear": ".layers",
    "LowRankConv2d": ".layers",
    "LowRankMatrixModule": ".layers",
    "TuckerConv2d": ".layers",
    "LowRankAdam": ".optim",
    "LowRankSGD": ".optim",
    "factorize": ".surgery",
    "densify": ".surgery",
    "compression_ratio": ".surgery",
    "count_parameters": ".surgery",
    "FactorizeReport": ".surgery",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lrc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
