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
--row-scaled-bases with ``optimizer.mode=parallel`` (matrix layers): the new directions of each
                   augmentation come from ``G_K``, ``G_L`` with each row (an output, an input
                   coordinate) divided by its running root mean square (β 0.999), as Adam scales
                   each coordinate of a factor; ``G_S`` stays the gradient's projection onto the
                   augmented bases, so only which directions enter changes
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


def _row_scaled(G, v):
    """``G`` with each row divided by its running root mean square ``√v``."""
    return G / (v.sqrt() + 1e-8 * v.max().sqrt() + 1e-30)[:, None]


def _row_scaled_bases() -> None:
    from lrc.linalg import augment_basis
    from lrc.optim.base import LowRankOptimizer

    def parallel_grads(self) -> dict:
        out = {}
        scales = self.__dict__.setdefault("_row_scales", {})  # per layer: (output rows, input rows)
        for layer in self._layers.values():
            U, _, V = layer.factor_parameters()
            if U.grad is None or V.grad is None:
                continue
            if layer.rank_mask is not None or U.dim() != 2:
                raise SystemExit("--row-scaled-bases: matrix layers without a capacity only")
            G_K, G_L = U.grad, V.grad
            v_out, v_in = scales.get(layer, (torch.zeros_like(G_K[:, 0]), torch.zeros_like(G_L[:, 0])))
            v_out = 0.999 * v_out + 0.001 * G_K.pow(2).mean(1)
            v_in = 0.999 * v_in + 0.001 * G_L.pow(2).mean(1)
            scales[layer] = (v_out, v_in)
            D_K, D_L = _row_scaled(G_K, v_out), _row_scaled(G_L, v_in)
            Ut = augment_basis(U.detach(), D_K, U.mT @ D_K, layer.sync_free_augmentation)
            Vt = augment_basis(V.detach(), D_L, V.mT @ D_L, layer.sync_free_augmentation)
            r, a, b = U.shape[1], Ut.shape[1], Vt.shape[1]
            G_S = G_K.new_zeros(r + a, r + b)
            G_S[:r, :r] = U.mT @ G_K  # Uᵀ∇W V
            G_S[r:, :r] = Ut.mT @ G_K  # Ũᵀ∇W V
            G_S[:r, r:] = (Vt.mT @ G_L).mT  # Uᵀ∇W Ṽ
            out[layer] = (Ut, Vt, G_S)
        self._fill_new_blocks(out)  # Ũᵀ∇W Ṽ from the kept rows (optimizer.new_block_fraction)
        return out

    LowRankOptimizer._parallel_grads = parallel_grads


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-lr-scale", type=float, default=None)
    parser.add_argument("--adalora-fixed", action="store_true")
    parser.add_argument("--row-scaled-bases", action="store_true")
    args = parser.parse_args(argv[:split])
    if args.head_lr_scale is not None:
        if not args.head_lr_scale > 0:
            parser.error("--head-lr-scale must be > 0")
        _scale_head_lr(args.head_lr_scale)
    if args.adalora_fixed:
        _fix_adalora()
    if args.row_scaled_bases:
        _row_scaled_bases()
    from lrc.cli import main as lrc_main

    sys.argv = ["lrc", "train", *argv[split + 1:]]
    lrc_main()


if __name__ == "__main__":
    main()
