import pytest
import torch
from torch import nn

from lrc import LowRankConv2d, LowRankLinear, densify
from lrc.linalg import augment_basis

f64 = torch.float64

CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=3, out_channels=8, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(in_channels=2, out_channels=5, kernel_size=3, padding="same", bias=False),
]


def dense_and_factorized(kind, full_rank=True, **kw):
    if kind == "linear":
        dense = nn.Linear(12, 9, **kw).to(f64)
        x = torch.randn(4, 3, 12, dtype=f64, requires_grad=True)  # extra leading dims
        fact = LowRankLinear.from_linear(dense, rank=9 if full_rank else 4)
    else:
        dense = nn.Conv2d(**kw).to(f64)
        x = torch.randn(2, kw["in_channels"], 11, 10, dtype=f64, requires_grad=True)
        fact = LowRankConv2d.from_conv(dense, rank=kw["out_channels"] if full_rank else 2)
    return dense, fact, x


LAYERS = [("linear", {}), ("linear", {"bias": False})] + [("conv", c) for c in CONVS]


@pytest.mark.parametrize("kind, kw", LAYERS)
def test_full_rank_factorized_layer_gives_dense_outputs(kind, kw):
    dense, fact, x = dense_and_factorized(kind, **kw)
    assert torch.allclose(fact(x), dense(x), atol=1e-12)
    assert torch.allclose(fact.to_dense()(x), dense(x), atol=1e-12)
    assert fact.U.dtype == f64 and fact.S.shape == (fact.rank, fact.rank)


@pytest.mark.parametrize("kind, kw", LAYERS)
def test_gradients_are_the_K_L_and_S_gradients(kind, kw):
    dense, fact, x = dense_and_factorized(kind, full_rank=False, **kw)
    dense.weight.data = fact.dense_weight().detach().clone()
    g = torch.randn_like(dense(x))
    (dense(x) * g).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (fact(x) * g).sum().backward()
    dW = dense.weight.grad.reshape(dense.weight.shape[0], -1)
    U, V = fact.U.detach(), fact.V.detach()
    assert torch.allclose(fact.U.grad, dW @ V, atol=1e-10)
    assert torch.allclose(fact.V.grad, dW.T @ U, atol=1e-10)
    assert torch.allclose(fact.S.grad, U.T @ dW @ V, atol=1e-10)
    assert torch.allclose(x.grad, gx, atol=1e-10)
    if dense.bias is not None:
        assert torch.allclose(fact.bias.grad, dense.bias.grad, atol=1e-10)


@pytest.mark.parametrize("kind, kw", LAYERS)
def test_fused_backward_records_the_augmented_coefficient_gradient(kind, kw):
    dense, fact, x = dense_and_factorized(kind, full_rank=False, **kw)
    dense.weight.data = fact.dense_weight().detach().clone()
    fact.fused = True
    g = torch.randn_like(dense(x))
    (dense(x) * g).sum().backward()
    (fact(x) * g).sum().backward()
    dW = dense.weight.grad.reshape(dense.weight.shape[0], -1)
    U, V = fact.U.detach(), fact.V.detach()
    Ut, Vt, G_S = fact._fused_grads
    assert torch.allclose(Ut, augment_basis(U, dW @ V), atol=1e-10)
    assert torch.allclose(Vt, augment_basis(V, dW.T @ U), atol=1e-10)
    Uh, Vh = torch.cat([U, Ut], 1), torch.cat([V, Vt], 1)
    assert torch.allclose(G_S, Uh.T @ dW @ Vh, atol=1e-10)
    assert fact._backward_count == 1


@pytest.mark.parametrize("kind, kw", LAYERS)
def test_to_dense_and_densify_reproduce_low_rank_outputs(kind, kw):
    _, fact, x = dense_and_factorized(kind, full_rank=False, **kw)
    model = nn.Sequential(fact)
    y = model(x)
    assert torch.allclose(fact.to_dense()(x), y, atol=1e-12)
    densify(model)
    assert type(model[0]) in (nn.Linear, nn.Conv2d)
    assert torch.allclose(model(x), y, atol=1e-12)


@pytest.mark.parametrize("kind, kw", [LAYERS[0], LAYERS[3]])
def test_adapter_mode_starts_at_the_dense_layer_and_adds_the_low_rank_part(kind, kw):
    dense, _, x = dense_and_factorized(kind, **kw)
    cls = LowRankLinear if kind == "linear" else LowRankConv2d
    ad = cls.from_linear(dense, rank=2, adapter=True) if kind == "linear" else cls.from_conv(dense, rank=2, adapter=True)
    assert ad.adapter and torch.count_nonzero(ad.S) == 0 and not ad.base_weight.requires_grad
    assert torch.allclose(ad(x), dense(x), atol=1e-12)
    with torch.no_grad():
        ad.S.copy_(torch.randn(2, 2, dtype=f64))
    expected = dense.weight + ad.low_rank_weight().reshape(dense.weight.shape)
    assert torch.allclose(ad.dense_weight(), expected)
    assert torch.allclose(ad.to_dense()(x), ad(x), atol=1e-12)


