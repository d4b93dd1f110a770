"""Synthetic labeled feature streams and malformed messages for integration tests."""

from __future__ import annotations

import json

import numpy as np

from service.core.events import encode

DIM = 384

MALFORMED: list[tuple[str, bytes]] = [
    ("not_json", b"this is not json"),
    ("not_object", b"[1, 2, 3]"),
    ("missing_field", b'{"id": "m-missing"}'),
    ("unknown_field", b'{"id": "m-unknown", "label": "a", "text": "t", "colour": "red"}'),
    ("bad_label", b'{"id": "m-label", "label": "", "text": "t"}'),
    ("text_and_features", json.dumps({"id": "m-both", "label": "a", "text": "t",
                                      "features": [0.0] * DIM}).encode()),
    ("no_input", b'{"id": "m-none", "label": "a"}'),
    ("non_finite", ('{"id": "m-nan", "label": "a", "features": [' + ",".join(["NaN"] * DIM) + "]}").encode()),
    ("wrong_dimension", json.dumps({"id": "m-dim", "label": "a", "features": [0.5] * (DIM - 1)}).encode()),
    ("not_utf8", b"\xff\xfe\xfd"),
]


def class_centers(n_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, DIM))
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def feature_events(n: int, n_classes: int, *, seed: int = 0, prefix: str = "e") -> list[tuple[str, str, bytes]]:
    """(id, label, value) for ``n`` good feature events; labels cycle through classes in a seeded order."""
    rng = np.random.default_rng(seed + 1)
    centers = class_centers(n_classes, seed)
    labels = rng.integers(0, n_classes, size=n)
    X = centers[labels] + 0.35 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    out = []
    for i, (row, c) in enumerate(zip(X.astype(np.float32), labels, strict=True)):
        event_id = f"{prefix}-{i:07d}"
        out.append((event_id, f"class-{c:02d}", encode(event_id, f"class-{c:02d}", features=row.tolist())))
    return out


def malformed(n: int) -> list[tuple[str, bytes]]:
    """``n`` malformed messages cycling through every kind in ``MALFORMED``."""
    return [MALFORMED[i % len(MALFORMED)] for i in range(n)]
