"""Where the time of a fused LowRankAdam step goes on a GPU (one-off diagnostics).

    python benchmarks/gpu_profile.py
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from step_time import build  # noqa: E402

from lrc.linalg import _cholesky_qr2_against, _cholesky_qr2_repaired  # noqa: E402


def t(f, n=20):
    f()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1e3


dev = torch.device("cuda")
S = torch.randn(128, 128, device=dev)
U = torch.linalg.qr(torch.randn(2048, 64, device=dev)).Q
G = torch.randn(2048, 64, device=dev)
P = G - U @ (U.T @ G)
print(f"svd 128 gesvd(default) {t(lambda: torch.linalg.svd(S, full_matrices=False)):.3f} ms")
for drv in ("gesvd", "gesvdj", "gesvda"):
    print(f"svd 128 {drv} {t(lambda: torch.linalg.svd(S, full_matrices=False, driver=drv)):.3f} ms")
print(f"svd 128 via cpu {t(lambda: [x.to(dev) for x in torch.linalg.svd(S.cpu(), full_matrices=False)]):.3f} ms")
print(f"qr 2048x128 {t(lambda: torch.linalg.qr(torch.cat([U, P], 1))):.3f} ms")
print(f"qr 2048x128 via cpu {t(lambda: [x.to(dev) for x in torch.linalg.qr(torch.cat([U, P], 1).cpu())]):.3f} ms")
print(f"cholqr2 checked (1 sync) {t(lambda: _cholesky_qr2_against(U, P)):.3f} ms")
print(f"cholqr2 sync-free (augmentation='sync_free') {t(lambda: _cholesky_qr2_repaired(U, P)):.3f} ms")
print(f"item sync {t(lambda: (S.sum() > 0).item()):.3f} ms")

model, opt, _ = build("lowrank-adam fused", dev)
x = torch.randn(1024, 2048, device=dev)
y = torch.randint(0, 10, (1024,), device=dev)
for _ in range(5):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
