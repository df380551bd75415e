"""LoRA-style factorized layers ``W = A Bᵀ`` trained by any plain optimizer: the baseline the
paper calls "LoRA pretrain" (a fixed rank, no geometry). Not used by the geometric
optimizers, which train :class:`~lrc.LowRankLinear` / :class:`~lrc.LowRankConv2d`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init  # factors set right after: no SVD of a random initialisation

from ..linalg import sign_fixed_svd
from .lowrank import _conv_padding, _pair, dense_conv, filled, initial_svd, linear_origin

__all__ = ["LoRALinear", "LoRAConv2d", "LoRAModule"]


class LoRAModule(nn.Module):
    """Shared part: ``A`` (n×r), ``B`` (m×r), ``bias``; initialised from a truncated SVD
    (``A = P√σ``, ``B = R√σ``) so that ``A Bᵀ`` is the best rank-r approximation."""

    def _init(self, n: int, m: int, rank: int, bias: bool, factory: dict) -> None:
        if not isinstance(rank, int) or not 1 <= rank <= min(n, m):
            raise ValueError(f"rank must be an integer in [1, {min(n, m)}] for a {n}×{m} weight, got {rank!r}")
        self.out_dim, self.in_dim = n, m
        self.A = nn.Parameter(torch.empty(n, rank, **factory))
        self.B = nn.Parameter(torch.empty(m, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(n, **factory)) if bias else None

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    adapter = False

    @torch.no_grad()
    def _init_from_matrix(self, W: Tensor, bias: Tensor | None, svd: tuple | None = None) -> None:
        P, sigma, R = svd if svd is not None else sign_fixed_svd(W.to(torch.promote_types(W.dtype, torch.float32)))
        root = sigma[: self.rank].sqrt()
        self.A.copy_(P[:, : self.rank] * root)
        self.B.copy_(R[:, : self.rank] * root)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def num_dense_parameters(self) -> int:
        return self.out_dim * self.in_dim + (self.out_dim if self.bias is not None else 0)

    def matrix_weight(self) -> Tensor:
        return self.A @ self.B.mT

    @property
    def weight(self) -> Tensor:
        """``A Bᵀ`` in the shape of the dense layer's ``weight`` (computed; plain autograd), for
        model code that reads ``layer.weight``."""
        return self.matrix_weight().reshape(self.out_dim, *self._kernel_shape())

    def _kernel_shape(self) -> tuple[int, ...]:
        return (self.in_dim,) if not hasattr(self, "kernel_size") else (self.in_channels, *self.kernel_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        A = state_dict.get(prefix + "A")
        if isinstance(A, Tensor) and A.shape[1] != self.rank:
            self.A.data = torch.empty(A.shape, dtype=self.A.dtype, device=self.A.device)
            self.B.data = torch.empty(self.in_dim, A.shape[1], dtype=self.B.dtype, device=self.B.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LoRALinear(LoRAModule):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init(out_features, in_features, rank, bias, {"device": device, "dtype": dtype})
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from_matrix(dense.weight, dense.bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int | None = None, tau: float | None = None,
                    adapter: bool = False, svd: tuple | None = None) -> "LoRALinear":
        if adapter:
            raise ValueError("LoRA layers of lrc are for factorized training; use adapter mode of LowRankLinear")
        W = layer.weight.detach()
        r, svd = initial_svd(W, rank, tau, svd)
        new = skip_init(cls, layer.in_features, layer.out_features, r, bias=layer.bias is not None, device=W.device,
                        dtype=W.dtype)
        new._init_from_matrix(W, None if layer.bias is None else layer.bias.detach(), svd)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x @ self.B, self.A, self.bias)

    def to_dense(self) -> nn.Module:
        return linear_origin(self, filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                                    device=self.A.device, dtype=self.A.dtype),
                                          self.matrix_weight().detach(), self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LoRAConv2d(LoRAModule):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = _conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        kh, kw = self.kernel_size
        self._init(out_channels, in_channels * kh * kw, rank, bias, {"device": device, "dtype": dtype})
        dense = nn.Conv2d(in_channels, out_channels, self.kernel_size, bias=bias, device=device, dtype=dtype)
        self._init_from_matrix(dense.weight.reshape(out_channels, -1), dense.bias)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, rank: int | None = None, tau: float | None = None,
                  adapter: bool = False, svd: tuple | None = None) -> "LoRAConv2d":
        if adapter or layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("LoRAConv2d supports plain convolutions (groups=1, zero padding, no adapter)")
        W = layer.weight.detach().reshape(layer.out_channels, -1)
        r, svd = initial_svd(W, rank, tau, svd)
        new = skip_init(cls, layer.in_channels, layer.out_channels, layer.kernel_size, r, layer.stride, layer.padding,
                        layer.dilation, layer.bias is not None, device=W.device, dtype=W.dtype)
        new._init_from_matrix(W, None if layer.bias is None else layer.bias.detach(), svd)
        return new

    def forward(self, x: Tensor) -> Tensor:
        filters = self.B.mT.reshape(self.rank, self.in_channels, *self.kernel_size)
        z = F.conv2d(x, filters, None, self.stride, self.padding, self.dilation)
        return F.conv2d(z, self.A[:, :, None, None], self.bias)

    def to_dense(self) -> nn.Conv2d:
        W = self.matrix_weight().detach()
        return dense_conv(self, W.reshape(self.out_channels, self.in_channels, *self.kernel_size))
