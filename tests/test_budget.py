"""A target compression ratio: one parameter budget over all layers (allocate_ranks), in
factorize, in the optimizers and through the CLI."""

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc import LowRankAdam, LowRankLinear, LowRankSGD, factorize
from lrc.layers import TuckerConv2d
from lrc.linalg import allocate_ranks, factor_parameter_count
from lrc.models import build_model
from lrc.surgery import compression_ratio

from .test_cli import lrc
from .test_optim import weights

f64 = torch.float64


# ---- the allocation ------------------------------------------------------------------------
def _matrix_cost(shapes):
    return lambda i, r: factor_parameter_count(shapes[i], r)


def test_allocation_with_equal_costs_keeps_the_largest_relative_energies():
    """Where every added singular value costs the same, the greedy choice is the exact optimum:
    the k largest relative energies over all layers."""
    torch.manual_seed(0)
    spectra = [[sorted(torch.rand(6).tolist(), reverse=True)] for _ in range(3)]
    per_value = 10
    cost = lambda i, r: per_value * r[0]  # noqa: E731
    for k in range(3, 19):
        ranks = allocate_ranks(spectra, cost, per_value * k, [(1,)] * 3, [(6,)] * 3)
        assert sum(r[0] for r in ranks) == k
        energy = [[s * s / sum(v * v for v in sp[0]) for s in sp[0]] for sp in spectra]
        kept = sorted((e for i, es in enumerate(energy) for e in es[1:]), reverse=True)[: k - 3]
        assert math.isclose(sum(sum(es[: r[0]]) for es, r in zip(energy, ranks)),
                            sum(es[0] for es in energy) + sum(kept))


def test_relative_allocation_is_one_threshold_on_relative_energy_whatever_the_cost():
    """The default rule keeps singular values in the order of their relative energy in their layer:
    at the end, every layer's next value either no longer fits the budget left or has no more
    relative energy than any value kept beyond the floors — also in the expensive layer, which
    the per-parameter rule starves."""
    torch.manual_seed(3)
    shapes = [(500, 800), (50, 500), (40, 60)]
    spectra = [[sorted((torch.rand(30) ** 2).tolist(), reverse=True)] for _ in shapes]
    cost = _matrix_cost(shapes)
    energy = [[v * v / sum(x * x for x in sp[0]) for v in sp[0]] for sp in spectra]
    for budget in (8_000, 20_000, 40_000):
        got = allocate_ranks(spectra, cost, budget, [(1,)] * 3, [(30,)] * 3)
        left = budget - sum(cost(i, r) for i, r in enumerate(got))
        assert left >= 0
        kept = [e for es, r in zip(energy, got) for e in es[1:r[0]]]
        for i, (es, r) in enumerate(zip(energy, got)):
            fits = cost(i, (r[0] + 1,)) - cost(i, r) <= left
            assert not fits or es[r[0]] <= min(kept)
        starved = allocate_ranks(spectra, cost, budget, [(1,)] * 3, [(30,)] * 3, allocation="per-parameter")
        assert got[0][0] >= starved[0][0]  # the 500×800 layer keeps at least as much
    with pytest.raises(ValueError, match="allocation"):
        allocate_ranks(spectra, cost, 8_000, [(1,)] * 3, [(30,)] * 3, allocation="energy")


