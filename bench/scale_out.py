"""Scale-out benchmark: learn throughput with 1, 2, 3 learner replicas, and serving freshness.

For each replica count it starts a real broker (once), then a merger, a serving replica and the
learner replicas as ``eddy serve`` subprocesses, on a fresh 6-partition topic of 384-d feature
events (ridge head, expansion 256, fixed lambda). Throughput: ``--events`` events produced as fast
as possible, timed from the first send until the merger has merged all of them (so it includes
publishing and merging). Freshness: events of a never-seen class are produced and the serving
replica is asked every 20 ms until it predicts that class. Also times the ridge solve and one
partition state's size at M=2048 (the numbers docs/scaling.md plans with).

    .venv/bin/python bench/scale_out.py            # prints a table, writes bench/results/scale_out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from kafka import KafkaAdminClient, KafkaProducer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.heads import RidgeHead  # noqa: E402
from service.core.events import encode  # noqa: E402
from service.core.snapshots import pack  # noqa: E402
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb  # noqa: E402
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from service.tools.broker import LocalKafka, free_port  # noqa: E402
from tests.integration.daemon import daemon_env, start_daemon  # noqa: E402
from tests.integration.streams import DIM, feature_events  # noqa: E402

LEARNED = 'eddy_events_total{result="learned"}'
PARTITIONS = 6


def _produce(bootstrap: str, topic: str, events: list[tuple[str, str, bytes]]) -> float:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20)
    start = time.perf_counter()
    for event_id, _, value in events:
        producer.send(topic, key=event_id.encode(), value=value)
    producer.flush()
    producer.close()
    return time.perf_counter() - start


def _wait(proc, n: int, timeout: float = 600) -> None:
    proc.wait_metric(LEARNED, lambda v: v >= n, timeout=timeout)


def run_replicas(bootstrap: str, tmp: Path, replicas: int, n_events: int, fresh_trials: int) -> dict:
    topic = f"bench-so-{replicas}-{int(time.time())}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics({topic: {"num_partitions": PARTITIONS, "replication_factor": -1}})
    admin.close()
    work = tmp / topic
    work.mkdir()
    env = daemon_env(work, bootstrap, topic, EDDY_KAFKA__SCALE_OUT="true", EDDY_KAFKA__DELTAS_TOPIC=f"{topic}.deltas",
                     EDDY_HEAD__EXPANSION_WIDTH="256", EDDY_HEAD__RIDGE_LAMBDA="1.0", EDDY_MEMORY__MAX_ITEMS="0",
                     EDDY_CHECKPOINT__EVERY_SECONDS="1", EDDY_CHECKPOINT__EVERY_EVENTS="20000",
                     EDDY_EXPORT__EVERY_SECONDS="0.25", EDDY_SERVING__FOLLOW_SECONDS="0.05",
                     EDDY_METRICS__LOG_EVERY_SECONDS="5")
    procs = []
    try:
        merger = start_daemon(work, {**env, "EDDY_CHECKPOINT__DIR": str(work / "merger")}, role="merge", name="merger")
        procs.append(merger)
        server = start_daemon(work, env, role="serve", name="serve")
        procs.append(server)
        procs += [start_daemon(work, env, role="learn", name=f"learner-{i}") for i in range(replicas)]
        warm = feature_events(600, 10, seed=5, prefix="w")
        _produce(bootstrap, topic, warm)
        _wait(merger, len(warm))  # every replica holds its partitions and the group is stable
        events = feature_events(n_events, 10, seed=6, prefix="b")
        start = time.perf_counter()
        produce_s = _produce(bootstrap, topic, events)
        _wait(merger, len(warm) + n_events)
        seconds = time.perf_counter() - start
        fresh = [_freshness(bootstrap, topic, server.addr, f"new-{replicas}-{i}", seed=100 + i)
                 for i in range(fresh_trials)]
        return {"replicas": replicas, "events": n_events, "seconds": round(seconds, 3),
                "events_per_s": round(n_events / seconds, 1), "produce_seconds": round(produce_s, 3),
                "freshness_s": [round(f, 3) for f in fresh],
                "freshness_median_s": round(statistics.median(fresh), 3) if fresh else None}
    finally:
        for proc in reversed(procs):
            proc.stop()


def _freshness(bootstrap: str, topic: str, addr: str, label: str, seed: int, n: int = 12) -> float:
    """Seconds from producing ``n`` events of a new class to the serving replica predicting it."""
    rng = np.random.default_rng(seed)
    center = rng.normal(size=DIM)
    center /= np.linalg.norm(center)
    X = center + 0.05 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    request = pb.PredictRequest(features=pb.Features(values=center.astype(np.float32).tolist()))
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        start = time.perf_counter()
        for i, row in enumerate(X):
            value = encode(f"{label}-{i}", label, features=row.tolist())
            producer.send(topic, key=f"{label}-{i}".encode(), value=value)
        producer.flush()
        while time.perf_counter() - start < 120:
            if stub.Predict(request, timeout=5).predictions[0].label == label:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
    producer.close()
    return seconds


def solve_and_size(width: int = 2048, classes: int = 77, n: int = 4096) -> dict:
    """Ridge solve time and one packed partition state's size at expansion ``width``."""
    rng = np.random.default_rng(0)
    head = RidgeHead(lam=1.0, expansion_width=width, seed=0)
    head.learn_many(rng.normal(size=(n, DIM)).astype(np.float32), [f"c{i % classes}" for i in range(n)])
    times = []
    for _ in range(3):
        head._weights = None  # force a fresh Cholesky solve
        t = time.perf_counter()
        head.weights()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    size = len(pack({"head": head.state_dict()}))
    pack_s = time.perf_counter() - t
    return {"expansion_width": width, "classes": classes, "solve_seconds": round(min(times), 3),
            "state_bytes": size, "pack_seconds": round(pack_s, 3),
            "formula_bytes": (width + 1) ** 2 * 8 + (width + 1) * classes * 8}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--replicas", default="1,2,3")
    p.add_argument("--fresh-trials", type=int, default=3)
    p.add_argument("--json", default=str(REPO / "bench/results/scale_out.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eddy-bench-scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        kafka = LocalKafka(port=free_port(), data_dir=tmp / "kafka", lib_dir=REPO / ".eddy/kafka/lib")
        bootstrap = kafka.start(timeout=120)
        try:
            for replicas in [int(r) for r in args.replicas.split(",")]:
                rows.append(run_replicas(bootstrap, tmp, replicas, args.events, args.fresh_trials))
                print(rows[-1], flush=True)
        finally:
            kafka.stop()
    solve = solve_and_size()
    print(f"\n{'replicas':>8} {'events':>7} {'seconds':>8} {'events/s':>9} {'speed-up':>8} {'freshness median s':>19}")
    for row in rows:
        print(f"{row['replicas']:>8} {row['events']:>7} {row['seconds']:>8.2f} {row['events_per_s']:>9.0f} "
              f"{row['events_per_s'] / rows[0]['events_per_s']:>8.2f} {row['freshness_median_s']:>19}")
    print(f"\nridge M=2048: solve {solve['solve_seconds']} s, one partition state {solve['state_bytes'] / 1e6:.1f} MB "
          f"(pack {solve['pack_seconds']} s)")
    import kafka as kafka_python

    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "load_avg_1m_at_end": os.getloadavg()[0], "numpy": np.__version__,
                       "kafka_python": kafka_python.__version__},
           "setup": {"partitions": PARTITIONS, "dim": DIM, "head": "ridge M=256 lam=1.0", "events": args.events,
                     "publish_every_seconds": 1.0, "export_every_seconds": 0.25, "follow_seconds": 0.05},
           "rows": rows, "ridge_2048": solve}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
