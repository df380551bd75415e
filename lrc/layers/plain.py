"""A factorized layer as a chain of standard modules, for inference and export.

A trained :class:`~lrc.LowRankLinear` computes ``x ↦ x V Sᵀ Uᵀ`` through an autograd function
that serves the optimizers; for inference (and for ONNX, TorchScript or any runtime) the same
map is two plain layers with the coefficient folded into one factor: ``Linear(m → r)`` with
weight ``Vᵀ`` and ``Linear(r → n)`` with weight ``U S`` (and the bias). A convolution is a
``k×k`` convolution to ``r`` channels and a 1×1 one back; a Tucker layer three convolutions
(1×1 to ``r_in``, the core, 1×1 to ``out``). An adapter layer has no cheaper form than its
merged dense weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lora import LoRAConv2d, LoRALinear, LoRAModule
from .lowrank import LowRankConv2d, LowRankLinear, LowRankMatrixModule
from .tucker import TuckerConv2d

__all__ = ["factored_modules"]


@torch.no_grad()
def factored_modules(layer: nn.Module) -> nn.Module:
    """Standard modules (``nn.Sequential`` of ``nn.Linear``/``nn.Conv2d``) with ``layer``'s
    outputs, on its device and dtype; ``layer.to_dense()`` for an adapter."""
    if getattr(layer, "adapter", False):
        return layer.to_dense()
    if isinstance(layer, TuckerConv2d):
        r_out, r_in = layer.ranks
        factory = {"device": layer.core.device, "dtype": layer.core.dtype}
        first = nn.Conv2d(layer.in_channels, r_in, 1, bias=False, **factory)
        core = nn.Conv2d(r_in, r_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, bias=False, **factory)
        last = nn.Conv2d(r_out, layer.out_channels, 1, bias=layer.bias is not None, **factory)
        _fill(first, layer.U_in.mT[:, :, None, None], None)
        _fill(core, layer.core, None)
        _fill(last, layer.U_out[:, :, None, None], layer.bias)
        return nn.Sequential(first, core, last)
    if isinstance(layer, LowRankMatrixModule):
        left, right = layer.V.mT, layer.U @ layer.S  # x ↦ (x Vᵀᵀ) (U S)ᵀ
    elif isinstance(layer, LoRAModule):
        left, right = layer.B.mT, layer.A
    else:
        raise TypeError(f"{type(layer).__name__} is not a factorized layer")
    r = left.shape[0]
    factory = {"device": left.device, "dtype": left.dtype}
    if isinstance(layer, (LowRankLinear, LoRALinear)):
        first = nn.Linear(layer.in_features, r, bias=False, **factory)
        last = nn.Linear(r, layer.out_features, bias=layer.bias is not None, **factory)
        _fill(first, left, None)
        _fill(last, right, layer.bias)
        return nn.Sequential(first, last)
    if isinstance(layer, (LowRankConv2d, LoRAConv2d)):
        first = nn.Conv2d(layer.in_channels, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, bias=False, **factory)
        last = nn.Conv2d(r, layer.out_channels, 1, bias=layer.bias is not None, **factory)
        _fill(first, left.reshape(r, layer.in_channels, *layer.kernel_size), None)
        _fill(last, right[:, :, None, None], layer.bias)
        return nn.Sequential(first, last)
    raise TypeError(f"{type(layer).__name__} is not a factorized layer")


def _fill(module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias)
