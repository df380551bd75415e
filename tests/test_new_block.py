"""``new_block_fraction``: the new-new block of the coefficient gradient estimated from the batch's first rows,
centered on the batch's means — in the fused backward, or in ``mode="parallel"``'s step from rows its backward
kept (float64 references)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lrc import LowRankAdam, LowRankConv2d, LowRankLinear, LowRankSGD
from lrc.layers import TuckerConv2d

from .conftest import preset_with, rel
from .test_optim import convnet, mlp, train, weights
from .test_tucker import tucker_net


def factored_tucker_net():
    """``tucker_net`` with its cores run through the three factor convolutions (``auto`` runs these small ones
    through the dense kernel, whose new-new block needs no batch product and stays exact)."""
    model, x, y = tucker_net()
    for m in model:
        if isinstance(m, TuckerConv2d):
            m.execution = "factored"
    return model, x, y


MAKERS = {"mlp": mlp, "conv": convnet, "tucker": factored_tucker_net}


def layer_batch(model, layer, x, y):
    """The input and the output gradient (of the mean loss over ``(x, y)``) of ``layer``'s dense twin, computed
    by autograd through the dense weight; and that weight's shape and the layer's convolution settings."""
    twin_model = copy.deepcopy(model)
    twin = twin_model[list(model).index(layer)]
    W = (twin.dense_weight() if isinstance(twin, TuckerConv2d) else twin.weight).detach().clone()
    out = x
    for m in twin_model:
        if m is twin:
            inp = out.detach()
            out = (F.linear(inp, W, m.bias) if isinstance(m, LowRankLinear)
                   else F.conv2d(inp, W, m.bias, m.stride, m.padding, m.dilation))
            out.retain_grad()
            seen = out
        else:
            out = m(out)
    F.cross_entropy(out, y).backward()
    return inp, seen.grad, W.shape, twin


def weight_grad(x, g, shape, layer):
    """``Σ_i g_iᵀ x_i`` as the dense weight's gradient: a matrix product, or torch's convolution weight gradient."""
    if isinstance(layer, LowRankLinear):
        return g.reshape(-1, g.shape[-1]).mT @ x.reshape(-1, x.shape[-1])
    return torch.nn.grad.conv2d_weight(x, shape, g, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


@pytest.mark.parametrize("name", MAKERS)
def test_the_new_new_block_is_the_centered_first_rows_estimate_and_the_others_are_exact(name):
    """With 1/4 of the batch: ``G_S``'s old-old and old-new blocks are ``Ûᵀ∇W V̂`` of the whole batch; its
    new-new block is ``Ũᵀ ∇W₄ Ṽ`` with ``∇W₄ = (B/n) Σ_{i<n} (g_i − ḡ)ᵀ(x_i − x̄) + B ḡᵀx̄`` — the first quarter's
    centered estimate plus the batch means' exact term (x, g the dense twin's input and output gradient)."""
    model, x, y = MAKERS[name]()
    opt = LowRankAdam(model, lr=1e-2, new_block_fraction=0.25)
    reference = copy.deepcopy(model)
    F.cross_entropy(model(x), y).backward()
    layers = [m for m in model if isinstance(m, (LowRankLinear, LowRankConv2d, TuckerConv2d))]
    assert layers and opt.new_block_fraction == 0.25
    for layer in layers:
        U, S, V = layer.factor_parameters()
        Ut, Vt, G_S = layer._fused_grads
        r, c, a, b = U.shape[1], V.shape[1], Ut.shape[1], Vt.shape[1]
        assert a and b, "the test needs new directions on both sides"
        Uh, Vh = torch.cat([U, Ut], 1), torch.cat([V, Vt], 1)
        xs, gs, shape, twin = layer_batch(reference, reference[list(model).index(layer)], x, y)
        B, n = x.shape[0], x.shape[0] // 4
        whole = weight_grad(xs, gs, shape, twin)
        x_mean, g_mean = xs.mean(0, keepdim=True), gs.mean(0, keepdim=True)
        estimate = (B / n) * weight_grad(xs[:n] - x_mean, gs[:n] - g_mean, shape, twin) \
            + B * weight_grad(x_mean, g_mean, shape, twin)
        if isinstance(layer, TuckerConv2d):
            from lrc.layers.tucker import mode_product

            def at(D):
                return mode_product(mode_product(D, Uh.mT, 0), Vh.mT, 1)
        else:
            def at(D):
                return Uh.mT @ D.reshape(D.shape[0], -1) @ Vh
        expected = at(whole)
        expected[r:, c:] = at(estimate)[r:, c:]
        assert rel(G_S, expected) < 1e-10
        assert rel(G_S[r:, c:], at(whole)[r:, c:]) > 1e-3  # the estimate is not the whole batch's block
        uncentered = (B / n) * weight_grad(xs[:n], gs[:n], shape, twin)
        assert rel(G_S[r:, c:], at(uncentered)[r:, c:]) > 1e-3  # nor the plain first-rows estimate


# SGD's step is linear in the gradient: the rounding of the old-new blocks (formed from G_K, G_L instead of the
# batch, or after the batched augmentation) stays at 1e-15. Adam's normalises entries whose gradient is at rounding
# level, which lifts it to 1e-10–1e-7 over 8 steps (Tucker cores with Adam: chaotic, their rank choices part at the
# first ulp; SGD covers them).
HALVES = [("mlp", LowRankSGD, {"lr": 0.5}, 1e-12), ("conv", LowRankSGD, {"lr": 0.5}, 1e-12),
          ("tucker", LowRankSGD, {"lr": 0.5}, 1e-12),
          ("mlp", LowRankAdam, {"lr": 5e-2, "lr_scaling": "none"}, 1e-6),
          ("conv", LowRankAdam, {"lr": 5e-2, "lr_scaling": "none"}, 1e-6)]


@pytest.mark.parametrize("name, opt_cls, kw, tol", HALVES)
def test_on_a_batch_of_two_equal_halves_half_the_batch_trains_as_the_exact_step(name, opt_cls, kw, tol):
    """The first half of a batch whose halves are equal gives the whole batch's new-new block: 8 steps with
    ``new_block_fraction=0.5`` are the exact fused step's to rounding, with the same ranks; on a batch of two
    different halves they are not."""
    def runs(double):
        out = []
        for fraction in (1.0, 0.5):
            model, x, y = MAKERS[name]()
            if double:
                half = x.shape[0] // 2
                x, y = torch.cat([x[:half], x[:half]]), torch.cat([y[:half], y[:half]])
            opt = opt_cls(model, tau=0.1, new_block_fraction=fraction, **kw)
            history = train(model, x, y, opt, 8)
            out.append((weights(model), history))
        return out

    (w_exact, h_exact), (w_half, h_half) = runs(double=True)
    assert h_half == h_exact
    assert rel(w_half, w_exact) < tol
    (w_exact, _), (w_half, _) = runs(double=False)
    assert rel(w_half, w_exact) > 100 * tol


def test_the_new_new_products_see_only_the_sampled_rows(monkeypatch):
    """The cost claim: with 1/8 of a batch of 64 the fused backward projects 8 centered input rows and the mean
    row onto ``Ṽ`` (``x Ṽ``), and as many output-gradient rows onto ``Ũ`` — the forward's ``x V`` and the
    backward's ``g U`` see all 64."""
    model, x, y = mlp()
    seen = {"in": [], "out": []}
    layer = model[2]
    project_input, project_output = layer._project_input, layer._project_output
    monkeypatch.setattr(layer, "_project_input", lambda t, V: seen["in"].append(t.shape[0]) or project_input(t, V))
    monkeypatch.setattr(layer, "_project_output", lambda t, U: seen["out"].append(t.shape[0]) or project_output(t, U))
    LowRankAdam(model, lr=1e-2, new_block_fraction=0.125)
    F.cross_entropy(model(x), y).backward()
    assert seen == {"in": [64, 8, 1], "out": [64, 8, 1]}
    seen["in"].clear(), seen["out"].clear()
    LowRankAdam(model, lr=1e-2)  # exact: x Ṽ and g Ũ over the whole batch
    layer.clear_fused_grads()
    F.cross_entropy(model(x), y).backward()
    assert seen == {"in": [64, 64], "out": [64, 64]}


