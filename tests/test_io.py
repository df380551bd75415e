import pytest
import torch
from torch import nn

from lrc import LowRankAdam, factorize
from lrc.io import CheckpointError, atomic_path, head_name, load_model, load_weights, read_metadata, save_model
from lrc.models import build_model


def test_save_and_load_round_trip_with_changed_ranks(tmp_path):
    model = build_model("lenet5")
    factorize(model, rank=8, exclude=["features.0", "classifier.3"])
    model.classifier[1].set_factors(torch.randn(500, 5), torch.randn(5, 5), torch.randn(800, 5))
    path = tmp_path / "m.safetensors"
    save_model(path, model, {"name": "lenet5", "args": {}}, {"test_accuracy": 0.5})
    loaded, meta = load_model(path)
    assert meta["layers"]["classifier.1"] == {"kind": "LowRankLinear", "rank": 5, "adapter": False}
    assert meta["layers"]["features.3"]["kind"] == "LowRankConv2d" and meta["summary"]["test_accuracy"] == 0.5
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    LowRankAdam(loaded)  # trains on


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_plain_state_dict_is_not_an_lrc_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an lrc compressed model"):
        read_metadata(tmp_path / "plain.safetensors")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        build_model("resnet9000")
    assert isinstance(build_model("vgg11", num_classes=10), nn.Module)


def test_new_head_loads_everything_but_the_classifier_of_another_class_count():
    source = build_model("vgg11", num_classes=1000).state_dict()  # stands in for ImageNet weights
    model = build_model("vgg11", num_classes=10)
    with pytest.raises(CheckpointError, match=r"wrong shape: classifier\.6\.weight, classifier\.6\.bias"):
        load_weights(model, source, "imagenet.pth")
    fresh = model.classifier[6].weight.clone()
    load_weights(model, source, "imagenet.pth", new_head=True)
    assert head_name(model) == "classifier.6" and torch.equal(model.classifier[6].weight, fresh)
    assert torch.equal(model.features[0].weight, source["features.0.weight"])
    assert torch.equal(model.classifier[3].weight, source["classifier.3.weight"])
    assert head_name(build_model("vit_small")) == "heads.head"
