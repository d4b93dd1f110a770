"""Never lose or double-count an event: crashes, broker restarts, hostile input, forgetting."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from service.core.events import encode
from service.tools.broker import LocalKafka, port_in_use
from service.tools.predict import predict
from tests.helpers import wait_for
from tests.integration.daemon import REPO, daemon_env, start_daemon
from tests.integration.reference import RIDGE_ENV, assert_statistics_equal, reference_statistics
from tests.integration.streams import DIM, feature_events

pytestmark = pytest.mark.kafka


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[str] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for i, value in enumerate(values):
        producer.send(topic, value, key=keys[i].encode() if keys else None)
    producer.flush()
    producer.close()


def export_stats(env: dict[str, str], out: Path) -> dict[str, np.ndarray]:
    proc = subprocess.run([sys.executable, "-m", "service.app.cli", "state", "--json", "--export-stats", str(out)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as npz:
        return {k: npz[k] for k in npz.files}


def snapshot_in_progress(checkpoints: Path) -> bool:
    return checkpoints.exists() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir())


def learned_in_snapshot(daemon) -> int:
    """Events in the newest snapshot (0 before the first one is written)."""
    try:
        return int(daemon.state()["events_learned"])
    except AssertionError:
        return 0


@pytest.mark.chaos
@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(kafka_bootstrap, topic_name, tmp_path):
    events = feature_events(20_000, 12, seed=11)
    produce(kafka_bootstrap, topic_name, [v for _, _, v in events])
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **RIDGE_ENV,
                     EDDY_CHECKPOINT__EVERY_EVENTS="1500", EDDY_CHECKPOINT__EVERY_SECONDS="0.5",
                     EDDY_KAFKA__BATCH_MAX_EVENTS="250", EDDY_MEMORY__MAX_ITEMS="5000")
    rng = random.Random(7)
    checkpoints = tmp_path / "checkpoints"
    kills, during_snapshot = 0, 0
    while kills < 10 or during_snapshot < 2:
        assert kills < 30, "could not hit enough snapshot writes"
        daemon = start_daemon(tmp_path, env, name=f"run{kills}")
        if during_snapshot < 2 and kills % 3 == 1:
            # Kill while a snapshot's temporary file exists, i.e. in the middle of writing it.
            deadline = time.monotonic() + 30
            while not snapshot_in_progress(checkpoints) and time.monotonic() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.5, 3.0))
        hit = snapshot_in_progress(checkpoints)
        daemon.kill()
        kills += 1
        during_snapshot += int(hit)
    daemon = start_daemon(tmp_path, env, name="final")
    try:
        wait_for(lambda: learned_in_snapshot(daemon) == 20_000, timeout=300, interval=1.0,
                 message="all 20,000 events in the snapshot")
    finally:
        assert daemon.stop() == 0
    state = daemon.state()
    produced = collections.Counter(label for _, label, _ in events)
    assert state["per_class_counts"] == dict(sorted(produced.items()))
    assert state["events_learned"] == 20_000
    assert state["duplicates_skipped"] == 0
    got = export_stats(env, tmp_path / "stats.npz")
    assert_statistics_equal(got, reference_statistics([v for _, _, v in events]))
    print(f"kills: {kills}, during a snapshot write: {during_snapshot}")


@pytest.mark.slow
def test_broker_restart_mid_stream(tmp_path):
    kafka = LocalKafka(port=port_outside_ephemeral_range(), data_dir=tmp_path / "kafka",
                       lib_dir=REPO / ".eddy" / "kafka" / "lib")
    bootstrap = kafka.start(timeout=120)
    topic = "restart-topic"
    events = feature_events(6_000, 6, seed=5)
    values = [v for _, _, v in events]
    env = daemon_env(tmp_path, bootstrap, topic, **RIDGE_ENV, EDDY_KAFKA__RECONNECT_BACKOFF_MAX_MS="1000")
    daemon = None
    try:
        produce(bootstrap, topic, values[:3_000])
        daemon = start_daemon(tmp_path, env)
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 3_000)
        daemon.wait_metric("eddy_model_version", lambda v: v >= 1)
        probe = np.frombuffer(np.asarray(json.loads(values[0])["features"], dtype=np.float32).tobytes(),
                              dtype=np.float32).tolist()
        served, failures, stop = [], [], threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    served.append(predict(daemon.addr, text=None, features=probe)["model_version"])
                except Exception as exc:
                    failures.append(repr(exc))
                time.sleep(0.05)

        t = threading.Thread(target=client, daemon=True)
        t.start()
        kafka.stop()
        daemon.wait_metric("eddy_broker_up", lambda v: v == 0, timeout=60)
        n_before = len(served)
        # predictions keep flowing while the broker is down
        wait_for(lambda: len(served) >= n_before + 5, 10, message="predictions while the broker is down")
        kafka.start(timeout=120)
        produce(bootstrap, topic, values[3_000:])
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 6_000, timeout=180)
        daemon.wait_metric("eddy_broker_up", lambda v: v == 1, timeout=60)
        stop.set()
        t.join(5)
        assert failures == []
        assert served == sorted(served)
    finally:
        if daemon is not None:
            assert daemon.stop() == 0
        kafka.stop()
    state = daemon.state()
    assert state["events_learned"] == 6_000
    assert state["per_class_counts"] == dict(sorted(collections.Counter(lbl for _, lbl, _ in events).items()))
    assert_statistics_equal(export_stats(env, tmp_path / "s.npz"), reference_statistics(values))


def port_outside_ephemeral_range() -> int:
    """A free port (and the next one, for the controller) below Linux's ephemeral range.

    While the broker is down the daemon keeps connecting to its port; an ephemeral source port can
    then equal the target port (a TCP self-connect) and hold it, so the restart could not bind.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 30_000)
        if not port_in_use(port) and not port_in_use(port + 1):
            return port
    raise AssertionError("no free port pair found below 30000")


