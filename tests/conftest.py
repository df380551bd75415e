import pytest
import torch

torch.set_num_threads(1) if torch.get_num_threads() > 2 else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def preset_with(*assignments: str, preset: str = "digits-mlp") -> dict:
    """A shipped preset with ``--set`` assignments applied in order (each checked as the CLI checks it)."""
    from lrc.presets import apply_override, load_preset

    cfg = load_preset(preset)
    for assignment in assignments:
        cfg = apply_override(cfg, assignment)
    return cfg


@pytest.fixture
def host_reads(monkeypatch):
    """``host_reads(skip=(), svd=False)``: a context manager whose list collects, while it is open (from empty), every read of
    a tensor's value on the host (``.item()``, ``bool()``… — ``_local_scalar_dense`` — and ``tolist``, which on a
    CPU tensor dispatches nothing), except of the tensors in ``skip``; with ``svd``, also every SVD call."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list = []
    state = {"on": False, "skip": set()}
    original = torch.Tensor.tolist

    def tolist(t):
        if state["on"] and id(t) not in state["skip"]:
            seen.append("tolist")
        return original(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    class Count(TorchDispatchMode):
        def __init__(self, svd: bool) -> None:
            super().__init__()
            self.svd = svd

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in state["skip"]) \
                    or (self.svd and func.__name__.startswith("_linalg_svd")):
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting(skip=(), svd: bool = False):
        seen.clear()
        state["on"], state["skip"] = True, {id(t) for t in skip}
        try:
            with Count(svd):
                yield seen
        finally:
            state["on"] = False

    return counting
