"""Convolutions in low-rank Tucker format over the channel modes (the paper's Section 4).

A kernel ``W ∈ ℝ^{out×in×kh×kw}`` is ``C ×₁ U_out ×₂ U_in``: a core
``C ∈ ℝ^{r_out×r_in×kh×kw}`` and orthonormal channel factors ``U_out`` (out×r_out) and
``U_in`` (in×r_in); the spatial modes stay full (a 3×3 window is already small).

Gradient convention (the Tucker form of the matrix layers' K/L/S convention): after a
backward pass, with ``∇W`` the gradient with respect to the dense kernel (never formed),

* ``U_out.grad`` holds ``G_out = Mat₁(∇W ×₂ U_inᵀ)·Q_out``, the K-step gradient of the
  output mode, where ``Q_out`` is an orthonormal basis of the row space of ``Mat₁(C)``
  (``Mat₁(C)ᵀ = Q_out R``),
* ``U_in.grad`` holds ``G_in = Mat₂(∇W ×₁ U_outᵀ)·Q_in`` likewise,
* ``core.grad`` holds ``∇W ×₁ U_outᵀ ×₂ U_inᵀ``.

``U_out.grad`` is not ``∂L/∂U_out = G_out Rᵀ``: like ``G_K`` it stays informative when the
core's unfolding is singular. The optimizers see the factors as ``(U, S, V) = (U_out,
core, U_in)`` and augment, update and truncate them as for matrices (DESIGN.md), with the
truncation per channel mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.nn.utils import skip_init  # factors set right after: no SVD of a random initialisation

from ..distributed import all_reduce_mean_
from ..linalg import augment_basis, left_svd
from .lowrank import (LayerFunction, _conv_padding, _pair, centered_rows, check_conv, dense_conv, first_fused_backward,
                      initial_svd, keep_for_new_block, replace_data, rescale_factor, sampled_rows)

__all__ = ["TuckerConv2d", "unfold", "mode_product", "EXECUTIONS"]

EXECUTIONS = ("auto", "factored", "dense")  # TuckerConv2d.execution


def unfold(T: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding of a 4-way tensor: ``T.shape[mode] × (product of the rest)``."""
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def mode_product(T: Tensor, A: Tensor, mode: int) -> Tensor:
    """``T ×_mode A``: multiplies mode ``mode`` of ``T`` by the matrix ``A`` (new size × old size)."""
    return torch.tensordot(A, T.movedim(mode, 0), dims=([1], [0])).movedim(0, mode)


class _TuckerProduct(LayerFunction):
    """``y = U_out ⋆ (C ⋆ (U_inᵀ ⋆ x))`` (three convolutions) with the gradients of the module doc."""

    @staticmethod
    def forward(ctx, x: Tensor, U_out: Tensor, core: Tensor, U_in: Tensor, layer: "TuckerConv2d") -> Tensor:
        z = F.conv2d(x, U_in.mT[:, :, None, None].to(x.dtype))
        LayerFunction.remember(ctx, layer, x, z, U_out, core, U_in)
        return F.conv2d(F.conv2d(z, core.to(x.dtype), None, layer.stride, layer.padding, layer.dilation),
                        U_out[:, :, None, None].to(x.dtype))

    @staticmethod
    def _backward(ctx, g: Tensor):
        x, z, U_out, core, U_in = ctx.saved_tensors
        layer: TuckerConv2d = ctx.layer
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        gp = F.conv2d(g, U_out.mT[:, :, None, None].to(g.dtype))  # ∂L/∂(core output), r_out channels
        grad_x = None
        if ctx.needs_input_grad[0]:
            gz = conv2d_input(z.shape, core.to(gp.dtype), gp, **conv)
            grad_x = F.conv2d(gz, U_in[:, :, None, None].to(gz.dtype))
        _, need_out, need_core, need_in, _ = ctx.needs_input_grad
        need_out, need_in = need_out and layer.basis_grads, need_in and layer.basis_grads
        fused = layer.fused and need_out and need_in
        (r_out, r_in), k = core.shape[:2], core.shape[2:]
        G_out = G_in = grad_core = D_out = D_in = None
        if need_out:  # Mat₁(∇W ×₂ U_inᵀ) Q_out
            D_out = conv2d_weight(z, (layer.out_channels, r_in, *k), g.to(z.dtype), **conv)
            G_out = (unfold(D_out, 0) @ _row_basis(unfold(core, 0)).to(D_out.dtype)).to(U_out.dtype)
        if need_in:  # Mat₂(∇W ×₁ U_outᵀ) Q_in
            D_in = conv2d_weight(x, (r_out, layer.in_channels, *k), gp.to(x.dtype), **conv)
            G_in = (unfold(D_in, 1) @ _row_basis(unfold(core, 1)).to(D_in.dtype)).to(U_in.dtype)
        if layer.keep_mode_grads and need_out and need_in:  # mode="parallel": summed over backward passes
            D_out, D_in = D_out.to(core.dtype), D_in.to(core.dtype)
            old = layer._mode_grads
            layer._mode_grads = (D_out, D_in) if old is None else (old[0] + D_out, old[1] + D_in)
        if need_core or fused:
            grad_core = conv2d_weight(z, core.shape, gp.to(z.dtype), **conv).to(core.dtype)
        if fused:
            rows = sampled_rows(x, layer.new_block_fraction)

            def coefficient_grad(Uh: Tensor, Vh: Tensor) -> Tensor:  # the core gradient at the augmented factors
                if rows is None:
                    return layer._core_grad_at(x, g, Uh, Vh)
                # the old-new blocks from the mode gradients; the new-new one from the batch's first rows
                Ut, Vt = Uh[:, r_out:], Vh[:, r_in:]
                G = layer._blocks(grad_core, D_out.to(core.dtype), D_in.to(core.dtype), Ut, Vt)
                if Ut.shape[1] and Vt.shape[1]:
                    G[r_out:, r_in:] = sum(layer._core_grad_at(xs, gs, Ut, Vt) * c
                                           for xs, gs, c in centered_rows(x, g, rows))
                return G

            grad_core = layer._record_fused(coefficient_grad, G_out, G_in, grad_core, U_out, U_in)
        elif layer.keep_new_block and need_out and need_in and grad_core is not None:
            keep_for_new_block(layer, grad_core, x, g)
        return grad_x, G_out, grad_core, G_in, None


