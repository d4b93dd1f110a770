"""Forget requests in scale-out mode, against the real broker and real processes.

2 learner replicas (one SIGKILLed mid-stream and restarted), 1 merger, 1 serving replica and a
single-process ``--role all`` daemon learn the same 3-partition topic; a whole-label forget (sent
with ``Admin/Forget`` to the serving replica, which queues it on the control topic) and a forget of
150 ids of other labels plus a few ids that were never produced then end, in both deployments, with
exactly the statistics of a learner that never saw those events; the serving replica stops
answering the forgotten label. A replica SIGKILLed right after applying a forget (before
publishing), or right after publishing it, neither loses the forget nor applies it twice.
"""

from __future__ import annotations

import collections
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from kafka import KafkaProducer

from service.kafka.clients import ensure_topics
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from tests.helpers import GROUP_JOIN_RERUN
from tests.integration.daemon import DaemonProc, daemon_env, start_daemon
from tests.integration.reference import RIDGE_ENV, assert_statistics_equal, reference_statistics
from tests.integration.streams import feature_events
from tests.integration.test_scale_out import _merged_stats, _produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_PARTITIONS = 3
LEARNED = 'eddy_events_total{result="learned"}'
FORGOTTEN = 'eddy_events_total{result="forgotten"}'
UNKNOWN = "eddy_forget_unknown_ids_total"
NEVER_PRODUCED = ["ghost-1", "ghost-2", "ghost-3", "ghost-4", "ghost-5"]


def _scale_out_env(tmp_path: Path, bootstrap: str, topic: str, **extra: str) -> dict[str, str]:
    return daemon_env(tmp_path, bootstrap, topic, **RIDGE_ENV, EDDY_KAFKA__SCALE_OUT="true",
                      EDDY_KAFKA__DELTAS_TOPIC=f"{topic}.deltas", EDDY_MEMORY__MAX_ITEMS="0",
                      EDDY_CHECKPOINT__EVERY_SECONDS="1", EDDY_EXPORT__EVERY_SECONDS="0.5",
                      EDDY_SERVING__FOLLOW_SECONDS="0.2", **extra)


