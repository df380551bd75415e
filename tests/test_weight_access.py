"""Model code that reads ``layer.weight`` of a factorized layer (torchvision's Swin calls
``F.linear(x, qkv.weight)``): the computed weight trains the factors exactly as the layer's own
forward does, in every mode, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc import LowRankAdam, LowRankConv2d, LowRankLinear, LowRankSGD
from lrc.layers import LoRALinear, TuckerConv2d

from .conftest import rel

f64 = torch.float64


def weights(model):
    """Every layer's effective weight and bias, flat (the wrapped layer included)."""
    layers = [m for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv2d, nn.Linear))]
    return torch.cat([torch.cat([m.dense_weight().flatten() if hasattr(m, "dense_weight") else m.weight.flatten(),
                                 m.bias.flatten()]).detach() for m in layers])


class ReadsWeight(nn.Module):
    """Calls the functional op on ``inner.weight`` and ``inner.bias`` instead of ``inner(x)``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if isinstance(self.inner, LowRankConv2d):
            return F.conv2d(x, self.inner.weight, self.inner.bias, self.inner.stride, self.inner.padding)
        return F.linear(x, self.inner.weight, self.inner.bias)


def _pair(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(LowRankLinear(10, 24, 4, dtype=f64), nn.Tanh(), LowRankLinear(24, 16, 5, dtype=f64),
                              nn.Tanh(), nn.Linear(16, 3, dtype=f64))
        x = torch.randn(32, 10, dtype=f64)
    else:
        model = nn.Sequential(LowRankConv2d(3, 8, 3, 2, padding=1, dtype=f64), nn.Tanh(),
                              LowRankConv2d(8, 12, 3, 3, padding=1, dtype=f64), nn.Tanh(), nn.Flatten(),
                              nn.Linear(12 * 6 * 6, 3, dtype=f64))
        x = torch.randn(8, 3, 6, 6, dtype=f64)
    reading = copy.deepcopy(model)
    reading[2] = ReadsWeight(reading[2])
    return model, reading, x, torch.randint(0, 3, (len(x),))


# heavy ball is linear in the gradients: equal to rounding; Adam divides small entries of G_S by
# their own size and so amplifies the rounding of a different summation order (see test_optim)
@pytest.mark.parametrize("optimizer, steps, tol", [("sgd", 5, 1e-12), ("adam", 1, 1e-9), ("adam", 5, 1e-7)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["fused", "two_pass", "parallel"])
def test_training_through_layer_weight_equals_training_through_the_layer(kind, mode, optimizer, steps, tol):
    model, reading, x, y = _pair(kind)
    for net in (model, reading):
        opt = (LowRankAdam(net, lr=3e-2, tau=0.05, mode=mode) if optimizer == "adam"
               else LowRankSGD(net, lr=0.1, tau=0.05, mode=mode))
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    assert [m.rank for m in model.modules() if isinstance(m, LowRankLinear | LowRankConv2d)] == \
        [m.rank for m in reading.modules() if isinstance(m, LowRankLinear | LowRankConv2d)]
    assert rel(weights(reading), weights(model)) < tol


def test_weight_has_the_dense_layers_shape_and_value():
    lin = LowRankLinear(6, 4, 2, dtype=f64)
    conv = LowRankConv2d(3, 5, (3, 2), 2, dtype=f64)
    lora = LoRALinear(6, 4, 2, dtype=f64)
    assert lin.weight.shape == (4, 6) and torch.equal(lin.weight, lin.dense_weight())
    assert conv.weight.shape == (5, 3, 3, 2) and torch.allclose(conv.weight, conv.dense_weight())
    assert lora.weight.shape == (4, 6) and torch.allclose(lora.weight, lora.matrix_weight())


def test_tucker_layers_have_no_weight_attribute():
    """A Tucker layer's optimizer needs its own forward; model code that reads ``.weight`` should
    use the matrix format, and ``hasattr(layer, "weight")`` stays a plain False."""
    assert not hasattr(TuckerConv2d(3, 5, 3, (2, 2), dtype=f64), "weight")

