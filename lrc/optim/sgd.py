"""Low-rank heavy ball: Algorithm 1 of Schotthöfer, Klein, Kusch (2025)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LowRankOptimizer
from .functional import heavy_ball_update_

__all__ = ["LowRankSGD"]


class LowRankSGD(LowRankOptimizer):
    r"""Geometric low-rank heavy ball (Algorithm 1 of "A geometric framework for
    momentum-based optimizers for low-rank training", Schotthöfer, Klein, Kusch, 2025).

    For every factorized layer (``W = U S Vᵀ``, momentum ``B`` of ``S``):

    .. code-block:: text

        Û, V̂, S̄, B̄, G_S as in LowRankAdam
        B̂ = μ B̄ + (G_S + wd·S̄);   Ŝ = S̄ − lr·B̂        (Nesterov: Ŝ = S̄ − lr·(G_S + wd·S̄ + μ B̂))
        P Σ Rᵀ = svd(Ŝ), rank by τ;  U, S, V ← Û P₁, Σ₁, V̂ R₁;  B ← P₁ᵀ B̂ R₁

    This is torch's form of heavy ball; in the paper's notation (step size ``λ``,
    momentum ``γ``: ``x_{k+1} = x_k − λ∇f(x_k) + γ(x_k − x_{k−1})``) ``λ = lr`` and
    ``γ = momentum``. ``wd·S̄`` is L2 decay on ``W`` (``Ûᵀ(wd·W)V̂ = wd·S̄``), as in
    ``torch.optim.SGD``. The update is linear, so for a square layer at full rank with
    ``tau=0`` it is exactly ``torch.optim.SGD(momentum=μ)`` on ``W``. Every other trainable
    parameter gets ``torch.optim.SGD``'s update in the same ``step()``.

    Args:
        model: the model holding factorized layers.
        lr (float): learning rate ``λ``. Default: ``1e-2``.
        momentum (float): ``γ`` in ``[0, 1)``. Default: ``0.9``.
        weight_decay (float): L2 penalty. Default: ``0``.
        nesterov (bool): Nesterov momentum. Default: ``False``.
        tau, min_rank, max_rank, mode, update_every, target_cr, max_params, allocation, fixed_ranks,
            rank_every, svd_batching, basis_every, augmentation, capacity, truncation, capturable,
            new_block_fraction, distributed: as :class:`~lrc.LowRankAdam`.
    """

    _state_keys = ("momentum_buffer",)

    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, tau: float = 0.1, min_rank: int = 1, max_rank: int | None = None,
                 mode: str = "fused", distributed: bool | None = None, update_every: int = 1,
                 target_cr: float | None = None, max_params: int | None = None,
                 allocation: str = "relative", fixed_ranks: bool = False, rank_every: int = 1,
                 svd_batching: str = "auto", basis_every: int = 1, augmentation: str = "auto",
                 capacity: int | None = None, truncation: str = "svd", capturable: bool = False,
                 new_block_fraction: float | None = None) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid lr: {lr!r} (must be ≥ 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r} (must lie in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be ≥ 0)")
        if nesterov and momentum == 0:
            raise ValueError("Invalid nesterov: Nesterov momentum needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(model, defaults, mode=mode, tau=tau, min_rank=min_rank, max_rank=max_rank,
                         distributed=distributed, update_every=update_every, target_cr=target_cr,
                         max_params=max_params, allocation=allocation, fixed_ranks=fixed_ranks,
                         rank_every=rank_every, svd_batching=svd_batching, basis_every=basis_every,
                         augmentation=augmentation, capacity=capacity, truncation=truncation,
                         capturable=capturable, new_block_fraction=new_block_fraction)

    def _update_(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        heavy_ball_update_(param, grad, state["momentum_buffer"], lr=group["lr"], momentum=group["momentum"],
                           weight_decay=group["weight_decay"], nesterov=group["nesterov"])