def hostile_messages(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    kinds = []
    for i in range(n):
        k = i % 10
        if k == 0:
            kinds.append(("random", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))))
        elif k == 1:
            kinds.append(("huge", b'{"id": "h%d", "label": "x", "text": "' % i + b"a" * 100_000 + b'"}'))
        elif k == 2:
            kinds.append(("nested", b"[" * 5_000 + b"]" * 5_000))
        elif k == 3:
            kinds.append(("nan", b'{"id": "n%d", "label": "x", "features": [' % i + b",".join([b"NaN"] * DIM) + b"]}"))
        elif k == 4:
            kinds.append(("inf", b'{"id": "i%d", "label": "x", "features": [' % i
                          + b",".join([b"1e999"] * DIM) + b"]}"))
        elif k == 5:
            kinds.append(("dim", json.dumps({"id": f"d{i}", "label": "x", "features": [0.1] * (DIM + 1)}).encode()))
        elif k == 6:
            kinds.append(("types", json.dumps({"id": i, "label": ["x"], "features": "no"}).encode()))
        elif k == 7:
            kinds.append(("empty_label", json.dumps({"id": f"e{i}", "label": "", "features": [0.1] * DIM}).encode()))
        elif k == 8:
            kinds.append(("deep_object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000))
        else:
            kinds.append(("empty", b""))
    return kinds


@pytest.mark.slow
def test_fuzz_hostile_messages_interleaved_with_good_ones(kafka_bootstrap, topic_name, tmp_path):
    good = feature_events(10_000, 8, seed=9)
    bad = hostile_messages(10_000)
    values = [v for _, _, v in good] + [raw for _, raw in bad]
    random.Random(1).shuffle(values)
    producer_cfg = {"max_request_size": 4 * 1024 * 1024}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20, **producer_cfg)
    for v in values:
        producer.send(topic_name, v)
    producer.flush()
    producer.close()
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **RIDGE_ENV, EDDY_KAFKA__MAX_EVENT_BYTES="65536")
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="dead_letter"}', lambda v: v >= 10_000, timeout=300)
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 10_000, timeout=300)
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
    from tests.helpers import consume

    dead = consume(kafka_bootstrap, f"{topic_name}.dlq", 10_000, timeout=120,
                   fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    assert len(dead) == 10_000
    assert all(dict(m.headers).get("eddy.reason") for m in dead)
    state = daemon.state()
    assert state["events_learned"] == 10_000
    assert state["dead_lettered"] == 10_000
    assert_statistics_equal(export_stats(env, tmp_path / "s.npz"), reference_statistics([v for _, _, v in good]))


@pytest.mark.slow
def test_forget_ids_and_a_label_equals_never_seen(kafka_bootstrap, topic_name, tmp_path):
    events = feature_events(4_000, 6, seed=21)
    produce(kafka_bootstrap, topic_name, [v for _, _, v in events])
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **RIDGE_ENV, EDDY_MEMORY__MAX_ITEMS="100000")
    daemon = start_daemon(tmp_path, env)
    rng = random.Random(3)
    forgotten_label = "class-02"
    forget_ids = rng.sample([i for i, lbl, _ in events if lbl != forgotten_label], 100)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 4_000)
        control = f"{topic_name}.control"
        produce(kafka_bootstrap, control, [json.dumps({"forget": {"ids": forget_ids}}).encode(),
                                           json.dumps({"forget": {"label": forgotten_label}}).encode()])
        n_label = sum(1 for _, lbl, _ in events if lbl == forgotten_label)
        daemon.wait_metric('eddy_events_total{result="forgotten"}', lambda v: v >= 100 + n_label)
    finally:
        assert daemon.stop() == 0
    gone = set(forget_ids) | {i for i, lbl, _ in events if lbl == forgotten_label}
    kept = [v for i, _, v in events if i not in gone]
    assert_statistics_equal(export_stats(env, tmp_path / "s.npz"), reference_statistics(kept))
    from service.core.snapshots import SnapshotStore

    snapshot = SnapshotStore(tmp_path / "checkpoints").latest()
    assert snapshot is not None
    in_memory = {str(x) for x in snapshot["memory"]["event_ids"]}
    assert in_memory, "the replay memory should hold the remaining events"
    assert not (in_memory & gone)
    state = daemon.state()
    assert forgotten_label not in state["per_class_counts"]
    assert state["forgotten"] == len(gone)


