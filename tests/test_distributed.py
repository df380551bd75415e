"""Data parallelism on the CPU: two Gloo processes with batch b each = one process with 2b."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lrc import LowRankAdam, LowRankSGD

from .conftest import rel
from .test_optim import convnet, mlp, train, weights
from .test_tucker import tucker_net

MODELS = {"mlp": mlp, "conv": convnet, "tucker": lambda r: tucker_net((r, r))}
CASES = [  # name, rank, optimizer, kwargs (configurations whose rounding floor is far below 1e-5)
    ("mlp", 8, "adam", {"lr": 5e-2, "second_moment": "squared"}),
    ("conv", 4, "adam", {"lr": 5e-2, "second_moment": "squared"}),
    ("tucker", 3, "adam", {"lr": 5e-2, "second_moment": "squared"}),
    ("mlp", 20, "adam", {"lr": 1e-3}),
    ("mlp", 20, "sgd", {"lr": 0.2}),
    ("mlp", 8, "adam", {"lr": 5e-2, "second_moment": "squared", "update_every": 3}),
    ("tucker", 3, "adam", {"lr": 5e-2, "second_moment": "squared", "svd_batching": "padded", "rank_every": 2}),
    ("tucker", 3, "adam", {"lr": 5e-2, "second_moment": "squared", "basis_every": 3}),
    ("tucker", 3, "adam", {"lr": 5e-2, "second_moment": "squared", "augmentation": "sync_free"}),
    ("mlp", 8, "adam", {"lr": 5e-2, "second_moment": "squared", "capacity": 10}),
    # parallel with the whole batch's new-new block (each process keeps its rows; the blocks are averaged): the
    # exact step in one pass. A share below 1 samples each process's rows, so it is not the one-process run's
    ("mlp", 8, "adam", {"lr": 5e-2, "second_moment": "squared", "new_block_fraction": 1.0}),
    ("tucker", 3, "sgd", {"lr": 0.2, "new_block_fraction": 1.0}),
    ("tucker", 3, "sgd", {"lr": 0.2}),  # parallel Tucker cores: their core gradient averaged too (it once was not)
]
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_opt(kind, model, mode, kw):
    return (LowRankAdam if kind == "adam" else LowRankSGD)(model, tau=0.1, mode=mode, **kw)


def train_in_step(model, x, y, opt, world):
    """``STEPS`` steps on this process's share of the batch; after each, the factors must be the
    same bits on every process. Returns the ranks after each step."""
    history = []
    for _ in range(STEPS):
        history += train(model, x, y, opt, 1)
        w = weights(model)
        gathered = [torch.empty_like(w) for _ in range(world)]
        dist.all_gather(gathered, w)
        assert all(torch.equal(g, w) for g in gathered), "factors differ between processes"
    return history


def worker(rank, world, port, case, mode, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    name, r, kind, kw = case
    model, x, y = MODELS[name](r)
    b = len(x) // world
    opt = make_opt(kind, model, mode, kw)
    assert opt.distributed
    history = train_in_step(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], opt, world)
    if rank == 0:
        torch.save({"weights": weights(model), "ranks": history, "bytes": opt.bytes_communicated}, out)
    dist.barrier()  # Gloo aborts a process whose peer has already torn its connection down
    # and may still abort in its own C++ teardown at exit ("terminate called without an active
    # exception", seen once in CI): everything is written, so leave without running destructors
    os._exit(0)


COMBOS = [(CASES[0], "fused"), (CASES[0], "parallel"), (CASES[0], "two_pass"), (CASES[1], "fused"),
          (CASES[2], "fused"), (CASES[3], "parallel"), (CASES[5], "fused"), (CASES[5], "parallel"), (CASES[6], "fused"), (CASES[7], "fused"),
          (CASES[8], "fused"), (CASES[9], "fused"), (CASES[9], "parallel"), (CASES[10], "parallel"),
          (CASES[11], "parallel"), (CASES[12], "parallel")]


@pytest.mark.parametrize("case, mode", COMBOS, ids=[f"{c[0]}-{c[2]}-r{c[1]}-{m}{'-every3' if 'update_every' in c[3] else ''}"
                                              f"{'-padded' if 'svd_batching' in c[3] else ''}{'-basis3' if 'basis_every' in c[3] else ''}"
                                              f"{'-syncfree' if 'augmentation' in c[3] else ''}"
                                              f"{'-capacity' if 'capacity' in c[3] else ''}"
                                              f"{'-newblock' if 'new_block_fraction' in c[3] else ''}"
                                              f"{'-sgd' if c[2] == 'sgd' and c[0] == 'tucker' else ''}"
                                              for c, m in COMBOS])
def test_two_processes_equal_one_process_with_the_global_batch(case, mode, tmp_path):
    out = tmp_path / "rank0.pt"
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(worker, args=(2, free_port(), case, mode, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    name, r, kind, kw = case
    model, x, y = MODELS[name](r)
    opt = make_opt(kind, model, mode, kw)
    assert got["ranks"] == train(model, x, y, opt, STEPS)
    assert rel(got["weights"], weights(model)) < 1e-5
    assert got["bytes"] > 0


def worker_differing_tau(rank, world, port, out):
    """Rank 1 asks for another τ than rank 0: the ranks it would choose differ from rank 0's."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, x, y = mlp(8)
    b = len(x) // world
    opt = LowRankAdam(model, lr=5e-2, tau=0.1 if rank == 0 else 0.5, second_moment="squared")
    history = train_in_step(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], opt, world)
    if rank == 0:
        torch.save({"weights": weights(model), "ranks": history}, out)
    dist.barrier()
    os._exit(0)


def test_processes_that_would_choose_other_ranks_take_rank_0s(tmp_path):
    """The truncation's ranks are rank 0's on every process (a broadcast), so shapes and factors
    agree even where another process's arithmetic (here: its τ) would have chosen otherwise."""
    out = tmp_path / "rank0.pt"
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(worker_differing_tau, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model, x, y = mlp(8)
    assert got["ranks"] == train(model, x, y, LowRankAdam(model, lr=5e-2, tau=0.1, second_moment="squared"), STEPS)
    assert rel(got["weights"], weights(model)) < 1e-5
    other, _, _ = mlp(8)  # τ = 0.5 alone would have chosen other ranks
    assert train(other, x, y, LowRankAdam(other, lr=5e-2, tau=0.5, second_moment="squared"), STEPS) != got["ranks"]
