"""How the rank allocation of ``--target-cr`` keeps a trained network: truncate a dense model to a
target c.r. by each allocation rule and by one common τ, and report the test accuracy right
after the truncation (no training) with the ranks chosen.

    python benchmarks/allocation.py --preset lenet5-fashion-mnist-compress \\
        --checkpoint runs/lenet5-dense/model.safetensors --target-crs 90,95
    python benchmarks/allocation.py --preset vggsmall-fashion-mnist-compress \\
        --checkpoint runs/vggsmall-dense/model.safetensors --target-crs 90

``--calibration N`` adds rows truncated for the inputs of N training samples (activation-aware,
``factorize(calibration=…)``) by each allocation rule.

The preset gives the model, the data set, ``factorize.exclude``, ``factorize.conv_format`` and
``factorize.rank`` (a cap on every layer). "Common τ" is ``factorize(tau=τ)`` with τ bisected
until the c.r. reaches the target (it may overshoot by a few tenths: ranks are integers).
"""

from __future__ import annotations

import argparse

import torch

from lrc import compression_ratio, factorize
from lrc.data import build_data
from lrc.evaluate import evaluate
from lrc.io import load_weights, read_checkpoint
from lrc.linalg import ALLOCATIONS
from lrc.models import build_model
from lrc.presets import load_preset
from lrc.train import calibration_batches


def truncated(cfg: dict, checkpoint: str, **kwargs) -> tuple[torch.nn.Module, dict]:
    model = build_model(cfg["model"]["name"], **cfg["model"]["args"])
    load_weights(model, read_checkpoint(checkpoint), checkpoint)
    fac = cfg["factorize"]
    report = factorize(model, rank=fac["rank"], exclude=fac["exclude"], conv_format=fac["conv_format"], **kwargs)
    return model, {r.name: r.rank for r in report.replaced}


def common_tau(cfg: dict, checkpoint: str, target: float, steps: int = 25) -> tuple[float, torch.nn.Module, dict]:
    lo, hi = 1e-3, 0.999
    for _ in range(steps):
        mid = (lo + hi) / 2
        model, _ = truncated(cfg, checkpoint, tau=mid)
        lo, hi = (mid, hi) if compression_ratio(model) < target else (lo, mid)
    model, ranks = truncated(cfg, checkpoint, tau=hi)
    return hi, model, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--checkpoint", required=True, help="the dense model (a run's model.safetensors)")
    parser.add_argument("--target-crs", default="90", help="comma-separated, percent")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--calibration", type=int, default=0, help="training samples for activation-aware rows")
    args = parser.parse_args()
    cfg = load_preset(args.preset)
    data = build_data(cfg["data"]["name"], args.data_dir, 0, cfg["data"]["image_size"], cfg["data"].get("channels"))
    _, test = data.loaders(512, 0)
    batches = calibration_batches(data.train, args.calibration)
    print("| c.r. | rule | test accuracy | c.r. reached | ranks |\n| ---: | --- | ---: | ---: | --- |")
    for target in (float(t) for t in args.target_crs.split(",")):
        rows = []
        for allocation in ALLOCATIONS:
            model, ranks = truncated(cfg, args.checkpoint, target_cr=target, allocation=allocation)
            rows.append((allocation, model, ranks))
        tau, model, ranks = common_tau(cfg, args.checkpoint, target)
        rows.append((f"common τ = {tau:.3f}", model, ranks))
        for allocation in ALLOCATIONS if args.calibration else ():
            model, ranks = truncated(cfg, args.checkpoint, target_cr=target, allocation=allocation,
                                     calibration=batches, calibration_samples=args.calibration)
            rows.append((f"{allocation}, calibrated on {args.calibration}", model, ranks))
        for rule, model, ranks in rows:
            accuracy = 100 * evaluate(model, test)["top1"]
            print(f"| {target:g} % | {rule} | {accuracy:.2f} % | {compression_ratio(model):.1f} % | {ranks} |",
                  flush=True)


if __name__ == "__main__":
    main()
