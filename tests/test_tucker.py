"""TuckerConv2d: the layer itself (outputs, HOSVD initialisation, parameter counts)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc.layers import TuckerConv2d
from lrc.layers.tucker import mode_product, unfold
from lrc.linalg import sign_fixed_svd

from .conftest import rel
from .test_optim import train, weights

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


def test_tau_takes_one_svd_per_mode_and_equals_the_hosvd_at_those_ranks(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(10, 12, 3, dtype=torch.float64)
    layer = TuckerConv2d.from_conv(conv, tau=0.3)
    reference = TuckerConv2d.from_conv(conv, ranks=layer.ranks)  # the rank given: its own SVDs
    for a, b in zip(layer.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    W = conv.weight.detach()
    for mode, P in ((0, layer.U_out), (1, layer.U_in)):  # the leading left singular vectors, signs fixed
        P_ref = sign_fixed_svd(unfold(W, mode))[0][:, :P.shape[1]]
        assert (P - P_ref).abs().max() < 1e-12
    calls = []
    svd = torch.linalg.svd
    # (skip_init's meta-device construction computes nothing)
    monkeypatch.setattr(torch.linalg, "svd", lambda A, *a, **k: calls.append(A.device.type != "meta") or svd(A, *a, **k))
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: pytest.fail("a second SVD for the rank"))
    TuckerConv2d.from_conv(conv, tau=0.3)
    assert sum(calls) == 2  # one per channel mode


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


def _executed(model, execution):
    for m in model.modules():
        if isinstance(m, TuckerConv2d):
            m.execution = execution
    return model


@pytest.mark.parametrize("execution", ["auto", "factored", "dense"])
def test_gradients_follow_the_k_l_s_convention(execution):
    """Through the factors or through the dense kernel ("auto" takes it for this layer): ∇x and
    the factor gradients of the module's convention, in float64."""
    torch.manual_seed(0)
    layer = _executed(TuckerConv2d(5, 7, 3, ranks=(3, 2), stride=2, padding=1, dtype=f64), execution)
    assert layer.runs_dense() == (execution != "factored")
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


def tucker_run(mode, steps, opt_cls, nudge=0.0, check=None, **kw):
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
    return weights(model), history


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


def test_auto_execution_runs_dense_where_the_ranks_keep_a_quarter_of_the_channels():
    assert TuckerConv2d(16, 16, 3, ranks=(4, 4)).runs_dense()  # 16·16 = 256 ≥ 256
    assert not TuckerConv2d(16, 16, 3, ranks=(4, 3)).runs_dense()
    assert not _executed(TuckerConv2d(16, 16, 3, ranks=(16, 16)), "factored").runs_dense()
    assert _executed(TuckerConv2d(64, 64, 3, ranks=(2, 2)), "dense").runs_dense()
    with pytest.raises(ValueError, match="execution must be one of auto, factored, dense, got 'Dense'"):
        TuckerConv2d(16, 16, 3, ranks=(4, 4)).execution = "Dense"


def test_the_preset_key_sets_how_every_tucker_layer_runs():
    from lrc.presets import PresetError, apply_override, load_preset
    from lrc.train import build_run

    cfg = apply_override(load_preset("lenet5-fashion-mnist"), "factorize.conv_format=tucker")
    for execution in ("auto", "factored", "dense"):
        model = build_run(apply_override(cfg, f"factorize.execution={execution}"), torch.device("cpu")).model
        layers = [m for m in model.modules() if isinstance(m, TuckerConv2d)]
        assert layers and all(m.execution == execution for m in layers)
    with pytest.raises(PresetError, match="factorize.execution 'fast': choose one of auto, factored, dense"):
        apply_override(cfg, "factorize.execution=fast")


@pytest.mark.parametrize("mode", ["fused", "two_pass", "parallel"])
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_dense_execution_trains_as_the_factored_one(mode, opt_name):
    """20 steps with moving ranks: the dense-kernel path equals the three-convolution path to
    1e-10 in float64, in every mode (parallel: two half-batches accumulated per step)."""
    from lrc import LowRankAdam, LowRankSGD

    cls, kw = (LowRankAdam, {"lr": 5e-2}) if opt_name == "adam" else (LowRankSGD, {"lr": 1.0})
    results = {}
    for execution in ("factored", "dense"):
        model, x, y = tucker_net()
        _executed(model, execution)
        opt = cls(model, mode=mode, tau=0.15, **kw)
        history = []

        def closure():
            opt.zero_grad()
            for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])) if mode == "parallel" else ((x, y),):
                (F.cross_entropy(model(xs), ys) * len(ys) / len(y)).backward()

        for _ in range(20):
            if mode == "two_pass":
                opt.step(closure)
            else:
                closure()
                opt.step()
            history.append([m.rank for m in model if isinstance(m, TuckerConv2d)])
        results[execution] = weights(model), history
    assert results["dense"][1] == results["factored"][1]
    assert len({str(h) for h in results["dense"][1]}) > 1, "the ranks should move in this test"
    assert rel(results["dense"][0], results["factored"][0]) < 1e-10


