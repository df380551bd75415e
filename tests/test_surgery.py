import copy

import pytest
import torch
from torch import nn

from lrc import LowRankConv2d, LowRankLinear, compression_ratio, count_parameters, densify, factorize

f64 = torch.float64


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                                      nn.ReLU(), nn.Conv2d(32, 32, 3, groups=4), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_factorize_replaces_in_place_and_reports():
    model = SmallNet().to(f64)
    x = torch.randn(2, 3, 16, 16, dtype=f64)
    before = count_parameters(model)
    report = factorize(model, rank=4)
    names = [r.name for r in report.replaced]
    assert names == ["features.0", "features.2", "classifier.1", "classifier.3"]
    assert isinstance(model.features[2], LowRankConv2d) and isinstance(model.classifier[1], LowRankLinear)
    assert model.features[2].U.dtype == f64 and model.features[2].stride == (2, 2)
    skipped = dict(report.skipped)
    assert "groups=4" in skipped["features.4"]
    r = report.replaced[1]
    assert (r.shape, r.rank, r.params_before, r.params_after) == ((32, 16, 3, 3), 4, 32 * 144 + 32,
                                                                   4 * (32 + 144 + 4) + 32)
    assert count_parameters(model) == before - report.params_before + report.params_after
    assert model(x).shape == (2, 10)
    assert "features.2" in str(report)


def test_factorize_include_exclude_and_skip_when_nothing_is_saved():
    model = SmallNet()
    report = factorize(model, rank=16, include=["classifier.*", "nothing.*"], exclude=["classifier.3"])
    assert [r.name for r in report.replaced] == ["classifier.1"]
    assert ("classifier.3", "excluded") in report.skipped
    assert report.unmatched == ["nothing.*"]
    assert type(model.features[0]) is nn.Conv2d
    report = factorize(SmallNet(), rank=30, include=["classifier.1"])
    assert not report.replaced and "would not save" in report.skipped[0][1]


