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


def test_row_scaled_bases_with_equal_scales_is_the_products_parallel_step(monkeypatch):
    import copy

    from lrc import LowRankAdam, factorize
    from lrc.optim.base import LowRankOptimizer

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 30), torch.nn.ReLU(),
                               torch.nn.Linear(30, 5)).double()
    factorize(base, rank=4)
    x, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))

    def train():
        model = copy.deepcopy(base)
        opt = LowRankAdam(model, lr=1e-2, tau=0.1, mode="parallel", new_block_fraction=1.0)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return list(model.parameters())

    reference = train()
    monkeypatch.setattr(LowRankOptimizer, "_parallel_grads", LowRankOptimizer._parallel_grads)
    monkeypatch.setattr(adapter_probes, "_row_scaled", lambda G, v: G)
    adapter_probes._row_scaled_bases()
    probed = train()
    assert [p.shape for p in probed] == [p.shape for p in reference]
    assert max((p - q).abs().max().item() for p, q in zip(probed, reference)) < 1e-9
