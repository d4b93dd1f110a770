"""Replay-memory micro-benchmark (``eddy bench memory`` and ``bench/memory.py``).

For each index kind: add rate through ``ReplayMemory.add`` (bookkeeping, policy, FAISS adds and any
IVF training included), single-query top-10 latency p50/p99 through ``ReplayMemory.search``,
recall@10 against the exact flat index, bytes held, and a deletion check (no deleted event is ever
returned when the deleted vectors themselves are the queries). IVF ``nprobe`` and HNSW ``efSearch``
are swept so the trade-off is visible. Data: random unit vectors, the hardest case for IVF and
HNSW recall (real sentence embeddings cluster, which helps both).

The only I/O is writing the JSON report when ``json_out`` is given.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from memory.index import gpu_count
from memory.replay import ReplayMemory

K = 10
SWEEP = {"ivf": ("nprobe", (4, 8, 16, 32, 64)), "hnsw": ("ef_search", (16, 32, 64, 128))}


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def make_data(kind: str, n: int, d: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, d), Q (queries, d)) unit vectors: ``random`` (uniform on the sphere) or ``clustered``.

    ``clustered`` mimics sentence embeddings: 1,000 random centres, each point a centre plus
    isotropic noise of the same overall norm (so cosine to its centre ~0.7), queries drawn alike.
    """
    rng = np.random.default_rng(seed)
    if kind == "random":
        return _unit(rng, n, d), _unit(rng, queries, d)
    if kind != "clustered":
        raise ValueError(f"data must be 'random' or 'clustered', got {kind!r}")
    centres = _unit(rng, 1000, d)

    def draw(m: int) -> np.ndarray:
        Z = centres[rng.integers(0, len(centres), m)] + _unit(rng, m, d)
        return Z / np.linalg.norm(Z, axis=1, keepdims=True)

    return draw(n).astype(np.float32), draw(queries).astype(np.float32)


def _latencies(m: ReplayMemory, Q: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """Per-query milliseconds and results, measured with one faiss thread.

    OpenMP only adds overhead to a single query, and on a busy 2-core machine its spinning threads
    make tails 10-20x worse.
    """
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times, found = np.empty(len(Q)), []
    try:
        for i in range(len(Q)):
            t0 = time.perf_counter()
            _, _, eids = m.search(Q[i : i + 1], K)
            times[i] = time.perf_counter() - t0
            found.append(eids[0])
    finally:
        faiss.omp_set_num_threads(threads)
    return times * 1e3, found


def _recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def bench_kind(kind: str, X: np.ndarray, Q: np.ndarray, truth: list[list[str]] | None,
               batch: int = 1000) -> dict[str, Any]:
    """Measure one index kind; ``truth`` (flat results) enables recall."""
    n, d = X.shape
    m = ReplayMemory(d, index=kind, max_items=n, use_gpu="never")  # type: ignore[arg-type]
    labels = [f"c{i % 77}" for i in range(n)]
    eids = [f"e{i}" for i in range(n)]
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        m.add(X[s : s + batch], labels[s : s + batch], eids[s : s + batch])
    add_s = time.perf_counter() - t0
    ms, found = _latencies(m, Q)
    row: dict[str, Any] = {
        "kind": kind, "n": len(m), "add_seconds": add_s, "add_per_s": n / add_s,
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
        "recall_at_10": _recall(found, truth) if truth is not None else 1.0,
        "nbytes": m.nbytes, "found": found,
    }
    if kind in SWEEP:
        name, values = SWEEP[kind]
        sweep = []
        for v in values:
            m.index.set_search_params(**{name: v})
            ms_v, found_v = _latencies(m, Q)
            sweep.append({name: v, "p50_ms": float(np.percentile(ms_v, 50)),
                          "p99_ms": float(np.percentile(ms_v, 99)),
                          "recall_at_10": _recall(found_v, truth) if truth is not None else None})
        m.index.set_search_params(**{name: getattr(m.index, name)})
        row["sweep"] = sweep
        row[name] = getattr(m.index, name)
    row.update(_deletion_check(m, X, eids))
    return row


def _deletion_check(m: ReplayMemory, X: np.ndarray, eids: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    gone = rng.choice(len(eids), size=min(1000, len(eids) // 10), replace=False)
    t0 = time.perf_counter()
    removed = m.remove_event_ids([eids[i] for i in gone])
    remove_s = time.perf_counter() - t0
    deleted = {eids[i] for i in gone}
    _, _, found = m.search(X[gone], K)
    leaked = sum(1 for row in found for e in row if e in deleted)
    return {"deleted": removed, "delete_seconds": remove_s, "deleted_returned": leaked}


def run_memory_bench(n: int = 100_000, dim: int = 384, json_out: Path | None = None, queries: int = 1000,
                     kinds: tuple[str, ...] = ("flat", "ivf", "hnsw"), data: str = "random",
                     ) -> dict[str, Any]:
    """Run the benchmark, print a table, and write JSON to ``json_out`` if given; returns the report."""
    X, Q = make_data(data, n, dim, queries)
    print(f"memory bench: {n} x {dim} {data} unit vectors, {queries} single queries, top-{K}", flush=True)
    rows, truth = [], None
    for kind in kinds:
        row = bench_kind(kind, X, Q, truth)
        if kind == "flat":
            truth = row["found"]
        del row["found"]
        rows.append(row)
        print(_format(row), flush=True)
    report = {
        "benchmark": "memory", "data": data, "n": n, "dim": dim, "queries": queries, "k": K,
        "search_threads": 1, "results": rows,
        "machine": _machine(),
    }
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    return report


def _format(row: dict[str, Any]) -> str:
    head = (f"{row['kind']:5s} n={row['n']:>7d} add {row['add_per_s']:>9.0f}/s  p50 {row['p50_ms']:6.3f} ms  "
            f"p99 {row['p99_ms']:6.3f} ms  recall@10 {row['recall_at_10']:.3f}  "
            f"{row['nbytes'] / 2**20:7.1f} MiB  deleted {row['deleted']} returned {row['deleted_returned']}")
    lines = [head]
    for s in row.get("sweep", []):
        name = "nprobe" if "nprobe" in s else "ef_search"
        recall = f"{s['recall_at_10']:.3f}" if s["recall_at_10"] is not None else "-"
        lines.append(f"        {name}={s[name]:<4d} p50 {s['p50_ms']:6.3f} ms  p99 {s['p99_ms']:6.3f} ms  "
                     f"recall@10 {recall}")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    import faiss

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "numpy": np.__version__, "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "gpus": gpu_count()}
