"""Hostile faults against a real daemon and broker (issue 14): forgets that reach the served model,
a lost registry manifest, a junk-id flood against tombstones, and a checkpoint disk that turns
read-only while the daemon runs."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc

from service.errors import ModelError
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from service.tools.predict import predict, rollback
from tests.helpers import wait_for
from tests.integration.daemon import DaemonProc, daemon_env, start_daemon
from tests.integration.reference import RIDGE_ENV, assert_statistics_equal, reference_statistics
from tests.integration.streams import feature_events
from tests.integration.test_exactly_once import export_stats, produce

pytestmark = pytest.mark.kafka

FAST = {**RIDGE_ENV, "EDDY_EXPORT__EVERY_SECONDS": "0.5", "EDDY_CHECKPOINT__EVERY_SECONDS": "0.5"}


def model_info(daemon: DaemonProc) -> pb.ModelInfoResponse:
    with grpc.insecure_channel(daemon.addr) as channel:
        # generous: on a loaded machine the backbone loading beside the server can stall a call for seconds
        return pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=20, wait_for_ready=True)


def classes_in(model_file: Path) -> str:
    return {p.key: p.value for p in onnx.load(str(model_file)).metadata_props}["classes"]


def served_classes(daemon: DaemonProc) -> list[str]:
    """The served model's classes ([] before the first model)."""
    try:
        return list(model_info(daemon).classes)
    except grpc.RpcError:
        return []


def features_of(value: bytes) -> list[float]:
    return [float(v) for v in json.loads(value)["features"]]


def served_labels(daemon: DaemonProc, rows: list[list[float]]) -> tuple[set[str], set[str]]:
    """Every label the served model returns for ``rows`` (top_k = all classes): over eddy.v1 and over OIP v2."""
    v1 = {p["label"] for row in rows for p in predict(daemon.addr, text=None, features=row, top_k=1000)["top"]}
    client = tc.InferenceServerClient(daemon.addr)
    try:
        tensor = tc.InferInput("FEATURES", [len(rows), len(rows[0])], "FP32")
        tensor.set_data_from_numpy(np.asarray(rows, dtype=np.float32))
        result = client.infer("eddy", [tensor], parameters={"top_k": 1000})
        oip = {v.decode() for v in result.as_numpy("LABEL").ravel()}
    finally:
        client.close()
    return v1, oip


def backbone_ready(daemon: DaemonProc) -> None:
    """Wait until the backbone finished loading in the background: a SIGTERM during that load was seen
    to abort the process in onnxruntime's teardown (rc -6), which is not what these tests are about."""
    wait_for(lambda: re.search(r"backbone \S+ ready", daemon.log()), timeout=60, message="the backbone loaded")


def readyz(daemon: DaemonProc) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/readyz", timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_forgotten_label_leaves_the_served_model_within_15_s_and_stays_gone(kafka_bootstrap, topic_name,
                                                                              tmp_path):
    events = feature_events(1_200, 4, seed=41)
    produce(kafka_bootstrap, topic_name, [v for _, _, v in events])
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **FAST)
    gone = "class-02"
    probes = [features_of(v) for _, lbl, v in events if lbl == gone][:8]
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 1_200, timeout=60)
        wait_for(lambda: gone in served_classes(daemon), timeout=30, message=f"{gone} served")
        before = model_info(daemon).model_version
        produce(kafka_bootstrap, f"{topic_name}.control", [json.dumps({"forget": {"label": gone}}).encode()])
        start = time.monotonic()
        # The recent rows held ~300 rows of the label, where the old model is right and the new one
        # cannot be: before issue 14 the export gate kept the old model serving.
        wait_for(lambda: gone not in model_info(daemon).classes, timeout=15, interval=0.1,
                 message=f"a served model without {gone}")
        elapsed = time.monotonic() - start
        v1, oip = served_labels(daemon, probes)
        assert gone not in v1 and gone not in oip and len(v1) == 3 and v1 == oip
        assert model_info(daemon).model_version > before
        with pytest.raises(ModelError, match="erased"):  # the versions that knew it are gone
            rollback(daemon.addr, before)
        # Admin/Forget returns once a model without the events serves.
        served_before = model_info(daemon).model_version
        ids = [i for i, lbl, _ in events if lbl == "class-01"][:5]
        with grpc.insecure_channel(daemon.addr) as channel:
            result = pb_grpc.AdminStub(channel).Forget(pb.ForgetRequest(ids=ids), timeout=30)
        assert result.forgotten == 5
        after = model_info(daemon).model_version
        assert after > served_before
    finally:
        assert daemon.stop() == 0
    print(f"forgotten label left the served model {elapsed:.2f} s after the control message")
    kept = sorted((tmp_path / "models").glob("*.onnx"))
    assert kept and all(gone not in json.loads(classes_in(p)) for p in kept)  # no file that knew it is left
    again = start_daemon(tmp_path, env, name="restart")
    try:
        wait_for(lambda: again.metric("eddy_model_version") > 0, timeout=60, message="a model served")
        info = model_info(again)
        assert info.model_version >= after and gone not in info.classes
        v1, oip = served_labels(again, probes)
        assert gone not in v1 | oip
        backbone_ready(again)
    finally:
        assert again.stop() == 0


def snapshot_version(daemon: DaemonProc) -> int:
    try:
        return int(daemon.state()["model_version"])
    except AssertionError:  # no snapshot yet
        return 0


