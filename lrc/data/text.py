"""Text classification from CSV or JSON-lines files, tokenized with a Hugging Face tokenizer.

``data_dir`` is one file (``.csv``, ``.jsonl``; split into a fixed seeded 80/20 train/test split)
or a directory with ``train.csv``/``test.csv`` (or ``.jsonl``). ``text_column`` and
``label_column`` name the fields; labels may be strings (sorted, then numbered) or integers.
Every text is tokenized once, padded/truncated to ``max_length``; a sample is a ``(2, T)``
integer tensor (token ids, attention mask), the input :class:`~lrc.models.hf.HFSequenceClassifier`
takes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..paths import resolve_path

__all__ = ["text_data", "read_rows"]


def read_rows(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """``(text, label)`` of every row of a CSV or JSON-lines file; ``ValueError`` names a missing
    column or an unreadable file."""
    rows = []
    try:
        if path.suffix == ".jsonl":
            records = (json.loads(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                       if line.strip())
        elif path.suffix in (".csv", ".tsv"):
            f = path.open(encoding="utf-8", errors="replace", newline="")
            records = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        else:
            raise ValueError(f"{path}: a text data set is a .csv, .tsv or .jsonl file")
        for i, record in enumerate(records):
            if text_column not in record or label_column not in record:
                raise ValueError(f"{path}: row {i + 1} has no column {text_column!r} or {label_column!r} (it has "
                                 f"{', '.join(map(str, record))}); set data.text_column / data.label_column")
            rows.append((str(record[text_column]), str(record[label_column])))
    except (OSError, json.JSONDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _files(root: Path) -> tuple[Path, Path | None]:
    if root.is_file():
        return root, None
    for suffix in (".csv", ".tsv", ".jsonl"):
        train, test = root / f"train{suffix}", root / f"test{suffix}"
        if train.is_file():
            return train, test if test.is_file() else None
    raise ValueError(f"{root}: expected a .csv/.tsv/.jsonl file, or a directory with train.csv (and test.csv)")


def text_data(data_dir, seed: int, tokenizer: str | None, text_column: str = "text", label_column: str = "label",
              max_length: int = 64, test_fraction: float = 0.2):
    from . import Data, DataError

    if data_dir is None:
        raise DataError("the text data set needs --data-dir: a .csv/.jsonl file, or a directory with train.csv "
                        "and test.csv")
    if not tokenizer:
        raise ValueError("the text data set needs a tokenizer: data.tokenizer, or a model with model.args.path")
    root = resolve_path(data_dir)
    if not root.exists():
        raise DataError(f"{data_dir}: no such file or directory")
    train_file, test_file = _files(root)
    train_rows = read_rows(train_file, text_column, label_column)
    if test_file is None:  # a fixed split, the same for every seed and method
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(1234)).tolist()
        cut = len(order) - max(1, int(test_fraction * len(order)))
        test_rows = [train_rows[i] for i in order[cut:]]
        train_rows = [train_rows[i] for i in order[:cut]]
    else:
        test_rows = read_rows(test_file, text_column, label_column)
    labels = sorted({label for _, label in train_rows}, key=lambda v: (not v.lstrip("-").isdigit(),
                                                                        int(v) if v.lstrip("-").isdigit() else 0, v))
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for _, label in test_rows} - set(index))
    if unknown:
        raise ValueError(f"{test_file}: labels {unknown[:3]} do not occur in the training data")
    from ..models.hf import _transformers

    tok_dir = resolve_path(tokenizer)
    if not tok_dir.is_dir():
        raise DataError(f"tokenizer {tokenizer}: no such directory (data.tokenizer, or the model's "
                        "model.args.path, holds tokenizer.json or vocab.txt)")
    try:
        tok = _transformers().AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {tokenizer}: cannot load it ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None and tok.eos_token is not None:  # GPT-2's convention: pad with end-of-text
        tok.pad_token = tok.eos_token

    def encode(rows):
        enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
        x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()
        return TensorDataset(x, torch.tensor([index[label] for _, label in rows], dtype=torch.long))

    return Data(encode(train_rows), encode(test_rows), len(labels), (2, max_length))
