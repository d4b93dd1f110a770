"""Replay-memory benchmark: add rate, top-10 latency p50/p99, recall@10 vs flat, bytes, deletion.

    .venv/bin/python bench/memory.py [--n 100000] [--dim 384] [--json OUT] [--data random|clustered] [--quick]

Writes bench/results/memory.json by default. The work is in ``memory.benchmark`` (also behind
``eddy bench memory``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder comes first on sys.path and would shadow the `memory` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from memory.benchmark import run_memory_bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--json", type=Path, default=HERE / "results" / "memory.json")
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--quick", action="store_true", help="20,000 vectors and 300 queries")
    args = p.parse_args()
    n, queries = (min(args.n, 20_000), min(args.queries, 300)) if args.quick else (args.n, args.queries)
    run_memory_bench(n=n, dim=args.dim, json_out=args.json, queries=queries, data=args.data)


if __name__ == "__main__":
    main()
