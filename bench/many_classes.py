"""Many one-event classes with a full replay memory: is learning's rate steady? (issue 14)

    .venv/bin/python bench/many_classes.py [--classes 20000] [--memory 500] [--width 2048] [--json OUT]

Feeds ``learn_batch`` (the daemon's data path without Kafka) batches of 500 events, each of a new
label, into a ridge head with a replay memory that is full after the first batch, and prints the
seconds per 1,000 classes as the class count grows. Also times ``memory.policy.class_targets``
against its former (quadratic) definition at 2k/10k/20k classes. Writes
bench/results/many_classes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `memory` is a package here
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from memory import ReplayMemory  # noqa: E402
from memory.policy import class_targets  # noqa: E402
from service.core.batch import Record, learn_batch  # noqa: E402
from service.core.events import encode  # noqa: E402
from service.core.state import new_state  # noqa: E402

DIM = 384
BATCH = 500


def quadratic_class_targets(seen: dict[str, int], capacity: int) -> dict[str, int]:
    """The definition before issue 14 (a set rebuilt per element), for the comparison."""
    targets = dict.fromkeys(seen, 0)
    open_classes, remaining = list(seen), capacity
    while open_classes:
        share, extra = divmod(remaining, len(open_classes))
        quota = {c: share + (1 if i < extra else 0) for i, c in enumerate(open_classes)}
        small = [c for c in open_classes if seen[c] <= quota[c]]
        if not small:
            targets.update(quota)
            break
        for c in small:
            targets[c] = seen[c]
            remaining -= seen[c]
        open_classes = [c for c in open_classes if c not in set(small)]
    return targets


def policy_seconds(n: int, capacity: int) -> dict[str, float]:
    seen = {f"label-{i}": 1 for i in range(n)}
    out = {}
    for name, fn in (("vectorised", class_targets), ("quadratic", quadratic_class_targets)):
        start = time.perf_counter()
        fn(seen, capacity)
        out[name] = time.perf_counter() - start
    return out


def learn_rate(classes: int, memory_items: int, width: int) -> list[dict[str, float]]:
    memory = ReplayMemory(DIM, max_items=memory_items, use_gpu="never")
    state = new_state("ridge", {"lam": 1.0, "expansion_width": width, "seed": 0, "temperature": 0.05},
                      memory, window=classes + 1, backbone_identity="bench")
    rng = np.random.default_rng(0)
    rows, mark, start = [], 0, time.perf_counter()
    for i in range(0, classes, BATCH):
        X = rng.normal(size=(BATCH, DIM)).astype(np.float32)
        records = [Record("t", 0, i + j, encode(f"e-{i + j}", f"label-{i + j}", features=X[j]))
                   for j in range(BATCH)]
        learn_batch(state, records, embed=None, dim=DIM, max_event_bytes=1 << 20, max_classes=classes)
        if (i + BATCH) % 1000 == 0:
            now = time.perf_counter()
            rows.append({"classes": i + BATCH, "seconds_per_1000": now - start - mark,
                         "events_per_second": 1000 / (now - start - mark)})
            mark = now - start
            print(f"{i + BATCH:>7} classes  {rows[-1]['seconds_per_1000']:7.2f} s / 1,000  "
                  f"{rows[-1]['events_per_second']:8.0f} events/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=20_000)
    p.add_argument("--memory", type=int, default=500)
    p.add_argument("--width", type=int, default=2048, help="ridge expansion width (2048 = default head)")
    p.add_argument("--json", type=Path, default=HERE / "results" / "many_classes.json")
    args = p.parse_args()
    policy = {n: policy_seconds(n, args.memory) for n in (2_000, 10_000, 20_000)}
    for n, t in policy.items():
        print(f"class_targets at {n:>6} classes: {t['vectorised'] * 1e3:8.2f} ms (was {t['quadratic']:.2f} s)")
    rows = learn_rate(args.classes, args.memory, args.width)
    first, last = rows[0]["seconds_per_1000"], rows[-1]["seconds_per_1000"]
    print(f"last/first 1,000 classes: {last / first:.1f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "classes": args.classes, "memory_max_items": args.memory, "expansion_width": args.width,
        "class_targets_seconds": {str(n): t for n, t in policy.items()},
        "learn": rows, "last_over_first": last / first,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
