"""Time one training step (forward, backward, optimizer step) of an MLP 2048→2048→2048→2048→10.

    python benchmarks/step_time.py                     # CPU, batches 256 and 1024
    python benchmarks/step_time.py --device cuda --batches 1024 4096

Methods, all at rank 64 for the three 2048×2048 layers (the 10-way head stays dense):
  lowrank-adam fused     LowRankAdam, mode="fused" (rank held at 64: min_rank = max_rank = 64,
                         so every step augments to 128 and truncates back: the full cost)
  lowrank-adam fused every4  the same with update_every=4: one augmentation and one truncation
                         per 4 steps, the 2 steps between at the augmented rank 128 (mean over the cycle)
  lowrank-adam two_pass  LowRankAdam, mode="two_pass" (a second forward/backward per step)
  dense adamw            torch.optim.AdamW on the dense model
  lora floor             W = A Bᵀ trained by torch.optim.Adam: the same forward/backward cost,
                         no geometry — the floor a geometric step can approach
Prints the median time per step over --steps steps after --warmup, the split of the fused
step into forward / backward / step(), and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lrc import LowRankAdam, factorize

WIDTH, DEPTH, CLASSES, RANK = 2048, 3, 10, 64


class LoRALinear(nn.Module):
    """``x ↦ x B Aᵀ + b`` with plain parameters A (out×r), B (in×r)."""

    def __init__(self, dense: nn.Linear, rank: int) -> None:
        super().__init__()
        U, s, Vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
        root = s[:rank].sqrt()
        self.A = nn.Parameter(U[:, :rank] * root)
        self.B = nn.Parameter(Vh[:rank].T * root)
        self.bias = nn.Parameter(dense.bias.detach().clone())

    def forward(self, x):
        return (x @ self.B) @ self.A.T + self.bias


def dense_mlp(device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES)).to(device)


def build(method: str, device):
    model = dense_mlp(device)
    if method == "dense adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), None
    if method == "lora floor":
        for i in range(0, 2 * DEPTH, 2):
            model[i] = LoRALinear(model[i], RANK)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), None
    factorize(model, rank=RANK)
    every = 4 if method.endswith("every4") else 1
    mode = method.split()[1]
    return model, LowRankAdam(model, lr=1e-3, tau=0.1, min_rank=RANK, max_rank=RANK, mode=mode,
                              update_every=every), mode


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(method: str, batch: int, steps: int, warmup: int, device) -> dict[str, float]:
    model, opt, mode = build(method, device)
    x = torch.randn(batch, WIDTH, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    parts = {"total": [], "forward": [], "backward": [], "step": []}
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        if mode == "two_pass":
            opt.step(closure)
            sync(device)
            t3 = time.perf_counter()
            t1 = t2 = t0
        else:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            sync(device)
            t1 = time.perf_counter()
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            opt.step()
            sync(device)
            t3 = time.perf_counter()
        if i >= warmup:
            parts["total"].append(t3 - t0)
            parts["forward"].append(t1 - t0)
            parts["backward"].append(t2 - t1)
            parts["step"].append(t3 - t2)
    average = statistics.mean if method.endswith("every4") else statistics.median  # steps of a cycle differ
    return {k: average(v) * 1e3 for k, v in parts.items()}


METHODS = ["lowrank-adam fused", "lowrank-adam fused every4", "lowrank-adam two_pass", "dense adamw", "lora floor"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# step time, MLP {WIDTH}x{DEPTH}→{CLASSES}, rank {RANK}, {name}, torch {torch.__version__}")
    print(f"# median of {args.steps} steps after {args.warmup} warm-up steps, milliseconds\n")
    print("| batch | method | step (ms) | forward | backward | opt.step() |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    ratios, every4 = [], []
    for batch in args.batches:
        results = {m: time_steps(m, batch, args.steps, args.warmup, device) for m in METHODS}
        for m, r in results.items():
            split = ("—", "—", "—") if m.endswith("two_pass") else (f"{r['forward']:.1f}", f"{r['backward']:.1f}",
                                                                   f"{r['step']:.1f}")
            print(f"| {batch} | {m} | {r['total']:.1f} | {split[0]} | {split[1]} | {split[2]} |")
        fused = results["lowrank-adam fused"]["total"]
        every4.append((batch, results["lowrank-adam fused every4"]["total"] / fused,
                       results["lowrank-adam fused every4"]["total"] / results["lora floor"]["total"]))
        ratios.append((batch, fused / results["lora floor"]["total"], fused / results["dense adamw"]["total"],
                       results["lowrank-adam two_pass"]["total"] / fused))
    print("\n| batch | fused / LoRA floor | fused / dense AdamW | two_pass / fused |")
    print("| ---: | ---: | ---: | ---: |")
    for batch, lora, dense, two in ratios:
        print(f"| {batch} | {lora:.2f} | {dense:.2f} | {two:.2f} |")
    print("\n| batch | fused every4 / fused | fused every4 / LoRA floor |")
    print("| ---: | ---: | ---: |")
    for batch, to_fused, to_lora in every4:
        print(f"| {batch} | {to_fused:.2f} | {to_lora:.2f} |")


if __name__ == "__main__":
    main()