def test_construction_errors():
    with pytest.raises(ValueError, match="groups=1"):
        LowRankConv2d(4, 4, 3, rank=2, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        LowRankConv2d(4, 4, 3, rank=2, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 5\]"):
        LowRankLinear(5, 8, rank=6)
    with pytest.raises(ValueError, match="tau"):
        LowRankLinear.from_linear(nn.Linear(5, 8), tau=1.5)
    with pytest.raises(ValueError, match="rank, a tolerance"):
        LowRankLinear.from_linear(nn.Linear(5, 8))


def test_rank_by_tau_follows_the_singular_values():
    dense = nn.Linear(10, 10, bias=False).to(f64)
    sigma = torch.tensor([10.0, 5, 1, 0.1, 0.01, 0, 0, 0, 0, 0], dtype=f64)
    Q1, Q2 = torch.linalg.qr(torch.randn(10, 10, dtype=f64)).Q, torch.linalg.qr(torch.randn(10, 10, dtype=f64)).Q
    dense.weight.data = Q1 @ torch.diag(sigma) @ Q2.T
    assert LowRankLinear.from_linear(dense, tau=0.05).rank == 3
    assert LowRankLinear.from_linear(dense, tau=0.05, rank=2).rank == 2
    assert LowRankLinear.from_linear(dense, tau=0.0005).rank == 5


def test_default_initialisation_and_device_dtype():
    layer = LowRankConv2d(3, 16, 3, rank=4, padding=1, dtype=f64)
    assert layer.U.dtype == f64
    assert torch.allclose(layer.U.T @ layer.U, torch.eye(4, dtype=f64), atol=1e-12)
    assert torch.allclose(layer.V.T @ layer.V, torch.eye(4, dtype=f64), atol=1e-12)
    assert layer(torch.randn(1, 3, 8, 8, dtype=f64)).shape == (1, 16, 8, 8)


def test_load_state_dict_takes_the_checkpoint_rank():
    a, b = LowRankLinear(20, 30, rank=3), LowRankLinear(20, 30, rank=7)
    b.load_state_dict(a.state_dict())
    assert b.rank == 3
    x = torch.randn(5, 20)
    assert torch.equal(a(x), b(x))
    # the model trains on after a rank change with an old graph still alive
    loss = b(x).sum()
    loss.backward()
    b.set_factors(torch.zeros(30, 5), torch.zeros(5, 5), torch.zeros(20, 5))
    b(x).sum().backward()
    assert b.U.grad.shape == (30, 5)


def test_factorizing_a_layer_takes_one_svd_not_one_of_a_random_initialisation_first(monkeypatch):
    """from_linear/from_conv build the module without its default initialisation (an SVD of a
    random matrix that the real one overwrites: a third of factorize's time on VGG16)."""
    from lrc.layers import TuckerConv2d
    from lrc.layers.lora import LoRAConv2d, LoRALinear

    calls = []
    svd = torch.linalg.svd

    svdvals = torch.linalg.svdvals

    def counted(A, **kw):  # an SVD on the meta device (shapes only) costs nothing
        if A.device.type != "meta":
            calls.append(A.shape)
        return svd(A, **kw)

    def counted_values(A):
        calls.append(A.shape)
        return svdvals(A)

    monkeypatch.setattr(torch.linalg, "svd", counted)
    monkeypatch.setattr(torch.linalg, "svdvals", counted_values)
    torch.manual_seed(0)
    linear, conv = nn.Linear(30, 20, dtype=f64), nn.Conv2d(4, 6, 3, dtype=f64)
    for make in (lambda: LowRankLinear.from_linear(linear, rank=5), lambda: LoRALinear.from_linear(linear, rank=5),
                 lambda: LowRankConv2d.from_conv(conv, rank=3), lambda: LoRAConv2d.from_conv(conv, rank=3),
                 # by τ too: the spectrum that chooses the rank is the SVD that initialises
                 lambda: LowRankLinear.from_linear(linear, tau=0.3), lambda: LoRALinear.from_linear(linear, tau=0.3),
                 lambda: LowRankConv2d.from_conv(conv, tau=0.3), lambda: LoRAConv2d.from_conv(conv, tau=0.3)):
        calls.clear()
        layer = make()
        assert len(calls) == 1 and layer.bias is not None and torch.isfinite(layer.bias).all()
    calls.clear()
    tucker = TuckerConv2d.from_conv(conv, ranks=(3, 2))
    assert len(calls) == 2  # one per channel mode
    W = LowRankLinear.from_linear(linear, rank=20).to_dense().weight
    assert torch.allclose(W, linear.weight, atol=1e-12)
    assert torch.allclose(tucker.bias, conv.bias)
