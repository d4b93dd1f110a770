"""Labelled data files for offline evaluation: CSV or JSONL, texts or precomputed features.

* CSV (``.csv``): a header row; ``text_col`` and ``label_col`` name the columns.
* JSONL (``.jsonl``/``.ndjson``/``.json``): one object per line with ``label_col`` and either
  ``text_col`` (a string) or ``"features"`` (a list of numbers, the same length on every line).

Labels are kept as strings (``3`` becomes ``"3"``), matching the heads' string labels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES_KEY = "features"
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


@dataclass(frozen=True)
class LabeledData:
    """Rows of one file: ``labels[i]`` belongs to ``texts[i]`` or to ``features[i]`` (exactly one is set)."""

    labels: list[str]
    texts: list[str] | None = None
    features: np.ndarray | None = None  # float32 (n, d)

    def __len__(self) -> int:
        return len(self.labels)


def read_labeled(path: Path | str, *, text_col: str = "text", label_col: str | None = "label") -> LabeledData:
    """Read ``path`` (CSV or JSONL by suffix) into a ``LabeledData``.

    ``label_col=None`` reads unlabelled rows (out-of-scope test files): every label is ``UNLABELLED``
    and a label column, if present, is ignored.

    Raises ``ValueError`` naming the file, the line and what was found for: a missing column
    (listing the columns found), an empty label, a missing text, a features row of the wrong
    length, a JSONL file mixing texts and features, or an empty file.
    """
    path = Path(path)
    if path.suffix.lower() in _JSONL_SUFFIXES:
        data = _read_jsonl(path, text_col, label_col)
    else:
        data = _read_csv(path, text_col, label_col)
    if not len(data):
        raise ValueError(f"{path}: no rows")
    return data


UNLABELLED = "-"


def _read_csv(path: Path, text_col: str, label_col: str | None) -> LabeledData:
    texts: list[str] = []
    labels: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        found = list(reader.fieldnames or [])
        for col in (text_col, label_col):
            if col is not None and col not in found:
                raise ValueError(f"{path}: no column {col!r}; columns found: {found}")
        for line, row in enumerate(reader, start=2):
            texts.append(_text(row.get(text_col), path, line))
            labels.append(_label(row.get(label_col), path, line) if label_col is not None else UNLABELLED)
    return LabeledData(labels=labels, texts=texts)


def _read_jsonl(path: Path, text_col: str, label_col: str | None) -> LabeledData:
    texts: list[str] = []
    rows: list[list[float]] = []
    labels: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            obj = _object(raw, path, line)
            if label_col is not None and label_col not in obj:
                raise ValueError(f"{path}:{line}: no key {label_col!r}; keys found: {sorted(obj)}")
            labels.append(_label(obj[label_col], path, line) if label_col is not None else UNLABELLED)
            if text_col in obj:
                texts.append(_text(obj[text_col], path, line))
            elif FEATURES_KEY in obj:
                rows.append(_feature_row(obj[FEATURES_KEY], rows, path, line))
            else:
                raise ValueError(f"{path}:{line}: need {text_col!r} or {FEATURES_KEY!r}; "
                                 f"keys found: {sorted(obj)}")
            if texts and rows:
                raise ValueError(f"{path}:{line}: mixes text rows and features rows")
    if rows:
        return LabeledData(labels=labels, features=np.asarray(rows, dtype=np.float32))
    return LabeledData(labels=labels, texts=texts)


def _object(raw: str, path: Path, line: int) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _text(value: Any, path: Path, line: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line}: text must be a string, got {value!r}")
    return value


def _label(value: Any, path: Path, line: int) -> str:
    label = "" if value is None else str(value)
    if not label.strip():
        raise ValueError(f"{path}:{line}: empty label")
    return label


def _feature_row(value: Any, rows: list[list[float]], path: Path, line: int) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{path}:{line}: features must be a non-empty list of numbers")
    if rows and len(value) != len(rows[0]):
        raise ValueError(f"{path}:{line}: got {len(value)} features, expected {len(rows[0])}")
    return [float(v) for v in value]
