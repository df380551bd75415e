"""Probes of what makes one adapter method train better than another: `lrc train` with one
change that the product does not offer as an option (a diagnostic, not a feature).

    python benchmarks/adapter_probes.py --head-lr-scale 3.333 -- --preset minilm-tweets --set train.seed=0
    python benchmarks/adapter_probes.py --adalora-fixed -- --preset minilm-tweets \\
        --set optimizer.method=peft-adalora --set optimizer.lr=1e-2 --set train.warmup_epochs=0 --set train.seed=0

Everything after ``--`` goes to ``lrc train``.

--head-lr-scale F  the trainable parameters that are neither low-rank factors nor adapters (the new
                   classification head) train at F times the learning rate; for the PEFT methods,
                   the parameters of PEFT's ``modules_to_save``
--adalora-fixed    PEFT AdaLoRA with ``init_r`` = ``target_r`` and its rank allocator never called:
                   its SVD-form factors (P Λ Q) and orthogonal regulariser at a fixed rank, without
                   the rank allocation
"""

from __future__ import annotations

import argparse
import sys

import torch

import lrc.train as lrc_train


def _scale_head_lr(scale: float) -> None:
    build_run = lrc_train.build_run

    def scaled(cfg, device, total_steps=0, calibration=None):
        run = build_run(cfg, device, total_steps, calibration)
        opt = run.optimizer
        if isinstance(opt, torch.optim.AdamW):  # dense, lora and PEFT methods: one group, split it
            named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
            head = [p for n, p in named if "modules_to_save" in n]
            rest = [p for n, p in named if "modules_to_save" not in n]
            if not head or not rest:
                raise SystemExit("--head-lr-scale: for AdamW methods only the PEFT ones (a modules_to_save head)")
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            opt = torch.optim.AdamW([dict(group, params=rest), dict(group, params=head, lr=group["lr"] * scale)])
            return run._replace(optimizer=opt)
        if len(opt.param_groups) != 2:  # LowRankAdam/LowRankSGD: factors, then the other trainables
            raise SystemExit("--head-lr-scale: the model has no trainable parameters besides its factors")
        opt.param_groups[1]["lr"] *= scale  # before the scheduler records each group's base lr
        return run

    lrc_train.build_run = scaled


def _fix_adalora() -> None:
    import peft

    import lrc.models.hf as hf

    config = peft.AdaLoraConfig

    def fixed(**kwargs):
        kwargs["init_r"] = kwargs["target_r"]
        return config(**kwargs)

    peft.AdaLoraConfig = fixed
    hf.HFSequenceClassifier.after_step = lambda self, step: None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-lr-scale", type=float, default=None)
    parser.add_argument("--adalora-fixed", action="store_true")
    args = parser.parse_args(argv[:split])
    if args.head_lr_scale is not None:
        if not args.head_lr_scale > 0:
            parser.error("--head-lr-scale must be > 0")
        _scale_head_lr(args.head_lr_scale)
    if args.adalora_fixed:
        _fix_adalora()
    from lrc.cli import main as lrc_main

    sys.argv = ["lrc", "train", *argv[split + 1:]]
    lrc_main()


if __name__ == "__main__":
    main()
