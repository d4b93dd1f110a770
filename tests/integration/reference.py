"""The oracle for exactly-once tests: an uninterrupted in-process run over the same event bytes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from learner.heads import make_head
from service.core.events import Event, decode

RIDGE = {"lam": 1.0, "expansion_width": 128, "seed": 0, "temperature": 0.05}
RIDGE_ENV = {"EDDY_HEAD__KIND": "ridge", "EDDY_HEAD__RIDGE_LAMBDA": "1.0", "EDDY_HEAD__EXPANSION_WIDTH": "128",
             "EDDY_HEAD__TEMPERATURE": "0.05"}


def reference_statistics(values: Iterable[bytes], dim: int = 384, batch: int = 500) -> dict[str, np.ndarray]:
    """Statistics of a ridge head that learned every good event once, decoded exactly as the daemon does."""
    events = [e for v in values if isinstance(e := decode(v, dim=dim, max_bytes=1 << 20), Event)]
    head = make_head("ridge", **RIDGE)
    for i in range(0, len(events), batch):
        chunk = events[i : i + batch]
        head.learn_many(np.stack([e.features for e in chunk]), [e.label for e in chunk])
    return head.statistics()


def assert_statistics_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float = 1e-9) -> None:
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(got["classes"], want["classes"])
    for key in want:
        if key == "classes":
            continue
        a, b = np.asarray(got[key], dtype=np.float64), np.asarray(want[key], dtype=np.float64)
        assert a.shape == b.shape, key
        scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
        rel = float(np.abs(a - b).max(initial=0.0)) / scale
        assert rel <= rtol, f"{key}: relative difference {rel:.3e} > {rtol:g}"
