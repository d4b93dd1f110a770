"""A daemon on all-mpnet-base-v2: learns text events from Kafka, serves them over OIP v2 naming the
backbone, and a restart on another backbone refuses the snapshot (exit 2, one line).

Needs the mpnet weights (``eddy models install all-mpnet-base-v2``); skips with that reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tc
from kafka import KafkaProducer

from learner.backbone import ModelMissing, model_dir
from tests.integration.daemon import REPO, daemon_env, start_daemon

pytestmark = pytest.mark.kafka

TOPICS = {"cards": ["my card was declined at the shop", "the card payment failed", "card blocked after PIN"],
          "travel": ["book a flight to tokyo", "my train to paris is late", "hotel room for two nights"]}


def test_mpnet_daemon_learns_text_serves_oip_and_refuses_another_backbone(kafka_bootstrap, topic_name, tmp_path):
    try:
        model_dir("all-mpnet-base-v2", REPO / ".eddy" / "cache" / "models")
    except ModelMissing as exc:
        pytest.skip(f"needs the mpnet weights: {exc}")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    n = 0
    for label, texts in TOPICS.items():
        for i, text in enumerate(texts * 4):
            producer.send(topic_name, json.dumps({"id": f"{label}-{i}", "text": f"{text} ({i})",
                                                  "label": label}).encode())
            n += 1
    producer.flush()
    producer.close()
    env = daemon_env(tmp_path, kafka_bootstrap, topic_name, EDDY_BACKBONE__NAME="all-mpnet-base-v2",
                     EDDY_HEAD__EXPANSION_WIDTH="256", EDDY_CHECKPOINT__EVERY_SECONDS="1")
    daemon = start_daemon(tmp_path, env)
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= n, timeout=600)
        daemon.wait_metric("eddy_model_version", lambda v: v >= 1, timeout=120)
        client = tc.InferenceServerClient(daemon.addr)
        text = tc.InferInput("TEXT", [2], "BYTES")
        text.set_data_from_numpy(np.array(["card declined when paying", "a flight to rome"], dtype=object))
        labels = [row[0].decode() for row in client.infer("eddy", [text]).as_numpy("LABEL")]
        assert labels == ["cards", "travel"]
        meta = client.get_model_metadata("eddy")
        assert b"all-mpnet-base-v2@78c0197b6159" in meta.SerializeToString()  # parameters["backbone"]
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    again = subprocess.run([sys.executable, "-m", "service.app.cli", "--log-level", "ERROR", "serve"],
                           env={**daemon.env, "EDDY_BACKBONE__NAME": "all-MiniLM-L6-v2"}, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "all-mpnet-base-v2@78c0197b6159" in lines[0] and "refusing" in lines[0]
