from fnmatch import fnmatch

import pytest
import torch
import torchvision

from lrc import compression_ratio, factorize
from lrc.data import DATASETS
from lrc.io import head_name
from lrc.models import build_model
from lrc.presets import DEFAULTS, PRESET_DIR, PresetError, apply_override, list_presets, load_preset, resolve_config


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_shipped_preset_loads_and_shows_its_command(name):
    cfg = load_preset(name)
    assert set(cfg) == set(DEFAULTS)
    first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# lrc train --preset {name}")
    assert list_presets()[name]


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_shipped_preset_names_real_layers_data_and_weights(name):
    # on the meta device: VGG16 and ViT-B/16 are built and factorized without allocating memory
    cfg = load_preset(name)
    with torch.device("meta"):
        model = build_model(cfg["model"]["name"], **cfg["model"]["args"])
    layers = [n for n, _ in model.named_modules() if n]
    for pattern in cfg["factorize"]["exclude"]:
        assert any(fnmatch(n, pattern) for n in layers), f"exclude pattern {pattern!r} matches no layer"
    assert cfg["data"]["name"] in DATASETS
    checkpoint = cfg["model"]["checkpoint"]
    if checkpoint and checkpoint.startswith("torchvision:"):
        torchvision.models.get_weight(checkpoint.split(":", 1)[1])  # a real weights name
    if cfg["model"]["new_head"]:
        assert head_name(model) in cfg["factorize"]["exclude"]
    report = factorize(model, rank=cfg["factorize"]["rank"], tau=None, exclude=cfg["factorize"]["exclude"],
                       conv_format=cfg["factorize"]["conv_format"])
    assert report.replaced and compression_ratio(model) > 50


def test_overrides_parse_yaml_values_and_check_types():
    cfg = load_preset("digits-mlp")
    cfg = apply_override(cfg, "optimizer.lr=3e-4")
    assert cfg["optimizer"]["lr"] == 3e-4
    cfg = apply_override(cfg, "model.args.hidden=[8, 8]")
    assert cfg["model"]["args"]["hidden"] == [8, 8]
    cfg = apply_override(cfg, "train.epochs=2")
    assert cfg["train"]["epochs"] == 2
    with pytest.raises(PresetError, match="wrong type"):
        apply_override(cfg, "train.epochs=two")
    with pytest.raises(PresetError, match="section.key=value"):
        apply_override(cfg, "train.epochs")


def test_config_validation():
    with pytest.raises(PresetError, match="unknown section"):
        resolve_config({"trainer": {}})
    with pytest.raises(PresetError, match="needs factorize.rank or factorize.tau"):
        resolve_config({})
    assert resolve_config({"optimizer": {"method": "dense"}})["optimizer"]["method"] == "dense"
    with pytest.raises(PresetError, match="method"):
        resolve_config({"optimizer": {"method": "pruning"}, "factorize": {"rank": 2}})


def test_match_cr_is_for_lora_only():
    with pytest.raises(PresetError, match="needs optimizer.method=lora"):
        resolve_config({"factorize": {"rank": 2, "match_cr": "runs/x"}})
