"""Layers held at a fixed capacity (``capacity=`` of the low-rank optimizers): the active rank masked
on the device, shapes and storage fixed, no host read in ``step()`` — and the same training as the
present step (ranks bounded by the capacity), to 1e-10 in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc import LowRankAdam, LowRankSGD, factorize

CAP = 12
X = torch.randn(256, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randint(0, 5, (256,), generator=torch.Generator().manual_seed(2))


def _model(dtype=torch.float64, last: int = 24, rank: int = 4) -> nn.Module:
    torch.manual_seed(0)
    # every factorized layer can be held at capacity 10 (2·10 ≤ min(n, m)) unless last < 20: then the third
    # cannot and changes shape as before
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 30), nn.ReLU(), nn.Linear(30, last),
                          nn.ReLU(), nn.Linear(last, 5)).to(dtype)
    factorize(model, rank=rank, exclude=["6"])
    return model


def _ranks(opt) -> list[int]:
    return [int(layer.rank_mask.sum()) if layer.rank_mask is not None else layer.rank for layer in opt.layers]


def _train(opt, model, steps: int, start: int = 0, dtype=torch.float64) -> list[list[int]]:
    ranks = []
    for t in range(start, start + steps):
        rows = torch.arange(t * 20 % 200, t * 20 % 200 + 56)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X[rows].to(dtype)), Y[rows])
            loss.backward()
            return loss

        opt.step(closure)
        ranks.append(_ranks(opt))
    return ranks


def _pair(cls=LowRankAdam, last: int = 24, **kw):
    """The present step (ranks bounded by max_rank=10) and the held one (capacity=10), on the same model;
    both with the sync-free augmentation the held layers use (a layer not held then steps alike)."""
    a, b = _model(last=last), _model(last=last)
    present = cls(a, max_rank=CAP, augmentation="sync_free", **kw)
    held = cls(b, capacity=CAP, augmentation="sync_free", **kw)
    return (a, present), (b, held)


def _assert_same(opt_a, opt_b, tol=1e-10):
    for la, lb in zip(opt_a.layers, opt_b.layers):
        assert (la.matrix_weight() - lb.matrix_weight()).abs().max() < tol
        r = la.rank
        for key in opt_a._state_keys:
            assert (opt_a.state[la.S][key] - opt_b.state[lb.S][key][:r, :r]).abs().max() < tol


# rates and tolerances at which the ranks move and stay below the capacity: where a rank is forced down to
# a cap inside a flat spectrum the cut is ill-posed, and any two ways to the same step part by more than rounding
SETTINGS = {"fused": dict(lr=1e-2, tau=0.05), "two_pass": dict(lr=1e-2, tau=0.05), "parallel": dict(lr=3e-2, tau=0.02)}
ADAM = {"dense": {}, "none": dict(lr_scaling="none"), "lora-wd": dict(lr_scaling="lora", weight_decay=0.1)}


@pytest.mark.parametrize("mode", ["fused", "two_pass", "parallel"])
@pytest.mark.parametrize("scaling", list(ADAM))
def test_held_layers_train_as_the_present_step_in_float64(mode, scaling):
    (a, present), (b, held) = _pair(mode=mode, **SETTINGS[mode], **ADAM[scaling])
    ranks_a, ranks_b = _train(present, a, 12), _train(held, b, 12)
    assert ranks_a == ranks_b
    if scaling == "dense":  # the ranks moved (grew and shrank) without a change of shape
        assert len({tuple(r) for r in ranks_a}) > 1 and max(map(max, ranks_a)) < CAP
    assert [layer.S.shape[0] for layer in held.layers] == [CAP] * 3
    held.compact()
    assert [layer.rank for layer in held.layers] == ranks_a[-1]
    _assert_same(present, held)


def test_a_layer_too_small_to_hold_changes_shape_as_before():
    (a, present), (b, held) = _pair(last=12, lr=1e-2, tau=0.05)  # 30→12: 2·10 > 12
    ranks = _train(held, b, 10)
    assert _train(present, a, 10) == ranks and len({tuple(r) for r in ranks}) > 1
    assert held.layers[2].rank_mask is None and held.layers[2].rank == ranks[-1][2]
    held.compact()
    _assert_same(present, held)


def test_layers_that_start_at_the_capacity():
    a, b = _model(rank=CAP), _model(rank=CAP)  # at the capacity from the start: held without padding
    present = LowRankAdam(a, lr=1e-2, tau=0.05, max_rank=CAP, augmentation="sync_free")
    held = LowRankAdam(b, lr=1e-2, tau=0.05, capacity=CAP)
    assert _train(present, a, 6) == _train(held, b, 6)
    assert all(layer.rank_mask is not None for layer in held.layers)
    held.compact()
    _assert_same(present, held)


def test_heavy_ball_and_the_checked_augmentation_too():
    a, b = _model(), _model()
    present = LowRankSGD(a, lr=5e-2, tau=0.05, max_rank=10)  # CholeskyQR2 checked on the host
    held = LowRankSGD(b, lr=5e-2, tau=0.05, capacity=10)
    assert _train(present, a, 10) == _train(held, b, 10)
    held.compact()
    _assert_same(present, held)


@pytest.mark.parametrize("kw", [dict(fixed_ranks=True), dict(rank_every=3), dict(basis_every=3),
                                dict(min_rank=3, tau=0.5)], ids=["fixed", "rank_every", "basis_every", "min_rank"])
def test_rank_rules_hold_with_a_capacity(kw):
    kw = dict(dict(lr=1e-2, tau=0.05), **kw)
    (a, present), (b, held) = _pair(**kw)
    assert _train(present, a, 9) == _train(held, b, 9)
    held.compact()
    _assert_same(present, held)


def test_a_warm_up_that_lets_ranks_only_shrink():
    (a, present), (b, held) = _pair(lr=1e-2, tau=0.05)
    for opt in (present, held):
        for group in opt.param_groups:
            group["grow"] = False
    ranks = _train(held, b, 6)
    assert _train(present, a, 6) == ranks and all(r <= 4 for row in ranks for r in row)
    held.compact()
    _assert_same(present, held)


def test_held_step_keeps_shapes_and_storage_and_reads_nothing(host_reads):
    model = _model(torch.float32)
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, capacity=10, svd_batching="padded")
    held = opt.layers
    _train(opt, model, 1, dtype=torch.float32)  # the first truncation holds the layers at the capacity
    pointers = [(p.data_ptr(), tuple(p.shape)) for layer in held for p in layer.factor_parameters()]
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    for t in range(1, 6):
        rows = torch.arange(t * 20, t * 20 + 56)
        opt.zero_grad()
        F.cross_entropy(model(X[rows].float()), Y[rows]).backward()
        with host_reads(skip=steps) as reads:
            opt.step()
        assert reads == []
        assert [(p.data_ptr(), tuple(p.shape)) for layer in held for p in layer.factor_parameters()] == pointers
    assert {int(layer.rank_mask.sum()) for layer in held} != {10}  # below the capacity: masked columns


def test_compact_then_go_on_equals_going_on():
    (a, present), (b, held) = _pair(lr=1e-2, tau=0.05)
    _train(present, a, 5)
    _train(held, b, 5)
    from lrc import compression_ratio

    before = [layer.matrix_weight() for layer in held.layers]
    cr = compression_ratio(b)  # held: counted at the active ranks, not at the capacity
    assert cr == compression_ratio(a)  # the present step at the same ranks
    held.compact()  # an epoch's end: the real sizes, then held again from the next truncation
    assert compression_ratio(b) == cr
    assert all(layer.rank_mask is None and layer.S.shape[0] == layer.rank for layer in held.layers)
    assert all((w - layer.matrix_weight()).abs().max() < 1e-14 for w, layer in zip(before, held.layers))
    assert _train(present, a, 5, start=5) == _train(held, b, 5, start=5)
    held.compact()
    _assert_same(present, held)


def test_a_held_run_resumes_from_its_state_dicts():
    model = _model()
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, capacity=10)
    _train(opt, model, 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    going_on = _train(opt, model, 4, start=4)
    again = _model()
    again.load_state_dict(saved_model)
    resumed = LowRankAdam(again, lr=1e-2, tau=0.05, capacity=10)
    resumed.load_state_dict(saved_opt)
    assert all(layer.rank_mask is not None for layer in resumed.layers)
    assert _train(resumed, again, 4, start=4) == going_on
    for la, lb in zip(opt.layers, resumed.layers):
        assert (la.matrix_weight() - lb.matrix_weight()).abs().max() < 1e-12


@pytest.mark.parametrize("kw, message", [
    (dict(capacity=0), "Invalid capacity"),
    (dict(capacity=2.5), "Invalid capacity"),
    (dict(capacity=3), "below the rank 4 of layer 0"),
    (dict(capacity=10, update_every=2), "update_every"),
    (dict(capacity=10, project_moments=False), "project_moments"),
    (dict(capacity=10, new_moments="project"), "new_moments"),
    (dict(capacity=10, max_params=5000), "max_params"),
])
def test_capacity_rejects_what_it_cannot_hold(kw, message):
    with pytest.raises(ValueError, match=message):
        LowRankAdam(_model(), **kw)


def test_saving_a_held_model_writes_its_active_columns_only(tmp_path):
    import json

    from safetensors import safe_open

    from lrc.io import save_model

    model = _model()
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, capacity=CAP)
    ranks = _train(opt, model, 4)[-1]
    assert all(layer.S.shape[0] == CAP for layer in opt.layers) and max(ranks) < CAP
    save_model(tmp_path / "m.safetensors", model, {"name": "test"})  # mid-training, without compact()
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        table = json.loads(f.metadata()["layers"])
        for (name, module), r in zip([(n, m) for n, m in model.named_modules() if m in opt.layers], ranks):
            U, S, V = (f.get_tensor(f"{name}.{k}") for k in "USV")
            assert S.shape == (r, r) and U.shape[1] == V.shape[1] == r and table[name]["rank"] == r
            assert (U @ S @ V.T - module.matrix_weight()).abs().max() < 1e-12
    assert all(layer.S.shape[0] == CAP for layer in opt.layers)  # the live model stays held


def _synchronisations(step) -> int:
    """How many times ``step()`` synchronised the CUDA device (torch's sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_held_step_matches_the_cpu_and_waits_once_or_never():
    model = _model()
    cpu = LowRankAdam(model, lr=1e-2, tau=0.05, capacity=CAP)
    ranks = _train(cpu, model, 5)
    gpu_model = _model().cuda()
    gpu = LowRankAdam(gpu_model, lr=1e-2, tau=0.05, capacity=CAP, svd_batching="padded")
    global X, Y
    X, Y = X.cuda(), Y.cuda()
    try:
        assert _train(gpu, gpu_model, 5) == ranks
        for a, b in zip(cpu.layers, gpu.layers):
            assert (a.matrix_weight() - b.matrix_weight().cpu()).abs().max() < 1e-8
        rows = torch.arange(100, 156, device="cuda")
        gpu.zero_grad()
        F.cross_entropy(gpu_model(X[rows]), Y[rows]).backward()
        assert _synchronisations(gpu.step) <= 1  # the one SVD call
        # and with the sync-free augmentation and the subspace truncation at kept ranks: none
        free = LowRankAdam(gpu_model, lr=1e-2, tau=0.05, capacity=CAP, augmentation="sync_free", fixed_ranks=True,
                           truncation="subspace")
        _train(free, gpu_model, 1)
        free.zero_grad()
        F.cross_entropy(gpu_model(X[rows]), Y[rows]).backward()
        assert _synchronisations(free.step) == 0
    finally:
        X, Y = X.cpu(), Y.cpu()


# ---- truncation="subspace": the steps that keep the ranks without an SVD ----------------------------
def test_subspace_truncation_is_the_svds_where_the_step_is_small():
    """Ŝ = diag(σ, 0) + a step far below the gap: two block power iterations give the SVD's truncation
    (the weight to ~1e-9); a step of the gap's size gives another subspace of nearly the same energy."""
    from lrc.linalg import subspace_truncation

    torch.manual_seed(0)
    r = 16
    base = torch.zeros(2, 2 * r, 2 * r, dtype=torch.float64)
    base[:, :r, :r] = torch.diag(torch.logspace(0, -1, r, dtype=torch.float64))
    for scale, tol in ((1e-4, 1e-9), (3e-2, None)):
        S_hat = base + scale * torch.randn(2, 2 * r, 2 * r, dtype=torch.float64)
        P, sigma, Rh = torch.linalg.svd(S_hat)
        best = P[..., :r] @ torch.diag_embed(sigma[..., :r]) @ Rh[..., :r, :]
        P1, S1, R1 = subspace_truncation(S_hat, torch.ones(2, r))
        got = P1 @ S1 @ R1.mT
        assert (P1.mT @ P1 - torch.eye(r, dtype=torch.float64)).abs().max() < 1e-12
        if tol is not None:
            assert (got - best).norm() < tol * best.norm()
        else:  # the truncation error within a few per cent of the optimal one
            assert (S_hat - got).norm() < 1.1 * (S_hat - best).norm()


def test_the_first_subspace_step_is_the_svd_step():
    """Before Adam's moments carry coordinates, a step truncated by subspaces is the SVD's (the weights to
    1e-9 at a small rate). Afterwards the two part slowly: ``S`` is not diagonal after a subspace
    truncation, and Adam's second moment depends on the coordinates it is kept in."""
    out = {}
    for truncation in ("svd", "subspace"):
        model = _model(rank=8)
        opt = LowRankAdam(model, lr=1e-4, tau=0.05, fixed_ranks=True, truncation=truncation)
        _train(opt, model, 1)
        out[truncation] = [layer.matrix_weight() for layer in opt.layers]
    for a, b in zip(out["svd"], out["subspace"]):
        assert (a - b).norm() < 1e-9 * a.norm()


@pytest.mark.parametrize("held", [False, True])
def test_subspace_truncation_calls_no_svd_between_rank_choices(monkeypatch, held):
    import lrc.optim.base as base

    calls = []
    original = base.sign_fixed_svd
    monkeypatch.setattr(base, "sign_fixed_svd", lambda A: calls.append(A.shape) or original(A))
    model = _model()
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, rank_every=3, truncation="subspace",
                      capacity=CAP if held else None, augmentation="sync_free")
    ranks = []
    for t in range(6):
        calls.clear()
        ranks += _train(opt, model, 1, start=t)
        assert bool(calls) == (t % 3 == 0), t  # the SVD only where the ranks are chosen
    assert ranks[1] == ranks[2] and ranks[4] == ranks[5]
    for layer in opt.layers:  # the bases stay orthonormal through the steps without an SVD
        U = layer.U[:, : layer.active_rank]
        assert (U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max() < 1e-12


def test_a_held_subspace_step_neither_reads_nor_calls_an_svd(host_reads):
    """capacity + the sync-free augmentation + truncation="subspace" at kept ranks: no host read and no SVD
    in step() (what a CUDA graph needs; on a GPU the SVD call is the wait that remains otherwise)."""
    model = _model(torch.float32)
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, capacity=CAP, augmentation="sync_free", fixed_ranks=True,
                      truncation="subspace")
    _train(opt, model, 1, dtype=torch.float32)
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    for t in range(1, 4):
        rows = torch.arange(t * 20, t * 20 + 56)
        opt.zero_grad()
        with host_reads(skip=steps, svd=True) as seen:  # the fused backward forms the augmentation: count it too
            F.cross_entropy(model(X[rows].float()), Y[rows]).backward()
            opt.step()
        assert seen == [], seen
    assert all(layer.rank_mask is not None for layer in opt.layers)


