"""Evaluation: accuracy (top-1, top-5), loss, parameters, compression ratio, FLOPs per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .layers import FACTORIZED, LoRAConv2d, LoRALinear, LowRankConv2d, LowRankLinear, TuckerConv2d
from .surgery import compression_ratio, count_parameters

__all__ = ["evaluate", "layer_ranks", "flops_per_sample", "METRICS", "classification_metrics", "check_model_takes"]

METRICS = ("accuracy", "mcc", "f1")  # what a data set is judged by (GLUE: CoLA Matthews, QQP F1)


def layer_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, FACTORIZED)}


@torch.no_grad()
def check_model_takes(model: nn.Module, dataset, num_classes: int, name: str,
                      device: torch.device | str = "cpu",
                      fix: str = "set the model's arguments to this data (e.g. model.args.in_features), "
                                 "or use a preset made for it") -> None:
    """Raise one ``ValueError`` line when ``model`` cannot classify ``dataset`` (a data set of
    ``num_classes`` classes called ``name``): its forward fails on two of its samples (inputs of
    another shape than the model's first layer takes), or it gives fewer outputs than there are
    classes; ``fix`` ends the line. Runs the model once in eval mode on those samples, drawing no
    random numbers."""
    from torch.utils.data import default_collate

    x = default_collate([dataset[i] for i in range(min(2, len(dataset)))])[0].to(device)
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        problem = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"the model does not take the samples of {name} (each of shape {tuple(x.shape[1:])}): "
                         f"{problem} — {fix}") from None
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] < num_classes:
        raise ValueError(f"the model gives {out.shape[1]} outputs but {name} has {num_classes} classes — {fix}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", bf16: bool = False) -> dict:
    """Mean loss and accuracy over ``loader``; top-5 when there are more than 5 classes."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, loss_sum, top1, top5, classes = 0, 0.0, 0, 0, 0
    confusion = None
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            out = model(x).float()
        classes = out.shape[1]
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, classes), dim=1).indices
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(1).sum().item()
        total += y.numel()
        if classes > 100:  # the Matthews correlation and F1 are for tasks of a few classes
            continue
        if confusion is None:
            confusion = torch.zeros(classes, classes, dtype=torch.long)
        confusion += torch.bincount((y * classes + top[:, 0]).cpu(), minlength=classes * classes).view(classes, classes)
    model.train(was_training)
    sample = next(iter(loader))[0][:1].to(device)
    result = {"loss": loss_sum / max(total, 1), "top1": top1 / max(total, 1), "samples": total,
              "params": count_parameters(model), "compression_ratio": compression_ratio(model),
              "flops_per_sample": flops_per_sample(model, sample), "ranks": layer_ranks(model)}
    if classes > 5:
        result["top5"] = top5 / max(total, 1)
    if confusion is not None:
        result.update(classification_metrics(confusion))
    return result


def classification_metrics(confusion: torch.Tensor) -> dict:
    """From a confusion matrix (rows: true class, columns: predicted): the Matthews correlation
    (its multi-class form, Gorodkin 2004; 0 where it is undefined) and, for two classes, the F1
    score of class 1 (GLUE's positive class: duplicate, paraphrase, acceptable)."""
    C = confusion.double()
    n, correct = C.sum(), C.diagonal().sum()
    true, pred = C.sum(1), C.sum(0)
    denominator = ((n * n - (pred * pred).sum()) * (n * n - (true * true).sum())).sqrt()
    mcc = float((correct * n - (true * pred).sum()) / denominator) if denominator > 0 else 0.0
    out = {"mcc": mcc}
    if C.shape[0] == 2:
        tp, fp, fn = C[1, 1], C[0, 1], C[1, 0]
        out["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp > 0 else 0.0
    return out


@torch.no_grad()
def flops_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds ×2 of the linear and convolutional layers for one input sample."""
    counts: list[int] = []

    def hook(module, inputs, output):
        positions = output[0].numel() // output.shape[1] if output.dim() > 2 else 1
        if isinstance(module, LowRankLinear):
            macs = module.rank * (module.in_features + module.out_features + module.rank)
        elif isinstance(module, LowRankConv2d):
            macs = positions * module.rank * (module.in_dim + module.out_dim + module.rank)
        elif isinstance(module, TuckerConv2d):  # 1×1 in → r_in at the input positions, core, 1×1 r_out → out
            (r_out, r_in), (kh, kw) = module.ranks, module.kernel_size
            in_positions = inputs[0][0].numel() // inputs[0].shape[1]
            macs = in_positions * module.in_channels * r_in + positions * (r_out * r_in * kh * kw + r_out * module.out_channels)
        elif isinstance(module, LoRALinear):
            macs = module.rank * (module.in_features + module.out_features)
        elif isinstance(module, LoRAConv2d):
            macs = positions * module.rank * (module.in_dim + module.out_dim)
        elif isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            macs = positions * module.weight.numel()
        else:
            return
        if getattr(module, "base_weight", None) is not None:
            macs += positions * module.base_weight.numel()
        counts.append(2 * macs)

    kinds = (nn.Linear, nn.Conv2d, *FACTORIZED)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(sum(counts))
