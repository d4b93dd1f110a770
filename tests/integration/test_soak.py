"""A long run keeps resident memory flat: every queue, window and memory in eddy is bounded."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest
from kafka import KafkaProducer

from service.core.events import encode
from tests.integration.daemon import daemon_env, start_daemon

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS = 200_000
DIM = 16


def test_resident_memory_flat_over_200k_events(kafka_bootstrap, topic_name, tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, DIM))
    labels = rng.integers(0, 20, size=N_EVENTS)
    X = (centers[labels] + 0.3 * rng.normal(size=(N_EVENTS, DIM))).astype(np.float32)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=50, batch_size=512 * 1024)
    for i in range(N_EVENTS):
        producer.send(topic_name, encode(f"s-{i}", f"c{labels[i]}", features=X[i].tolist()))
    producer.flush()
    producer.close()
    # Bounded structures sized so they fill up during warm-up (the first quarter of the stream).
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, EDDY_BACKBONE__DIM=str(DIM),
                     EDDY_HEAD__EXPANSION_WIDTH="256", EDDY_HEAD__RIDGE_LAMBDA="1.0",
                     EDDY_KAFKA__DEDUPE_WINDOW="20000", EDDY_MEMORY__MAX_ITEMS="5000",
                     EDDY_CHECKPOINT__EVERY_SECONDS="2", EDDY_EXPORT__KEEP="3")
    daemon = start_daemon(tmp_path, env)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    proc = psutil.Process(daemon.proc.pid)

    def sample() -> None:
        while not stop.is_set():
            try:
                learned = daemon.metric('eddy_events_total{result="learned"}')
                samples.append((learned, proc.memory_info().rss))
            except (OSError, psutil.Error):
                pass
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= N_EVENTS, timeout=900)
    finally:
        stop.set()
        t.join(5)
        assert daemon.stop() == 0
    after = [rss for learned, rss in samples if learned >= N_EVENTS // 4]
    assert len(after) >= 10, samples
    lo, hi = min(after), max(after)
    print(f"RSS after warm-up: {lo / 2**20:.0f}-{hi / 2**20:.0f} MiB over {len(after)} samples")
    assert hi <= 1.10 * lo, f"RSS grew from {lo / 2**20:.0f} MiB to {hi / 2**20:.0f} MiB"
