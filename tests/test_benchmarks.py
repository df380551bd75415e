"""The diagnostic scripts under benchmarks/ that patch the product (they must follow its changes)."""

import sys
from pathlib import Path

import pytest
import torch

import lrc.train as lrc_train
from lrc.presets import load_preset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import adapter_probes  # noqa: E402


def test_head_lr_scale_gives_the_non_factor_parameters_their_own_learning_rate(monkeypatch):
    monkeypatch.setattr(lrc_train, "build_run", lrc_train.build_run)  # undone after the test
    adapter_probes._scale_head_lr(3.0)
    cfg = load_preset("digits-mlp")
    run = lrc_train.build_run(cfg, torch.device("cpu"))
    factors, others = run.optimizer.param_groups
    assert factors["lr"] == cfg["optimizer"]["lr"] and others["lr"] == pytest.approx(3 * cfg["optimizer"]["lr"])
    assert {id(p) for p in others["params"]} == {id(p) for n, p in run.model.named_parameters()
                                                 if n.endswith("bias") or n.startswith("5.")}  # the dense head


def test_adapter_probes_refuses_a_scale_that_is_not_positive():
    with pytest.raises(SystemExit):
        adapter_probes.main(["--head-lr-scale", "0", "--", "--epochs", "1"])
