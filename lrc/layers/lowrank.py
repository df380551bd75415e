"""Factorized layers in matrix format: ``W = U S Vᵀ`` (plus a frozen base in adapter mode).

Gradient convention (the one the geometric optimizers need, see DESIGN.md step 1):
after a backward pass

* ``U.grad`` holds ``G_K = ∇W·V`` (n×r), the gradient of the K-step (``K = U S``),
* ``V.grad`` holds ``G_L = ∇Wᵀ·U`` (m×r), the gradient of the L-step (``L = V Sᵀ``),
* ``S.grad`` holds ``Uᵀ·∇W·V`` (r×r), the gradient of the coefficient,

where ``∇W`` is the gradient with respect to the dense weight; ``∇W`` itself is never
formed. These are *not* ``∂L/∂U = G_K Sᵀ``: they stay informative when ``S`` is
singular. Use :class:`lrc.LowRankAdam` / :class:`lrc.LowRankSGD` to train these layers;
a plain ``torch.optim`` optimizer would follow the K/L gradients without the geometry.

With ``layer.fused = True`` (set by a ``mode="fused"`` optimizer) the backward pass also
forms the augmented bases and the coefficient gradient at the augmented basis from the
same batch, so that one forward/backward serves the whole step.
"""

from __future__ import annotations


import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.nn.utils import skip_init  # factors set right after: no SVD of a random initialisation

from ..distributed import all_reduce_mean_
from ..linalg import augment_basis, sign_fixed_svd, truncation_rank

__all__ = ["LowRankMatrixModule", "LowRankLinear", "LowRankConv2d"]


class LayerFunction(torch.autograd.Function):
    """An autograd function of a factorized layer: the forward saves its tensors and the
    layer; the backward (``_backward``) runs under the forward's autocast state."""

    @staticmethod
    def remember(ctx, layer, x: Tensor, *saved: Tensor) -> None:
        ctx.save_for_backward(x, *saved)
        ctx.layer = layer
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    @classmethod
    def backward(cls, ctx, g: Tensor):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # as in the forward pass
            return cls._backward(ctx, g)


class _FactorizedProduct(LayerFunction):
    """``y = (x ↦ project on V) → S → U`` with the K/L/S gradients of the module doc."""

    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, S: Tensor, V: Tensor, layer: "LowRankMatrixModule") -> Tensor:
        z = layer._project_input(x, V)
        LayerFunction.remember(ctx, layer, x, z, U, S, V)
        return layer._expand_output(z, U @ S)

    @staticmethod
    def _backward(ctx, g: Tensor):
        x, z, U, S, V = ctx.saved_tensors
        layer: LowRankMatrixModule = ctx.layer
        gu = layer._project_output(g, U)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = layer._input_grad(x, layer._project_output_coeff(gu, S), V)
        _, need_U, need_S, need_V, _ = ctx.needs_input_grad
        need_U, need_V = need_U and layer.basis_grads, need_V and layer.basis_grads
        fused = layer.fused and need_U and need_V
        G_K = layer._contract(g, z).to(U.dtype) if need_U else None
        G_L = layer._input_weight_grad(x, gu, U.shape[1]).to(V.dtype) if need_V else None
        grad_S = layer._contract(gu, z).to(S.dtype) if need_S or fused else None
        if fused:
            grad_S = layer._record_fused(x, g, z, gu, G_K, G_L, grad_S, U, V)
        elif layer.keep_new_block and need_U and need_V and grad_S is not None:
            keep_for_new_block(layer, grad_S, x, g)
        return grad_x, G_K, grad_S, G_L, None


