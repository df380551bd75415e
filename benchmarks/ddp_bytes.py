"""Bytes a data-parallel step sends per process: lrc's factor gradients and broadcast
against dense DDP's all-reduce, for torchvision's vgg16(num_classes=10).

    python benchmarks/ddp_bytes.py [--ranks 32 64]
"""

import argparse

from lrc import compression_ratio, factorize
from lrc.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args()
    print("| rank | c.r. | lrc, per step | dense DDP, per step |\n| ---: | ---: | ---: | ---: |")
    for r in args.ranks:
        model = build_model("vgg16", num_classes=10)
        dense = sum(p.numel() for p in model.parameters())
        report = factorize(model, rank=r, exclude=["features.0", "classifier.6"])
        numbers = 0
        factor_names = set()
        for layer in report.replaced:
            n = layer.shape[0]
            m = 1
            for d in layer.shape[1:]:
                m *= d
            numbers += n * r + m * r + (2 * r) ** 2  # G_K, G_L, G_S (all-reduced)
            numbers += n * r + m * r + 3 * r * r  # U, V, S and two moments (broadcast)
            factor_names.update(f"{layer.name}.{k}" for k in ("U", "S", "V"))
        numbers += sum(p.numel() for name, p in model.named_parameters() if name not in factor_names)  # dense grads
        print(f"| {r} | {compression_ratio(model):.1f} % | {numbers * 4 / 1e6:.1f} MB | {dense * 4 / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