def test_factorize_full_rank_keeps_outputs_and_densify_restores_them():
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8)).to(f64)
    x = torch.randn(3, 8, dtype=f64)
    y = model(x)
    report = factorize(model, rank=6, adapter=True)
    assert len(report.replaced) == 2
    assert torch.allclose(model(x), y, atol=1e-12)
    densify(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
    assert torch.allclose(model(x), y, atol=1e-12)


def test_compression_ratio_is_exact():
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    dense = 100 * 50 + 50 + 50 * 10 + 10
    factorize(model, rank=5, include=["0"])
    compressed = 5 * (100 + 50 + 5) + 50 + 50 * 10 + 10
    assert compression_ratio(model) == pytest.approx((1 - compressed / dense) * 100, abs=1e-12)
    assert compression_ratio(nn.Linear(3, 3)) == 0.0


@pytest.mark.parametrize("kwargs, match", [({}, "rank, a tolerance"), ({"rank": 0}, "positive integer"),
                                           ({"tau": 1.0}, r"\(0, 1\)"), ({"tau": 0.0}, r"\(0, 1\)")])
def test_factorize_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        factorize(SmallNet(), **kwargs)
    with pytest.raises(TypeError, match="takes the model"):
        factorize(list(SmallNet().parameters()), rank=2)


def test_factorize_by_tau_picks_rank_per_layer():
    model = nn.Sequential(nn.Linear(40, 40, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 3) @ torch.randn(3, 40) + 1e-6 * torch.randn(40, 40))
    report = factorize(model, tau=0.01)
    assert report.replaced[0].rank == 3


class SamePadConv(nn.Conv2d):
    """A convolution that pads in its own forward, as TensorFlow's "same" (asymmetric when
    the padding is odd), like the convolutions of efficientnet-lite-pytorch."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PlainSubclass(nn.Conv2d):
    pass


def test_conv2d_subclasses_are_factorized_only_where_their_forward_is_a_plain_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(3, 16, 3, stride=2), SamePadConv(16, 32, 1), PlainSubclass(32, 32, 3),
                          SamePadConv(32, 32, 3, groups=32)).to(f64)
    x = torch.randn(2, 3, 15, 15, dtype=f64)
    want = model(x)
    report = factorize(model, rank=16, adapter=True)  # exact: frozen weights plus U S Vᵀ = 0
    skipped = dict(report.skipped)
    assert [r.name for r in report.replaced] == ["1", "2"]  # 1×1 "same" = no padding; a plain subclass
    assert "SamePadConv" in skipped["0"] and "padding" in skipped["0"]  # its asymmetric padding is kept
    assert "groups=32" in skipped["3"]
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)


def test_conv2d_subclass_probe_works_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(SamePadConv(3, 64, 3, stride=2), SamePadConv(64, 64, 1))
    report = factorize(model, rank=4)
    assert [r.name for r in report.replaced] == ["1"] and "0" in dict(report.skipped)


def test_adapter_dropout_drops_only_the_adapter_input_while_training():
    torch.manual_seed(0)
    dense = nn.Linear(32, 8)
    model = nn.Sequential(copy.deepcopy(dense))
    factorize(model, rank=4, adapter=True, adapter_dropout=0.5)
    layer = model[0]
    with torch.no_grad():
        layer.S.copy_(torch.eye(4))
    x = torch.randn(64, 32)
    model.eval()
    assert torch.equal(model(x), model(x))  # no dropout in eval
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a, b)  # dropout on the adapter's input
    layer.S.data.zero_()
    assert torch.allclose(model(x), dense(x), atol=1e-6)  # the frozen path never sees it
    with pytest.raises(ValueError, match="adapter=True"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank=2, adapter_dropout=0.1)


# ---- activation-aware truncation (factorize(calibration=…)) ---------------------------------------
def _anisotropic(n_samples, dim, generator):
    """Inputs whose directions differ in energy by 10⁴."""
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return torch.randn(n_samples, dim, generator=generator, dtype=torch.float64) * scales


def _closed_form(W, X, r, damping=1e-4):
    """[W L]_r L⁻¹ with L Lᵀ = XᵀX / mean(diag) + damping·I (float64)."""
    C = X.T @ X
    C = C / C.diagonal().mean() + damping * torch.eye(C.shape[0], dtype=C.dtype)
    L = torch.linalg.cholesky(C)
    P, s, Qh = torch.linalg.svd(W @ L)
    return (P[:, :r] * s[:r]) @ Qh[:r] @ torch.linalg.inv(L)


@pytest.mark.parametrize("kind", ["lowrank", "lora"])
def test_calibrated_truncation_of_a_linear_layer_is_the_best_rank_r_map_on_its_inputs(kind):
    g = torch.Generator().manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 9).double())
    X = _anisotropic(300, 12, g)
    plain, calibrated = copy.deepcopy(dense), copy.deepcopy(dense)
    factorize(plain, rank=3, kind=kind)
    factorize(calibrated, rank=3, kind=kind, calibration=[(X[:150], None), (X[150:], None)], calibration_samples=300)
    W = dense[0].weight.detach()
    got = calibrated[0].matrix_weight().detach() if kind == "lowrank" else calibrated[0].A @ calibrated[0].B.T
    assert torch.allclose(got, _closed_form(W, X, 3), atol=1e-10)
    if kind == "lowrank":  # orthonormal factors and a diagonal S, as after a plain truncation
        U, S, V = calibrated[0].factor_parameters()
        eye = torch.eye(3, dtype=torch.float64)
        assert torch.allclose(U.T @ U, eye, atol=1e-12) and torch.allclose(V.T @ V, eye, atol=1e-12)
        assert torch.equal(S, torch.diag(S.diagonal()))
    error = lambda m: (m(X) - dense(X)).norm()  # noqa: E731
    with torch.no_grad():
        assert error(calibrated) < 0.5 * error(plain)


def test_calibration_on_inputs_of_equal_energy_in_every_direction_is_the_plain_truncation():
    dense = nn.Sequential(nn.Linear(16, 20).double())
    X = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64)).Q * 3.0  # XᵀX = 9·I
    plain, calibrated = copy.deepcopy(dense), copy.deepcopy(dense)
    factorize(plain, tau=0.5)
    factorize(calibrated, tau=0.5, calibration=X)
    assert plain[0].rank == calibrated[0].rank < 8
    assert torch.allclose(calibrated[0].matrix_weight(), plain[0].matrix_weight(), atol=1e-12)


@pytest.mark.parametrize("conv_format", ["matrix", "tucker"])
def test_calibrated_truncation_of_a_convolution(conv_format):
    """Matrix format: the best rank-r kernel on the input patches (closed form through unfold);
    Tucker: the HOSVD of the kernel with its input-channel mode whitened by the channels' second
    moment, the input factor orthonormal again."""
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(5, 4, 7, 7, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.3, 0.1, 0.01],
                                                                                 dtype=torch.float64)[:, None, None]
    dense = nn.Sequential(conv)
    calibrated = copy.deepcopy(dense)
    factorize(calibrated, rank=2, calibration=x, conv_format=conv_format)
    W = conv.weight.detach()
    if conv_format == "matrix":
        patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36)
        want = _closed_form(W.reshape(6, 36), patches, 2).reshape(W.shape)
        assert torch.allclose(calibrated[0].weight, want, atol=1e-10)
    else:
        from lrc.layers.tucker import mode_product, unfold

        pixels = x.movedim(1, -1).reshape(-1, 4)
        C = pixels.T @ pixels
        L = torch.linalg.cholesky(C / C.diagonal().mean() + 1e-4 * torch.eye(4, dtype=torch.float64))
        Wl = torch.einsum("oihw,ij->ojhw", W, L)
        Uo = torch.linalg.svd(unfold(Wl, 0))[0][:, :2]
        Ui = torch.linalg.svd(unfold(Wl, 1))[0][:, :2]
        core = mode_product(mode_product(Wl, Uo.T, 0), Ui.T, 1)
        want = mode_product(mode_product(core, Uo, 0), torch.linalg.inv(L).T @ Ui, 1)
        assert torch.allclose(calibrated[0].dense_weight(), want, atol=1e-10)
        U_in = calibrated[0].U_in
        assert torch.allclose(U_in.T @ U_in, torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_calibration_is_refused_for_adapters_and_needs_inputs():
    with pytest.raises(ValueError, match="adapters start at zero"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank=2, adapter=True, calibration=torch.randn(3, 4))
    with pytest.raises(ValueError, match="no input reached"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank=2, calibration=[])


def test_calibration_samples_are_fixed_and_leave_the_random_stream_alone():
    """The same subset for every seed, and drawing it moves no global random state: a run with
    factorize.calibration starts from the head initialisation and dropout masks the same seed
    gives without it (a DataLoader draws its base seed from the global generator unless given one)."""
    from torch.utils.data import TensorDataset

    from lrc.train import calibration_batches

    data = TensorDataset(torch.randn(50, 3), torch.arange(50))
    torch.manual_seed(0)
    batches = calibration_batches(data, 20, batch_size=8)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    torch.manual_seed(1)
    again = calibration_batches(data, 20, batch_size=8)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_calibration_leaves_convolutions_that_are_kept_dense_alone():
    """Self-padding and grouped convolutions are not factorized; their inputs are not gathered
    either (an unfold with the module's own padding attribute would not fit them)."""
    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(3, 16, 5, stride=2), nn.Conv2d(16, 32, 1), SamePadConv(32, 32, 3, groups=32)).to(f64)
    x = torch.randn(4, 3, 4, 4, dtype=f64)  # the first conv's input is smaller than its kernel unpadded
    report = factorize(model, rank=4, calibration=x)
    assert [r.name for r in report.replaced] == ["1"] and {"0", "2"} <= set(dict(report.skipped))
