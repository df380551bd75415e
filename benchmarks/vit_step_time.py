"""Time one training step of vitsmall-cifar10's architecture (ViT, patch 8, 512 wide, 6 blocks,
2 heads) with attention factorized, attention kept dense, and dense, on random CIFAR-shaped data.

    python benchmarks/vit_step_time.py                   # CPU, batch 32, rank 64
    python benchmarks/vit_step_time.py --device cuda --batch 256 --rank 128

Low-rank: LowRankAdam (fused, τ = 0.05, ranks held at --rank with min_rank = max_rank so every
step pays the full augmentation and truncation); dense: torch.optim.AdamW. Prints the c.r. and
the median time per step over --steps steps after --warmup, and the ratios to dense.
"""

from __future__ import annotations

import argparse
import torch
from conv_step_time import median_step_time  # benchmarks/ is the script's directory

from lrc import LowRankAdam, compression_ratio, factorize
from lrc.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    rows = []
    for label, exclude in (("attention factorized", ["conv_proj", "heads.head"]),
                           ("attention dense", ["conv_proj", "heads.head", "*self_attention"]), ("dense", None)):
        model = build_model("vit_small", num_classes=10).to(args.device)
        if exclude is None:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            factorize(model, rank=args.rank, exclude=exclude)
            opt = LowRankAdam(model, lr=1e-4, tau=0.05, min_rank=args.rank, max_rank=args.rank)
        ms = 1e3 * median_step_time(model, opt, x, y, args.steps, args.warmup)
        rows.append((label, compression_ratio(model), ms))
    dense_ms = rows[-1][2]
    print(f"vit_small, batch {args.batch}, rank {args.rank}, {args.device} ({torch.get_num_threads()} threads)")
    print("| model | c.r. [%] | step [ms] | × dense |")
    print("| --- | ---: | ---: | ---: |")
    for label, cr, ms in rows:
        print(f"| {label} | {cr:.1f} | {ms:.1f} | {ms / dense_ms:.2f} |")


if __name__ == "__main__":
    main()
