"""``eddy demo`` (what ``make demo`` runs): the whole product, end to end, on real parts.

1. starts a local Apache Kafka broker (fetched from Maven Central once);
2. starts the daemon (``eddy serve``) as a child process with its own state folder;
3. replays BBC News articles (4 of the 5 classes) into the topic, with a few malformed events;
4. asks for predictions over gRPC while it learns, and shows live rates, accuracy and versions;
5. produces the fifth class for the first time and measures how soon gRPC predicts it;
6. prints the dead letters, the metrics endpoint's key lines, and shuts everything down.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

DEMO_DIR = Path(".eddy/demo")
HELD_BACK = "tech"


def run_demo(*, limit: int = 1500, rate: float = 300.0) -> int:
    """Run the demo; return 0 when every step worked."""
    from service.tools.broker import LocalKafka
    from service.tools.demo_data import bbc_news_csv

    _step("1/6 starting Apache Kafka (KRaft, 127.0.0.1:9092)")
    kafka = LocalKafka(port=9092)
    was_running = kafka.status().running
    bootstrap = kafka.start()
    data = bbc_news_csv(DEMO_DIR / "bbc.csv")
    first, later = _split(data, limit)
    topic = f"demo.{int(time.time())}"
    env = _daemon_env(bootstrap, topic)
    _step(f"2/6 starting the daemon on topic {topic} (gRPC 127.0.0.1:{env['EDDY_SERVING__GRPC_PORT']}, "
          f"HTTP :{env['EDDY_SERVING__HTTP_PORT']}, "
          f"metrics :{env['EDDY_METRICS__PORT']})")
    log_path = DEMO_DIR / "daemon.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "service.app.cli", "serve"], env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
        try:
            return _scenario(bootstrap, topic, env, first, later, daemon, rate)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            if was_running:
                _step(f"daemon stopped (log: {log_path}); the broker you started keeps running")
            else:
                kafka.stop()
                _step(f"daemon and broker stopped (daemon log: {log_path})")


def _scenario(bootstrap: str, topic: str, env: dict[str, str], first: Path, later: Path,
              daemon: subprocess.Popen[bytes], rate: float) -> int:
    from kafka import KafkaProducer

    from service.tools.predict import predict
    from service.tools.produce import produce_file

    addr = f"127.0.0.1:{env['EDDY_SERVING__GRPC_PORT']}"
    metrics_url = f"http://127.0.0.1:{env['EDDY_METRICS__PORT']}/metrics"
    _step("3/6 replaying BBC News (business, entertainment, politics, sport) + 5 malformed events")
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for bad in (b"not json", b'{"id": "x"}', b'{"id":"y","label":"sport","features":[1,2]}',
                b'{"id":"z","label":"","text":"t"}', b'{"id":"w","label":"a","text":"t","extra":1}'):
        producer.send(topic, bad)
    producer.flush()
    produce_file(first, bootstrap=bootstrap, topic=topic, rate=rate, id_prefix="bbc")
    _wait(lambda: _metric(metrics_url, 'eddy_events_total{result="learned"}') >= _rows(first) - 1, 300,
          "the daemon to learn the replayed events", daemon, metrics_url)
    _step("4/6 predictions over gRPC (eddy.v1 Predict)")
    samples = ["The central bank raised interest rates as inflation climbed.",
               "The striker scored twice in the final minutes of the match.",
               "The film won three awards at the festival on Saturday night.",
               "The prime minister faces a vote in parliament next week."]
    for text in samples:
        print(f"   {json.dumps(predict(addr, text=text, features=None))}  <- {text!r}")
    _step(f"5/6 a new class appears: producing '{HELD_BACK}' for the first time")
    produced_at = time.monotonic()
    produce_file(later, bootstrap=bootstrap, topic=topic, id_prefix="bbc-new", progress=False)
    probe = "The new smartphone chip runs software faster and uses less battery power."
    # The best in-scope label: the answer itself may still be "<unknown>" while the class is young.
    _wait(lambda: predict(addr, text=probe, features=None)["top"][0]["label"] == HELD_BACK, 60,
          f"gRPC to predict '{HELD_BACK}'", daemon, metrics_url)
    print(f"   '{HELD_BACK}' servable {time.monotonic() - produced_at:.2f} s after its first event was produced")
    print(f"   {json.dumps(predict(addr, text=probe, features=None))}  <- {probe!r}")
    _step("6/6 metrics (http GET /metrics)")
    for line in _metric_lines(metrics_url):
        print(f"   {line}")
    return 0


def _split(data: Path, limit: int) -> tuple[Path, Path]:
    """Split the demo CSV into the first classes and the held-back class."""
    with data.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    first = [r for r in rows if r["label"] != HELD_BACK][:limit]
    later = [r for r in rows if r["label"] == HELD_BACK][:100]
    paths = (DEMO_DIR / "first.csv", DEMO_DIR / "later.csv")
    for path, part in zip(paths, (first, later), strict=True):
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": r["label"]} for r in part)
    return paths


def _rows(path: Path) -> int:
    with path.open(newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def _daemon_env(bootstrap: str, topic: str) -> dict[str, str]:
    state = DEMO_DIR / topic
    return {**os.environ, "EDDY_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "EDDY_KAFKA__TOPIC": topic,
            "EDDY_KAFKA__CONTROL_TOPIC": f"{topic}.control", "EDDY_KAFKA__GROUP_ID": f"{topic}.eddy",
            "EDDY_CHECKPOINT__DIR": str(state / "checkpoints"),
            "EDDY_EXPORT__REGISTRY_DIR": str(state / "models"), "EDDY_SERVING__GRPC_PORT": "50061",
            "EDDY_SERVING__HTTP_PORT": "8061",
            "EDDY_METRICS__PORT": "9161", "EDDY_METRICS__LOG_EVERY_SECONDS": "2"}


def _wait(cond: Callable[[], bool], timeout: float, what: str, daemon: subprocess.Popen[bytes],
          metrics_url: str) -> None:
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {daemon.returncode}; see {DEMO_DIR}/daemon.log")
        try:
            if cond():
                return
        except Exception:  # not ready yet (no model, broker warming up): keep waiting
            pass
        if time.monotonic() - last_print > 2:
            last_print = time.monotonic()
            print(f"   waiting for {what}: {_status(metrics_url)}", flush=True)
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _status(url: str) -> str:
    try:
        learned = _metric(url, 'eddy_events_total{result="learned"}')
        dead = _metric(url, 'eddy_events_total{result="dead_letter"}')
        version = _metric(url, "eddy_model_version")
        return f"learned {learned:.0f}, dead-lettered {dead:.0f}, model v{version:.0f}"
    except Exception:
        return "daemon starting"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        body: bytes = resp.read()
    return body.decode()


def _metric(url: str, name: str) -> float:
    """Sum of the samples whose name and labels are exactly ``name``."""
    total = 0.0
    for line in _scrape(url).splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key == name:
                total += float(value)
    return total


def _metric_lines(url: str) -> list[str]:
    keep = ("eddy_events_total", "eddy_dead_letters_total", "eddy_model_version", "eddy_classes",
            "eddy_swaps_total", "eddy_prequential_accuracy", "eddy_label_to_servable_seconds_count")
    return [ln for ln in _scrape(url).splitlines() if ln.startswith(keep) and not ln.startswith("#")]


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


