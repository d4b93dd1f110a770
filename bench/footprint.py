"""Memory footprint: bytes of each head's state, and of a full default-capacity replay memory.

    .venv/bin/python bench/footprint.py

Heads learn all banking77 training rows (77 classes, cached MiniLM features); the state size is
the sum of ``nbytes`` of the numpy arrays in ``state_dict()`` (what a checkpoint stores, before
compression). The replay memory is ``memory.replay.ReplayMemory(384)`` with the daemon's default
capacity (``memory.max_items = 20000``, flat index) filled to capacity; its ``nbytes`` counts row
arrays, per-item Python overhead, event ids and the FAISS index. The daemon's process RSS comes
from ``bench/throughput.py``. Writes ``bench/results/footprint.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import limit_blas_threads, machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"
HEADS = {"ridge M=2048 (default)": ("ridge", {"expansion_width": 2048, "lam": "gcv"}),
         "ridge M=0": ("ridge", {"expansion_width": 0, "lam": "gcv"}),
         "slda": ("slda", {}), "ncm": ("ncm", {})}


def state_bytes(state: Any) -> int:
    """Sum of ``nbytes`` over every numpy array inside ``state`` (dicts and lists are walked)."""
    if isinstance(state, np.ndarray):
        return int(state.nbytes)
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


def main() -> dict[str, Any]:
    from bench.throughput import banking77
    from learner.heads import make_head
    from memory.replay import ReplayMemory

    doc: dict[str, Any] = {"benchmark": "footprint", "machine": machine_info(), "seeds": [0]}
    limit_blas_threads(1)
    _, labels, X = banking77(10_003)
    heads = []
    for name, (kind, params) in HEADS.items():
        head = make_head(kind, **params)
        head.learn_many(X, labels)
        head.readout()  # solved weights are part of what a running daemon holds
        n = state_bytes(head.state_dict())
        heads.append({"name": name, "kind": kind, "params": params, "classes": len(head.classes_),
                      "state_bytes": n})
        print(f"{name:<24}{n / 2**20:>9.2f} MiB state ({len(head.classes_)} classes)", flush=True)
    capacity = 20_000
    memory = ReplayMemory(384, max_items=capacity)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for start in range(0, capacity, 2_000):
        rows = rng.normal(size=(2_000, 384)).astype(np.float32)
        memory.add(rows, [f"c{i % 77}" for i in range(2_000)], [f"e-{start + i:08d}" for i in range(2_000)])
    doc.update(heads=heads, replay_memory={"capacity": capacity, "items": len(memory), "index": "flat",
                                           "nbytes": memory.nbytes, "fill_seconds": time.perf_counter() - t0})
    print(f"{'replay memory (20000)':<24}{memory.nbytes / 2**20:>9.2f} MiB", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "footprint.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {RESULTS / 'footprint.json'}")
    return doc


if __name__ == "__main__":
    main()
