"""Backbone throughput: sentences/s for the onnx and torch runtimes on 512 banking77 texts.

Runs each runtime with dynamic padding (the product's behaviour) and with every batch padded to
128 tokens (the naive baseline). ``python bench/backbone.py [--threads N] [--n 512]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from learner.backbone import load_backbone

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "banking77" / "train.csv"
RESULTS = REPO / "bench" / "results" / "backbone.json"


def texts(n: int) -> list[str]:
    with open(DATA, newline="") as f:
        rows = [row["text"] for row in csv.DictReader(f)]
    rng = np.random.default_rng(0)
    return [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]


def measure(runtime: str, sample: list[str], *, threads: int, fixed_pad: bool) -> float:
    backbone = load_backbone(runtime=runtime, threads=threads)  # type: ignore[arg-type]
    if fixed_pad:  # baseline: every sequence padded to 128 tokens
        backbone._padder.tokenizer.enable_padding(length=128)  # type: ignore[attr-defined]
    backbone.embed(sample[:64])  # warm-up
    start = time.perf_counter()
    backbone.embed(sample)
    return len(sample) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=512)
    args = parser.parse_args()
    sample = texts(args.n)
    rows = []
    print(f"{'runtime':<8}{'padding':<10}{'sentences/s':>12}")
    for runtime in ("onnx", "torch"):
        for fixed in (False, True):
            rate = measure(runtime, sample, threads=args.threads, fixed_pad=fixed)
            padding = "pad-128" if fixed else "dynamic"
            rows.append({"runtime": runtime, "padding": padding, "sentences_per_s": round(rate, 1)})
            print(f"{runtime:<8}{padding:<10}{rate:>12.1f}")
    import onnxruntime
    import torch

    result = {"n_texts": args.n, "threads": args.threads, "results": rows,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