def test_allocation_is_the_best_of_all_rank_choices_on_a_small_case():
    """Against exhaustive search on two matrices of different shapes: the greedy ranks leave a
    sum of relative errors within the value of one marginal singular value of the optimum, and
    never exceed the budget."""
    torch.manual_seed(1)
    shapes = [(12, 20), (30, 8)]
    spectra = [[sorted((torch.rand(8) ** 3).tolist(), reverse=True)] for _ in shapes]
    cost = _matrix_cost(shapes)

    def error(ranks):
        return sum(sum(s * s for s in sp[0][r[0]:]) / sum(s * s for s in sp[0]) for sp, r in zip(spectra, ranks))

    for budget in (80, 150, 300, 500, 700):
        got = allocate_ranks(spectra, cost, budget, [(1,), (1,)], [(8,), (8,)], allocation="per-parameter")
        assert sum(cost(i, r) for i, r in enumerate(got)) <= budget
        best = min((error([(a,), (b,)]) for a, b in itertools.product(range(1, 9), repeat=2)
                    if cost(0, (a,)) + cost(1, (b,)) <= budget))
        slack = max(s * s / sum(v * v for v in sp[0]) for sp in spectra for s in sp[0])
        assert error(got) <= best + slack


def test_allocation_respects_floors_caps_zeros_and_tucker_costs():
    spectra = [[[3.0, 2.0, 1.0, 0.0]], [[5.0, 4.0, 3.0], [6.0, 1.0, 0.5]]]
    shapes = [(10, 10), (8, 6, 9)]
    cost = lambda i, r: factor_parameter_count(shapes[i], r)  # noqa: E731
    ranks = allocate_ranks(spectra, cost, 10**6, [(1,), (1, 1)], [(4,), (2, 3)])
    assert ranks == [(3,), (2, 3)]  # the zero singular value is never kept; caps hold
    assert allocate_ranks(spectra, cost, cost(0, (2,)) + cost(1, (1, 1)), [(2,), (1, 1)], [(4,), (3, 3)])[0] == (2,)
    with pytest.raises(ValueError, match="below"):
        allocate_ranks(spectra, cost, 10, [(1,), (1, 1)], [(4,), (3, 3)])


def test_parameter_counts():
    assert factor_parameter_count((10, 20), (3,)) == 3 * 30 + 9
    assert factor_parameter_count((10, 20), (3,), "lora") == 3 * 30
    assert factor_parameter_count((8, 6, 9), (2, 3)) == 16 + 18 + 54


