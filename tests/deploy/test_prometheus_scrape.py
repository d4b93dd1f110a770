"""A real Prometheus scrapes eddy's metrics endpoint; the alert rules and dashboard queries run on it.

Today the endpoint is ``service.serving.ops_http`` started in this process with metrics updated the way the
daemon updates them; pointing ``prometheus_server`` at a running daemon's metrics port instead is
a one-line change.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import metrics
from service.serving.ops_http import HealthReport, start_http_server

pytestmark = pytest.mark.prometheus

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture
def metrics_target() -> Iterator[str]:
    server, port = start_http_server(
        "127.0.0.1", 0, health=lambda: HealthReport(live=True, ready=True, details={"role": "all"}))
    yield f"127.0.0.1:{port}"
    server.stop()


def _value(result: list[dict]) -> float:
    return float(result[0]["value"][1])


def test_prometheus_scrapes_eddy_metrics_and_evaluates_alerts_and_dashboard_queries(
        metrics_target: str, prometheus_server) -> None:
    metrics.EVENTS.labels(result="learned").inc(5)
    metrics.EVENTS.labels(result="dead_letter").inc(0)
    metrics.PREDICT_SECONDS.labels(rpc="Predict", input="features").observe(0.004)
    metrics.BROKER_UP.set(1)
    metrics.MODEL_VERSION.set(3)

    prom = prometheus_server([metrics_target], rule_files=[DEPLOY / "prometheus" / "alerts.yml"])

    up = prom.wait_for('up{job="eddy"} == 1')
    assert up[0]["metric"]["instance"] == metrics_target
    learned = prom.wait_for('eddy_events_total{job="eddy", result="learned"}')
    assert _value(learned) >= 5
    buckets = prom.wait_for('eddy_predict_seconds_bucket{rpc="Predict", input="features"}')
    assert {b["metric"]["le"] for b in buckets} >= {"0.005", "+Inf"}
    assert _value(prom.wait_for("eddy_model_version")) == 3

    # Latency observed between two scrapes shows up in the dashboard's histogram_quantile query.
    prom.wait_for('count_over_time(eddy_predict_seconds_count{rpc="Predict"}[1m]) >= 2')
    for _ in range(20):
        metrics.PREDICT_SECONDS.labels(rpc="Predict", input="features").observe(0.004)
    prom.wait_for('increase(eddy_predict_seconds_count{rpc="Predict", input="features"}[1m]) > 0')
    p99 = _value(prom.wait_for(
        'histogram_quantile(0.99, sum by (le) (rate(eddy_predict_seconds_bucket{input="features"}[1m])))'))
    assert 0.002 < p99 <= 0.005  # inside the bucket that holds every observation

    # Every alert rule loads and evaluates without error against real eddy series.
    def rules_evaluated() -> list[dict]:
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups if g["name"] == "eddy" for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else []

    rules = prom.wait(rules_evaluated, timeout=30, what="every eddy alert rule to evaluate")
    assert {r["name"] for r in rules} >= {
        "EddyDown", "EddyBrokerUnreachable", "EddyConsumerLagGrowing", "EddyNoRecentSwap",
        "EddyAccuracyDrop", "EddyDeadLetterRate", "EddySnapshotTooOld"}
    firing = [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]]
    assert "EddyDown" not in firing and "EddyBrokerUnreachable" not in firing

    # Every dashboard query is valid PromQL for this Prometheus (Grafana variables substituted).
    dashboard = json.loads((DEPLOY / "grafana" / "eddy-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            expr = re.sub(r"\$instance\b", ".*", expr)
            prom.query(expr)  # raises ValueError with Prometheus's message on a bad query

    version = prom.query('eddy_model_version{job="eddy"}')
    assert version and not math.isnan(_value(version))
