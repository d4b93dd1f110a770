"""Temperature fitted on a replay-memory sample vs the head's default temperature, on banking77.

``python bench/calibration.py [--seed 0] [--widths 2048 0]``; writes bench/results/calibration.json.

The banking77 train split (10,003 MiniLM embeddings, cached) is streamed in a seeded order into a
ridge head (lambda by GCV) and a ``ReplayMemory`` (20,000 items, class-balanced), as the service
does. At checkpoints, a class-balanced sample of 1,024 items is drawn from the memory (what the
export thread gets) and a temperature is fitted on it three ways:

* ``in-sample``: on the head's raw scores of the sampled items (which the head has learned);
* ``loo``: on their exact leave-one-out scores (``learner.heldout``);
* ``oracle``: on the test split itself (the best any single temperature can do; a reference only).

Reported: test-split NLL and expected calibration error (15 equal-width bins of the top
probability) of the served probabilities with each temperature and with the head's default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import limit_blas_threads, machine_info
from learner.calibration import class_indices, fit_temperature, nll
from learner.evaluate import stream_order
from learner.heads import RidgeHead
from learner.heldout import fit_heldout_temperature
from memory import ReplayMemory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SAMPLE = 1024
CHECKPOINTS = (1000, 2500, 5000, 10_003)
BATCH = 256


def ece(scores: np.ndarray, y: np.ndarray, T: float, bins: int = 15) -> float:
    """Expected calibration error of the top-label probability of ``softmax(scores / T)``."""
    Z = scores / T
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    conf, hit = P.max(1), P.argmax(1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            total += rows.mean() * abs(hit[rows].mean() - conf[rows].mean())
    return float(total)


def run(X: np.ndarray, y: list[str], Xte: np.ndarray, yte: list[str], width: int, order: str,
        seed: int) -> list[dict[str, Any]]:
    """Stream, and at each checkpoint compare temperatures on the test split."""
    idx = stream_order(y, order, seed)  # type: ignore[arg-type]
    head = RidgeHead(expansion_width=width, lam="gcv")
    memory = ReplayMemory(X.shape[1], max_items=20_000, seed=seed, use_gpu="never")
    rng = np.random.default_rng(seed + 1000)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(idx), BATCH):
        part = idx[start:start + BATCH]
        labels = [y[i] for i in part]
        head.learn_many(X[part], labels)
        memory.add(X[part], labels, [str(i) for i in part])
        done = start + len(part)
        if not any(start < c <= done for c in CHECKPOINTS):
            continue
        head.choose_lambda()
        readout = head.readout()
        cols, known = class_indices(yte, readout.classes)
        S = readout.scores(Xte[known])
        Yk = cols[known]
        Xs, ls, _ = memory.sample(SAMPLE, rng)
        sc, si = class_indices(ls, readout.classes)
        temps = {"default": head.default_temperature,
                 "in-sample": fit_temperature(readout.scores(Xs[si]), sc[si]),
                 "loo": fit_heldout_temperature(head, Xs, ls),
                 "oracle": fit_temperature(S, Yk)}
        row = {"events": done, "width": width, "order": order, "seed": seed, "n_test_known": int(known.sum()),
               "accuracy": float((S.argmax(1) == Yk).mean()),
               **{f"T_{k}": v for k, v in temps.items()},
               **{f"nll_{k}": nll(S, Yk, v) for k, v in temps.items() if v is not None},
               **{f"ece_{k}": ece(S, Yk, v) for k, v in temps.items() if v is not None}}
        rows.append(row)
        print(f"{order:<18}{width:>6}{done:>7}{row['accuracy']:>7.3f}"
              + "".join(f"{row[f'T_{k}']:>8.4f}{row[f'nll_{k}']:>8.4f}{row[f'ece_{k}']:>7.3f}" for k in temps))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widths", type=int, nargs="+", default=[2048, 0])
    parser.add_argument("--orders", nargs="+", default=["random", "class-incremental"])
    args = parser.parse_args()
    limit_blas_threads(1)
    info = machine_info()
    from bench.drift import load_banking77

    X, y, n = load_banking77()  # train rows first, then test
    print(f"{'order':<18}{'M':>6}{'events':>7}{'acc':>7}"
          + "".join(f"{'T_' + k:>8}{'nll':>8}{'ece':>7}" for k in ("def", "in", "loo", "orc")))
    rows = [r for order in args.orders for w in args.widths
            for r in run(X[:n], y[:n], X[n:], y[n:], w, order, args.seed)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration.json").write_text(json.dumps(
        {"dataset": "banking77", "sample": SAMPLE, "rows": rows, "command": " ".join(sys.argv), "machine": info},
        indent=2, default=str))


if __name__ == "__main__":
    main()
