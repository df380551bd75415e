"""Attention factorized: SplitMultiheadAttention equals nn.MultiheadAttention in float64 (masks,
layouts, weights), factorize splits and factorizes it, the optimizers train through it."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc import LowRankAdam, LowRankLinear, compression_ratio, densify, factorize
from lrc.layers.attention import SplitMultiheadAttention

from .conftest import rel

f64 = torch.float64
E, H, L, S, N = 16, 4, 5, 7, 3


def _masks(kind, batch_first):
    g = torch.Generator().manual_seed(1)
    kpm = attn = None
    if kind in ("padding", "both"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, :1] = True
    if kind in ("bool2d", "both"):
        attn = torch.rand(L, S, generator=g) > 0.7
        attn[:, 2] = False  # every query keeps a key
    if kind == "float3d":
        attn = torch.randn(N * H, L, S, generator=g, dtype=f64)
    if kind == "float_padding":
        kpm = torch.randn(N, S, generator=g, dtype=f64)
    return kpm, attn


@pytest.mark.parametrize("batch_first, masks, need_weights, average",
                         [(bf, m, nw, av) for bf, m, (nw, av) in itertools.product(
                             (True, False), ("none", "padding", "bool2d", "float3d", "float_padding", "both"),
                             ((True, True), (True, False), (False, True)))])
def test_split_attention_equals_multihead_attention_in_float64(batch_first, masks, need_weights, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=f64).eval()
    with torch.no_grad():
        mha.out_proj.bias.normal_()
        mha.in_proj_bias.normal_()
    split = SplitMultiheadAttention.from_attention(mha)
    shape = (N, L, E) if batch_first else (L, N, E)
    q = torch.randn(*shape, dtype=f64)
    kv = torch.randn(*((N, S, E) if batch_first else (S, N, E)), dtype=f64)
    kpm, attn = _masks(masks, batch_first)
    kw = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, average_attn_weights=average)
    want_out, want_w = mha(q, kv, kv, **kw)
    got_out, got_w = split(q, kv, kv, **kw)
    assert torch.allclose(got_out, want_out, rtol=0, atol=1e-12)
    if need_weights:
        assert torch.allclose(got_w, want_w, rtol=0, atol=1e-12)
    else:
        assert got_w is None and want_w is None


def test_split_attention_unbatched_and_other_kdim_vdim():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=6, vdim=10, dtype=f64).eval()
    split = SplitMultiheadAttention.from_attention(mha)
    q, k, v = torch.randn(L, E, dtype=f64), torch.randn(S, 6, dtype=f64), torch.randn(S, 10, dtype=f64)
    for a, b in zip(mha(q, k, v), split(q, k, v)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    back = split.to_dense()
    for a, b in zip(mha(q, k, v), back(q, k, v)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, dtype=f64)
        self.head = nn.Linear(E, 3, dtype=f64)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_factorize_splits_attention_and_full_rank_keeps_the_outputs():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(N, L, E, dtype=f64)
    want = model(x)
    report = factorize(model, rank=E, adapter=True, exclude=["head"])
    assert isinstance(model.attn, SplitMultiheadAttention)
    assert sorted(r.name for r in report.replaced) == ["attn.k_proj", "attn.out_proj", "attn.q_proj", "attn.v_proj"]
    assert torch.allclose(model(x), want, rtol=0, atol=1e-12)
    densify(model)
    assert type(model.attn) is nn.MultiheadAttention
    assert torch.allclose(model(x), want, rtol=0, atol=1e-12)


def test_exclude_keeps_attention_as_it_is_and_unsupported_attention_is_reported():
    model = Block()
    factorize(model, rank=2, exclude=["attn"])
    assert type(model.attn) is nn.MultiheadAttention
    model = Block()
    model.attn = nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=f64)
    report = factorize(model, rank=2)
    assert type(model.attn) is nn.MultiheadAttention
    assert any(name == "attn" and "add_bias_kv" in why for name, why in report.skipped)


@pytest.mark.parametrize("mode", ["two_pass", "parallel"])
def test_fused_equals_other_modes_through_attention(mode):
    runs = {}
    for m in ("fused", mode):
        torch.manual_seed(0)
        model = Block()
        factorize(model, rank=3, exclude=["head"])
        x, y = torch.randn(8, L, E, dtype=f64), torch.randint(0, 3, (8,))
        opt = LowRankAdam(model, lr=1e-2, tau=0.05, mode=m)
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        runs[m] = torch.cat([p.detach().flatten() for lay in model.modules() if isinstance(lay, LowRankLinear)
                             for p in (lay.dense_weight(),)])
    if mode == "two_pass":
        assert rel(runs["fused"], runs[mode]) < 1e-10
    else:
        assert rel(runs["fused"], runs[mode]) > 1e-10  # parallel drops a block: really different


def test_vit_attention_factorized_raises_the_compression():
    from lrc.models import build_model

    before = build_model("vit_small", num_classes=10, hidden_dim=64, mlp_dim=128, num_layers=2, num_heads=4)
    assert any(isinstance(m, nn.MultiheadAttention) for m in before.modules())
    model = copy.deepcopy(before)
    factorize(model, rank=8)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    kept = copy.deepcopy(before)
    factorize(kept, rank=8, exclude=["*self_attention"])
    assert compression_ratio(model) > compression_ratio(kept) + 10
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)


def test_a_vit_with_factorized_attention_saves_reloads_and_exports_dense(tmp_path):
    from lrc.io import load_model, save_dense, save_model
    from lrc.models import build_model

    args = dict(num_classes=10, hidden_dim=32, mlp_dim=64, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    model = build_model("vit_small", **args).eval()
    factorize(model, rank=4)
    x = torch.randn(2, 3, 32, 32)
    save_model(tmp_path / "m.safetensors", model, {"name": "vit_small", "args": args})
    again, _ = load_model(tmp_path / "m.safetensors")
    assert torch.allclose(again.eval()(x), model(x), atol=1e-6)
    save_dense(tmp_path / "d.pt", model)
    dense = build_model("vit_small", **args).eval()
    dense.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True), strict=True)
    assert torch.allclose(dense(x), model(x), atol=1e-5)
