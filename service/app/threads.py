"""Cap the native thread pools (BLAS, OpenMP) of every numeric library the learner uses.

Why: the learner shares two or so cores with the backbone's ONNX Runtime threads and the gRPC
server. Multi-threaded BLAS fighting over them ran the ridge update ~6x slower than one thread
(bench/heads.py), and FAISS's OpenMP made one-query searches ~20x slower under load.

threadpoolctl only sees libraries already loaded, and numpy, scipy and faiss each ship their own
OpenBLAS, so the libraries are imported here before the cap is set: a cap set before scipy's BLAS
loaded left ``dsyrk`` on two threads, competing with the backbone.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

# Modules whose import loads a native BLAS or OpenMP runtime used on the learn or serve path.
NATIVE_MODULES = ("numpy", "scipy.linalg", "faiss")


def limit_native_threads(n: int) -> list[dict[str, object]]:
    """Load the numeric libraries and cap their BLAS and OpenMP pools at ``n`` threads each.

    Returns threadpoolctl's description of every pool after the cap (for logs and benchmarks).
    A library that is not installed is skipped.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    loaded = {}
    for name in NATIVE_MODULES:
        try:
            loaded[name] = importlib.import_module(name)
        except ImportError:
            log.debug("%s not installed: no thread pool to cap", name)
    threadpool_limits(n)
    if "faiss" in loaded:
        loaded["faiss"].omp_set_num_threads(n)
    return [{"api": p["internal_api"], "threads": p["num_threads"], "library": p["filepath"].rsplit("/", 1)[-1]}
            for p in threadpool_info()]