def test_dense_executed_tucker_cores_and_weight_readers_stay_exact():
    """A Tucker core run through its dense kernel has the whole ``∇W`` without a batch product: the fraction
    changes nothing there."""
    out = []
    for fraction in (1.0, 0.25):
        model, x, y = tucker_net()
        for m in model:
            if isinstance(m, TuckerConv2d):
                m.execution = "dense"
        train(model, x, y, LowRankAdam(model, lr=1e-3, lr_scaling="none", new_block_fraction=fraction), 3)
        out.append(weights(model))
    assert rel(out[1], out[0]) < 1e-12


@pytest.mark.parametrize("kwargs, message", [
    ({"new_block_fraction": -0.5}, r"Invalid new_block_fraction: -0.5 \(a share of the batch in \[0, 1\]"),
    ({"new_block_fraction": 1.5}, "Invalid new_block_fraction: 1.5"),
    ({"new_block_fraction": True}, "Invalid new_block_fraction: True"),
    ({"new_block_fraction": "half"}, "Invalid new_block_fraction: 'half'"),
    ({"new_block_fraction": 0.0}, "new_block_fraction=0 drops the new-new block, which is mode='parallel'"),
    ({"new_block_fraction": 0.5, "mode": "two_pass"}, "does not go with mode='two_pass'"),
    ({"new_block_fraction": 1.5, "mode": "parallel"}, "Invalid new_block_fraction: 1.5"),
])
def test_bad_fractions_are_refused_with_the_argument_named(kwargs, message):
    model, _, _ = mlp()
    with pytest.raises(ValueError, match=message):
        LowRankAdam(model, **kwargs)


