"""Thin helpers over ``torch.distributed`` for data-parallel low-rank training.

The geometric optimizers cannot sit behind ``DistributedDataParallel``: DDP assumes
parameters of fixed shapes, and a rank change resizes ``U``, ``S`` and ``V`` every step.
Instead the optimizer averages the gradients itself, in one flat all-reduce per phase, and
for a factorized layer what crosses the wire is its factor gradients (``G_K``, ``G_L``,
``G_S``), never a dense n×m gradient. After the truncation, rank 0's new ranks, factors and
moments are broadcast: BLAS rounds differently for buffers at different addresses, so
identical inputs do not give bit-identical factors in two processes, and Adam would
amplify the difference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank_and_world", "all_reduce_mean_", "broadcast_", "broadcast_ints"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean_(tensors: list[Tensor]) -> int:
    """Average ``tensors`` in place over all processes with one all-reduce; returns the
    number of bytes this process sent (the payload)."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors or not is_distributed():
        return 0
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat.numel() * flat.element_size()


def broadcast_ints(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's ``values`` on every process (e.g. the new ranks, so that shapes agree)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def broadcast_(tensors: list[Tensor]) -> int:
    """Rank 0's values of ``tensors`` (same shapes everywhere) on every process, in one
    broadcast; returns the payload in bytes."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors or not is_distributed():
        return 0
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat.numel() * flat.element_size()