def test_subspace_truncation_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="Invalid truncation"):
        LowRankAdam(_model(), truncation="eigh")
    with pytest.raises(ValueError, match="update_every"):
        LowRankAdam(_model(), truncation="subspace", update_every=2)
    with pytest.raises(ValueError, match="new_moments"):
        LowRankAdam(_model(), truncation="subspace", new_moments="project")


def test_matrix_convolutions_are_held_too():
    from .test_optim import convnet, train, weights

    out = {}
    for kw in (dict(max_rank=6, augmentation="sync_free"), dict(capacity=6)):
        model, x, y = convnet(4)  # LowRankConv2d 3→12 and 12→16, 3×3: both hold 6 columns (2·6 ≤ 12)
        opt = LowRankAdam(model, lr=5e-3, tau=0.1, second_moment="squared", **kw)
        train(model, x, y, opt, 8)
        if "capacity" in kw:
            assert all(layer.rank_mask is not None and layer.S.shape[0] == 6 for layer in opt.layers)
        out[len(out)] = weights(model)
    assert (out[0] - out[1]).abs().max() < 1e-9  # the ranks sit at the cap: its cut amplifies rounding a little


@pytest.mark.parametrize("kw", [{}, dict(augmentation="sync_free", fixed_ranks=True, truncation="subspace")],
                         ids=["svd", "subspace"])
def test_held_layers_train_under_bf16_autocast(kw):
    model = _model(torch.float32)
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, capacity=CAP, **kw)
    for t in range(5):
        rows = torch.arange(t * 20, t * 20 + 56)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(X[rows].float()), Y[rows])
        loss.backward()
        opt.step()
    for layer in opt.layers:  # the factors stay float32, held, orthonormal on their active columns
        assert layer.U.dtype == torch.float32 and layer.S.shape[0] == CAP and torch.isfinite(layer.U).all()
        U = layer.U[:, : layer.active_rank]
        assert (U.T @ U - torch.eye(U.shape[1])).abs().max() < 1e-5
