"""``capturable=True``: the step that keeps the ranks, with its counters and ``lr`` on the device, reads nothing,
keeps every tensor's storage, compiles whole (one graph, no recompilation) and replays in a CUDA graph — and
trains as the eager step does, to 1e-10 in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrc import LowRankAdam, LowRankSGD, factorize

X = torch.randn(256, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randint(0, 5, (256,), generator=torch.Generator().manual_seed(2))
HOLD = dict(capacity=10, augmentation="sync_free", truncation="subspace")


def _model(dtype=torch.float64, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 30), nn.ReLU(), nn.Linear(30, 24),
                          nn.ReLU(), nn.Linear(24, 5)).to(dtype)
    factorize(model, rank=4, exclude=["6"])
    return model.to(device)


def _backward(model, t: int, dtype=torch.float64) -> None:
    rows = torch.arange(t * 20 % 200, t * 20 % 200 + 56, device=X.device)
    F.cross_entropy(model(X[rows].to(dtype)), Y[rows]).backward()


def _run(model, opt, sched, steps: range, step=None, dtype=torch.float64) -> None:
    for t in steps:
        if t == 2:
            opt.fixed_ranks = True  # the first two steps choose ranks (eagerly); then the ranks are kept
        opt.zero_grad()
        _backward(model, t, dtype)
        (step or opt.step)()
        sched.step()


def _pair(cls, **kw):
    runs = []
    for capturable in (False, True):
        model = _model()
        opt = cls(model, lr=1e-2, **HOLD, capturable=capturable, **kw)
        runs.append((model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))))
    return runs


def _assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-10) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() < tol, name


@pytest.mark.parametrize("cls, kw", [
    (LowRankAdam, dict(tau=0.05, weight_decay=0.1)),
    (LowRankAdam, dict(tau=0.05, mode="parallel", lr_scaling="lora", new_moments="second")),
    (LowRankAdam, dict(tau=0.05, lr_scaling="none", coefficient_metric="balanced")),
    (LowRankSGD, dict(tau=0.05, weight_decay=0.1, nesterov=True)),
    (LowRankAdam, dict(tau=0.05, mode="parallel", new_block_fraction=0.5)),
    (LowRankAdam, dict(tau=0.05, new_block_fraction=0.5)),
], ids=["adamw", "parallel-lora-second", "paper-balanced", "heavy-ball", "parallel-new-block", "fused-new-block"])
def test_capturable_step_trains_as_the_eager_one_in_float64(cls, kw):
    (a, opt_a, sched_a), (b, opt_b, sched_b) = _pair(cls, **kw)
    _run(a, opt_a, sched_a, range(8))
    _run(b, opt_b, sched_b, range(8))
    _assert_same(a, b)
    assert [int(layer.rank_mask.sum()) for layer in opt_b.layers] == [int(la.rank_mask.sum()) for la in opt_a.layers]
    lr = opt_b.param_groups[0]["lr"]  # a tensor the scheduler updated in place
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64 and float(lr) == opt_a.param_groups[0]["lr"]


@pytest.mark.parametrize("mode, fraction", [("fused", None), ("parallel", None), ("parallel", 0.5)])
def test_a_kept_step_reads_nothing_and_keeps_every_tensor_in_place(host_reads, mode, fraction):
    """What a CUDA graph's replay needs: no host read (the step counters' included: they live on the
    device), no SVD, and the same storage for everything the step reads or writes."""
    model = _model(torch.float32)
    opt = LowRankAdam(model, lr=1e-2, tau=0.05, **HOLD, capturable=True, mode=mode, new_block_fraction=fraction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)
    _run(model, opt, sched, range(3), dtype=torch.float32)

    def storage():
        out = [p.data_ptr() for p in model.parameters()]
        out += [v.data_ptr() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        out += [g["lr"].data_ptr() for g in opt.param_groups] + [layer.rank_mask.data_ptr() for layer in opt.layers]
        return out + [d.data_ptr() for d in opt._diagnostics.values()]

    before = storage()
    for t in range(3, 6):
        opt.zero_grad()
        with host_reads(svd=True) as seen:  # the fused backward forms the augmentation: count it too
            _backward(model, t, torch.float32)
            opt.step()
        sched.step()
        assert seen == [], seen
        assert storage() == before
    assert all(isinstance(s["step"], torch.Tensor) and s["step"].item() == 6 for s in opt.state.values())


@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(mode="parallel", new_block_fraction=0.5)],
                         ids=["fused", "parallel-new-block"])
def test_the_step_compiles_whole_once_and_trains_as_the_eager_one(kw):
    (a, opt_a, sched_a), (b, opt_b, sched_b) = _pair(LowRankAdam, tau=0.05, **kw)
    _run(a, opt_a, sched_a, range(8))
    _run(b, opt_b, sched_b, range(3))
    torch._dynamo.reset()
    # the scheduler wraps the bound opt.step (in a file dynamo skips): compile the class's step
    compiled = torch.compile(lambda: type(opt_b).step(opt_b), fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):  # a count or lr guarded as a constant would
        _run(b, opt_b, sched_b, range(3, 8), step=compiled)
    _assert_same(a, b)


def test_a_capturable_run_resumes_from_state_dicts_with_or_without_it():
    (a, opt_a, sched_a), (b, opt_b, sched_b) = _pair(LowRankAdam, tau=0.05)
    _run(a, opt_a, sched_a, range(8))
    _run(b, opt_b, sched_b, range(5))
    for saved_by in (opt_a, opt_b):  # a state saved by the eager step (counters on the CPU) loads too
        if saved_by is opt_a:  # the eager run at step 5, rebuilt
            a5 = _model()
            opt_a5 = LowRankAdam(a5, lr=1e-2, tau=0.05, **HOLD)
            sched_a5 = torch.optim.lr_scheduler.LambdaLR(opt_a5, lambda t: 1.0 / (1.0 + t))
            _run(a5, opt_a5, sched_a5, range(5))
            model_state, opt_state, sched_state = a5.state_dict(), opt_a5.state_dict(), sched_a5.state_dict()
        else:
            model_state, opt_state, sched_state = b.state_dict(), opt_b.state_dict(), sched_b.state_dict()
        c = _model()
        c.load_state_dict(model_state)  # the layers at their capacity's shapes, then the optimizer
        opt_c = LowRankAdam(c, lr=1e-2, tau=0.05, **HOLD, capturable=True, fixed_ranks=True)
        sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda t: 1.0 / (1.0 + t))
        opt_c.load_state_dict(copy.deepcopy(opt_state))
        sched_c.load_state_dict(sched_state)
        assert all(isinstance(s["step"], torch.Tensor) for s in opt_c.state.values())
        assert isinstance(opt_c.param_groups[0]["lr"], torch.Tensor)
        _run(c, opt_c, sched_c, range(5, 8))
        _assert_same(a, c)


@pytest.mark.parametrize("kw, message", [
    (dict(capacity=None), "needs capacity=C"),
    (dict(augmentation="auto"), "augmentation='sync_free'"),
    (dict(truncation="svd"), "truncation='subspace'"),
    (dict(mode="two_pass"), "mode='two_pass'"),
    (dict(basis_every=2), "update_every or basis_every"),
    (dict(capacity=13), "every factorized layer held"),  # 2·13 > 24: the third layer cannot be held
])
def test_capturable_rejects_what_it_cannot_capture(kw, message):
    with pytest.raises(ValueError, match=message):
        LowRankAdam(_model(), **{**HOLD, **kw}, capturable=True)


def test_a_tensor_lr_needs_capturable():
    with pytest.raises(ValueError, match="lr as a tensor needs capturable=True"):
        LowRankAdam(_model(), lr=torch.tensor(1e-3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fused", "parallel"])
def test_cuda_graph_of_the_whole_step_replays_the_eager_training(mode):
    """Forward, backward and ``step()`` captured in one CUDA graph after eager warm-up steps (on a side
    stream, as torch's docs on whole-network capture do), replayed on new batches copied into its input:
    the same training as the eager steps, with a schedule's lr, and no synchronisation in a replay."""
    global X, Y
    X, Y = X.cuda(), Y.cuda()
    try:
        runs = []
        for captured in (False, True):
            model = _model(device="cuda")
            opt = LowRankAdam(model, lr=1e-2, tau=0.05, weight_decay=0.1, **HOLD, capturable=True, mode=mode)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _run(model, opt, sched, range(3))
            torch.cuda.current_stream().wait_stream(side)
            if not captured:
                _run(model, opt, sched, range(3, 8))
            else:
                rows = torch.arange(0, 56, device="cuda")
                x, y = X[rows].clone(), Y[rows].clone()
                graph = torch.cuda.CUDAGraph()
                opt.zero_grad(set_to_none=True)
                with torch.cuda.graph(graph):
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                for t in range(3, 8):
                    rows = torch.arange(t * 20 % 200, t * 20 % 200 + 56, device="cuda")
                    x.copy_(X[rows])
                    y.copy_(Y[rows])
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        graph.replay()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                    sched.step()
            runs.append(model)
        torch.cuda.synchronize()
        _assert_same(*runs, tol=1e-9)
    finally:
        X, Y = X.cpu(), Y.cpu()
