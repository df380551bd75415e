"""Any model in: factorize torchvision's classification models and EfficientNet-Lite0 and report,
per model, what was factorized and what kept dense (with the reasons), whether the outputs at
full rank equal the dense model's, and the c.r. at a target of 90 %.

    python benchmarks/model_zoo.py                   # the six models, CPU, 1×3×64×64 inputs
    python benchmarks/model_zoo.py --models resnet18,swin_t --target-cr 95

"Full rank" is the adapter form (frozen dense weight plus a zero-initialised ``U S Vᵀ``), so the
check sees every behaviour factorize could lose (padding, strides, model code reading
``.weight``). The target c.r. is reached by ``factorize(model, target_cr=…)`` on the randomly
initialised weights (the allocation uses their spectra; a pretrained network gives other ranks
at the same c.r.). A target the layers kept dense make impossible is reported as such.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import torch

from lrc import compression_ratio, factorize
from lrc.models import build_model

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "swin_t", "efficientnet_lite0"]


def build(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        return build_model("efficientnet_lite0", num_classes=10)
    return build_model(f"torchvision:{name}", num_classes=10)


def reason(text: str) -> str:
    """A skip reason without the layer-specific numbers, to count alike reasons together."""
    if text.startswith("groups="):
        return "grouped/depthwise convolution"
    if "would not save parameters" in text:
        return "factorization would not save parameters"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--target-cr", type=float, default=90.0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)
    print(f"| model | layers factorized | kept dense (why) | full rank: max |Δ output| | c.r. at --target-cr "
          f"{args.target_cr:g} | time [s] |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        start = time.perf_counter()
        model = build(name).eval()
        with torch.no_grad():
            want = model(x)
        adapted = copy.deepcopy(model)
        report = factorize(adapted, rank=8, adapter=True)
        with torch.no_grad():
            diff = (adapted(x) - want).abs().max().item()
        kept = collections.Counter(reason(why) for _, why in report.skipped)
        budgeted = copy.deepcopy(model)
        try:
            factorize(budgeted, target_cr=args.target_cr)
            cr = f"{compression_ratio(budgeted):.1f} %"
        except ValueError as e:
            cr = "out of reach: " + str(e).split("leave at most ")[-1].split(";")[0]
        dense = "; ".join(f"{n} {why}" for why, n in kept.items()) or "none"
        print(f"| {name} | {len(report.replaced)} | {dense} | {diff:.1e} | {cr} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
