"""Encoder throughput, candidate against a baseline, in alternating rounds (``eddy bench backbone``).

Alternating rounds (baseline, candidate, baseline, ...) on the same texts make the ratio fair on a
shared machine: a neighbour's burst of load hits both sides, not one. Each round embeds every
text once; the reported rate is the median over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from learner.backbone import Backbone

# Used when no text file is given: short support-style questions, varied in length.
_TOPICS = ("my card delivery", "a refund", "the exchange rate", "my locked account", "a password reset",
           "a failed top-up", "a transfer abroad", "my PIN", "a cash withdrawal", "a disputed payment")
_FRAMES = ("I have a question about {}.", "Can you help me with {} please?",
           "Yesterday something went wrong with {}, and I am really not happy about it at all.", "{}?")


def sample_texts(n: int) -> list[str]:
    """``n`` deterministic sentences (4 to ~20 words) for a benchmark without a data file."""
    pool = [f.format(t) for t in _TOPICS for f in _FRAMES]
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" ({i})") for i in range(n)]


def texts_per_second(backbone: Backbone, texts: Sequence[str]) -> float:
    """Texts embedded per wall-clock second, one pass over ``texts``."""
    start = time.perf_counter()
    backbone.embed(texts)
    return len(texts) / (time.perf_counter() - start)


def compare(candidate: Backbone, baseline: Backbone, texts: Sequence[str], *, rounds: int = 3) -> dict[str, Any]:
    """Median texts/s of each over ``rounds`` alternating rounds, and ``ratio`` = candidate / baseline."""
    if rounds < 1 or not texts:
        raise ValueError(f"need rounds >= 1 and some texts, got {rounds} rounds and {len(texts)} texts")
    warm = list(texts[:32])
    baseline.embed(warm)
    candidate.embed(warm)
    base, cand = [], []
    for _ in range(rounds):
        base.append(texts_per_second(baseline, texts))
        cand.append(texts_per_second(candidate, texts))
    b, c = statistics.median(base), statistics.median(cand)
    return {"candidate": candidate.identity, "baseline": baseline.identity, "n_texts": len(texts),
            "rounds": rounds, "candidate_texts_per_s": round(c, 2), "baseline_texts_per_s": round(b, 2),
            "ratio": round(c / b, 3), "candidate_rounds": [round(x, 2) for x in cand],
            "baseline_rounds": [round(x, 2) for x in base]}