def test_sigkill_and_a_deleted_manifest_never_send_versions_backwards(kafka_bootstrap, topic_name, tmp_path):
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **FAST)
    daemon = start_daemon(tmp_path, env)
    try:
        for n_classes in (2, 3, 4, 5):  # each new class is exported at once: one version per round at least
            batch = feature_events(100, n_classes, seed=n_classes, prefix=f"r{n_classes}")
            produce(kafka_bootstrap, topic_name, [v for _, _, v in batch])
            wait_for(lambda n=n_classes: len(served_classes(daemon)) == n, timeout=30,
                     message=f"{n_classes} classes served")
        before = int(daemon.metric("eddy_model_version"))
        assert before >= 4
        wait_for(lambda: snapshot_version(daemon) == before, timeout=30, message="a snapshot of it")
    finally:
        daemon.kill()
    (tmp_path / "models" / "manifest.json").unlink()
    start = time.monotonic()
    again = start_daemon(tmp_path, env, name="restart")
    try:
        served = wait_for(lambda: again.metric("eddy_model_version"), timeout=60, message="a model served")
        elapsed = time.monotonic() - start
        assert served >= before, f"served v{served:g} after v{before} before the crash"
        assert model_info(again).model_version >= before
        produce(kafka_bootstrap, topic_name, [v for _, _, v in feature_events(50, 6, seed=9, prefix="late")])
        wait_for(lambda: len(served_classes(again)) == 6, timeout=30, message="the sixth class served")
        assert model_info(again).model_version > before
        backbone_ready(again)
    finally:
        assert again.stop() == 0
    print(f"model v{served:g} served {elapsed:.1f} s after the restart (v{before} before the SIGKILL)")


def test_a_junk_id_flood_cannot_evict_the_tombstone_of_a_forgotten_event(kafka_bootstrap, topic_name, tmp_path):
    events = feature_events(300, 3, seed=17)
    produce(kafka_bootstrap, topic_name, [v for _, _, v in events])
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **FAST, EDDY_KAFKA__DEDUPE_WINDOW="500")
    forgotten = [e for e in events if e[0].endswith(("3", "7"))][:20]
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 300, timeout=60)
        control = f"{topic_name}.control"
        produce(kafka_bootstrap, control, [json.dumps({"forget": {"ids": [i for i, _, _ in forgotten]}}).encode()])
        daemon.wait_metric('eddy_events_total{result="forgotten"}', lambda v: v >= 20, timeout=30)
        junk = [json.dumps({"forget": {"ids": [f"junk-{m}-{i}" for i in range(1_000)]}}).encode() for m in range(3)]
        produce(kafka_bootstrap, control, junk)  # 3,000 unknown ids, six times the dedupe window
        daemon.wait_metric("eddy_forget_unknown_ids_total", lambda v: v >= 3_000, timeout=30)
        produce(kafka_bootstrap, topic_name, [v for _, _, v in forgotten])  # the forgotten events, replayed
        daemon.wait_metric('eddy_events_total{result="forgotten"}', lambda v: v >= 40, timeout=30)
    finally:
        assert daemon.stop() == 0
    state = daemon.state()
    assert state["forgotten_skipped"] == 20 and state["learned_total"] == 300 and state["events_learned"] == 280
    kept = [v for i, _, v in events if i not in {f[0] for f in forgotten}]
    assert state["per_class_counts"] == dict(sorted(collections.Counter(
        lbl for i, lbl, _ in events if i not in {f[0] for f in forgotten}).items()))
    assert_statistics_equal(export_stats(env, tmp_path / "s.npz"), reference_statistics(kept))


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs this test may remount read-only (root ignores file modes, a read-only mount it cannot)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs that can be made read-only (file modes do not stop root, "
                    "and as non-root a chmod test would not show the same failure)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no mount permission): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True)
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def test_a_read_only_checkpoint_dir_pauses_learning_keeps_serving_and_heals(kafka_bootstrap, topic_name,
                                                                             tmp_path, tmpfs_dir):
    events = feature_events(2_000, 4, seed=23)
    values = [v for _, _, v in events]
    produce(kafka_bootstrap, topic_name, values[:1_000])
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, **FAST, EDDY_CHECKPOINT__DIR=str(tmpfs_dir),
                     EDDY_CHECKPOINT__EVERY_EVENTS="200")
    daemon = start_daemon(tmp_path, env)
    probe = features_of(values[0])
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 1_000, timeout=60)
        daemon.wait_metric("eddy_model_version", lambda v: v >= 1, timeout=30)
        remount(tmpfs_dir, "ro")
        produce(kafka_bootstrap, topic_name, values[1_000:1_500])
        daemon.wait_metric("eddy_snapshot_failures_total", lambda v: v >= 2, timeout=30)
        paused_at = daemon.metric('eddy_events_total{result="learned"}')
        status, body = readyz(daemon)
        assert status == 200, body  # it still serves
        assert any("snapshot" in d and "Read-only file system" in d for d in body["degraded"]), body
        produce(kafka_bootstrap, topic_name, values[1_500:])
        daemon.wait_metric("eddy_snapshot_failures_total", lambda v: v >= 4, timeout=30)  # two more retries
        assert daemon.metric('eddy_events_total{result="learned"}') == paused_at < 2_000  # learning waits
        for _ in range(5):
            assert predict(daemon.addr, text=None, features=probe)["label"] == events[0][1]
        assert daemon.proc.poll() is None
        remount(tmpfs_dir, "rw")
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 2_000, timeout=60)
        wait_for(lambda: readyz(daemon)[1]["degraded"] == [], timeout=30, message="the fault cleared")
    finally:
        assert daemon.stop() == 0
    state = daemon.state()
    assert state["events_learned"] == 2_000 and state["duplicates_skipped"] == 0
    assert state["per_class_counts"] == dict(sorted(collections.Counter(lbl for _, lbl, _ in events).items()))
    assert_statistics_equal(export_stats(env, tmp_path / "s.npz"), reference_statistics(values))
