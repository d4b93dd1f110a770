"""The operations HTTP endpoint: metrics exposition, liveness and readiness, over a real socket."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.serving.ops_http import HealthReport, assess, start_http_server


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], HealthReport]], str]]:
    servers = []

    def start(health: Callable[[], HealthReport]) -> str:
        server, port = start_http_server("127.0.0.1", 0, health=health)
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop()


def _healthy() -> HealthReport:
    return HealthReport(live=True, ready=True, details={"role": "all", "model_version": 3})


def test_metrics_exposes_every_eddy_metric_in_prometheus_text_format(serve) -> None:
    base = serve(_healthy)
    metrics.EVENTS.labels(result="learned").inc(7)
    metrics.PREDICT_SECONDS.labels(rpc="Predict", input="text").observe(0.003)
    status, headers, body = _get(base + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert "eddy_events" in families and "eddy_predict_seconds" in families
    learned = [s.value for s in families["eddy_events"].samples
               if s.name == "eddy_events_total" and s.labels == {"result": "learned"}]
    assert learned and learned[0] >= 7


def test_healthz_and_readyz_are_200_with_json_when_healthy(serve) -> None:
    base = serve(_healthy)
    for path in ("/healthz", "/readyz"):
        status, headers, body = _get(base + path)
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        assert doc["status"] == "ok" and doc["reasons"] == [] and doc["model_version"] == 3


def test_live_but_not_ready_fails_only_readyz_and_says_why(serve) -> None:
    base = serve(lambda: HealthReport(live=True, ready=False, reasons=["no model is served yet"]))
    assert _get(base + "/healthz")[0] == 200
    status, _, body = _get(base + "/readyz")
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "unavailable" and doc["reasons"] == ["no model is served yet"]


def test_dead_loop_fails_both_probes(serve) -> None:
    base = serve(lambda: HealthReport(live=False, ready=False, reasons=["process loop is not running"]))
    assert _get(base + "/healthz")[0] == 503
    assert _get(base + "/readyz")[0] == 503


def test_a_raising_health_check_reads_as_unhealthy_not_as_a_crash(serve) -> None:
    def broken() -> HealthReport:
        raise RuntimeError("boom")

    base = serve(broken)
    status, _, body = _get(base + "/healthz")
    assert status == 503
    assert "boom" in json.loads(body)["reasons"][0]
    assert _get(base + "/metrics")[0] == 200  # the server itself keeps working


def test_unknown_paths_are_404_query_strings_are_ignored_and_head_has_no_body(serve) -> None:
    base = serve(_healthy)
    assert _get(base + "/nope")[0] == 404
    assert _get(base + "/metrics?debug=1")[0] == 200
    status, headers, body = _get(base + "/readyz", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_concurrent_scrapes_while_a_health_check_is_slow(serve) -> None:
    release = threading.Event()

    def slow() -> HealthReport:
        release.wait(5)
        return _healthy()

    base = serve(slow)
    t = threading.Thread(target=_get, args=(base + "/readyz",))
    t.start()
    try:
        assert _get(base + "/metrics")[0] == 200  # not blocked behind the slow probe
    finally:
        release.set()
        t.join()


def test_stop_frees_the_port_and_is_idempotent() -> None:
    server, port = start_http_server("127.0.0.1", 0, health=_healthy)
    assert port > 0
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again, port2 = start_http_server("127.0.0.1", port, health=_healthy)  # rebinding works at once
    again.stop()
    assert port2 == port


def test_binding_a_taken_port_raises_oserror() -> None:
    server, port = start_http_server("127.0.0.1", 0, health=_healthy)
    try:
        with pytest.raises(OSError):
            start_http_server("127.0.0.1", port, health=_healthy)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("loop", "model", "broker", "serves", "learns", "live", "ready", "n_reasons"),
    [
        (True, True, True, True, True, True, True, 0),
        (True, True, False, True, True, True, True, 0),  # serving goes on through a Kafka outage
        (True, True, False, True, False, True, True, 0),  # a serving-only process does not need Kafka
        (True, False, False, False, True, True, False, 1),  # a learn-only process needs the broker
        (True, False, True, True, True, True, False, 1),
        (False, True, True, True, True, False, False, 1),
        (False, False, False, True, True, False, False, 2),
    ],
)
def test_assess_rule(loop, model, broker, serves, learns, live, ready, n_reasons) -> None:
    r = assess(loop_alive=loop, model_served=model, broker_up=broker, serves=serves, learns=learns,
               details={"role": "x"})
    assert (r.live, r.ready, len(r.reasons)) == (live, ready, n_reasons)
    assert r.details == {"role": "x", "broker_up": broker, "degraded": []}


@pytest.mark.parametrize(("serves", "ready"), [(True, True), (False, False)])
def test_a_disk_fault_degrades_but_a_serving_process_stays_ready(serves: bool, ready: bool) -> None:
    faults = {"snapshot": "snapshot write failed (Read-only file system); learning paused"}
    r = assess(loop_alive=True, model_served=True, broker_up=True, serves=serves, learns=True, faults=faults)
    assert r.ready is ready
    assert r.details["degraded"] == ["snapshot: snapshot write failed (Read-only file system); learning paused"]
    assert (r.reasons == []) is serves
