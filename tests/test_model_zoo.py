"""Any model in: torchvision's model kinds (small configurations of the same classes) factorize
with outputs equal at full rank (the adapter form), reach a target c.r., and train a step —
Swin's attention reads ``qkv.weight`` and must still train the factors."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

from lrc import LowRankAdam, compression_ratio, factorize


def _models():
    yield "mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10)
    yield "efficientnet_b0", lambda: torchvision.models.efficientnet_b0(num_classes=10)
    yield "convnext", lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)
    yield "swin", lambda: SwinTransformer([4, 4], 24, [1, 1], [2, 2], [4, 4], num_classes=10)
    yield "resnet", lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                            num_classes=10)


@pytest.mark.parametrize("name, make", list(_models()), ids=[n for n, _ in _models()])
def test_torchvision_kinds_factorize_exactly_reach_a_target_and_train(name, make):
    torch.manual_seed(0)
    model = make().eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():
        want = model(x)
    adapted = copy.deepcopy(model)
    report = factorize(adapted, rank=4, adapter=True)
    assert report.replaced
    assert all(why.startswith("groups=") for _, why in report.skipped), report.skipped  # depthwise only
    with torch.no_grad():
        assert torch.allclose(adapted(x), want, atol=1e-5, rtol=1e-5)
    compressed = copy.deepcopy(model)
    factorize(compressed, target_cr=60)
    assert 60 <= compression_ratio(compressed) <= 60.5
    compressed.train()
    opt = LowRankAdam(compressed, lr=1e-3, target_cr=60)
    before = [p.detach().clone() for layer in opt.layers for p in layer.factor_parameters()]
    F.cross_entropy(compressed(x), y).backward()
    opt.step()
    after = [p.detach() for layer in opt.layers for p in layer.factor_parameters()]
    moved = sum(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(after, before))
    assert moved == len(before)  # every factorized layer stepped (Swin's through layer.weight too)
    assert 60 <= compression_ratio(compressed) <= 60.5