def _start_all(tmp_path: Path, specs: list[tuple[dict[str, str], str, str]], procs: list[DaemonProc]
               ) -> list[DaemonProc]:
    """Start ``(env, role, name)`` daemons side by side (each waits for its metrics endpoint); all go in ``procs``."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(start_daemon, tmp_path, env, role=role, name=name) for env, role, name in specs]
    procs.extend(f.result() for f in futures if f.exception() is None)  # the caller stops these
    return [f.result() for f in futures]


def _send_control(bootstrap: str, topic: str, body: dict) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(f"{topic}.control", value=json.dumps({"forget": body}).encode()).get(timeout=30)
    producer.close()


def _wait_until(what: str, cond, procs: list[DaemonProc], timeout: float) -> None:
    """Wait for ``cond()``, failing at once (with its log) if any process in ``procs`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.proc.poll() is None, f"{p.log_path.name} exited:\n{p.log()[-3000:]}"
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(p.log()[-1500:] for p in procs))


def _plan(events: list[tuple[str, str, bytes]], label: str, n_ids: int) -> tuple[list[str], set[str]]:
    """150 ids of other labels, spread over the stream; and every id the forgets remove."""
    others = [i for i, lbl, _ in events if lbl != label]
    ids = others[:: len(others) // n_ids][:n_ids]
    return ids, set(ids) | {i for i, lbl, _ in events if lbl == label}


def _served_classes(addr: str) -> list[str]:
    try:
        with grpc.insecure_channel(addr) as channel:
            return list(pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5).classes)
    except grpc.RpcError:
        return []  # no model yet


def _owned(log: str) -> set[int]:
    """The partitions a replica took over last (from its "assigned partitions [...]" line)."""
    found = re.findall(r"assigned partitions \[([0-9, ]*)\]", log)
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()


def _applications(logs: list[str]) -> collections.Counter[int]:
    """How many times each partition applied a forget, by the replicas' logs."""
    return collections.Counter(int(p) for log in logs for p in re.findall(r"partition (\d+): forget at control", log))


def _admin_forget_label(addr: str, label: str) -> str:
    """``Admin/Forget`` on a serving replica; returns where it queued the request."""
    with grpc.insecure_channel(addr) as channel:
        _reply, call = pb_grpc.AdminStub(channel).Forget.with_call(pb.ForgetRequest(label=label), timeout=30)
    return dict(call.trailing_metadata() or ()).get("eddy-forget-published", "")


@GROUP_JOIN_RERUN
def test_forget_in_scale_out_equals_single_process_and_leaves_the_served_model(kafka_bootstrap, topic_name,
                                                                               tmp_path):
    events = feature_events(4_000, 6, seed=31)
    label = "class-02"
    ids, gone = _plan(events, label, 150)
    ensure_topics(kafka_bootstrap, {topic_name: N_PARTITIONS})
    env = _scale_out_env(tmp_path, kafka_bootstrap, topic_name)
    single_env = {**env, "EDDY_KAFKA__SCALE_OUT": "false", "EDDY_KAFKA__GROUP_ID": f"{topic_name}.single",
                  "EDDY_CHECKPOINT__DIR": str(tmp_path / "single"),
                  "EDDY_EXPORT__REGISTRY_DIR": str(tmp_path / "single-models")}
    merger_ckpt = tmp_path / "merger"
    procs: list[DaemonProc] = []
    try:
        merger, server, single, *learners = _start_all(tmp_path, [
            ({**env, "EDDY_CHECKPOINT__DIR": str(merger_ckpt)}, "merge", "merger"), (env, "serve", "serve"),
            (single_env, "all", "single"), (env, "learn", "learner-0"), (env, "learn", "learner-1")], procs)

        _produce(kafka_bootstrap, topic_name, events[:1_500], 1000.0)
        _wait_until("1,000 merged events", lambda: merger.metric(LEARNED) >= 1_000, [merger, *learners], 120)
        learners[0].kill()  # SIGKILL mid-stream, restarted at once
        learners[0] = start_daemon(tmp_path, env, role="learn", name="learner-2")
        procs.append(learners[0])
        _produce(kafka_bootstrap, topic_name, events[1_500:], 1000.0)
        _wait_until("everything learned by both deployments",
                    lambda: merger.metric(LEARNED) >= 4_000 and single.metric(LEARNED) >= 4_000,
                    [merger, single, *learners], 180)
        _wait_until("a served model with the label", lambda: label in _served_classes(server.addr), [server], 60)

        where = _admin_forget_label(server.addr, label)
        assert where.startswith(f"{topic_name}.control:"), where
        _send_control(kafka_bootstrap, topic_name, {"ids": ids + NEVER_PRODUCED})

        for proc in (merger, single):
            _wait_until(f"{proc.log_path.name} to forget {len(gone)} events",
                        lambda p=proc: p.metric(FORGOTTEN) >= len(gone) and p.metric(UNKNOWN) >= len(NEVER_PRODUCED),
                        [merger, single, *learners], 90)
        _wait_until("the serving replica to drop the label", lambda: label not in _served_classes(server.addr),
                    [server], 60)
        x = np.array(json.loads(next(v for i, lbl, v in events if lbl == label))["features"], np.float32)
        with grpc.insecure_channel(server.addr) as channel:
            reply = pb_grpc.InferenceStub(channel).Predict(
                pb.PredictRequest(features=pb.Features(values=x.tolist()), top_k=10), timeout=5)
        assert reply.predictions and label not in {p.label for p in reply.predictions}
        time.sleep(1.5)  # a late second application would show in the counters below
        assert merger.metric(FORGOTTEN) == len(gone) and merger.metric(UNKNOWN) == len(NEVER_PRODUCED)
        assert [learner.metric(UNKNOWN) for learner in learners] == [0, 0]  # counted by the merger alone
    finally:
        for proc in reversed(procs):
            proc.stop()

    audit = [line for line in server.log().splitlines() if "forget request published" in line]
    assert len(audit) == 1, audit
    for proc in procs:
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
    assert merger.proc.returncode == 0 and single.proc.returncode == 0

    merged = _merged_stats(env, merger_ckpt, tmp_path / "merged.npz")
    alone = _merged_stats(single_env, tmp_path / "single", tmp_path / "single.npz")
    expected = collections.Counter(lbl for i, lbl, _ in events if i not in gone)
    for report in (merged, alone):
        assert report["per_class_counts"] == dict(sorted(expected.items()))
        assert report["forgotten"] == len(gone)
        assert report["forget_unknown_ids"] == len(NEVER_PRODUCED)
    merged_stats, single_stats = dict(np.load(tmp_path / "merged.npz")), dict(np.load(tmp_path / "single.npz"))
    assert_statistics_equal(merged_stats, single_stats)
    assert_statistics_equal(merged_stats, reference_statistics(v for i, _, v in events if i not in gone))


@GROUP_JOIN_RERUN
@pytest.mark.parametrize("kill_at", ["forget_applied", "forget_published"])
def test_a_replica_killed_around_a_forget_neither_loses_nor_repeats_it(kafka_bootstrap, topic_name, tmp_path,
                                                                       kill_at):
    events = feature_events(1_200, 4, seed=41)
    label = "class-01"
    ids, gone = _plan(events, label, 60)
    ensure_topics(kafka_bootstrap, {topic_name: N_PARTITIONS})
    env = _scale_out_env(tmp_path, kafka_bootstrap, topic_name)
    merger_ckpt = tmp_path / "merger"
    procs: list[DaemonProc] = []
    try:
        merger, doomed, other = _start_all(tmp_path, [
            ({**env, "EDDY_CHECKPOINT__DIR": str(merger_ckpt)}, "merge", "merger"),
            ({**env, "EDDY_TESTING_KILL_AT": kill_at}, "learn", "doomed"), (env, "learn", "other")], procs)
        _wait_until("both replicas to own partitions", lambda: _owned(doomed.log()) and _owned(other.log())
                    and _owned(doomed.log()) | _owned(other.log()) == {0, 1, 2}, procs, 60)
        _produce(kafka_bootstrap, topic_name, events, 2000.0)
        _wait_until("everything merged", lambda: merger.metric(LEARNED) >= len(events), procs, 120)
        doomed_parts = _owned(doomed.log())

        _send_control(kafka_bootstrap, topic_name, {"ids": ids + NEVER_PRODUCED[:3], "label": label})
        doomed.proc.wait(60)
        assert doomed.proc.returncode == -9, doomed.log()[-3000:]
        assert f"reached {kill_at}: SIGKILL" in doomed.log()
        other_before = len(other.log())
        successor = start_daemon(tmp_path, env, role="learn", name="successor")
        procs.append(successor)
        survivors = [merger, other, successor]
        _wait_until(f"partitions {sorted(doomed_parts)} restored by the survivors", lambda: all(
            f"partition {p} restored at offset" in other.log()[other_before:] + successor.log()
            for p in doomed_parts), survivors, 60)
        _wait_until(f"{len(gone)} events forgotten, 3 unknown ids",
                    lambda: merger.metric(FORGOTTEN) >= len(gone) and merger.metric(UNKNOWN) >= 3, survivors, 60)
        time.sleep(2.0)  # a second application would show in the counters below
        assert merger.metric(FORGOTTEN) == len(gone) and merger.metric(UNKNOWN) == 3
    finally:
        for proc in reversed(procs):
            proc.stop()

    # Every partition holds the forget exactly once: for the doomed partitions, the application
    # that counts is the published one (the doomed replica's if it published, else its successor's).
    published = [other.log(), successor.log()] + ([doomed.log()] if kill_at == "forget_published" else [])
    assert _applications(published) == {p: 1 for p in range(N_PARTITIONS)}
    report = _merged_stats(env, merger_ckpt, tmp_path / "merged.npz")
    expected = collections.Counter(lbl for i, lbl, _ in events if i not in gone)
    assert report["per_class_counts"] == dict(sorted(expected.items()))
    assert report["forgotten"] == len(gone)
    assert report["forget_unknown_ids"] == 3
    assert_statistics_equal(dict(np.load(tmp_path / "merged.npz")),
                            reference_statistics(v for i, _, v in events if i not in gone))