class _WeightProduct(LayerFunction):
    """``W = U S Vᵀ`` (n×m) for model code that reads ``layer.weight``: the backward receives
    the whole ``∇W`` and hands the optimizers what the layer's own backward would —
    ``G_K = ∇W V``, ``G_L = ∇Wᵀ U``, ``Uᵀ∇W V`` and, fused, ``Ũ, Ṽ, Ûᵀ∇W V̂``."""

    @staticmethod
    def forward(ctx, U: Tensor, S: Tensor, V: Tensor, layer: "LowRankMatrixModule") -> Tensor:
        LayerFunction.remember(ctx, layer, U, S, V)
        return U @ S @ V.mT

    @staticmethod
    def _backward(ctx, D: Tensor):
        U, S, V = ctx.saved_tensors
        layer: LowRankMatrixModule = ctx.layer
        D = D.to(U.dtype)
        G_K, G_L = D @ V, D.mT @ U
        grad_S = U.mT @ G_K
        if layer.fused and first_fused_backward(layer, G_K, G_L):
            with torch.autocast(D.device.type, enabled=False):
                Ut = augment_basis(U, G_K, grad_S, layer.sync_free_augmentation, layer.rank_mask)
                Vt = augment_basis(V, G_L, grad_S.mT, layer.sync_free_augmentation, layer.rank_mask)
            G_S = torch.cat([U, Ut], 1).mT @ D @ torch.cat([V, Vt], 1)
            if layer.distributed:
                all_reduce_mean_([G_S])
            layer._fused_grads = (Ut, Vt, G_S)
            grad_S = G_S[: S.shape[0], : S.shape[1]].clone()
        elif layer.keep_new_block:  # mode="parallel": the whole ∇W gives its new-new block exactly
            keep_for_new_block(layer, grad_S, D)
        return G_K, grad_S, G_L, None


