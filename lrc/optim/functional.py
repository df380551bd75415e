"""Single-tensor update rules, shared by dense parameters and low-rank coefficients.

Each function updates ``param`` and its state tensors in place, exactly as the matching
``torch.optim`` class does for one tensor (same operation order), so that the dense
parameters of a model and the coefficient ``S̄`` of a factorized layer follow one code path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adamw_update_", "adamw_foreach_", "adamw_device_update_", "heavy_ball_update_"]


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """AdamW (decoupled weight decay), step number ``step ≥ 1``; as ``torch.optim.AdamW``."""
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adamw_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   step: int, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """:func:`adamw_update_` on several tensors with one step number, through the multi-tensor
    (``torch._foreach_*``) kernels ``torch.optim`` uses: the same operations in the same order,
    a few kernel launches for all tensors instead of a set per tensor."""
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bias_correction1)


def adamw_device_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, *,
                         lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """:func:`adamw_update_` with the step number ``step`` a tensor on ``param``'s device (a 0-d tensor, or
    one per slice of a stacked ``param``, shaped to broadcast against it) and ``lr`` a number or a 0-d
    tensor there: no value is read on the host, so that a step can be captured in a CUDA graph and
    replayed with the counts and a schedule's ``lr`` it finds on the device. The bias corrections are
    computed in float64 (float32 on MPS); the values equal :func:`adamw_update_`'s to rounding."""
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    t = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
    bias_correction1 = (1.0 - torch.pow(beta1, t)).to(param.dtype)
    bias_correction2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt().to(param.dtype)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.sub_(exp_avg / denom * (lr / bias_correction1))


def heavy_ball_update_(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float | Tensor, momentum: float,
                       weight_decay: float, nesterov: bool) -> None:
    """Heavy ball as ``torch.optim.SGD(momentum=…, dampening=0)`` (buffer starts at zero).

    ``b ← μ b + (g + wd·p)``, ``p ← p − lr·b`` (Nesterov: ``p ← p − lr·(g + μ b)``), which is
    Polyak's ``p_{k+1} = p_k − λ∇f(p_k) + γ(p_k − p_{k−1})`` with ``λ = lr``, ``γ = momentum``.
    ``lr`` may be a 0-d tensor on ``param``'s device (a capturable step: no value read on the host).
    """
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    momentum_buffer.mul_(momentum).add_(grad)
    direction = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    if isinstance(lr, Tensor):
        param.sub_(direction * lr)
    else:
        param.add_(direction, alpha=-lr)
