"""Scale-out against the real broker: 3 learner replicas (one SIGKILLed and restarted mid-stream),
1 merger and 1 serving replica end with exactly the statistics of one learner over the same events,
and the serving replica answers throughout."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from learner.heads import make_head
from service.kafka.clients import ensure_topics
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from tests.helpers import GROUP_JOIN_RERUN, wait_for
from tests.integration.daemon import REPO, DaemonProc, daemon_env, start_daemon
from tests.integration.streams import feature_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS, N_PARTITIONS, N_CLASSES = 20_000, 6, 10
HEAD = {"lam": 1.0, "expansion_width": 256, "seed": 0, "temperature": "auto"}
LEARNED = 'eddy_events_total{result="learned"}'


class Client(threading.Thread):
    """Calls Predict every ~50 ms; records (ok, model_version or error) per call."""

    def __init__(self, addr: str, x: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.addr, self.x = addr, x
        self.calls: list[tuple[bool, int | str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.addr) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.PredictRequest(features=pb.Features(values=self.x.tolist()))
            while not self.stop.wait(0.05):
                try:
                    self.calls.append((True, stub.Predict(request, timeout=5).model_version))
                except grpc.RpcError as exc:
                    self.calls.append((False, f"{exc.code().name}: {exc.details()}"))

    def failures_after_first_model(self) -> list[str]:
        first = next((i for i, (ok, _) in enumerate(self.calls) if ok), len(self.calls))
        return [str(v) for ok, v in self.calls[first:] if not ok]


def _wait_merged(merger: DaemonProc, learners: list[DaemonProc], n: int, timeout: float) -> None:
    """Wait until the merger has merged ``n`` events, failing at once if a learner replica died."""
    def merged() -> bool:
        for learner in learners:
            assert learner.proc.poll() is None, f"learner exited:\n{learner.log()[-3000:]}"
        return merger.wait_metric(LEARNED, lambda v: True) >= n

    try:
        wait_for(merged, timeout, interval=0.2, message=f"the merger to reach {n} events")
    except AssertionError as exc:
        if "learner exited" in str(exc):
            raise
        raise AssertionError(f"merger did not reach {n} events:\n{merger.log()[-3000:]}") from None


def _produce(bootstrap: str, topic: str, events: list[tuple[str, str, bytes]], rate: float) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    start, chunk = time.monotonic(), 500
    for i in range(0, len(events), chunk):
        for event_id, _, value in events[i : i + chunk]:
            producer.send(topic, key=event_id.encode(), value=value)
        time.sleep(max(start + (i + chunk) / rate - time.monotonic(), 0.0))
    producer.flush()
    producer.close()


def _reference(events: list[tuple[str, str, bytes]]) -> dict[str, np.ndarray]:
    X = np.array([json.loads(value)["features"] for _, _, value in events], dtype=np.float32)
    head = make_head("ridge", **HEAD)
    head.learn_many(X, [label for _, label, _ in events])
    return head.statistics()


def _merged_stats(env: dict[str, str], checkpoint: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "service.app.cli", "state", "--json", "--checkpoint", str(checkpoint),
                           "--export-stats", str(out)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _committed_total(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    committed = admin.list_group_offsets(group).get(group, {})
    admin.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    tps = [TopicPartition(topic, p) for p in range(N_PARTITIONS)]
    end = sum(consumer.end_offsets(tps).values())
    consumer.close()
    return sum(om.offset for tp, om in committed.items() if tp.topic == topic), end


@GROUP_JOIN_RERUN
def test_three_replicas_one_killed_merge_to_the_single_learner_statistics(kafka_bootstrap, topic_name, tmp_path):
    events = feature_events(N_EVENTS, N_CLASSES, seed=11)
    ensure_topics(kafka_bootstrap, {topic_name: N_PARTITIONS})
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name,
                     EDDY_KAFKA__SCALE_OUT="true", EDDY_KAFKA__DELTAS_TOPIC=f"{topic_name}.deltas",
                     EDDY_HEAD__EXPANSION_WIDTH=str(HEAD["expansion_width"]), EDDY_HEAD__RIDGE_LAMBDA="1.0",
                     EDDY_MEMORY__MAX_ITEMS="0", EDDY_CHECKPOINT__EVERY_SECONDS="1",
                     EDDY_EXPORT__EVERY_SECONDS="0.5", EDDY_SERVING__FOLLOW_SECONDS="0.2")
    merger_ckpt = tmp_path / "merger"
    procs: list[DaemonProc] = []
    client = None
    try:
        merger = start_daemon(tmp_path, {**env, "EDDY_CHECKPOINT__DIR": str(merger_ckpt)}, role="merge",
                              name="merger")
        procs.append(merger)
        server = start_daemon(tmp_path, env, role="serve", name="serve")
        procs.append(server)
        learners = [start_daemon(tmp_path, env, role="learn", name=f"learner-{i}") for i in range(3)]
        procs.extend(learners)
        x0 = np.array(json.loads(events[0][2])["features"], dtype=np.float32)
        client = Client(server.addr, x0)
        client.start()

        producer = threading.Thread(target=_produce, args=(kafka_bootstrap, topic_name, events, 1000.0))
        producer.start()
        _wait_merged(merger, learners, 5000, timeout=180)
        learners[0].kill()  # SIGKILL mid-stream, then restart a replacement at once
        learners[0] = start_daemon(tmp_path, env, role="learn", name="learner-3")
        procs.append(learners[0])
        producer.join()
        _wait_merged(merger, learners, N_EVENTS, timeout=240)
        server.wait_metric("eddy_model_version", lambda v: v >= 1, timeout=30)
        calls = len(client.calls)  # a few more predictions against the final model
        wait_for(lambda: len(client.calls) >= calls + 5, 10, message="predictions against the final model")
    finally:
        if client is not None:
            client.stop.set()
            client.join(10)
        for proc in reversed(procs):
            proc.stop()

    for proc in procs[2:]:
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
    restored = [line for p in procs[2:] for line in p.log().splitlines() if " restored at offset " in line]
    assert restored, "no replica restored a partition from a published state"

    assert merger.proc.returncode == 0, merger.log()[-3000:]
    report = _merged_stats(env, merger_ckpt, tmp_path / "stats.npz")
    expected_counts = collections.Counter(label for _, label, _ in events)
    assert report["per_class_counts"] == dict(sorted(expected_counts.items()))
    assert report["learned_total"] == N_EVENTS
    assert sum(report["offsets"].values()) == N_EVENTS
    merged = np.load(tmp_path / "stats.npz")
    reference = _reference(events)
    assert list(merged["classes"]) == list(reference["classes"])
    assert np.array_equal(merged["counts"], reference["counts"])
    for key in ("gram", "Q", "sums"):
        scale = np.abs(reference[key]).max()
        assert np.abs(merged[key] - reference[key]).max() <= 1e-9 * scale, key

    committed, end = _committed_total(kafka_bootstrap, f"{topic_name}.g", topic_name)
    assert committed == end == N_EVENTS

    assert client is not None
    served = [v for ok, v in client.calls if ok]
    assert served, f"no prediction succeeded: {client.calls[-5:]}"
    assert client.failures_after_first_model() == []
    assert served == sorted(served), "a client saw the model version go backwards"