class LowRankMatrixModule(nn.Module):
    """Shared machinery of matrix-format factorized layers (``W`` seen as n×m).

    Subclasses give the batch products (``_project_input`` etc.) and the dense
    counterpart. Attributes: ``U`` (n×r), ``S`` (r×r), ``V`` (m×r) parameters, ``bias``,
    ``base_weight`` (adapter mode only: frozen dense weight, n×m view), property
    ``rank``. :meth:`set_factors` is the one place where a rank changes.
    """

    def _init_factors(self, n: int, m: int, rank: int, bias: bool, adapter: bool, factory: dict) -> None:
        if not isinstance(rank, int) or rank < 1 or rank > min(n, m):
            raise ValueError(
                f"rank must be an integer in [1, {min(n, m)}] for a {n}×{m} weight, got {rank!r}"
            )
        self.out_dim, self.in_dim = n, m
        self.U = nn.Parameter(torch.empty(n, rank, **factory))
        self.S = nn.Parameter(torch.empty(rank, rank, **factory))
        self.V = nn.Parameter(torch.empty(m, rank, **factory))
        self.bias = nn.Parameter(torch.empty(n, **factory)) if bias else None
        self.base_weight = (
            nn.Parameter(torch.empty(self._dense_shape(), **factory), requires_grad=False) if adapter else None
        )
        self.fused = False
        self.sync_free_augmentation = False  # set by the optimizer: augment_basis(sync_free=…)
        # held at a capacity by an optimizer (its ``capacity``): 1 for the active columns of U, S, V, 0 for
        # the zero ones; None: every column is active
        self.rank_mask: Tensor | None = None
        # False: the backward skips the basis gradients (set by an optimizer on the steps that move S alone)
        self.basis_grads = True
        self.distributed = False  # set by a data-parallel optimizer: average inside the fused backward
        # set by an optimizer (its new_block_fraction): the share of the batch the fused backward's new-new block
        # of the coefficient gradient is estimated from (1: all of it, exact)
        self.new_block_fraction = 1.0
        # set by a mode="parallel" optimizer on the steps that augment, when its new_block_fraction > 0: the
        # backward keeps that share of the batch (or the whole ∇W) for the new-new block step() forms
        self.keep_new_block = False
        self._kept: list[tuple] = []  # per backward pass: (x rows, g rows, scale to the batch) or (∇W,)
        self._kept_S: Tensor | None = None  # the coefficient gradients those passes returned, summed
        self.adapter_dropout = 0.0  # adapter mode: dropout on the input of U S Vᵀ while training (as LoRA's)
        self._fused_grads: tuple[Tensor, Tensor, Tensor] | None = None
        self._backward_count = 0

    # ---- factors -----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.S.shape[0]

    @property
    def active_rank(self) -> int:
        """The rank the layer computes with: :attr:`rank`, or while an optimizer's ``capacity`` holds it at
        more columns than that, its active ones (a read from the device)."""
        return self.rank if self.rank_mask is None else int(self.rank_mask.sum())

    @property
    def adapter(self) -> bool:
        return self.base_weight is not None

    def factor_parameters(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(U, S, V)``: the parameters the low-rank optimizers update together."""
        return self.U, self.S, self.V

    @torch.no_grad()
    def set_factors(self, U: Tensor, S: Tensor, V: Tensor) -> None:
        """Replace the factors (any rank); parameters keep their identity, grads are dropped."""
        replace_data(self.factor_parameters(), (U, S, V))
        self.clear_fused_grads()

    def clear_fused_grads(self) -> None:
        self._fused_grads = None
        self._backward_count = 0
        self._kept, self._kept_S = [], None

    @torch.no_grad()
    def kept_new_block(self, Ut: Tensor, Vt: Tensor) -> Tensor | None:
        """``mode="parallel"``: the new-new block ``Ũᵀ∇W Ṽ`` from what the backward passes kept (summed over
        them, each estimate scaled to its batch), times the factor by which the grads were rescaled after
        the backward (clipping, loss-scale unscaling); ``None`` where nothing was kept."""
        if not self._kept:
            return None
        block = 0
        for item in self._kept:
            if len(item) == 1:
                block = block + Ut.mT @ item[0].reshape(item[0].shape[0], -1).to(Ut.dtype) @ Vt
            else:
                x, g, scale = item
                block = block + self._contract(self._project_output(g.to(Ut.dtype), Ut),
                                               self._project_input(x.to(Vt.dtype), Vt)).to(Ut.dtype) * scale
        return block * rescale_factor(self.S.grad, self._kept_S).to(block.dtype)

    def low_rank_weight(self) -> Tensor:
        """``U S Vᵀ`` as an n×m matrix."""
        return self.U @ self.S @ self.V.mT

    def matrix_weight(self) -> Tensor:
        """The effective dense weight as an n×m matrix (adapter base included)."""
        w = self.low_rank_weight()
        if self.base_weight is not None:
            w = w + self.base_weight.reshape(w.shape)
        return w

    def dense_weight(self) -> Tensor:
        """The effective weight in the shape of the dense layer's ``weight``."""
        return self.matrix_weight().reshape(self._dense_shape())

    @property
    def weight(self) -> Tensor:
        """The effective dense weight (``U S Vᵀ``, plus the base of an adapter) in the shape of
        ``nn.Linear``/``nn.Conv2d``'s ``weight``, for model code that reads ``layer.weight``
        (e.g. torchvision's Swin attention calls ``F.linear(x, qkv.weight)``). Computed on each
        read; a loss through it trains the factors exactly as one through the layer's forward
        (its backward receives ``∇W`` and gives the optimizers the same gradients, fused too).
        Read-only."""
        w = _WeightProduct.apply(self.U, self.S, self.V, self)
        if self.base_weight is not None:
            w = w + self.base_weight.reshape(w.shape)
        return w.reshape(self._dense_shape())

    def num_dense_parameters(self) -> int:
        """Parameters of the dense layer this one replaces."""
        return self.out_dim * self.in_dim + (self.out_dim if self.bias is not None else 0)

    @torch.no_grad()
    def _init_from_matrix(self, W: Tensor, bias: Tensor | None, svd: tuple | None = None) -> None:
        """Truncated SVD of an n×m matrix into the factors (S = 0 in adapter mode); ``svd``: its
        sign-fixed SVD, if already taken."""
        P, sigma, R = svd if svd is not None else sign_fixed_svd(W.to(torch.promote_types(W.dtype, torch.float32)))
        r = self.rank
        S = torch.diag(sigma[:r])
        if self.base_weight is not None:
            self.base_weight.copy_(W.reshape(self.base_weight.shape))
            S = torch.zeros_like(S)
        self.set_factors(P[:, :r], S, R[:, :r])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold another rank than this module: take its shapes.
        shapes = [state_dict.get(prefix + name) for name in ("U", "S", "V")]
        if all(isinstance(t, Tensor) for t in shapes) and shapes[1].shape[0] != self.rank:
            self.set_factors(*(torch.empty(t.shape, dtype=t.dtype) for t in shapes))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- forward -----------------------------------------------------------------------
    def _low_rank_forward(self, x: Tensor) -> Tensor:
        if self.base_weight is not None and self.adapter_dropout > 0 and self.training:
            x = F.dropout(x, self.adapter_dropout)  # the adapter's input only; the frozen path sees x
        return _FactorizedProduct.apply(x, self.U, self.S, self.V, self)

    # ---- fused backward -----------------------------------------------------------------
    @torch.no_grad()
    def _record_fused(self, x, g, z, gu, G_K, G_L, grad_S, U, V) -> Tensor:
        """From one batch: ``Ũ, Ṽ`` and ``G_S = Ûᵀ ∇W V̂`` (blocks), kept for ``step()``. With
        ``new_block_fraction`` below 1 the new-new block ``Ũᵀ ∇W Ṽ`` is estimated from the batch's first
        rows (centered, scaled to the batch: :func:`centered_rows`), so that its two batch-sized products
        shrink to those rows and one mean row.

        Data-parallel: ``G_K`` and ``G_L`` are averaged over processes (in place: they are
        also the grads this backward returns) before the bases are formed, then ``G_S``;
        returns the coefficient gradient to hand to autograd (the averaged one)."""
        if not first_fused_backward(self, G_K, G_L):
            return grad_S
        with torch.autocast(x.device.type, enabled=False):  # orthogonality needs full precision
            # Uᵀ G_K = Uᵀ ∇W V = grad_S
            Ut = augment_basis(U, G_K, grad_S, self.sync_free_augmentation, self.rank_mask)
            Vt = augment_basis(V, G_L, grad_S.mT, self.sync_free_augmentation, self.rank_mask)
        r, a, b = grad_S.shape[0], Ut.shape[1], Vt.shape[1]
        G_S = grad_S.new_zeros(r + a, r + b)
        G_S[:r, :r] = grad_S
        rows = sampled_rows(x, self.new_block_fraction)
        if rows is not None:  # the old-new blocks from G_K, G_L; the new-new one from the first rows
            G_S[:r, r:] = G_L.mT.to(Vt.dtype) @ Vt  # Uᵀ ∇W Ṽ
            G_S[r:, :r] = Ut.mT @ G_K.to(Ut.dtype)  # Ũᵀ ∇W V
            if a and b:
                G_S[r:, r:] = sum(self._contract(self._project_output(gs, Ut), self._project_input(xs, Vt)) * c
                                  for xs, gs, c in centered_rows(x, g, rows))
        else:
            zvt = self._project_input(x, Vt) if b else None
            if b:
                G_S[:r, r:] = self._contract(gu, zvt)
            if a:
                gut = self._project_output(g, Ut)
                G_S[r:, :r] = self._contract(gut, z)
                if b:
                    G_S[r:, r:] = self._contract(gut, zvt)
        if self.distributed:
            all_reduce_mean_([G_S])
        self._fused_grads = (Ut, Vt, G_S)
        return G_S[:r, :r].clone()

    # ---- subclass interface -------------------------------------------------------------
    def _dense_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _project_input(self, x: Tensor, V: Tensor) -> Tensor:  # x ↦ "x V"
        raise NotImplementedError

    def _expand_output(self, z: Tensor, A: Tensor) -> Tensor:  # z ↦ "z Aᵀ", A n×r
        raise NotImplementedError

    def _project_output(self, g: Tensor, U: Tensor) -> Tensor:  # g ↦ "g U"
        raise NotImplementedError

    def _project_output_coeff(self, gu: Tensor, S: Tensor) -> Tensor:  # gu ↦ "gu S"
        raise NotImplementedError

    def _input_grad(self, x: Tensor, gz: Tensor, V: Tensor) -> Tensor:  # ∂L/∂x from ∂L/∂z
        raise NotImplementedError

    def _contract(self, a: Tensor, b: Tensor) -> Tensor:  # Σ_batch,positions a ⊗ b
        raise NotImplementedError

    def _input_weight_grad(self, x: Tensor, gu: Tensor, r: int) -> Tensor:  # ∇Wᵀ U, m×r
        raise NotImplementedError


class LowRankLinear(LowRankMatrixModule):
    """``nn.Linear`` with ``W = U S Vᵀ`` (``U``: out×r, ``V``: in×r).

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        rank: initial rank, ``1 ≤ rank ≤ min(in, out)``.
        adapter: keep a frozen dense ``base_weight`` and learn ``U S Vᵀ`` on top
            (``S`` starts at zero), for fine-tuning.

    Use :meth:`from_linear` to factorize a trained layer and :meth:`to_dense` to merge back.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 adapter: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_factors(out_features, in_features, rank, bias, adapter, {"device": device, "dtype": dtype})
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The truncated SVD of ``nn.Linear``'s default initialisation."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.U.device, dtype=self.U.dtype)
        self._init_from_matrix(dense.weight, dense.bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int | None = None, tau: float | None = None,
                    adapter: bool = False, svd: tuple | None = None) -> "LowRankLinear":
        """Factorize ``layer`` by truncated SVD, at ``rank`` or by tolerance ``tau`` (or both:
        ``rank`` then caps the rank chosen by ``tau``). Same device and dtype. ``svd``: the
        weight's SVD as :func:`~lrc.linalg.sign_fixed_svd` gives it, if the caller has it."""
        W = layer.weight.detach()
        r, svd = initial_svd(W, rank, tau, svd)
        new = skip_init(cls, layer.in_features, layer.out_features, r, bias=layer.bias is not None,
                        adapter=adapter, device=W.device, dtype=W.dtype)
        new._init_from_matrix(W, None if layer.bias is None else layer.bias.detach(), svd)
        return new

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` with the same outputs (a ``Conv1D`` where the layer replaced one)."""
        W = self.dense_weight().detach()
        return linear_origin(self, filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                                     device=W.device, dtype=W.dtype), W, self.bias))

    def forward(self, x: Tensor) -> Tensor:
        y = self._low_rank_forward(x)
        if self.base_weight is not None:
            y = y + F.linear(x, self.base_weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}" + (", adapter=True" if self.adapter else ""))

    def _dense_shape(self):
        return (self.out_features, self.in_features)

    def _project_input(self, x, V):
        return x @ V

    def _expand_output(self, z, A):
        return z @ A.mT

    def _project_output(self, g, U):
        return g @ U

    def _project_output_coeff(self, gu, S):
        return gu @ S

    def _input_grad(self, x, gz, V):
        return gz @ V.mT

    def _contract(self, a, b):
        rows = math.prod(a.shape[:-1])
        return contract_rows(a.reshape(rows, a.shape[-1]), b.reshape(rows, b.shape[-1]))

    def _input_weight_grad(self, x, gu, r):
        return self._contract(x, gu)


class LowRankConv2d(LowRankMatrixModule):
    """``nn.Conv2d`` with its kernel, seen as ``out × (in·kh·kw)``, factorized as ``U S Vᵀ``.

    The forward pass is a convolution with ``r`` filters (the columns of ``V``) followed by
    ``U S`` as a 1×1 convolution. Stride, padding, dilation and bias of the original are
    kept; ``groups ≠ 1`` and non-zero padding modes are refused.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 adapter: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        check_conv("LowRankConv2d", groups, padding_mode)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        kh, kw = self.kernel_size
        self._init_factors(out_channels, in_channels * kh * kw, rank, bias, adapter,
                           {"device": device, "dtype": dtype})
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The truncated SVD of ``nn.Conv2d``'s default initialisation."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                          device=self.U.device, dtype=self.U.dtype)
        self._init_from_matrix(dense.weight.reshape(self.out_channels, -1), dense.bias)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, rank: int | None = None, tau: float | None = None,
                  adapter: bool = False, svd: tuple | None = None) -> "LowRankConv2d":
        """Factorize ``layer`` by truncated SVD of its ``out × (in·kh·kw)`` kernel matrix
        (``svd``: that matrix's sign-fixed SVD, if the caller has it)."""
        W = layer.weight.detach().reshape(layer.out_channels, -1)
        r, svd = initial_svd(W, rank, tau, svd)
        new = skip_init(cls, layer.in_channels, layer.out_channels, layer.kernel_size, r, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                        bias=layer.bias is not None, padding_mode=layer.padding_mode, adapter=adapter,
                        device=W.device, dtype=W.dtype)
        new._init_from_matrix(W, None if layer.bias is None else layer.bias.detach(), svd)
        return new

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same outputs."""
        return dense_conv(self, self.dense_weight().detach())

    def forward(self, x: Tensor) -> Tensor:
        y = self._low_rank_forward(x)
        if self.base_weight is not None:
            y = y + F.conv2d(x, self.base_weight, None, self.stride, self.padding, self.dilation)
        return y if self.bias is None else y + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}" + (", adapter=True" if self.adapter else ""))

    def _dense_shape(self):
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _filters(self, V: Tensor) -> Tensor:
        return V.mT.reshape(V.shape[1], self.in_channels, *self.kernel_size)

    def _project_input(self, x, V):
        return F.conv2d(x, self._filters(V).to(x.dtype), None, self.stride, self.padding, self.dilation)

    def _expand_output(self, z, A):
        return F.conv2d(z, A[:, :, None, None].to(z.dtype))

    def _project_output(self, g, U):
        return F.conv2d(g, U.mT[:, :, None, None].to(g.dtype))

    def _project_output_coeff(self, gu, S):
        return F.conv2d(gu, S.mT[:, :, None, None].to(gu.dtype))

    def _input_grad(self, x, gz, V):
        return conv2d_input(x.shape, self._filters(V).to(gz.dtype), gz, self.stride, self.padding, self.dilation)

    def _contract(self, a, b):
        return a.transpose(0, 1).flatten(1) @ b.transpose(0, 1).flatten(1).mT

    def _input_weight_grad(self, x, gu, r):
        w = conv2d_weight(x, (r, self.in_channels, *self.kernel_size), gu.to(x.dtype), self.stride,
                          self.padding, self.dilation)
        return w.reshape(r, -1).mT


def replace_data(params, values) -> None:
    """Give each parameter new data (any shape) in place: identity kept, grad dropped."""
    for p, value in zip(params, values):
        value = value.to(dtype=p.dtype, device=p.device)
        if value.shape != p.shape:
            # Autograd caches a leaf's shape in its gradient accumulator for as long as any
            # graph that used it is alive (e.g. the last step's loss). Assigning data of
            # another dtype is the public way to make it drop that accumulator.
            p.data = value.new_empty(0, dtype=torch.float16 if value.dtype != torch.float16 else torch.float32)
        p.data = value
        p.grad = None


def contract_rows(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for ``a`` (rows×p), ``b`` (rows×q), summed over the long rows: formed as
    ``(bᵀ a)ᵀ`` when ``a`` is the wider, the orientation BLAS runs fastest (the result a
    transposed view): on two CPU cores ``G_K = gᵀ z`` of a 2048-wide layer at batch 1024 takes
    1.0 ms this way against 1.4–1.7 ms the other."""
    if a.shape[1] > b.shape[1]:
        return (b.mT @ a).mT
    return a.mT @ b


def sampled_rows(x: Tensor, fraction: float) -> int | None:
    """How many leading rows of the batch ``x`` (its first dimension; a data loader shuffles it) the fused
    backward estimates the new-new block of the coefficient gradient from: ``⌈fraction · B⌉``, or ``None``
    for the whole batch (``fraction`` 1, or an input without a batch of more rows than that)."""
    if fraction >= 1.0 or x.dim() < 2:
        return None
    rows = max(1, math.ceil(fraction * x.shape[0]))
    return rows if rows < x.shape[0] else None


def keep_for_new_block(layer, grad: Tensor, *batch: Tensor) -> None:
    """``mode="parallel"`` with a ``new_block_fraction``: ``layer`` (matrix or Tucker) keeps what the new-new
    block ``Ũᵀ∇W Ṽ`` of this backward pass needs once ``step()`` has ``Ũ``, ``Ṽ`` — the terms of
    :func:`centered_rows` from its input ``x`` and output gradient ``g`` (``batch = (x, g)``; the whole batch
    where the fraction covers it) or its whole ``∇W`` (``batch = (∇W,)``) — and the coefficient gradient
    ``grad`` the pass returned, to follow a rescaling of the grads after the backward."""
    grad = grad.detach()
    layer._kept_S = grad.clone() if layer._kept_S is None else layer._kept_S + grad
    if len(batch) == 1:
        layer._kept.append((batch[0].detach(),))
        return
    x, g = batch
    rows = sampled_rows(x, layer.new_block_fraction)
    if rows is None:
        layer._kept.append((x.detach(), g.detach(), 1.0))
    else:  # new tensors (the centering subtracts): no view keeps the whole batch's storage alive until step()
        layer._kept += centered_rows(x.detach(), g.detach(), rows)


def centered_rows(x: Tensor, g: Tensor, rows: int) -> list[tuple[Tensor, Tensor, float]]:
    """The terms ``(x', g', c)`` whose ``Σ c · Σ_i g'_iᵀ x'_i`` estimates the batch's ``Σ_i g_iᵀ x_i`` (each term
    bilinear per sample, as ``Uᵀ∇W V`` is) from its first ``rows`` samples, centered: with the batch means
    ``x̄``, ``ḡ`` over the first dimension, ``Σ_i g_iᵀ x_i = Σ_i (g_i − ḡ)ᵀ(x_i − x̄) + B ḡᵀ x̄`` exactly; the
    first sum is estimated from the rows (scaled by ``B/rows``), the second is exact (one mean sample). Where a
    batch norm follows the layer, ``Σ_i g_i`` vanishes and the uncentered estimate would be dominated by the
    inputs' mean ``x̄``, which the sample does not cancel."""
    B = x.shape[0]
    x_mean, g_mean = x.mean(0, keepdim=True), g.mean(0, keepdim=True)
    return [(x[:rows] - x_mean, g[:rows] - g_mean, B / rows), (x_mean, g_mean, float(B))]


def rescale_factor(grad: Tensor | None, raw: Tensor) -> Tensor:
    """The factor ``c`` with ``grad = c · raw`` (a scalar rescaling after the backward: ``⟨grad, raw⟩/‖raw‖²``,
    1 where ``raw`` is zero or ``grad`` absent), computed on the device."""
    if grad is None:
        return raw.new_ones(())
    denom = (raw * raw).sum()
    return torch.where(denom > 0, (grad * raw).sum() / denom.clamp_min(torch.finfo(denom.dtype).tiny), 1.0)


def first_fused_backward(layer, *grads: Tensor) -> bool:
    """Counts a fused backward pass of ``layer``; ``False`` for a second one in the same step
    (the optimizer reports that error at ``step()``). Data-parallel: averages ``grads`` (the
    basis gradients) over processes in place before the bases are formed from them."""
    layer._backward_count += 1
    if layer._backward_count > 1:
        layer._fused_grads = None
        return False
    if layer.distributed:
        all_reduce_mean_(list(grads))
    return True


def filled(module: nn.Module, W: Tensor, bias: Tensor | None) -> nn.Module:
    """``module`` (a fresh dense layer) with the weight ``W`` and ``bias`` copied in."""
    with torch.no_grad():
        module.weight.copy_(W.reshape(module.weight.shape))
        if bias is not None:
            module.bias.copy_(bias)
    return module


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2 and its kin): a linear map whose
    weight is stored transposed (``in × out``, ``y = x W + b``). Recognised by its class name
    and fields, so that lrc does not import ``transformers`` to ask."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a ``Conv1D`` computes (its weight a transposed view)."""
    nx, nf = module.weight.shape
    linear = nn.Linear(nx, nf, bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
    linear.weight = nn.Parameter(module.weight.detach().mT, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def linear_origin(layer: nn.Module, dense: nn.Linear) -> nn.Module:
    """``dense``, or — where ``layer`` replaced a ``Conv1D`` (its ``conv1d_class``) — that class
    again with the same weights, so that a dense export loads where the original model did."""
    cls = getattr(layer, "conv1d_class", None)
    if cls is None:
        return dense
    out = cls(dense.out_features, dense.in_features).to(device=dense.weight.device, dtype=dense.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(dense.weight.mT)
        if dense.bias is not None:
            out.bias.copy_(dense.bias)
        else:
            out.bias.zero_()
    return out


def check_conv(cls_name: str, groups: int, padding_mode: str) -> None:
    if groups != 1:
        raise ValueError(f"{cls_name} supports groups=1 only (got groups={groups}); "
                         "exclude grouped/depthwise convolutions from factorization")
    if padding_mode != "zeros":
        raise ValueError(f"{cls_name} supports padding_mode='zeros' only (got {padding_mode!r})")


def dense_conv(layer, W: Tensor) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``layer``'s settings, the kernel ``W`` and ``layer``'s bias."""
    out = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                    device=W.device, dtype=W.dtype)
    return filled(out, W, layer.bias)


def initial_svd(W: Tensor, rank: int | None, tau: float | None, svd: tuple | None = None) -> tuple[int, tuple | None]:
    """:func:`initial_rank` and, when ``tau`` needed the spectrum, the sign-fixed SVD it came from
    (``None`` otherwise), so that an initialisation takes one SVD, not a second one for the rank.
    ``svd``: that SVD of ``W``, if the caller has it (returned as is)."""
    if tau is None:
        return initial_rank(W, rank, None), svd
    if rank is not None:
        initial_rank(W, rank, None)  # the checks of a given rank
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must lie in (0, 1), got {tau!r}")
    if svd is None:
        svd = sign_fixed_svd(W.to(torch.promote_types(W.dtype, torch.float32)))
    return truncation_rank(svd[1], tau, 1, rank), svd


def initial_rank(W: Tensor, rank: int | None, tau: float | None) -> int:
    """Rank for an SVD initialisation of the n×m matrix ``W``: ``rank``, or the τ-rule, or
    the smaller of both. Raises ``ValueError`` for a rank the matrix cannot hold."""
    n, m = W.shape
    if rank is None and tau is None:
        raise ValueError("give a rank, a tolerance tau, or both")
    if rank is not None and (not isinstance(rank, int) or rank < 1 or rank > min(n, m)):
        raise ValueError(f"rank must be an integer in [1, {min(n, m)}] for a {n}×{m} weight, got {rank!r}")
    if tau is None:
        return rank
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must lie in (0, 1), got {tau!r}")
    sigma = torch.linalg.svdvals(W.to(torch.promote_types(W.dtype, torch.float32)))
    return truncation_rank(sigma, tau, 1, rank)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_padding(padding, kernel_size, stride, dilation) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even kernel pads asymmetrically; give integer padding")
        return tuple(t // 2 for t in total)
    return _pair(padding)