class _TuckerDense(LayerFunction):
    """The map and the gradients of :class:`_TuckerProduct`, computed through the dense kernel
    ``W = C ×₁ U_out ×₂ U_in``: one convolution forward, two backward (``∇x`` and ``∇W``), and
    every factor gradient a contraction of ``∇W`` (no batch-sized tensor beyond the dense
    layer's). Cheaper where the ranks are a large part of the channels (``execution``)."""

    @staticmethod
    def forward(ctx, x: Tensor, U_out: Tensor, core: Tensor, U_in: Tensor, layer: "TuckerConv2d") -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the kernel in the factors' precision
            W = mode_product(mode_product(core, U_out, 0), U_in, 1)
        LayerFunction.remember(ctx, layer, x, W, U_out, core, U_in)
        return F.conv2d(x, W, None, layer.stride, layer.padding, layer.dilation)

    @staticmethod
    def _backward(ctx, g: Tensor):
        x, W, U_out, core, U_in = ctx.saved_tensors
        layer: TuckerConv2d = ctx.layer
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        grad_x = conv2d_input(x.shape, W.to(g.dtype), g, **conv) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:4]):
            return grad_x, None, None, None, None
        dW = conv2d_weight(x, W.shape, g.to(x.dtype), **conv).to(core.dtype)  # ∇W, the dense layer's gradient
        _, need_out, need_core, need_in, _ = ctx.needs_input_grad
        need_out, need_in = need_out and layer.basis_grads, need_in and layer.basis_grads
        fused = layer.fused and need_out and need_in
        G_out = G_in = None
        with torch.autocast(x.device.type, enabled=False):  # contractions of ∇W in the factors' precision
            D_out = mode_product(dW, U_in.mT, 1)  # ∇W ×₂ U_inᵀ
            D_in = mode_product(dW, U_out.mT, 0)  # ∇W ×₁ U_outᵀ
            if need_out:
                G_out = (unfold(D_out, 0) @ _row_basis(unfold(core, 0)).to(D_out.dtype)).to(U_out.dtype)
            if need_in:
                G_in = (unfold(D_in, 1) @ _row_basis(unfold(core, 1)).to(D_in.dtype)).to(U_in.dtype)
            if layer.keep_mode_grads and need_out and need_in:
                old = layer._mode_grads
                layer._mode_grads = (D_out, D_in) if old is None else (old[0] + D_out, old[1] + D_in)
            grad_core = mode_product(D_out, U_out.mT, 0)
            if fused:
                grad_core = layer._record_fused(lambda Uh, Vh: mode_product(mode_product(dW, Uh.mT, 0), Vh.mT, 1),
                                                G_out, G_in, grad_core, U_out, U_in)
            elif layer.keep_new_block and need_out and need_in:  # mode="parallel": ∇W gives it exactly
                keep_for_new_block(layer, grad_core, dW)
        return grad_x, G_out, grad_core if need_core or fused else None, G_in, None


