import pytest

from lrc.presets import DEFAULTS, PRESET_DIR, PresetError, apply_override, list_presets, load_preset, resolve_config


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_shipped_preset_loads_and_shows_its_command(name):
    cfg = load_preset(name)
    assert set(cfg) == set(DEFAULTS)
    first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# lrc train --preset {name}")
    assert list_presets()[name]


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