# ---- factorize -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", [50.0, 80.0, 90.0, 95.0])
@pytest.mark.parametrize("case", ["lenet-matrix", "lenet-lora", "vgg-tucker"])
def test_factorize_reaches_the_target_cr(case, target):
    name, kw = {"lenet-matrix": ("lenet5", {}), "lenet-lora": ("lenet5", {"kind": "lora"}),
                "vgg-tucker": ("vgg_small", {"conv_format": "tucker"})}[case]
    model = build_model(name, num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    report = factorize(model, target_cr=target, exclude=["features.0"], **kw)
    assert abs(compression_ratio(model) - target) <= 0.5
    assert report.replaced and all(r.params_after < r.params_before for r in report.replaced)
    assert torch.isfinite(model(x)).all()
    if case == "vgg-tucker":
        tucker = [m for m in model.modules() if isinstance(m, TuckerConv2d)]
        assert tucker
        for m in tucker:  # never a rank the core's unfolding cannot hold
            (r_out, r_in), k = m.ranks, m.kernel_size[0] * m.kernel_size[1]
            assert r_out <= r_in * k and r_in <= r_out * k
        opt = LowRankAdam(model, lr=1e-3, target_cr=target)  # and it trains at the target (a crash once)
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        opt.step()
        assert abs(compression_ratio(model) - target) <= 0.5


def test_factorize_target_cr_keeps_more_of_the_layer_with_the_slower_decaying_spectrum():
    """Two equal layers, one with a fast-decaying spectrum: the budget goes to the other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        for layer, decay in zip(model, (0.5, 0.95)):
            P, _ = torch.linalg.qr(torch.randn(64, 64))
            R, _ = torch.linalg.qr(torch.randn(64, 64))
            layer.weight.copy_(P @ torch.diag(decay ** torch.arange(64.0)) @ R.T)
    factorize(model, target_cr=70)
    assert model[1].rank > 2 * model[0].rank
    assert 70 <= compression_ratio(model) <= 70 + 100 * (128 + 2 * 14 + 1) / 8192  # within one component


@pytest.mark.parametrize("kwargs, message", [
    ({"target_cr": 99.99}, "out of reach"),
    ({"target_cr": 0.0}, "in \\(0, 100\\)"),
    ({"target_cr": 90, "tau": 0.1}, "not both"),
    ({"target_cr": 90, "adapter": True}, "adapters"),
])
def test_factorize_target_cr_refuses_what_it_cannot_do(kwargs, message):
    model = build_model("lenet5", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=message):
        factorize(model, exclude=["features.0"], **kwargs)


# ---- the optimizers ------------------------------------------------------------------------
def _mlp(rank=12):
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(32, 64, rank, dtype=f64), nn.ReLU(), LowRankLinear(64, 48, rank, dtype=f64),
                          nn.ReLU(), nn.Linear(48, 5, dtype=f64))
    return model, torch.randn(128, 32, dtype=f64), torch.randint(0, 5, (128,))


def _train(model, opt, x, y, steps=6):
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("mode", ["fused", "two_pass", "parallel"])
def test_the_optimizers_hold_the_target_cr_at_every_step(optimizer, mode):
    model, x, y = _mlp()
    cls = {"adam": LowRankAdam, "sgd": LowRankSGD}[optimizer]
    opt = cls(model, lr=1e-2, mode=mode, target_cr=80)
    for _ in range(4):
        _train(model, opt, x, y, steps=1)
        assert 80 <= compression_ratio(model) <= 80.5 + 100 * (64 + 48 + 1) / 5405  # within one component
    assert torch.isfinite(weights(model)).all()


def test_tucker_layers_hold_the_target_cr():
    torch.manual_seed(0)
    model = nn.Sequential(TuckerConv2d(3, 16, 3, (3, 3), padding=1, dtype=f64), nn.ReLU(),
                          TuckerConv2d(16, 24, 3, (8, 8), dtype=f64), nn.ReLU(), nn.Flatten(),
                          nn.Linear(24 * 6 * 6, 5, dtype=f64))
    x, y = torch.randn(8, 3, 8, 8, dtype=f64), torch.randint(0, 5, (8,))
    opt = LowRankAdam(model, lr=1e-2, target_cr=40)
    _train(model, opt, x, y, steps=3)
    assert 40 <= compression_ratio(model) <= 41.0


@pytest.mark.parametrize("mode", ["fused", "two_pass"])
def test_a_budget_that_does_not_bind_is_the_untruncated_update_in_float64(mode):
    """A target c.r. whose budget holds every layer at its max_rank keeps every non-zero singular
    value, as tau=0 does: the two runs agree to rounding."""
    runs = []
    for kwargs in ({"tau": 0.0}, {"target_cr": 1.0}):
        model, x, y = _mlp(rank=3)
        opt = LowRankAdam(model, lr=1e-2, mode=mode, max_rank=6, **kwargs)
        _train(model, opt, x, y)
        runs.append(model)
    assert [m.rank for m in runs[0] if isinstance(m, LowRankLinear)] == [6, 6]
    assert [m.rank for m in runs[1] if isinstance(m, LowRankLinear)] == [6, 6]
    assert torch.allclose(weights(runs[0]), weights(runs[1]), rtol=0, atol=1e-10)


def test_update_every_truncates_to_the_target_at_the_end_of_each_cycle():
    model, x, y = _mlp()
    opt = LowRankAdam(model, lr=1e-2, target_cr=85, update_every=3)
    _train(model, opt, x, y, steps=3)
    assert 85 <= compression_ratio(model) <= 86.5
    _train(model, opt, x, y, steps=1)  # inside a cycle: augmented
    opt.finish_cycle()
    assert 85 <= compression_ratio(model) <= 86.5


@pytest.mark.parametrize("target, message", [(99.9, "out of reach"), (0, "Invalid target_cr"),
                                             (True, "Invalid target_cr")])
def test_the_optimizer_refuses_a_target_it_cannot_keep(target, message):
    model, _, _ = _mlp()
    with pytest.raises(ValueError, match=message):
        LowRankAdam(model, target_cr=target)


def test_the_optimizer_refuses_target_cr_with_adapters():
    model = nn.Sequential(LowRankLinear.from_linear(nn.Linear(16, 16), rank=2, adapter=True))
    with pytest.raises(ValueError, match="adapter"):
        LowRankAdam(model, target_cr=50)


# ---- the CLI -------------------------------------------------------------------------------
def test_train_target_cr_ends_at_the_target_for_lowrank_and_lora(tmp_path):
    for method in ("lowrank-adam", "lora"):
        out = tmp_path / method
        proc = lrc("train", "--target-cr", "92", "--epochs", "1", "--method", method, "--quiet", "--out", out)
        assert "c.r. 92." in proc.stdout
        final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert 92 <= final["compression_ratio"] <= 92.5


@pytest.mark.parametrize("args, message", [
    (("train", "--target-cr", "100"), "must lie in (0, 100)"),
    (("train", "--target-cr", "99.9"), "out of reach"),
    (("train", "--preset", "lenet5-fashion-mnist-compress", "--set", "factorize.target_cr=90"),
     "both choose the ranks"),
    (("factorize", "--target-cr", "90", "--tau", "0.1"), "give one"),
])
def test_target_cr_bad_input_is_one_line(args, message, tmp_path):
    proc = lrc(*args, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_compare_with_a_target_cr_runs_lora_on_its_own_at_that_cr(tmp_path):
    import csv

    out = tmp_path / "cmp"
    lrc("compare", "--methods", "lora,dlrt-naive", "--target-cr", "91", "--seeds", "1", "--epochs", "1",
        "--quiet", "--out", out)
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"lora", "dlrt-naive"}
    for row in rows.values():
        assert 91 <= float(row["compression_ratio"]) <= 91.5


# ---- lrc sweep -----------------------------------------------------------------------------
def test_sweep_writes_the_table_and_the_pareto_plot_and_resumes(tmp_path):
    from lrc.sweep import pareto_front

    out = tmp_path / "sw"
    args = ("sweep", "--target-crs", "85,95", "--epochs", "1", "--quiet", "--out", out, "--jobs", "2")
    proc = lrc(*args)
    assert "| target c.r. [%] |" in proc.stdout
    rows = {float(r["target_cr"]): r for r in __import__("csv").DictReader((out / "sweep.csv").open())}
    assert set(rows) == {85.0, 95.0}
    for target, row in rows.items():
        final = json.loads((out / "runs" / f"cr{target:g}-s0" / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(row["accuracy_mean"]) == pytest.approx(100 * final["test_accuracy"])
        assert target <= float(row["compression_ratio"]) <= target + 0.5
    assert (out / "pareto.png").stat().st_size > 1000
    again = lrc(*args)
    assert again.stderr.count("done already") == 2
    assert pareto_front([(90, 80), (95, 70), (85, 75), (95, 60)]) == {0, 1}


@pytest.mark.parametrize("args, message", [
    ((), "give one of --taus or --target-crs"),
    (("--taus", "0.1", "--target-crs", "90"), "give one of"),
    (("--taus", "0.1,x"), "'x' is not a number"),
    (("--taus", "1.5"), "must lie in (0, 1)"),
    (("--target-crs", "90,90"), "given twice"),
    (("--taus", "0.1", "--method", "lora"), "has no truncation"),
])
def test_sweep_bad_input_is_one_line(args, message, tmp_path):
    proc = lrc("sweep", *args, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_max_params_bounds_adapters_whose_ranks_a_relative_tau_lets_grow():
    """A fresh adapter (S = 0) under Adam: every direction gets a step of about lr, the spectrum
    is flat, and τ keeps nearly all of it — the ranks grow each step. max_params holds the
    adapters' trainable parameters at the budget."""
    def run(**kwargs):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))
        model = copy.deepcopy(base)
        factorize(model, rank=2, adapter=True, include=["0", "2"])
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in (model[0], model[2]):
            for p in layer.factor_parameters():
                p.requires_grad_(True)
        opt = LowRankAdam(model, lr=1e-2, tau=0.05, **kwargs)
        x, y = torch.randn(64, 48), torch.randint(0, 5, (64,))
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return sum(p.numel() for layer in (model[0], model[2]) for p in layer.factor_parameters())

    free = run()
    budget = 2 * (4 * (48 + 64) + 16)
    assert free > 3 * budget  # τ alone: the adapters grew
    assert run(max_params=budget) <= budget