def export_children(cache_dir: Path) -> list[int]:
    """PIDs of live ``python -m service.models.backbone`` export processes writing into ``cache_dir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.models.backbone" in cmdline and str(cache_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_stop_while_the_backbone_exports_exits_cleanly_and_loses_nothing(kafka_bootstrap, topic_name, tmp_path):
    """A fresh machine exports the backbone for a minute; a stop meanwhile must not crash or drop text."""
    texts = [encode(f"t-{i}", f"topic-{i % 3}", text=f"sentence number {i} about topic {i % 3}")
             for i in range(30)]
    produce(kafka_bootstrap, topic_name, texts + [v for _, _, v in feature_events(40, 3, seed=9)])
    cold = tmp_path / "cold-cache"
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, EDDY_BACKBONE__CACHE_DIR=str(cold))
    daemon = start_daemon(tmp_path, env, name="cold")
    wait_for(lambda: export_children(cold), timeout=60, message="the export child started")
    wait_for(lambda: "waiting for the backbone" in daemon.log(), timeout=60, message="the learner waits on it")
    assert daemon.stop() == 0
    assert "stopping before the backbone loaded" in daemon.log()
    wait_for(lambda: not export_children(cold), timeout=15, message="the export child is gone")
    assert not list(cold.glob("*.tmp")), "the killed export left a temporary file"
    assert daemon.state()["events_learned"] == 0  # the batch mixed text and features: none counted

    warm = start_daemon(tmp_path, daemon_env(tmp_path, kafka_bootstrap, topic_name), name="warm")
    try:
        warm.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 70, timeout=120)
    finally:
        assert warm.stop() == 0
    state = warm.state()
    assert state["events_learned"] == 70 and state["dead_lettered"] == 0
