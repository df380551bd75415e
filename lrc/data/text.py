"""Text classification from CSV or JSON-lines files, tokenized with a Hugging Face tokenizer.

``data_dir`` is one file (``.csv``, ``.tsv``, ``.jsonl``; split into a fixed seeded 80/20 train/test
split) or a directory with ``train.csv``/``test.csv`` (or ``.tsv``, ``.jsonl``), or the files
``train_file``/``test_file`` name in it (GLUE: ``train.tsv``, ``dev.tsv``). ``text_column`` (one
name, or two for sentence pairs) and ``label_column`` name the fields, ``columns`` those of a file
without a header; labels may be strings (sorted, then numbered) or integers.
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


def read_rows(path: Path, text_column, label_column: str,
              columns: list[str] | None = None) -> list[tuple[tuple[str, ...], str]]:
    """``(texts, label)`` of every row of a CSV/TSV or JSON-lines file — ``texts`` one field, or two
    for a sentence pair (``text_column`` a list of two names). ``columns`` names the fields of a
    file without a header row (GLUE's CoLA). Rows too short to hold a field are skipped (GLUE's QQP
    has a few); ``ValueError`` names a missing column or an unreadable file."""
    names = [text_column] if isinstance(text_column, str) else list(text_column)
    rows = []
    try:
        if path.suffix == ".jsonl":
            records = (json.loads(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                       if line.strip())
        elif path.suffix in (".csv", ".tsv"):
            f = path.open(encoding="utf-8", errors="replace", newline="")
            # GLUE's TSV files quote nothing: a quotation mark is part of the sentence
            records = (csv.DictReader(f, fieldnames=columns, delimiter="\t", quoting=csv.QUOTE_NONE)
                       if path.suffix == ".tsv" else csv.DictReader(f, fieldnames=columns))
        else:
            raise ValueError(f"{path}: a text data set is a .csv, .tsv or .jsonl file")
        for i, record in enumerate(records):
            if any(k not in record for k in (*names, label_column)):
                raise ValueError(f"{path}: row {i + 1} has no column {', '.join(map(repr, names))} or "
                                 f"{label_column!r} (it has {', '.join(map(str, record))}); set data.text_column / "
                                 "data.label_column (data.columns for a file without a header)")
            values = [record[k] for k in (*names, label_column)]
            if any(v is None for v in values):  # a short row
                continue
            rows.append((tuple(str(v) for v in values[:-1]), str(values[-1])))
    except (OSError, json.JSONDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _files(root: Path, train_file: str | None, test_file: str | None) -> tuple[Path, Path | None]:
    if root.is_file():
        return root, None
    if train_file or test_file:  # named files in the directory (GLUE: train.tsv, dev.tsv)
        train = root / (train_file or "train.tsv")
        test = root / test_file if test_file else None
        for f in (train, test):
            if f is not None and not f.is_file():
                raise ValueError(f"{root}: no file {f.name} (data.train_file / data.test_file name files in "
                                 "--data-dir)")
        return train, test
    for suffix in (".csv", ".tsv", ".jsonl"):
        train, test = root / f"train{suffix}", root / f"test{suffix}"
        if train.is_file():
            return train, test if test.is_file() else None
    raise ValueError(f"{root}: expected a .csv/.tsv/.jsonl file, or a directory with train.csv (and test.csv)")


def text_data(data_dir, seed: int, tokenizer: str | None, text_column="text", label_column: str = "label",
              max_length: int = 64, test_fraction: float = 0.2, columns: list[str] | None = None,
              train_file: str | None = None, test_file: str | None = None):
    from . import Data, DataError

    if data_dir is None:
        raise DataError("the text data set needs --data-dir: a .csv/.jsonl file, or a directory with train.csv "
                        "and test.csv")
    if not tokenizer:
        raise ValueError("the text data set needs a tokenizer: data.tokenizer, or a model with model.args.path")
    root = resolve_path(data_dir)
    if not root.exists():
        raise DataError(f"{data_dir}: no such file or directory")
    train_file, test_file = _files(root, train_file, test_file)
    train_rows = read_rows(train_file, text_column, label_column, columns)
    if test_file is None:  # a fixed split, the same for every seed and method
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(1234)).tolist()
        cut = len(order) - max(1, int(test_fraction * len(order)))
        test_rows = [train_rows[i] for i in order[cut:]]
        train_rows = [train_rows[i] for i in order[:cut]]
    else:
        test_rows = read_rows(test_file, text_column, label_column, columns)
    labels = sorted({label for _, label in train_rows}, key=lambda v: (not v.lstrip("-").isdigit(),
                                                                        int(v) if v.lstrip("-").isdigit() else 0, v))
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for _, label in test_rows} - set(index))
    if unknown:
        where = test_file or f"{train_file} (its held-out {test_fraction:.0%})"
        shown = ", ".join(repr(v if len(v) <= 40 else v[:37] + "...") for v in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        hint = (f"; {len(labels)} distinct labels in {label_column!r}: is it the label column (data.label_column)?"
                if len(labels) > 100 else "")
        raise ValueError(f"{where}: labels {shown}{more} do not occur in the training data{hint}")
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
        first = [t[0] for t, _ in rows]
        second = [t[1] for t, _ in rows] if len(rows[0][0]) > 1 else None  # a sentence pair
        enc = tok(first, second, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()
        return TensorDataset(x, torch.tensor([index[label] for _, label in rows], dtype=torch.long))

    return Data(encode(train_rows), encode(test_rows), len(labels), (2, max_length))