def test_max_params_refuses_what_cannot_hold():
    model, _, _ = _mlp()
    with pytest.raises(ValueError, match="below"):
        LowRankAdam(model, max_params=10)
    with pytest.raises(ValueError, match="not both"):
        LowRankAdam(model, max_params=10**6, target_cr=50)


@pytest.mark.parametrize("mode", ["fused", "two_pass", "parallel"])
def test_a_tucker_core_with_more_output_ranks_than_its_unfolding_holds_still_trains(mode):
    """r_out = 20 > r_in·kh·kw = 9: the mode gradient keeps the factor's shape (zero columns)."""
    torch.manual_seed(0)
    layer = TuckerConv2d(2, 32, 3, (20, 1), padding=1, dtype=f64)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(32 * 6 * 6, 3, dtype=f64))
    opt = LowRankAdam(model, lr=1e-3, tau=0.05, mode=mode)
    x, y = torch.randn(4, 2, 6, 6, dtype=f64), torch.tensor([0, 1, 2, 0])

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert torch.isfinite(layer.dense_weight()).all()



def test_budget_warmup_schedule_is_cubic_and_ends_at_the_target():
    from lrc.train import _warm_budget

    values = [_warm_budget(1000, 100, s, 10) for s in range(12)]
    assert values[0] < 1000 and values[9] == values[10] == values[11] == 100
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[1] - values[2] > values[7] - values[8]  # fast at first


