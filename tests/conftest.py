import pytest
import torch

torch.set_num_threads(1) if torch.get_num_threads() > 2 else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
