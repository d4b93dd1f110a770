"""Reading labelled CSV/JSONL files for offline evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from learner.datasets import read_labeled

BANKING77 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "banking77"


def test_csv_texts_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,category\n"hello, world",greet\nbye,leave\n')
    data = read_labeled(path, label_col="category")
    assert data.texts == ["hello, world", "bye"] and data.labels == ["greet", "leave"]
    assert data.features is None


def test_missing_column_names_the_columns_found(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,category\nhi,greet\n")
    with pytest.raises(ValueError, match=r"no column 'label'; columns found: \['text', 'category'\]"):
        read_labeled(path)


def test_jsonl_texts_features_and_errors(tmp_path: Path) -> None:
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "hi", "label": 3}\n\n{"text": "yo", "label": "x"}\n')
    data = read_labeled(texts)
    assert data.texts == ["hi", "yo"] and data.labels == ["3", "x"]
    feats = tmp_path / "f.jsonl"
    feats.write_text("".join(json.dumps({"features": [i, 1.5], "label": "a"}) + "\n" for i in range(3)))
    data = read_labeled(feats)
    assert data.texts is None and data.features is not None
    assert data.features.dtype == np.float32 and data.features.shape == (3, 2) and len(data) == 3
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"features": [1, 2], "label": "a"}\n{"features": [1], "label": "a"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: got 1 features, expected 2"):
        read_labeled(bad)
    mixed = tmp_path / "m.jsonl"
    mixed.write_text('{"features": [1, 2], "label": "a"}\n{"text": "hi", "label": "a"}\n')
    with pytest.raises(ValueError, match="mixes"):
        read_labeled(mixed)
    nolabel = tmp_path / "n.jsonl"
    nolabel.write_text('{"text": "hi", "category": "a"}\n')
    with pytest.raises(ValueError, match=r"no key 'label'; keys found: \['category', 'text'\]"):
        read_labeled(nolabel)


def test_empty_file_and_empty_label(tmp_path: Path) -> None:
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        read_labeled(empty)
    blank = tmp_path / "l.csv"
    blank.write_text("text,label\nhi,\n")
    with pytest.raises(ValueError, match=r"l\.csv:2: empty label"):
        read_labeled(blank)


def test_banking77_reads() -> None:
    if not (BANKING77 / "test.csv").exists():
        pytest.skip("banking77 not present")
    data = read_labeled(BANKING77 / "test.csv", label_col="category")
    assert len(data) == 3080 and len(set(data.labels)) == 77
