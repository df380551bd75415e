"""TuckerConv2d: the layer itself (outputs, HOSVD initialisation, parameter counts)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc.layers import TuckerConv2d
from lrc.layers.tucker import mode_product, unfold

from .conftest import rel

SETTINGS = [dict(stride=1, padding=0, dilation=1), dict(stride=2, padding=1, dilation=1),
            dict(stride=1, padding=2, dilation=2), dict(stride=(2, 1), padding="valid", dilation=(1, 2))]


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_tucker_conv_gives_the_dense_outputs(kw, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 3), bias=bias, dtype=torch.float64, **kw)
    layer = TuckerConv2d.from_conv(conv, ranks=(8, 6))
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    assert rel(layer(x), conv(x)) < 1e-12  # the bias is added once
    assert rel(layer.to_dense()(x), conv(x)) < 1e-12
    assert layer.to_dense().stride == conv.stride and layer.to_dense().dilation == conv.dilation


def test_factors_are_orthonormal_and_the_core_is_the_projection():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 3, dtype=torch.float64)
    layer = TuckerConv2d.from_conv(conv, ranks=(5, 7))
    assert layer.ranks == (5, 7) and layer.core.shape == (5, 7, 3, 3)
    for U in (layer.U_out, layer.U_in):
        assert torch.allclose(U.mT @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-12)
    W = conv.weight.detach()
    core = mode_product(mode_product(W, layer.U_out.mT, 0), layer.U_in.mT, 1)
    assert torch.allclose(layer.core, core, atol=1e-12)
    # U_out spans the leading left singular vectors of the mode-0 unfolding
    P = torch.linalg.svd(unfold(W, 0)).U[:, :5]
    assert torch.allclose(layer.U_out @ layer.U_out.mT, P @ P.mT, atol=1e-10)


def test_tau_picks_each_mode_rank_from_its_unfolding():
    torch.manual_seed(0)
    conv = nn.Conv2d(10, 12, 3, bias=False, dtype=torch.float64)
    A, B = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    core = torch.zeros(12, 10, 3, 3, dtype=torch.float64)
    core[:3, :4] = torch.randn(3, 4, 3, 3, dtype=torch.float64)  # multilinear ranks (3, 4)
    with torch.no_grad():
        conv.weight.copy_(mode_product(mode_product(core, A, 0), B, 1) + 1e-9 * torch.randn(12, 10, 3, 3, dtype=torch.float64))
    layer = TuckerConv2d.from_conv(conv, tau=1e-4)
    assert layer.ranks == (3, 4)
    assert rel(layer.dense_weight(), conv.weight) < 1e-6
    assert TuckerConv2d.from_conv(conv, ranks=(2, 9), tau=1e-4).ranks == (2, 4)  # the smaller of both


def test_parameter_count_and_gradients_flow():
    layer = TuckerConv2d(32, 64, 3, ranks=(8, 4), padding=1)
    assert sum(p.numel() for p in layer.parameters()) == 64 * 8 + 32 * 4 + 8 * 4 * 9 + 64
    assert layer.num_dense_parameters() == 64 * 32 * 9 + 64
    layer(torch.randn(2, 32, 5, 5)).square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_bad_settings_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="groups=1"):
        TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), ranks=2)
    with pytest.raises(ValueError, match="padding_mode"):
        TuckerConv2d(4, 4, 3, ranks=2, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"r_in must be an integer in \[1, 4\]"):
        TuckerConv2d(4, 8, 3, ranks=(2, 5))


# ---- gradients and the optimizers ------------------------------------------------------------
f64 = torch.float64


def test_gradients_follow_the_k_l_s_convention():
    torch.manual_seed(0)
    layer = TuckerConv2d(5, 7, 3, ranks=(3, 2), stride=2, padding=1, dtype=f64)
    x = torch.randn(4, 5, 9, 9, dtype=f64, requires_grad=True)
    target = torch.randn(4, 7, 5, 5, dtype=f64)
    F.mse_loss(layer(x), target).backward()
    W = layer.dense_weight().detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    F.mse_loss(F.conv2d(x_ref, W, layer.bias, 2, 1), target).backward()
    gW, C = W.grad, layer.core.detach()
    U_out, U_in = layer.U_out.detach(), layer.U_in.detach()
    assert rel(x.grad, x_ref.grad) < 1e-12
    assert rel(layer.core.grad, mode_product(mode_product(gW, U_out.mT, 0), U_in.mT, 1)) < 1e-12
    Q_out = torch.linalg.qr(unfold(C, 0).mT).Q
    Q_in = torch.linalg.qr(unfold(C, 1).mT).Q
    G_out = unfold(mode_product(gW, U_in.mT, 1), 0) @ Q_out
    G_in = unfold(mode_product(gW, U_out.mT, 0), 1) @ Q_in
    # up to the sign of each column of Q (the layer fixes it)
    assert torch.allclose(layer.U_out.grad.abs(), G_out.abs(), atol=1e-12)
    assert torch.allclose(layer.U_in.grad.abs(), G_in.abs(), atol=1e-12)


def tucker_net(r=(3, 3)):
    torch.manual_seed(1)
    model = nn.Sequential(TuckerConv2d(4, 12, 3, ranks=(min(r[0], 12), min(r[1], 4)), padding=1, dtype=f64),
                          nn.ReLU(), TuckerConv2d(12, 16, 3, ranks=r, stride=2, dtype=f64), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 3 * 3, 5, dtype=f64))
    return model, torch.randn(16, 4, 8, 8, dtype=f64), torch.randint(0, 5, (16,))


def tucker_weights(model):
    return torch.cat([(m.dense_weight() if isinstance(m, TuckerConv2d) else m.weight).detach().flatten()
                      for m in model if hasattr(m, "weight") or isinstance(m, TuckerConv2d)])


def tucker_run(mode, steps, opt_cls, nudge=0.0, check=None, **kw):
    from .test_optim import train

    model, x, y = tucker_net()
    if nudge:
        with torch.no_grad():
            model[0].core.add_(nudge)
    opt = opt_cls(model, mode=mode, **kw)
    history = []
    for _ in range(steps):
        history += train(model, x, y, opt, 1)
        if check:
            check(model)
    return tucker_weights(model), history


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_tucker_fused_equals_two_pass_after_one_step(opt_name):
    from lrc import LowRankAdam, LowRankSGD

    cls, kw = (LowRankAdam, {"lr": 1e-2}) if opt_name == "adam" else (LowRankSGD, {"lr": 0.2})
    w_two, _ = tucker_run("two_pass", 1, cls, tau=0.1, **kw)
    w_fused, _ = tucker_run("fused", 1, cls, tau=0.1, **kw)
    assert rel(w_fused, w_two) < 1e-10


# wrong: a real difference the tolerance must see (moments left in the old coordinates;
# for heavy ball, a momentum off by 1 %)
@pytest.mark.parametrize("opt_name, kw, wrong", [
    ("adam", {"lr": 5e-2, "second_moment": "squared"}, {"project_moments": False}),
    ("sgd", {"lr": 1.0, "tau": 0.2}, {"momentum": 0.891}),
])
def test_tucker_fused_equals_two_pass_after_20_steps_with_orthonormal_factors(opt_name, kw, wrong):
    from lrc import LowRankAdam, LowRankSGD

    cls = LowRankAdam if opt_name == "adam" else LowRankSGD

    def orthonormal(model):
        for m in model:
            if isinstance(m, TuckerConv2d):
                for U in (m.U_out, m.U_in):
                    assert torch.allclose(U.mT @ U, torch.eye(U.shape[1], dtype=f64), atol=1e-12)

    kw = {"tau": 0.1, **kw}
    w_two, h_two = tucker_run("two_pass", 20, cls, check=orthonormal, **kw)
    w_fused, h_fused = tucker_run("fused", 20, cls, check=orthonormal, **kw)
    assert h_fused == h_two
    assert len({str(h) for h in h_two}) > 1, "the ranks should move in this test"
    floor = rel(tucker_run("two_pass", 20, cls, nudge=1e-15, **kw)[0], w_two)
    real = rel(tucker_run("two_pass", 20, cls, **{**kw, **wrong})[0], w_two)
    tol = 1e-6
    assert floor < tol / 10 and real > tol * 100, (floor, real)
    assert rel(w_fused, w_two) < tol


def test_tucker_state_dict_round_trip_across_rank_changes(tmp_path):
    from lrc import LowRankAdam

    from .test_optim import train

    model, x, y = tucker_net()
    opt = LowRankAdam(model, lr=5e-2, tau=0.1)
    history = train(model, x, y, opt, 6)
    assert history[-1] != [[3, 3], [3, 3]]  # the ranks moved
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh, _, _ = tucker_net()
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = LowRankAdam(fresh, lr=5e-2, tau=0.1)
    fresh_opt.load_state_dict(ckpt["opt"])
    assert [m.rank for m in fresh if isinstance(m, TuckerConv2d)] == history[-1]
    assert train(model, x, y, opt, 3) == train(fresh, x, y, fresh_opt, 3)
    assert rel(tucker_weights(fresh), tucker_weights(model)) < 1e-10  # BLAS may round another allocation differently


def test_parallel_mode_refuses_tucker_layers():
    from lrc import LowRankAdam

    with pytest.raises(ValueError, match="mode='parallel' does not support TuckerConv2d"):
        LowRankAdam(tucker_net()[0], mode="parallel")
