"""Head throughput and solve time on synthetic features.

``python bench/heads.py [--quick] [--blas-threads N]``: learn events/s for ncm, slda, ridge M=0
and ridge M=2048 on precomputed random unit-norm 384-d float32 features in batches of 256; solve time of ridge
M=2048 with 150 classes (fixed lambda, GCV choice + solve, readout with a cached GCV lambda).
Prints a table and writes bench/results/heads.json with numpy/BLAS and CPU info.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.heads import make_head  # noqa: E402
from learner.heads.ridge import RidgeHead  # noqa: E402

RESULTS = REPO / "bench" / "results"
DIM, BATCH, CLASSES = 384, 256, 150


def features(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, DIM)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)  # like sentence embeddings
    return X, [f"intent-{c}" for c in rng.integers(0, CLASSES, n)]


def learn_rate(kind: str, params: dict[str, Any], X: np.ndarray, labels: list[str]) -> dict[str, Any]:
    head = make_head(kind, **params)
    head.learn_many(X[:BATCH], labels[:BATCH])  # warm-up: allocation, first classes
    start = time.perf_counter()
    for i in range(BATCH, len(X) - BATCH + 1, BATCH):
        head.learn_many(X[i : i + BATCH], labels[i : i + BATCH])
    seconds = time.perf_counter() - start
    events = (len(X) - BATCH) // BATCH * BATCH
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds}


def solve_times(n: int) -> dict[str, float]:
    X, labels = features(n, seed=1)
    out: dict[str, float] = {}
    for lam in (1.0, "gcv"):
        head = RidgeHead(lam=lam, expansion_width=2048)
        head.learn_many(X, labels)
        start = time.perf_counter()
        if lam == "gcv":
            head.choose_lambda()
            out["gcv_choose_seconds"] = time.perf_counter() - start
        head.readout()
        key = "gcv_choose_and_solve_seconds" if lam == "gcv" else "fixed_lambda_solve_seconds"
        out[key] = time.perf_counter() - start
        if lam == "gcv":
            out["gcv_lambda"] = float(head.lam_ or 0.0)
            head.learn_many(X[:BATCH], labels[:BATCH])
            start = time.perf_counter()
            head.readout()  # lambda stays cached: only the Cholesky solve
            out["cached_gcv_readout_seconds"] = time.perf_counter() - start
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                            "scipy": scipy.__version__, "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        from threadpoolctl import threadpool_info

        keys = ("internal_api", "version", "num_threads", "architecture", "prefix")
        info["blas"] = [{k: d.get(k) for k in keys} for d in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer events (for a smoke run)")
    parser.add_argument("--blas-threads", type=int, default=0, help="limit BLAS threads (0: library default)")
    args = parser.parse_args()
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads)
    n_fast, n_wide = (20_480, 2_560) if args.quick else (204_800, 20_480)
    X, labels = features(n_fast)
    configs = [("ncm", "ncm", {}, n_fast, None), ("slda", "slda", {}, n_fast, None),
               ("ridge M=0", "ridge", {"lam": 1.0, "expansion_width": 0}, n_fast, 200_000),
               ("ridge M=2048", "ridge", {"lam": 1.0, "expansion_width": 2048}, n_wide, 5_000)]
    rows = []
    print(f"{'head':<14}{'events':>9}{'seconds':>9}{'events/s':>12}{'target':>10}")
    for name, kind, params, n, target in configs:
        r = learn_rate(kind, params, X[:n], labels[:n])
        r.update(name=name, kind=kind, params=params, target_events_per_s=target)
        rows.append(r)
        print(f"{name:<14}{r['events']:>9}{r['seconds']:>9.2f}{r['events_per_s']:>12,.0f}{target or '':>10}")
    solve = solve_times(2_000 if args.quick else 6_000)
    print(f"ridge M=2048, {CLASSES} classes: fixed-lambda solve {solve['fixed_lambda_solve_seconds']:.3f} s "
          f"(target < 0.5), GCV choose {solve['gcv_choose_seconds']:.3f} s + solve "
          f"{solve['gcv_choose_and_solve_seconds']:.3f} s total (target < 2.5), cached-lambda readout "
          f"{solve['cached_gcv_readout_seconds']:.3f} s; lambda = {solve['gcv_lambda']:.4g}")
    result = {"quick": args.quick, "blas_threads": args.blas_threads or "default", "dim": DIM,
              "batch": BATCH, "learn": rows,
              "solve_M2048_150_classes": solve, "machine": machine(),
              "note": "shared machine (2 cores, other jobs running): numbers are lower bounds"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["load_average"] = os.getloadavg()
    (RESULTS / "heads.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'heads.json'}")


if __name__ == "__main__":
    main()
