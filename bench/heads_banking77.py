"""Heads on banking77, class-incremental: final accuracy vs the joint logistic-regression reference.

``python bench/heads_banking77.py [--seed 0] [--order class-incremental]``; writes
bench/results/heads_banking77.json and bench/results/heads_banking77.png (test accuracy on seen
classes and on old classes as the stream goes on).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from learner.backbone import load_backbone
from learner.datasets import read_labeled
from learner.evaluate import embed_cached, evaluate_stream, joint_reference_cached
from learner.heads import make_head

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "banking77"
RESULTS = REPO / "bench" / "results"
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("ridge M=2048 gcv", "ridge", {"expansion_width": 2048, "lam": "gcv"}),
    ("ridge M=4096", "ridge", {"expansion_width": 4096}),
    ("slda", "slda", {}),
    ("ncm", "ncm", {}),
]
TARGETS = {"ridge M=2048 gcv": 0.925, "ridge M=4096": 0.933, "slda": 0.88, "ncm": 0.84}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="class-incremental")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    args = parser.parse_args()
    train = read_labeled(DATA / "train.csv", label_col="category")
    test = read_labeled(DATA / "test.csv", label_col="category")
    assert train.texts is not None and test.texts is not None
    backbone = load_backbone()
    cache = REPO / ".eddy" / "cache"
    X = embed_cached(train.texts + test.texts, backbone, cache, "max_tokens=128", progress=True)
    n = len(train)
    Xtr, Xte = X[:n], X[n:]
    t0 = time.perf_counter()
    ref = joint_reference_cached(Xtr, train.labels, Xte, test.labels, args.seed, cache)
    ref["seconds"] = time.perf_counter() - t0
    runs = []
    print(f"{'head':<18}{'final':>8}{'gap':>8}{'preq':>8}{'preq_seen':>10}{'forget':>8}{'min_old':>8}"
          f"{'learn ev/s':>11}{'total s':>9}")
    for name, kind, params in CONFIGS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        out = evaluate_stream(Xtr, train.labels, Xte, test.labels, head=make_head(kind, **params),
                              order=args.order, seed=args.seed, eval_every=args.eval_every, progress=False)
        out.update(name=name, head_params=params, seconds=time.perf_counter() - t0,
                   target=TARGETS.get(name), gap_to_joint=ref["accuracy"] - out["final_accuracy"])
        runs.append(out)
        print(f"{name:<18}{out['final_accuracy']:>8.4f}{out['gap_to_joint']:>8.4f}{out['prequential_accuracy']:>8.4f}"
              f"{out['prequential_accuracy_seen_classes']:>10.4f}{out['forgetting']:>8.4f}"
              f"{out['min_old_class_accuracy']:>8.4f}{out['learn_events_per_s']:>11.0f}{out['seconds']:>9.1f}")
    print(f"{'joint LR (C=' + str(ref['C']) + ')':<18}{ref['accuracy']:>8.4f}")
    result = {"dataset": "banking77", "order": args.order, "seed": args.seed, "backbone": backbone.identity,
              "joint_reference": ref, "runs": runs,
              "machine": {"python": platform.python_version(), "numpy": np.__version__}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads_banking77.json").write_text(json.dumps(result, indent=2, default=str))
    plot(runs, ref["accuracy"], RESULTS / "heads_banking77.png")


def plot(runs: list[dict[str, Any]], joint: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in runs:
        curve = run["curve"]
        axes[0].plot(curve["events"], curve["seen_class_accuracy"], label=run["name"])
        pairs = zip(curve["events"], curve["old_class_accuracy"], strict=True)
        old = [(e, a) for e, a in pairs if a is not None]
        axes[1].plot([e for e, _ in old], [a for _, a in old], label=run["name"])
    for ax, title in zip(axes, ("test accuracy, seen classes", "test accuracy, old classes"), strict=True):
        ax.axhline(joint, color="grey", linestyle="--", label="joint LR (all classes)")
        ax.set_title(title)
        ax.set_xlabel("events streamed")
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