def _row_basis(A: Tensor) -> Tensor:
    """Orthonormal basis of the row space of ``A`` (r×m): Q of ``Aᵀ = QR``, ``R`` with a
    non-negative diagonal (machine-independent signs); orthonormal also when ``A`` is singular.
    Always ``r`` columns: where ``r > m`` (e.g. ``r_out`` above ``r_in·kh·kw``, a rank the core's
    unfolding cannot hold) the last ``r − m`` are zero, so the mode gradient keeps the factor's
    shape and those directions get no gradient."""
    Q, R = torch.linalg.qr(A.mT.to(torch.promote_types(A.dtype, torch.float32)))
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    Q = Q * sign
    if Q.shape[1] < A.shape[0]:
        Q = torch.cat([Q, Q.new_zeros(Q.shape[0], A.shape[0] - Q.shape[1])], dim=1)
    return Q


class TuckerConv2d(nn.Module):
    """``nn.Conv2d`` whose kernel is ``C ×₁ U_out ×₂ U_in`` (Tucker format in the channel modes).

    The forward pass is three convolutions: ``U_inᵀ`` as a 1×1 convolution (in → r_in
    channels), the core with the original stride, padding and dilation (r_in → r_out), and
    ``U_out`` as a 1×1 convolution (r_out → out); the bias is added once, at the end.
    ``groups ≠ 1`` and non-zero padding modes are refused. Attributes: ``U_out``, ``U_in``,
    ``core``, ``bias``, ``execution`` (``"auto"``, ``"factored"`` or ``"dense"``: whether the
    passes run through the factors or through the dense kernel formed from them, see
    :meth:`runs_dense`); property ``ranks`` = ``(r_out, r_in)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, ranks: tuple[int, int], stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__()
        check_conv("TuckerConv2d", groups, padding_mode)
        r_out, r_in = _check_ranks(ranks, out_channels, in_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        factory = {"device": device, "dtype": dtype}
        self.U_out = nn.Parameter(torch.empty(out_channels, r_out, **factory))
        self.U_in = nn.Parameter(torch.empty(in_channels, r_in, **factory))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.fused = False
        self.sync_free_augmentation = False  # set by the optimizer: augment_basis(sync_free=…)
        self.rank_mask = None  # never held at a capacity (the optimizers' capacity holds matrix layers)
        # False: the backward skips the basis gradients (set by an optimizer on the steps that move S alone)
        self.basis_grads = True
        self.distributed = False  # set by a data-parallel optimizer: average inside the fused backward
        self.keep_mode_grads = False  # set by a mode="parallel" optimizer
        self.new_block_fraction = 1.0  # set by an optimizer: the batch share of the fused new-new block
        self.keep_new_block = False  # set by a mode="parallel" optimizer (as LowRankMatrixModule's)
        self._kept: list[tuple] = []
        self._kept_S: Tensor | None = None
        self._fused_grads: tuple[Tensor, Tensor, Tensor] | None = None
        self._mode_grads: tuple[Tensor, Tensor] | None = None  # ∇W ×₂ U_inᵀ and ∇W ×₁ U_outᵀ
        self._backward_count = 0
        self.execution = "auto"  # how forward/backward run (runs_dense)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The truncated HOSVD of ``nn.Conv2d``'s default initialisation."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                          device=self.core.device, dtype=self.core.dtype)
        self._init_from_kernel(dense.weight, dense.bias, self.ranks)

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return self.U_out.shape[1], self.U_in.shape[1]

    @property
    def rank(self) -> list[int]:
        """``[r_out, r_in]``, as the metrics and the file metadata record it."""
        return list(self.ranks)

    @property
    def adapter(self) -> bool:
        return False

    # the optimizers' view: (U, S, V) = (U_out, core, U_in)
    U = property(lambda self: self.U_out)
    S = property(lambda self: self.core)
    V = property(lambda self: self.U_in)

    def factor_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(U_out, core, U_in)``: the parameters the low-rank optimizers update together."""
        return self.U_out, self.core, self.U_in

    def clear_fused_grads(self) -> None:
        self._fused_grads = None
        self._mode_grads = None
        self._backward_count = 0
        self._kept, self._kept_S = [], None

    def _core_grad_at(self, x: Tensor, g: Tensor, Uh: Tensor, Vh: Tensor) -> Tensor:
        """``∇W ×₁ Uhᵀ ×₂ Vhᵀ`` of the batch ``x``, ``g`` (input, output gradient): two 1×1 convolutions and
        the core's weight gradient."""
        conv = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        zh = F.conv2d(x, Vh.mT[:, :, None, None].to(x.dtype))
        gh = F.conv2d(g, Uh.mT[:, :, None, None].to(g.dtype))
        return conv2d_weight(zh, (Uh.shape[1], Vh.shape[1], *self.kernel_size), gh.to(zh.dtype), **conv)

    @torch.no_grad()
    def kept_new_block(self, Ut: Tensor, Vt: Tensor) -> Tensor | None:
        """As :meth:`LowRankMatrixModule.kept_new_block`: the new-new block of the core gradient."""
        if not self._kept:
            return None
        block = 0
        for item in self._kept:
            if len(item) == 1:
                block = block + mode_product(mode_product(item[0], Ut.mT.to(item[0].dtype), 0),
                                             Vt.mT.to(item[0].dtype), 1).to(Ut.dtype)
            else:
                x, g, scale = item
                block = block + self._core_grad_at(x.to(Ut.dtype), g.to(Ut.dtype), Ut, Vt) * scale
        return block * rescale_factor(self.core.grad, self._kept_S).to(block.dtype)

    @torch.no_grad()
    def parallel_coefficient_grad(self, Ut: Tensor, Vt: Tensor) -> Tensor | None:
        """``mode="parallel"``: the core gradient at the augmented factors without its
        new-new block: ``[[G_C, D_in ×₂ Ṽᵀ], [D_out ×₁ Ũᵀ, 0]]`` from the last backward passes."""
        if self._mode_grads is None or self.core.grad is None:
            return None
        return self._blocks(self.core.grad, *self._mode_grads, Ut, Vt)

    def _blocks(self, grad_core: Tensor, D_out: Tensor, D_in: Tensor, Ut: Tensor, Vt: Tensor) -> Tensor:
        """``[[G_C, D_in ×₂ Ṽᵀ], [D_out ×₁ Ũᵀ, 0]]``: the core gradient at the augmented factors but its
        new-new block, from the mode gradients ``D_out = ∇W ×₂ U_inᵀ``, ``D_in = ∇W ×₁ U_outᵀ``."""
        r_out, r_in = grad_core.shape[:2]
        G = grad_core.new_zeros(r_out + Ut.shape[1], r_in + Vt.shape[1], *grad_core.shape[2:])
        G[:r_out, :r_in] = grad_core
        G[r_out:, :r_in] = mode_product(D_out, Ut.mT.to(D_out.dtype), 0)
        G[:r_out, r_in:] = mode_product(D_in, Vt.mT.to(D_in.dtype), 1)
        return G

    @torch.no_grad()
    def _record_fused(self, coefficient_grad, G_out, G_in, grad_core, U_out, U_in) -> Tensor:
        """From one batch: ``Ũ_out, Ũ_in`` and the core gradient at the augmented factors
        (``coefficient_grad(Û_out, Û_in)``), kept for ``step()`` (as the matrix layers' fused
        backward; see DESIGN.md)."""
        if not first_fused_backward(self, G_out, G_in):
            return grad_core
        with torch.autocast(U_out.device.type, enabled=False):  # orthogonality needs full precision
            Ut = augment_basis(U_out, G_out, sync_free=self.sync_free_augmentation)
            Vt = augment_basis(U_in, G_in, sync_free=self.sync_free_augmentation)
        G_hat = coefficient_grad(torch.cat([U_out, Ut], 1), torch.cat([U_in, Vt], 1)).to(grad_core.dtype)
        if self.distributed:
            all_reduce_mean_([G_hat])
        self._fused_grads = (Ut, Vt, G_hat)
        r_out, r_in = grad_core.shape[:2]
        return G_hat[:r_out, :r_in].clone()

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, ranks: int | tuple[int, int] | None = None,
                  tau: float | None = None, svds: list[tuple] | None = None) -> "TuckerConv2d":
        """Factorize ``layer`` by truncated HOSVD of its kernel: per channel mode, the leading
        left singular vectors of the unfolding, as many as ``ranks`` gives and/or the τ-rule
        (``‖σ_{r+1:}‖ ≤ τ‖W‖_F``, as for matrices) keeps. ``svds``: the two unfoldings' sign-fixed
        SVDs (``(P, σ)`` suffice), if the caller has them."""
        W = layer.weight.detach()
        if ranks is None or isinstance(ranks, int):
            ranks = (ranks, ranks)
        out, inp = W.shape[:2]
        if svds is None and tau is not None:  # by τ, the SVD that gives a mode's rank also gives its factor
            work = W.to(torch.promote_types(W.dtype, torch.float32))
            svds = [left_svd(unfold(work, mode)) for mode in (0, 1)]
        chosen = [initial_svd(unfold(W, mode), None if r is None else min(r, W.shape[mode]), tau,
                              None if svds is None else svds[mode])
                  for mode, r in enumerate(ranks)]
        ranks = tuple(r for r, _ in chosen)
        new = skip_init(cls, inp, out, layer.kernel_size, ranks, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                        padding_mode=layer.padding_mode, device=W.device, dtype=W.dtype)
        new._init_from_kernel(W, None if layer.bias is None else layer.bias.detach(), ranks,
                              [None if svd is None else svd[0] for _, svd in chosen])
        return new

    @torch.no_grad()
    def _init_from_kernel(self, W: Tensor, bias: Tensor | None, ranks: tuple[int, int],
                          bases: list[Tensor | None] | None = None) -> None:
        """Truncated HOSVD of ``W`` at ``ranks``; ``bases``: per channel mode the sign-fixed left
        singular vectors of its unfolding where the caller has them already."""
        work = W.to(torch.promote_types(W.dtype, torch.float32))
        factors = []
        for mode, r in enumerate(ranks):
            P = bases[mode] if bases and bases[mode] is not None else left_svd(unfold(work, mode))[0]
            factors.append(P[:, :r])
        core = mode_product(mode_product(work, factors[0].mT, 0), factors[1].mT, 1)
        self.set_factors(factors[0].to(W.dtype), core.to(W.dtype), factors[1].to(W.dtype))
        if bias is not None:
            self.bias.copy_(bias)

    @torch.no_grad()
    def set_factors(self, U_out: Tensor, core: Tensor, U_in: Tensor) -> None:
        """Replace the factors (any ranks); parameters keep their identity, grads are dropped."""
        replace_data(self.factor_parameters(), (U_out, core, U_in))
        self.clear_fused_grads()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold other ranks than this module: take its shapes.
        shapes = [state_dict.get(prefix + name) for name in ("U_out", "core", "U_in")]
        if all(isinstance(t, Tensor) for t in shapes) and tuple(shapes[1].shape[:2]) != self.ranks:
            self.set_factors(*(torch.empty(t.shape, dtype=t.dtype) for t in shapes))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dense_weight(self) -> Tensor:
        """``C ×₁ U_out ×₂ U_in`` (out×in×kh×kw)."""
        return mode_product(mode_product(self.core, self.U_out, 0), self.U_in, 1)

    def num_dense_parameters(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw + (0 if self.bias is None else self.out_channels)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same outputs."""
        return dense_conv(self, self.dense_weight().detach())

    @property
    def execution(self) -> str:
        """``"auto"``, ``"factored"`` or ``"dense"``: how forward and backward run (:meth:`runs_dense`)."""
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in EXECUTIONS:
            raise ValueError(f"TuckerConv2d.execution must be one of {', '.join(EXECUTIONS)}, got {value!r}")
        self._execution = value

    def runs_dense(self) -> bool:
        """Whether the forward and backward go through the dense kernel (:class:`_TuckerDense`)
        rather than the three convolutions of the factors: ``execution`` ``"dense"``,
        ``"factored"``, or ``"auto"`` — dense where ``r_out·r_in ≥ out·in/16``, i.e. where the ranks
        keep a quarter of the channels per mode or more (measured on a 2-core CPU, vgg_small's layers
        at 90 % c.r.: the factored fused step took 1.5–2.4× the dense layer's time there, 0.7–0.9×
        below). The two give the same values and gradients up to rounding."""
        if self.execution == "auto":
            r_out, r_in = self.ranks
            return 16 * r_out * r_in >= self.out_channels * self.in_channels
        return self.execution == "dense"

    def forward(self, x: Tensor) -> Tensor:
        product = _TuckerDense if self.runs_dense() else _TuckerProduct
        y = product.apply(x, self.U_out, self.core, self.U_in, self)
        return y if self.bias is None else y + self.bias[:, None, None].to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


def _check_ranks(ranks, out_channels: int, in_channels: int) -> tuple[int, int]:
    if isinstance(ranks, int):
        ranks = (ranks, ranks)
    ranks = tuple(ranks)
    if len(ranks) != 2:
        raise ValueError(f"ranks must be (r_out, r_in), got {ranks!r}")
    for name, r, limit in (("r_out", ranks[0], out_channels), ("r_in", ranks[1], in_channels)):
        if not isinstance(r, int) or not 1 <= r <= limit:
            raise ValueError(f"{name} must be an integer in [1, {limit}], got {r!r}")
    return ranks