def test_tucker_state_dict_round_trip_across_rank_changes(tmp_path):
    from lrc import LowRankAdam

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
    assert rel(weights(fresh), weights(model)) < 1e-10  # BLAS may round another allocation differently


def test_tucker_parallel_mode_accumulates_and_differs_from_the_exact_step():
    """Two half-batches accumulated give the whole batch's step; dropping the new-new block
    is a real difference from two_pass."""
    import copy

    from lrc import LowRankAdam

    a, x, y = tucker_net()
    b = copy.deepcopy(a)
    oa, ob = LowRankAdam(a, lr=5e-2, mode="parallel"), LowRankAdam(b, lr=5e-2, mode="parallel")
    for _ in range(4):
        oa.zero_grad()
        F.cross_entropy(a(x), y).backward()
        oa.step()
        ob.zero_grad()
        for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])):
            (0.5 * F.cross_entropy(b(xs), ys)).backward()
        ob.step()
    assert rel(weights(b), weights(a)) < 1e-10
    exact, _ = tucker_run("two_pass", 4, LowRankAdam, lr=5e-2)
    assert rel(weights(a), exact) > 1e-4


# ---- surgery, files, the command line --------------------------------------------------------
def test_factorize_tucker_format_counts_and_densify():
    from lrc import compression_ratio, densify, factorize
    from lrc.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5").double()
    dense = sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 1, 28, 28, dtype=f64)
    report = factorize(model, rank=8, exclude=["features.0", "classifier.3"], conv_format="tucker")
    layer = model.features[3]
    assert isinstance(layer, TuckerConv2d) and layer.ranks == (8, 8) and "8×8" in str(report)
    assert isinstance(model.classifier[1], nn.Module) and not isinstance(model.classifier[1], TuckerConv2d)
    after = sum(p.numel() for p in model.parameters())
    assert report.replaced[0].params_after == 50 * 8 + 20 * 8 + 8 * 8 * 25 + 50
    assert compression_ratio(model) == pytest.approx(100 * (1 - after / dense))
    y = model(x)
    assert rel(densify(model)(x), y) < 1e-12 and isinstance(model.features[3], nn.Conv2d)
    with pytest.raises(ValueError, match="conv_format must be one of matrix, tucker"):
        factorize(build_model("lenet5"), rank=4, conv_format="cp")


def test_tucker_model_file_round_trip_with_changed_ranks(tmp_path):
    from lrc import factorize
    from lrc.io import load_model, save_model
    from lrc.models import build_model

    model = build_model("lenet5")
    factorize(model, rank=8, exclude=["features.0", "classifier.3"], conv_format="tucker")
    layer = model.features[3]
    layer.set_factors(torch.linalg.qr(torch.randn(50, 5)).Q, torch.randn(5, 3, 5, 5), torch.linalg.qr(torch.randn(20, 3)).Q)
    save_model(tmp_path / "m.safetensors", model, {"name": "lenet5", "args": {}}, {})
    loaded, meta = load_model(tmp_path / "m.safetensors")
    assert meta["layers"]["features.3"] == {"kind": "TuckerConv2d", "rank": [5, 3], "adapter": False}
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x)) and loaded.features[3].ranks == (5, 3)


def test_lrc_trains_a_tucker_model_end_to_end(tmp_path):
    import json

    import numpy as np

    from .test_cli import lrc
    from .test_data_models import write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    out = tmp_path / "run"
    lrc("train", "--preset", "lenet5-fashion-mnist", "--conv-format", "tucker", "--data-dir", tmp_path, "--epochs", "2",
        "--quiet", "--out", out, "--set", "data.batch_size=16")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    r_out, r_in = last["ranks"]["features.3"]
    assert 1 <= r_out <= 36 and 1 <= r_in <= 20  # augmented at most to twice 18, capped at 20 input channels
    info = lrc("info", out / "model.safetensors").stdout
    assert "TuckerConv2d" in info
    ev = json.loads(lrc("evaluate", out / "model.safetensors", "--json", "--data-dir", tmp_path, "--device", "cpu").stdout)
    assert ev["ranks"]["features.3"] == [r_out, r_in] and ev["compression_ratio"] == pytest.approx(last["compression_ratio"])
    kernel = 5 * 5
    conv_macs = 12 * 12 * 20 * r_in + 8 * 8 * (r_out * r_in * kernel + r_out * 50)  # lenet5: 12×12 in, 8×8 out
    assert ev["flops_per_sample"] > 2 * conv_macs


@pytest.mark.parametrize("mode", ["fused", "two_pass", "parallel"])
def test_bf16_autocast_trains_tucker_layers_with_float32_factors(mode):
    """The dtype handling of the bf16 path (tested here on the CPU; CUDA takes the same code)."""
    from lrc import LowRankAdam

    model, x, y = tucker_net()
    model, x = model.float(), x.float()
    opt = LowRankAdam(model, lr=1e-2, mode=mode)
    losses = []

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(8):
        losses.append(opt.step(closure).item())
    assert losses[-1] < losses[0]
    for layer in opt.layers:
        assert layer.U.dtype == layer.core.dtype == torch.float32
        for U in (layer.U_out, layer.U_in):
            assert torch.allclose(U.mT @ U, torch.eye(U.shape[1]), atol=1e-5)