def test_budget_warmup_starts_at_the_presets_ranks_reaches_the_target_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from lrc.presets import apply_override, load_preset, with_target_cr
    from lrc.train import TrainingStopped, train

    cfg = with_target_cr(apply_override(load_preset("digits-mlp"), "train.epochs=2"), 95, "test")
    cfg = apply_override(cfg, "train.budget_warmup_epochs=1.5")
    full = train(cfg, tmp_path / "full", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["compression_ratio"] < 95  # still above the target after one epoch
    assert 95 <= rows[1]["compression_ratio"] <= 95.5
    with pytest.raises(TrainingStopped):
        train(cfg, tmp_path / "cut", progress=False, max_steps=30)  # inside the warm-up (23 steps per epoch)
    resumed = train({}, tmp_path / "cut", resume=True, progress=False)
    assert resumed.metrics["ranks"] == full.metrics["ranks"]
    a, b = load_file(full.model_path), load_file(resumed.model_path)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
def test_budget_warmup_shrinks_to_max_params_from_the_presets_ranks(tmp_path):
    """AdaLoRA's schedule for a parameter cap (adapters: 12 → 8): the run starts at
    factorize.rank, is still above the cap after the first epoch and within it at the end."""
    from lrc.presets import apply_override, load_preset
    from lrc.train import train

    cfg = apply_override(load_preset("digits-mlp"), "train.epochs=2")
    start = 30 * (64 + 1024) + 30 * (1024 + 1024) + 2 * 30 * 30  # U, S, V at the preset's rank 30
    cap = start // 2
    for override in (f"optimizer.max_params={cap}", "train.budget_warmup_epochs=1.5", "optimizer.tau=0.01"):
        cfg = apply_override(cfg, override)
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = [sum(r * (a + b) + r * r for r, (a, b) in zip(row["ranks"].values(), ((1024, 64), (1024, 1024))))
             for row in rows]
    assert cap < sizes[0] < start and sizes[1] <= cap, sizes
    assert result.metrics["ranks"] == rows[1]["ranks"]
    with pytest.raises(ValueError, match="set --target-cr or optimizer.max_params"):
        train(apply_override(load_preset("digits-mlp"), "train.budget_warmup_epochs=1"), tmp_path / "x",
              progress=False)


def test_budget_warmup_start_cr_starts_at_that_budget_allocated_like_the_target(tmp_path):
    """The warm-up from a c.r.: the start is factorize(target_cr=start) — the same ranks — and the
    run ends at the target."""
    from lrc.models import build_model
    from lrc.presets import PresetError, apply_override, load_preset, with_target_cr
    from lrc.surgery import compression_ratio, factorize
    from lrc.train import build_run, train

    cfg = with_target_cr(apply_override(load_preset("digits-mlp"), "train.epochs=1"), 95, "test")
    cfg = apply_override(apply_override(cfg, "train.budget_warmup_epochs=0.5"), "train.budget_warmup_start_cr=60")
    torch.manual_seed(cfg["train"]["seed"])
    run = build_run(cfg, torch.device("cpu"))
    torch.manual_seed(cfg["train"]["seed"])
    reference = build_model(cfg["model"]["name"], **cfg["model"]["args"])
    factorize(reference, target_cr=60, exclude=cfg["factorize"]["exclude"], include=cfg["factorize"]["include"])
    assert 59.5 <= compression_ratio(run.model) <= 60.5
    assert ({n: m.rank for n, m in run.model.named_modules() if hasattr(m, "rank")}
            == {n: m.rank for n, m in reference.named_modules() if hasattr(m, "rank")})
    assert run.optimizer.budget < sum(p.numel() for layer in run.optimizer.layers for p in layer.factor_parameters())
    result = train(cfg, tmp_path / "run", progress=False)
    assert 95 <= result.metrics["compression_ratio"] <= 95.5
    with pytest.raises(PresetError, match="below the target"):
        apply_override(cfg, "train.budget_warmup_start_cr=97")
    with pytest.raises(ValueError, match="set train.budget_warmup_epochs"):
        build_run(apply_override(cfg, "train.budget_warmup_epochs=0"), torch.device("cpu"))


@pytest.mark.parametrize("conv_format, kind", [("tucker", "lowrank"), ("matrix", "lowrank"), ("matrix", "lora")])
def test_factorize_by_target_cr_takes_one_svd_per_layer_and_builds_what_its_ranks_give(monkeypatch, conv_format,
                                                                                        kind):
    """The budget's SVDs are the ones the layers are built from: the same factors bit for bit as
    factorizing at the chosen ranks, and no singular values taken twice."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.Flatten(),
                             nn.Linear(24 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    calls = []
    svd = torch.linalg.svd
    # (skip_init's meta-device construction computes nothing)
    monkeypatch.setattr(torch.linalg, "svd", lambda A, *a, **k: calls.append(A.device.type != "meta") or svd(A, *a, **k))
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: pytest.fail("singular values taken twice"))
    model = net()
    report = factorize(model, target_cr=60, conv_format=conv_format, kind=kind, exclude=["6"])
    monkeypatch.undo()
    assert sum(calls) == (5 if conv_format == "tucker" else 3)  # one per matrix, two per Tucker core
    ranks = {r.name: r.rank for r in report.replaced}
    reference = net()
    factorize(reference, ranks={k: tuple(v) if isinstance(v, list) else v for k, v in ranks.items()},
              conv_format=conv_format, kind=kind, exclude=["6"])
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k