def test_the_default_is_the_modes_own():
    for mode, expected in (("fused", 1.0), ("two_pass", 1.0), ("parallel", 0.0)):
        model, _, _ = mlp()
        assert LowRankAdam(model, mode=mode).new_block_fraction == expected


@pytest.mark.parametrize("assignments, message", [
    (["optimizer.new_block_fraction=0"], r"optimizer.new_block_fraction = 0 drops the new-new block"),
    (["optimizer.new_block_fraction=2.0"], r"optimizer.new_block_fraction = 2.0 must lie in \[0, 1\]"),
    (["optimizer.mode=two_pass", "optimizer.new_block_fraction=0.5"], "does not go with optimizer.mode: two_pass"),
])
def test_preset_fractions_are_checked(assignments, message):
    from lrc.presets import PresetError

    with pytest.raises(PresetError, match=message):
        preset_with(*assignments)
    assert preset_with("optimizer.new_block_fraction=0.125")["optimizer"]["new_block_fraction"] == 0.125
    cfg = preset_with("optimizer.mode=parallel", "optimizer.new_block_fraction=0")
    assert cfg["optimizer"]["new_block_fraction"] == 0.0


# ---- mode="parallel": the block from rows its backward kept, formed in step() -------------------------------
@pytest.mark.parametrize("name, opt_cls, kw, tol", HALVES)
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_parallel_with_a_fraction_trains_as_fused_with_it(name, opt_cls, kw, tol, fraction):
    """The same ``G_S``, formed after the batched augmentation instead of in the backward: 8 steps of
    ``mode="parallel"`` with ``new_block_fraction`` f are the fused step's with f (with 1: the exact step)."""
    out = []
    for mode in ("fused", "parallel"):
        model, x, y = MAKERS[name]()
        history = train(model, x, y, opt_cls(model, tau=0.1, mode=mode, new_block_fraction=fraction, **kw), 8)
        out.append((weights(model), history))
    assert out[1][1] == out[0][1]
    assert rel(out[1][0], out[0][0]) < tol
    model, x, y = MAKERS[name]()
    train(model, x, y, opt_cls(model, tau=0.1, mode="parallel", **kw), 8)  # without the block: not the same
    assert rel(weights(model), out[0][0]) > 100 * tol


@pytest.mark.parametrize("name", ["mlp", "tucker"])
def test_parallel_with_the_whole_batch_accumulates_to_the_exact_step(name):
    """Two half-batches accumulated with ``new_block_fraction=1`` (each pass keeps its rows) give the exact
    step of the whole batch (two_pass)."""
    out = []
    for mode in ("two_pass", "parallel"):
        model, x, y = MAKERS[name]()
        opt = LowRankSGD(model, lr=0.5, tau=0.1, mode=mode, **({"new_block_fraction": 1.0} if mode == "parallel" else {}))
        half = x.shape[0] // 2

        def halves():
            opt.zero_grad()
            for xs, ys in ((x[:half], y[:half]), (x[half:], y[half:])):
                (0.5 * F.cross_entropy(model(xs), ys)).backward()

        for _ in range(4):
            if mode == "two_pass":
                opt.step(halves)
            else:
                halves(), opt.step()
        out.append(weights(model))
    assert rel(out[1], out[0]) < 1e-12


def test_parallel_kept_block_follows_a_rescaling_of_the_grads():
    """Clipping or unscaling after backward (a scalar on every grad) reaches the kept new-new block too: the
    step equals the one of a loss scaled by that factor."""
    out = []
    for scale_loss in (True, False):
        model, x, y = mlp()
        opt = LowRankSGD(model, lr=0.2, mode="parallel", new_block_fraction=0.5)
        for _ in range(3):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) * (0.5 if scale_loss else 1.0)).backward()
            if not scale_loss:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(0.5)
            opt.step()
        out.append(weights(model))
    assert rel(out[1], out[0]) < 1e-12


def test_parallel_keeps_only_the_sampled_rows_and_only_on_augmenting_steps():
    model, x, y = mlp()
    opt = LowRankAdam(model, lr=1e-2, mode="parallel", new_block_fraction=0.125, basis_every=2)
    F.cross_entropy(model(x), y).backward()
    kept = model[2]._kept  # the centered rows, scaled to the batch, and the batch's mean row
    assert [(t[0].shape[0], t[1].shape[0], t[2]) for t in kept] == [(8, 8, 64 / 8), (1, 1, 64.0)]
    # new tensors, not views that would hold the whole batch's storage until step()
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for item in kept for t in item[:2])
    opt.step()
    assert model[2]._kept == []  # consumed
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # a step inside the cycle moves S alone: nothing kept
    assert model[2]._kept == []
    opt.step()
