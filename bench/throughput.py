"""Throughput ratios, each measured side by side in the same run on the same machine.

    .venv/bin/python bench/throughput.py [--quick] [--part learn|text|features|all]

1. ``ridge_vs_river_learn_ratio``: eddy's default head (ridge, M=2048, lambda by GCV) learning
   precomputed 384-d banking77 features in batches of 512 (the daemon's batch) vs the fastest
   River learner of the accuracy comparison (``learn_one``, event by event), after the same warm-up
   (every class seen). Rounds alternate eddy / River so load drift hits both; medians are compared.
   Ridge M=0 is reported beside it, and River's mini-batch ``learn_many`` as a variant.
2. ``text_e2e_vs_backbone_ratio``: N banking77 texts produced to a real Kafka topic, then the real
   daemon (``eddy serve --role all``, default config) consumes, embeds and learns them; the rate is
   (events learned after the first learned batch) / (time from that batch to the last), so the
   daemon's start-up is excluded. Compared with the bare backbone embedding the same texts in
   process in the daemon's calls (512 texts, sorted by length inside each call), measured before
   and after the daemon run.
3. ``features_e2e_vs_consume_ratio``: N feature events (banking77 embeddings as JSON) on a real
   topic; the daemon's rate as above vs a bare kafka-python ``KafkaConsumer`` reading every message
   of the same topic without processing (measured before and after the daemon run).

Also records the daemon's RSS after each run. Writes ``bench/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import limit_blas_threads, machine_info  # noqa: E402
from bench.peers import RIVER_METHODS  # noqa: E402

RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".eddy" / "cache"
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
DAEMON_BATCH = 512  # kafka.batch_max_events default
LEARNED = 'eddy_events_total{result="learned"}'
# The daemon's own histograms (service/metrics.py): where its time goes, whole run including start-up.
STAGES = ("learn_batch", "embed", "export", "snapshot")
TARGETS = {"ridge_vs_river_learn_ratio": 15.0, "text_e2e_vs_backbone_ratio": 0.85,
           "features_e2e_vs_consume_ratio": 0.8}


def banking77(n: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """``n`` banking77 training rows (texts, labels, cached MiniLM features) in a seeded random order.

    Rows repeat (in a new permutation each pass) when ``n`` exceeds the 10,003 training rows.
    """
    from learner.backbone import load_backbone
    from learner.evaluate import embed_cached

    with open(BANKING77 / "train.csv", newline="") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    with open(BANKING77 / "test.csv", newline="") as f:
        test = [r["text"] for r in csv.DictReader(f)]
    texts = [t for t, _ in rows]
    X = embed_cached(texts + test, load_backbone(cache_dir=CACHE), CACHE, "max_tokens=128", progress=True)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(len(rows)) for _ in range(n // len(rows) + 1)])[:n]
    return [texts[i] for i in idx], [rows[i][1] for i in idx], X[idx]


# -- 1. learn rates on precomputed features -------------------------------------------------------

def _timed(learn: Callable[[np.ndarray, list[str]], None], X: np.ndarray, y: list[str], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(X), batch):
        learn(X[i:i + batch], y[i:i + batch])
    return len(X) / (time.perf_counter() - t0)


def eddy_rate(params: dict[str, Any], X: np.ndarray, y: list[str], warm: int) -> float:
    """Events/s of ``RidgeHead(**params).learn_many`` in daemon-sized batches, after ``warm`` events."""
    from learner.heads import make_head

    head = make_head("ridge", **params)
    head.learn_many(X[:warm], y[:warm])
    return _timed(head.learn_many, X[warm:], y[warm:], DAEMON_BATCH)


def river_rate(name: str, value: float, X: np.ndarray, y: list[str], warm: int, *, many: bool = False) -> float:
    """Events/s of a River method's ``learn_one`` (or ``learn_many`` mini-batches), after ``warm`` events."""
    head = RIVER_METHODS[name].head(value)
    head.learn_many(X[:warm], y[:warm])
    if not many:
        return _timed(head.learn_many, X[warm:], y[warm:], DAEMON_BATCH)
    import pandas as pd

    model = head.model

    def learn(Xb: np.ndarray, yb: list[str]) -> None:
        model.learn_many(pd.DataFrame(Xb.astype(np.float64)), pd.Series(yb))

    return _timed(learn, X[warm:], y[warm:], DAEMON_BATCH)


def river_choice() -> tuple[dict[str, float], str | None, str]:
    """Tuned River values and the fastest accurate River learner, from bench/accuracy.py's results.

    "Fastest accurate": the highest learn rate among River methods whose banking77 final accuracy
    (River-budget subset, random order) is within 0.05 of the best River method's. ``None`` (and
    default values) when accuracy.json is missing: every method is then screened here.
    """
    values: dict[str, float] = {"river-softmax": 0.1, "river-ovr-logistic": 0.1, "river-ovr-pa": 0.1,
                                "river-ovr-alma": 0.9, "river-knn": 5}
    path = RESULTS / "accuracy.json"
    if not path.exists():
        return values, None, "accuracy.json missing: defaults, fastest by screening"
    doc = json.loads(path.read_text())
    bank = doc.get("datasets", {}).get("banking77", {})
    values.update({k: v["value"] for k, v in bank.get("river_tuning", {}).items()})
    rows = [r for r in doc.get("aggregate", []) if r["dataset"] == "banking77" and r["group"] == "river"
            and r["order"] == "random" and r["final_accuracy"] is not None]
    if not rows:
        return values, None, "no River rows in accuracy.json: fastest by screening"
    best = max(r["final_accuracy"] for r in rows)
    accurate = [r for r in rows if r["final_accuracy"] >= best - 0.05]
    fastest = max(accurate, key=lambda r: r["learn_events_per_s"] or 0.0)
    return values, fastest["method"], (f"fastest of the River methods within 0.05 of the best River final "
                                         f"accuracy on banking77 ({best:.3f}) in accuracy.json: "
                                         + ", ".join(r["method"] for r in accurate))


def learn_part(quick: bool) -> dict[str, Any]:
    """Alternate eddy ridge (M=2048 and M=0) and River's fastest accurate learner, round by round."""
    warm, n_river, n_eddy, rounds = (400, 300, 4_000, 2) if quick else (1_000, 1_000, 20_000, 3)
    _, y, X = banking77(warm + n_eddy)
    values, fastest, why = river_choice()
    screen: dict[str, float] = {}
    if fastest is None:
        for name in RIVER_METHODS:
            screen[name] = river_rate(name, values[name], X[:warm + 100], y[:warm + 100], warm)
            print(f"  screen {name}: {screen[name]:,.0f} events/s", flush=True)
        fastest = max(screen, key=lambda k: screen[k])
    rows: dict[str, list[float]] = {"eddy-ridge-M2048": [], "eddy-ridge-M0": [], fastest: []}
    many = f"{fastest} learn_many (mini-batch SGD)"
    import importlib.util

    has_pandas = importlib.util.find_spec("pandas") is not None  # River's learn_many takes DataFrames
    if fastest == "river-ovr-logistic" and has_pandas:  # River's mini-batch path: faster, a different learner
        rows[many] = []
    Xr, yr = X[:warm + n_river], y[:warm + n_river]
    for r in range(rounds):
        rows["eddy-ridge-M2048"].append(eddy_rate({"expansion_width": 2048, "lam": "gcv"}, X, y, warm))
        rows[fastest].append(river_rate(fastest, values[fastest], Xr, yr, warm))
        rows["eddy-ridge-M0"].append(eddy_rate({"expansion_width": 0, "lam": "gcv"}, X, y, warm))
        if many in rows:
            rows[many].append(river_rate(fastest, values[fastest], Xr, yr, warm, many=True))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rows.items()),
              flush=True)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    out: dict[str, Any] = {
        "warm_up_events": warm, "eddy_events_per_round": n_eddy, "river_events_per_round": n_river,
        "rounds": rounds, "eddy_batch": DAEMON_BATCH, "river_values": values, "river_choice": why,
        "screen_events_per_s": screen, "river_fastest": fastest,
        "river_learn_many": "measured" if many in rows else "not measured (needs pandas, not installed)",
        "events_per_s": rows, "median_events_per_s": med,
        "ridge_vs_river_learn_ratio": med["eddy-ridge-M2048"] / med[fastest],
        "ridge_M0_vs_river_learn_ratio": med["eddy-ridge-M0"] / med[fastest],
        "key_uses": "eddy-ridge-M2048 (the daemon's default head: ridge, expansion_width 2048, lambda GCV) vs "
                    f"{fastest} learn_one",
    }
    if many in rows:
        out["ridge_vs_river_learn_many_ratio"] = med["eddy-ridge-M2048"] / med[many]
    return out


# -- 2./3. end to end through Kafka and the real daemon ---------------------------------------------

class Broker:
    """A real local Kafka broker in a temporary folder, for the duration of a ``with`` block."""

    def __enter__(self) -> Broker:
        from service.broker import LocalKafka, free_port

        self._tmp = tempfile.TemporaryDirectory(prefix="eddy-bench-kafka-")
        self.kafka = LocalKafka(port=free_port(), data_dir=Path(self._tmp.name),
                                lib_dir=REPO / ".eddy" / "kafka" / "lib")
        self.bootstrap = self.kafka.start(timeout=180)
        return self

    def __exit__(self, *exc: object) -> None:
        self.kafka.stop()
        self._tmp.cleanup()


def produce(bootstrap: str, topic: str, values: list[bytes]) -> float:
    """Send ``values`` to ``topic`` (one partition, created on first use); return seconds taken."""
    from kafka import KafkaProducer

    t0 = time.perf_counter()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20)
    for value in values:
        producer.send(topic, value)
    producer.flush()
    producer.close()
    return time.perf_counter() - t0


def raw_consume_rate(bootstrap: str, topic: str, n: int) -> float:
    """Messages/s of a bare ``KafkaConsumer`` reading ``n`` messages (first message -> last)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=30_000)
    count, t_first = 0, 0.0
    for _ in consumer:
        count += 1
        if count == 1:
            t_first = time.perf_counter()
        if count >= n:
            break
    rate = (count - 1) / (time.perf_counter() - t_first) if count > 1 else 0.0
    consumer.close()
    if count < n:
        raise RuntimeError(f"raw consumer read {count} of {n} messages from {topic}")
    return rate


def daemon_rate(bootstrap: str, topic: str, n: int, tmp: Path, env_extra: dict[str, str]) -> dict[str, Any]:
    """Start the real daemon on ``topic`` (already holding ``n`` events) and time its learning.

    Returns the rate from the first learned batch to the last event learned (start-up excluded),
    the daemon's RSS at the end, and the start-up time.
    """
    import psutil

    from tests.integration.daemon import daemon_env, start_daemon

    env = daemon_env(tmp, bootstrap, topic, **env_extra)
    t_start = time.perf_counter()
    daemon = start_daemon(tmp, env)
    try:
        count, t_first = 0.0, 0.0
        while count <= 0:
            count = daemon.wait_metric(LEARNED, lambda v: v > 0, timeout=300)
            t_first = time.perf_counter()
        first_count = count
        daemon.wait_metric(LEARNED, lambda v: v >= n, timeout=900)
        t_last = time.perf_counter()
        rss = psutil.Process(daemon.proc.pid).memory_info().rss
        stages = {name: {"sum_s": daemon.metric(f"eddy_{name}_seconds_sum"),
                         "count": daemon.metric(f"eddy_{name}_seconds_count")} for name in STAGES}
    finally:
        rc = daemon.stop()
    return {"events": n, "first_batch_events": first_count, "startup_to_first_learned_s": t_first - t_start,
            "seconds_first_to_last": t_last - t_first,
            "events_per_s": (n - first_count) / (t_last - t_first), "daemon_rss_bytes": rss, "exit_code": rc,
            "stage_seconds_whole_run": stages}


def backbone_rate(texts: list[str], chunk: int | None = None) -> float:
    """Sentences/s of the bare backbone (daemon defaults) embedding ``texts`` in calls of ``chunk`` texts.

    ``chunk=None``: the backbone's batch size (64). Each call sorts its texts by length before
    batching, so larger calls pad less (the daemon embeds a whole consumed batch, up to 512, at once).
    """
    from learner.backbone import load_backbone

    backbone = load_backbone(cache_dir=CACHE)
    batch: int = chunk or int(getattr(backbone, "_batch_size", 64))
    backbone.embed(texts[:batch])  # warm-up: session allocations
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        backbone.embed(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - t0)


def text_part(bootstrap: str, n: int, n_backbone: int) -> dict[str, Any]:
    """Daemon text e2e vs the bare backbone embedding the same texts the way the daemon calls it.

    The daemon embeds each consumed batch (up to ``DAEMON_BATCH`` texts) in one call, sorted by
    length inside the call; the reference makes the same calls, before and after the daemon run.
    Calls of 64 (the encoder's own batch, which pads more) are reported beside it for context.
    """
    from service.events import encode

    texts, labels, _ = banking77(n, seed=1)
    sample = texts[:max(n_backbone, 2 * DAEMON_BATCH)]
    before = backbone_rate(sample, DAEMON_BATCH)
    print(f"  backbone in process, calls of {DAEMON_BATCH}: {before:,.1f} sentences/s", flush=True)
    topic = f"bench-text-{uuid.uuid4().hex[:8]}"
    produced = produce(bootstrap, topic, [encode(f"t-{i}", y, text=t)
                                          for i, (t, y) in enumerate(zip(texts, labels, strict=True))])
    with tempfile.TemporaryDirectory(prefix="eddy-bench-text-") as tmp:
        daemon = daemon_rate(bootstrap, topic, n, Path(tmp), {})
    print(f"  daemon text e2e: {daemon['events_per_s']:,.1f} events/s", flush=True)
    after = backbone_rate(sample, DAEMON_BATCH)
    print(f"  backbone in process, calls of {DAEMON_BATCH} (after): {after:,.1f} sentences/s", flush=True)
    small = backbone_rate(sample)
    print(f"  backbone in process, calls of 64: {small:,.1f} sentences/s", flush=True)
    backbone = (before + after) / 2
    return {"events": n, "backbone_texts": len(sample), "produce_seconds": produced,
            f"backbone_calls_of_{DAEMON_BATCH}_sentences_per_s": [before, after],
            "backbone_calls_of_64_sentences_per_s": small, "daemon": daemon,
            "text_e2e_vs_backbone_ratio": daemon["events_per_s"] / backbone,
            "text_e2e_vs_backbone_calls_of_64_ratio": daemon["events_per_s"] / small}


def features_part(bootstrap: str, n: int) -> dict[str, Any]:
    """Daemon features e2e vs bare kafka-python consumption of the same topic, side by side."""
    from service.events import encode

    _, labels, X = banking77(n, seed=2)
    topic = f"bench-features-{uuid.uuid4().hex[:8]}"
    values = [encode(f"f-{i}", y, features=row) for i, (row, y) in enumerate(zip(X.tolist(), labels, strict=True))]
    produced = produce(bootstrap, topic, values)
    before = raw_consume_rate(bootstrap, topic, n)
    print(f"  raw kafka-python consume: {before:,.0f} messages/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="eddy-bench-features-") as tmp:
        daemon = daemon_rate(bootstrap, topic, n, Path(tmp), {})
    print(f"  daemon features e2e: {daemon['events_per_s']:,.0f} events/s", flush=True)
    after = raw_consume_rate(bootstrap, topic, n)
    print(f"  raw kafka-python consume (after): {after:,.0f} messages/s", flush=True)
    consume = (before + after) / 2
    return {"events": n, "message_bytes_mean": float(np.mean([len(v) for v in values])),
            "produce_seconds": produced, "raw_consume_messages_per_s": [before, after], "daemon": daemon,
            "features_e2e_vs_consume_ratio": daemon["events_per_s"] / consume}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events and rounds")
    parser.add_argument("--part", choices=["learn", "text", "features", "all"], default="all")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() and args.part != "all" else {}
    doc.update(benchmark="throughput", quick=args.quick, machine=machine_info(), targets=TARGETS, seeds=[0, 1, 2])
    limit_blas_threads(1)  # the daemon's head.blas_threads default
    started = time.perf_counter()
    if args.part in ("learn", "all"):
        print("== learn rate on precomputed features", flush=True)
        doc["learn"] = learn_part(args.quick)
    if args.part in ("text", "features", "all"):
        n_text, n_backbone, n_feat = (1_024, 512, 10_000) if args.quick else (10_000, 2_048, 40_000)
        with Broker() as broker:
            if args.part in ("text", "all"):
                print(f"== text end to end ({n_text} events)", flush=True)
                doc["text"] = text_part(broker.bootstrap, n_text, n_backbone)
            if args.part in ("features", "all"):
                print(f"== features end to end ({n_feat} events)", flush=True)
                doc["features"] = features_part(broker.bootstrap, n_feat)
    doc["ratios"] = {key: _ratio(doc, key) for key in TARGETS}
    doc["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"{'ratio':<34}{'value':>8}{'target':>8}")
    for key, value in doc["ratios"].items():
        shown = f"{value:8.2f}" if value is not None else f"{'-':>8}"
        print(f"{key:<34}{shown}{'>= ' + str(TARGETS[key]):>8}")
    print(f"wrote {args.out} ({doc['seconds']:.0f} s)")
    return doc


def _ratio(doc: dict[str, Any], key: str) -> float | None:
    for part in ("learn", "text", "features"):
        if key in doc.get(part, {}):
            return float(doc[part][key])
    return None


if __name__ == "__main__":
    main()
