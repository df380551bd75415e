"""Time one training step (forward, backward, step()) of a conv net with its convolutions
factorized in matrix or Tucker format, against dense AdamW.

    python benchmarks/conv_step_time.py                       # LeNet-5 and vgg_small, batch 128, CPU
    python benchmarks/conv_step_time.py --device cuda --batch 512
    python benchmarks/conv_step_time.py --presets vggsmall-fashion-mnist --target-cr 90 \
        --checkpoint runs/vggsmall-dense/model.safetensors   # the compress protocol's ranks

Each model at its preset's rank (lenet5-fashion-mnist: 18, vggsmall-fashion-mnist: 8) or, with
``--target-cr``, at the ranks that budget allocates on the weights (``--checkpoint``: trained ones), the
preset's excluded layers dense, LowRankAdam in fused mode with τ = 0.1, on 1×28×28 inputs; the
Tucker layers once per ``--executions`` (``TuckerConv2d.execution``: through the factors, through
the dense kernel, or ``auto``). Prints the median time per step over --steps steps after --warmup.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from lrc import LowRankAdam, compression_ratio, factorize
from lrc.io import load_weights, read_checkpoint
from lrc.layers import TuckerConv2d
from lrc.models import build_model
from lrc.presets import load_preset


def median_step_time(model, opt, x, y, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["lenet5-fashion-mnist", "vggsmall-fashion-mnist"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--executions", nargs="+", default=["factored", "auto"],
                        choices=["factored", "dense", "auto"], help="how the Tucker layers run")
    parser.add_argument("--target-cr", type=float, help="ranks from one budget (percent) instead of the preset's rank")
    parser.add_argument("--checkpoint", help="dense weights to start from (the budget allocates on their spectra)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    print("| preset | format | c.r. | time / step [ms] | vs dense |\n| --- | --- | ---: | ---: | ---: |")
    for name in args.presets:
        cfg = load_preset(name)
        dense = build_model(cfg["model"]["name"], **cfg["model"]["args"])
        if args.checkpoint:
            load_weights(dense, read_checkpoint(args.checkpoint), args.checkpoint)
        dense = dense.to(args.device)
        ranks = dict(target_cr=args.target_cr) if args.target_cr else dict(rank=cfg["factorize"]["rank"])
        base = median_step_time(dense, torch.optim.AdamW(dense.parameters(), lr=1e-3), x, y, args.steps, args.warmup)
        print(f"| {name} | dense (AdamW) | 0.0 % | {1e3 * base:.1f} | 1.00 |")
        lora = copy.deepcopy(dense)  # the LoRA-style floor: A Bᵀ at the same budget, plain AdamW
        factorize(lora, exclude=cfg["factorize"]["exclude"], kind="lora", **ranks)
        t = median_step_time(lora, torch.optim.AdamW(lora.parameters(), lr=1e-3), x, y, args.steps, args.warmup)
        print(f"| {name} | LoRA (AdamW) | {compression_ratio(lora):.1f} % | {1e3 * t:.1f} | {t / base:.2f} |")
        for conv_format, execution in [("matrix", None)] + [("tucker", e) for e in args.executions]:
            model = copy.deepcopy(dense)
            factorize(model, exclude=cfg["factorize"]["exclude"], conv_format=conv_format, **ranks)
            tucker = [m for m in model.modules() if isinstance(m, TuckerConv2d)]
            for m in tucker:
                m.execution = execution
            opt = LowRankAdam(model, lr=1e-3, tau=0.1)
            t = median_step_time(model, opt, x, y, args.steps, args.warmup)
            label = conv_format if execution is None else (
                f"tucker, {execution} ({sum(m.runs_dense() for m in tucker)}/{len(tucker)} through the dense kernel)")
            print(f"| {name} | {label} | {compression_ratio(model):.1f} % | {1e3 * t:.1f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
