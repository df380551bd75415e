"""``nn.MultiheadAttention`` with its four projections as separate modules, so that each can be
factorized on its own.

``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight`` (3E×E) and calls a
functional kernel on it, so neither a factorized layer nor a rank per projection fits in.
:class:`SplitMultiheadAttention` computes the same function from four ``nn.Linear`` modules
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), any of which :func:`~lrc.factorize` may then
replace; the attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (or the
explicit softmax when the weights are asked for), with ``nn.MultiheadAttention``'s masks,
batch layouts, head averaging and dropout. ``to_dense()`` gives the ``nn.MultiheadAttention``
back (factorized projections merged), so a dense export loads into the original model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SplitMultiheadAttention", "split_attention_supported"]


def split_attention_supported(mha: nn.MultiheadAttention) -> str | None:
    """``None`` if ``mha`` can be split, else the reason it stays as it is."""
    if mha.bias_k is not None:
        return "add_bias_kv=True (not supported by the split attention)"
    if mha.add_zero_attn:
        return "add_zero_attn=True (not supported by the split attention)"
    return None


class SplitMultiheadAttention(nn.Module):
    """The function of ``nn.MultiheadAttention`` with four projection modules.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` as ``nn.MultiheadAttention.forward``: batched
    or unbatched inputs, ``batch_first`` either way, boolean or additive masks (``attn_mask``
    of shape ``(L, S)`` or ``(N·H, L, S)``), the attention weights averaged over heads or not.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    @torch.no_grad()
    def from_attention(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The same attention, weights copied; ``ValueError`` for what it cannot represent."""
        why = split_attention_supported(mha)
        if why:
            raise ValueError(why)
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, device=ref.device, dtype=ref.dtype)
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(E)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(E) if mha.in_proj_bias is not None else (None, None, None)
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight.copy_(w)
            if b is not None:
                proj.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    @torch.no_grad()
    def to_dense(self) -> nn.MultiheadAttention:
        """``nn.MultiheadAttention`` with the same outputs (factorized projections merged)."""
        weights = [_dense_weight(p) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)]
        ref = weights[0]
        has_bias = self.q_proj.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=has_bias,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                    device=ref.device, dtype=ref.dtype)
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat(weights[:3]))
        else:
            for name, w in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), weights[:3]):
                getattr(mha, name).copy_(w)
        if has_bias:
            mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
            mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.out_proj.weight.copy_(weights[3])
        return mha.train(self.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, N, _ = query.shape
        S = key.shape[0]
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(L, N, H, d).permute(1, 2, 0, 3)  # N, H, L, d
        k = self.k_proj(key).reshape(S, N, H, d).permute(1, 2, 0, 3)
        v = self.v_proj(value).reshape(S, N, H, d).permute(1, 2, 0, 3)
        mask = _additive_mask(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0:
                weights = F.dropout(weights, p)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, H * d))  # L, N, E
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def _dense_weight(module: nn.Module) -> Tensor:
    w = module.weight
    return w.detach() if isinstance(w, Tensor) else w


def _additive_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, N: int, H: int, L: int, S: int,
                   dtype: torch.dtype) -> Tensor | None:
    """``attn_mask`` and ``key_padding_mask`` (boolean: True = not attended; or additive) as one
    additive mask broadcastable to ``(N, H, L, S)``."""
    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(N, H, L, S) if mask.dim() == 3 else mask.reshape(1, 1, L, S)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(N, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask
