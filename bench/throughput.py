"""Throughput ratios, each measured side by side in the same run on the same machine.

    .venv/bin/python bench/throughput.py [--quick] [--part learn|text|features|all]

1. ``ridge_vs_river_learn_ratio``: eddy's default head (ridge, M=2048, lambda by GCV) learning
   precomputed 384-d banking77 features in batches of 512 (the daemon's batch) vs the fastest
   River learner of the accuracy comparison (``learn_one``, event by event), after the same warm-up
   (every class seen). Rounds alternate eddy / River so load drift hits both; medians are compared.
   Ridge M=0 is reported beside it, and River's mini-batch ``learn_many`` as a variant.
2. ``text_e2e_vs_backbone_ratio``: banking77 texts produced to a real Kafka topic, then the real
   daemon (``eddy serve --role all``, default config) consumes, embeds and learns them; the rate is
   (events learned after the first learned batch, up to the next-to-last) / (time between the two),
   so start-up is excluded and the window starts and ends with the embed-ahead pipeline equally
   full. Compared with the bare backbone embedding the same texts in process in the daemon's
   calls (512 texts, sorted by length inside each call). Rounds alternate reference and daemon
   (the daemon resumes from its snapshot each round); the ratio is the median of the per-round
   ratios, each over the references just before and after its round.
3. Feature events (banking77 embeddings of 50 classes as JSON arrays, 3 rounds of 8,000) on a real
   topic, in alternating rounds: ``features_e2e_vs_head_alone_ratio`` (the daemon with its default
   config vs its default head learning the same features in process, no Kafka) and
   ``features_e2e_lean_json_vs_consume_ratio`` (the daemon with a lean head: ridge M=0, no replay
   memory, no compensation, vs a bare kafka-python ``KafkaConsumer`` reading the same messages).
   The head alone vs bare consume is reported beside them (see ``features_part``).

Also records the daemon's RSS after each run. Writes ``bench/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
# A git worktree lives elsewhere than the data beside the main checkout: EDDY_BANKING77_DIR points at it.
BANKING77 = Path(os.environ.get("EDDY_BANKING77_DIR", REPO.parent / "shared" / "data" / "banking77"))
DAEMON_BATCH = 512  # kafka.batch_max_events default
LEARNED = 'eddy_events_total{result="learned"}'
# The daemon's own histograms (service/metrics.py): where its time goes, whole run including start-up.
STAGES = ("learn_batch", "embed", "export", "snapshot")
TARGETS = {"ridge_vs_river_learn_ratio": 15.0, "text_e2e_vs_backbone_ratio": 0.85,
           "features_e2e_vs_head_alone_ratio": 0.7, "features_e2e_lean_json_vs_consume_ratio": 0.6}


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
        from service.tools.broker import LocalKafka, free_port

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


def raw_consume_rate(bootstrap: str, topic: str, start: int, n: int) -> float:
    """Messages/s of a bare ``KafkaConsumer`` polling ``n`` messages from offset ``start`` of partition 0.

    Polls in batches of the daemon's size (faster than iterating message by message, so the
    stricter reference); timed from the first message to the last.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, start)
    count, first, t_first = 0, 0, 0.0
    deadline = time.monotonic() + 60
    while count < n and time.monotonic() < deadline:
        got = sum(len(msgs) for msgs in consumer.poll(timeout_ms=1000, max_records=DAEMON_BATCH).values())
        if got and not count:
            t_first, first = time.perf_counter(), got
        count += got
    seconds = time.perf_counter() - t_first
    consumer.close()
    if count < n:
        raise RuntimeError(f"raw consumer read {count} of {n} messages from {topic}")
    return (count - first) / seconds


class DaemonRounds:
    """The real daemon (``eddy serve --role all``) learning a topic one round at a time.

    Each round starts the daemon on the same state folder, so it resumes from its last snapshot
    and learns exactly the events produced since; the round is timed from its first learned batch
    to its last event (start-up excluded), then the daemon is stopped. References measured between
    rounds therefore share the machine with no daemon.
    """

    def __init__(self, bootstrap: str, topic: str, folder: Path, env_extra: dict[str, str]) -> None:
        from tests.integration.daemon import daemon_env

        self.folder = folder
        self.env = daemon_env(folder, bootstrap, topic, **env_extra)

    def round(self, n: int) -> dict[str, Any]:
        """Learn the ``n`` events waiting on the topic; rate, start-up, RSS, stage times, exit code.

        The rate counts the events learned from the first learned batch to the next-to-last.
        """
        import psutil

        from tests.integration.daemon import start_daemon

        t_start = time.perf_counter()
        daemon = start_daemon(self.folder, self.env)
        try:
            first = daemon.wait_metric(LEARNED, lambda v: v > 0, timeout=300)
            t_first = time.perf_counter()
            # The window ends when the next-to-last batch is learned, not the last: the daemon
            # embeds batch k+1 while it learns batch k, so at t_first the second batch is already
            # being embedded, and ending with the pipeline equally full keeps that head start
            # from counting as speed (~2% on text rounds).
            last = daemon.wait_metric(LEARNED, lambda v: v >= n - DAEMON_BATCH, timeout=900)
            t_last = time.perf_counter()
            daemon.wait_metric(LEARNED, lambda v: v >= n, timeout=900)
            rss = psutil.Process(daemon.proc.pid).memory_info().rss
            stages = {name: {"sum_s": daemon.metric(f"eddy_{name}_seconds_sum"),
                             "count": daemon.metric(f"eddy_{name}_seconds_count")} for name in STAGES}
        finally:
            rc = daemon.stop()
        if rc != 0:
            raise RuntimeError(f"daemon exited with {rc}")
        return {"events": n, "first_batch_events": first, "startup_to_first_learned_s": t_first - t_start,
                "window_events": last - first, "seconds_first_to_last": t_last - t_first,
                "events_per_s": (last - first) / (t_last - t_first),
                "daemon_rss_bytes": rss, "exit_code": rc, "stage_seconds": stages}


def _median_of_rounds(rates: list[float], refs: list[float]) -> tuple[list[float], float]:
    """Per-round ratios (each round over the mean of the references taken just before and after it)."""
    ratios = [rate / ((refs[i] + refs[i + 1]) / 2) for i, rate in enumerate(rates)]
    return ratios, float(np.median(ratios))


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


def text_part(bootstrap: str, rounds: int, per_round: int, n_backbone: int) -> dict[str, Any]:
    """Daemon text e2e vs the bare backbone embedding the same texts the way the daemon calls it.

    The daemon embeds each consumed batch (up to ``DAEMON_BATCH`` texts) in one call, sorted by
    length inside the call; the reference makes the same calls. Rounds alternate reference and
    daemon (reference, round 1, reference, round 2, ..., reference) so the machine's drift hits
    both; the ratio is the median of the per-round ratios. Calls of 64 (the encoder's own batch,
    which pads more) are reported beside it for context.
    """
    from service.core.events import encode

    texts, labels, _ = banking77(rounds * per_round, seed=1)
    sample = texts[:max(n_backbone, 2 * DAEMON_BATCH)]
    topic = f"bench-text-{uuid.uuid4().hex[:8]}"
    refs = [backbone_rate(sample, DAEMON_BATCH)]
    print(f"  backbone in process, calls of {DAEMON_BATCH}: {refs[0]:,.1f} sentences/s", flush=True)
    daemon: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="eddy-bench-text-") as tmp:
        runner = DaemonRounds(bootstrap, topic, Path(tmp), {})
        for r in range(rounds):
            chunk = range(r * per_round, (r + 1) * per_round)
            produce(bootstrap, topic, [encode(f"t-{i}", labels[i], text=texts[i]) for i in chunk])
            daemon.append(runner.round(per_round))
            refs.append(backbone_rate(sample, DAEMON_BATCH))
            print(f"  round {r + 1}/{rounds}: daemon {daemon[-1]['events_per_s']:,.1f} events/s, backbone "
                  f"{refs[-1]:,.1f} sentences/s", flush=True)
    small = backbone_rate(sample)
    print(f"  backbone in process, calls of 64: {small:,.1f} sentences/s", flush=True)
    ratios, ratio = _median_of_rounds([d["events_per_s"] for d in daemon], refs)
    return {"rounds": rounds, "events_per_round": per_round, "backbone_texts": len(sample),
            f"backbone_calls_of_{DAEMON_BATCH}_sentences_per_s": refs,
            "backbone_calls_of_64_sentences_per_s": small, "daemon": daemon, "round_ratios": ratios,
            "text_e2e_vs_backbone_ratio": ratio,
            "text_e2e_vs_backbone_calls_of_64_ratio": float(np.median([d["events_per_s"] for d in daemon])) / small}


LEAN = {"EDDY_HEAD__EXPANSION_WIDTH": "0", "EDDY_MEMORY__MAX_ITEMS": "0", "EDDY_MEMORY__ERROR_COMPENSATION": "false"}
FEATURE_CLASSES = 50  # banking77 rows of its first 50 categories (issue 19: 24,000 events, 50 classes)


def feature_events(n: int, classes: int, seed: int = 2) -> tuple[list[str], np.ndarray]:
    """``n`` banking77 (label, feature) rows of its first ``classes`` categories, in a seeded random order."""
    _, labels, X = banking77(n * 2 + 20_000, seed=seed)
    keep = sorted(set(labels))[:classes]
    idx = [i for i, label in enumerate(labels) if label in set(keep)][:n]
    if len(idx) < n:
        raise RuntimeError(f"only {len(idx)} rows of {classes} classes, {n} wanted")
    return [labels[i] for i in idx], X[idx]


def features_part(bootstrap: str, rounds: int, per_round: int) -> dict[str, Any]:
    """Feature events through the daemon vs the default head alone and vs bare consumption, side by side.

    One topic holds ``rounds * per_round`` events (JSON arrays, ``FEATURE_CLASSES`` classes),
    produced a round at a time. Each round measures, in turn: a bare kafka-python consumer reading
    the round's messages, the default head (ridge M=2048) learning the round's features in process
    (one head across rounds, batches of 512, no Kafka), the daemon with its default config, and the
    daemon with a lean config (ridge M=0, no replay memory, no compensation); both daemons learn
    every event of the topic (own groups and state folders). The references are taken once more
    after the last round; each daemon round is divided by the mean of the references just before
    and after it, and the ratio is the median over rounds:

    - ``features_e2e_vs_head_alone_ratio``: default daemon / default head alone (what the daemon
      adds on top of its head's math);
    - ``features_e2e_lean_json_vs_consume_ratio``: lean daemon / bare consume (what the daemon adds
      on top of Kafka when its head costs next to nothing);
    - context: ``head_alone_vs_consume_ratio`` and the default daemon / bare consume.
    """
    from learner.heads import make_head
    from service.core.events import encode

    labels, X = feature_events(rounds * per_round, FEATURE_CLASSES)
    topic = f"bench-features-{uuid.uuid4().hex[:8]}"
    head = make_head("ridge", expansion_width=2048, lam="gcv")
    raws: list[float] = []
    heads: list[float] = []
    daemons: dict[str, list[dict[str, Any]]] = {"default": [], "lean": []}
    sizes: list[int] = []
    load: list[list[float]] = []

    def references(chunk: range) -> None:
        raws.append(raw_consume_rate(bootstrap, topic, chunk.start, len(chunk)))
        heads.append(_timed(head.learn_many, X[chunk.start:chunk.stop], labels[chunk.start:chunk.stop], DAEMON_BATCH))

    with tempfile.TemporaryDirectory(prefix="eddy-bench-features-") as tmp:
        runners = {"default": DaemonRounds(bootstrap, topic, Path(tmp) / "default", {}),
                   "lean": DaemonRounds(bootstrap, topic, Path(tmp) / "lean",
                                        {**LEAN, "EDDY_KAFKA__GROUP_ID": f"{topic}.lean"})}
        for folder in ("default", "lean"):
            (Path(tmp) / folder).mkdir()
        for r in range(rounds):
            chunk = range(r * per_round, (r + 1) * per_round)
            values = [encode(f"f-{i}", labels[i], features=X[i]) for i in chunk]
            sizes += [len(value) for value in values]
            produce(bootstrap, topic, values)
            references(chunk)
            load.append(list(os.getloadavg()))
            for name, runner in runners.items():
                daemons[name].append(runner.round(per_round))
            print(f"  round {r + 1}/{rounds}: raw consume {raws[-1]:,.0f} msgs/s, head alone {heads[-1]:,.0f}/s, "
                  f"daemon default {daemons['default'][-1]['events_per_s']:,.0f}/s, lean "
                  f"{daemons['lean'][-1]['events_per_s']:,.0f}/s, load {load[-1][0]:.1f}", flush=True)
        # The references once more, on the last round's messages (the head relearns them: same cost).
        references(range((rounds - 1) * per_round, rounds * per_round))
    default_rates = [d["events_per_s"] for d in daemons["default"]]
    lean_rates = [d["events_per_s"] for d in daemons["lean"]]
    vs_head, vs_head_ratio = _median_of_rounds(default_rates, heads)
    lean_vs_raw, lean_ratio = _median_of_rounds(lean_rates, raws)
    default_vs_raw, default_raw_ratio = _median_of_rounds(default_rates, raws)
    head_vs_raw = [h / r for h, r in zip(heads, raws, strict=True)]
    return {"rounds": rounds, "events_per_round": per_round, "classes": FEATURE_CLASSES, "encoding": "JSON arrays",
            "message_bytes_mean": float(np.mean(sizes)), "load_average_per_round": load,
            "raw_consume_messages_per_s": raws, "head_alone_events_per_s": heads,
            "daemon": daemons, "lean_settings": LEAN,
            "round_ratios": {"default_vs_head_alone": vs_head, "lean_vs_consume": lean_vs_raw,
                             "default_vs_consume": default_vs_raw, "head_alone_vs_consume": head_vs_raw},
            "features_e2e_vs_head_alone_ratio": vs_head_ratio,
            "features_e2e_lean_json_vs_consume_ratio": lean_ratio,
            "features_e2e_default_vs_consume_ratio": default_raw_ratio,
            "head_alone_vs_consume_ratio": float(np.median(head_vs_raw))}


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
        rounds, n_text, n_backbone, n_feat = (3, 1_536, 512, 4_000) if args.quick else (3, 2_500, 2_048, 8_000)
        # Text rounds scatter most (one round: 0.80-0.97 of the encoder on shared cores): five of them.
        text_rounds = rounds if args.quick else 5
        with Broker() as broker:
            if args.part in ("text", "all"):
                print(f"== text end to end ({text_rounds} rounds of {n_text} events)", flush=True)
                doc["text"] = text_part(broker.bootstrap, text_rounds, n_text, n_backbone)
            if args.part in ("features", "all"):
                print(f"== features end to end ({rounds} rounds of {n_feat} events)", flush=True)
                doc["features"] = features_part(broker.bootstrap, rounds, n_feat)
    doc["ratios"] = {key: _ratio(doc, key) for key in TARGETS}
    doc["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"{'ratio':<42}{'value':>8}{'target':>8}")
    for key, value in doc["ratios"].items():
        shown = f"{value:8.2f}" if value is not None else f"{'-':>8}"
        print(f"{key:<42}{shown}{'>= ' + str(TARGETS[key]):>8}")
    print(f"wrote {args.out} ({doc['seconds']:.0f} s)")
    return doc


def _ratio(doc: dict[str, Any], key: str) -> float | None:
    for part in ("learn", "text", "features"):
        if key in doc.get(part, {}):
            return float(doc[part][key])
    return None


if __name__ == "__main__":
    main()
