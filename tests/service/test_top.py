"""``eddy top``: quantile arithmetic, the rendered view, and the refresh loop against a real endpoint."""

from __future__ import annotations

import io
import math
import re
import socket

import pytest

from service import metrics
from service.serving.ops_http import HealthReport, start_http_server
from service.tools.top import (
    FRAME_SEPARATOR,
    Snapshot,
    counter_delta,
    histogram_quantile,
    parse_metrics,
    render,
    run_top,
)

INF = math.inf


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = [(0.001, 0.0), (0.002, 0.0), (0.005, 10.0), (INF, 10.0)]
    # rank 9.9 of 10 lies in (0.002, 0.005]: 0.002 + 0.003 * 9.9 / 10
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.00497)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.0035)


def test_histogram_quantile_edge_cases() -> None:
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (INF, 0.0)]) is None  # no observations
    # rank in the +Inf bucket: the highest finite bound, as Prometheus does
    assert histogram_quantile(0.99, [(0.1, 1.0), (1.0, 1.0), (INF, 10.0)]) == 1.0
    assert histogram_quantile(0.5, [(0.1, 4.0), (INF, 4.0)]) == pytest.approx(0.05)  # first bucket from 0


def test_counter_delta_treats_a_decrease_as_a_restart() -> None:
    assert counter_delta(15.0, 10.0) == 5.0
    assert counter_delta(3.0, 10.0) == 3.0
    assert counter_delta(3.0, None) == 0.0


def _exposition(learned: int, dead: int, applied: int, rejected: int, fast: int, slow: int, ok: int) -> str:
    return f"""\
# TYPE eddy_build_info gauge
eddy_build_info{{version="0.1.0",role="all",head="ridge",backbone="all-MiniLM-L6-v2"}} 1
# TYPE eddy_events_total counter
eddy_events_total{{result="learned"}} {learned}
eddy_events_total{{result="dead_letter"}} {dead}
# TYPE eddy_consumer_lag gauge
eddy_consumer_lag{{partition="0"}} 400
eddy_consumer_lag{{partition="1"}} 34
# TYPE eddy_swaps_total counter
eddy_swaps_total{{result="applied",reason="ok"}} {applied}
eddy_swaps_total{{result="rejected",reason="parity"}} {rejected}
# TYPE eddy_predict_seconds histogram
eddy_predict_seconds_bucket{{rpc="Predict",input="text",le="0.001"}} 0
eddy_predict_seconds_bucket{{rpc="Predict",input="text",le="0.002"}} {fast}
eddy_predict_seconds_bucket{{rpc="Predict",input="text",le="0.005"}} {fast + slow}
eddy_predict_seconds_bucket{{rpc="Predict",input="text",le="+Inf"}} {fast + slow}
eddy_predict_seconds_count{{rpc="Predict",input="text"}} {fast + slow}
eddy_predict_seconds_sum{{rpc="Predict",input="text"}} 0.1
# TYPE eddy_requests_total counter
eddy_requests_total{{rpc="Predict",code="OK"}} {ok}
eddy_requests_total{{rpc="Predict",code="INVALID_ARGUMENT"}} 2
# TYPE eddy_prequential_accuracy gauge
eddy_prequential_accuracy{{head="ridge"}} 0.912
# TYPE eddy_model_version gauge
eddy_model_version 12
# TYPE eddy_classes gauge
eddy_classes 77
# TYPE eddy_memory_items gauge
eddy_memory_items 20000
# TYPE eddy_memory_bytes gauge
eddy_memory_bytes 30720000
# TYPE eddy_broker_up gauge
eddy_broker_up 0
# TYPE eddy_last_snapshot_timestamp_seconds gauge
eddy_last_snapshot_timestamp_seconds 996
# TYPE eddy_last_swap_timestamp_seconds gauge
eddy_last_swap_timestamp_seconds 0
"""


def test_render_shows_rates_recent_swaps_and_latency_from_two_snapshots() -> None:
    prev = parse_metrics(_exposition(1000, 10, 5, 1, fast=100, slow=0, ok=100), taken_at=998.0)
    now = parse_metrics(_exposition(2000, 12, 8, 2, fast=100, slow=10, ok=110), taken_at=1000.0)
    text = render(now, prev, 2.0)
    assert "\x1b[" not in text  # no color unless asked
    assert re.search(r"learned 500\.0", text) and re.search(r"dead_letter 1\.0", text)
    assert "(total 2,012)" in text
    assert "434 total" in text and "p0 400" in text and "p1 34" in text
    assert "applied +3 (total 8)" in text and "rejected +1 (total 2)" in text
    assert "model v12" in text and "classes 77" in text and "broker DOWN" in text
    assert "accuracy ridge 0.912" in text and "20,000 items / 29.3 MiB" in text
    assert "snapshot 4 s ago" in text and "swap never" in text
    # the 10 requests in this interval all took 2-5 ms: p99 = 0.002 + 0.003 * 9.9 / 10
    assert "Predict/text" in text and "5.0 req/s" in text and "p99 5.0 ms" in text
    assert "OK 5.0" in text and "INVALID_ARGUMENT 0.0" in text
    assert "role all" in text and "version 0.1.0" in text


def test_first_frame_has_no_rates_and_an_empty_endpoint_renders() -> None:
    now = parse_metrics(_exposition(1000, 10, 5, 1, fast=100, slow=0, ok=100), taken_at=1000.0)
    text = render(now, None, 0.0)
    assert "learned -" in text and "applied -" in text and "p99 -" not in text.split("predict")[1][:3]
    empty = render(Snapshot(taken_at=0.0, samples={}), None, 0.0)
    assert "model v-" in empty and "predict" in empty


def test_a_counter_reset_between_snapshots_does_not_show_negative_rates() -> None:
    prev = parse_metrics(_exposition(5000, 10, 50, 1, fast=100, slow=0, ok=100), taken_at=998.0)
    now = parse_metrics(_exposition(200, 0, 1, 0, fast=2, slow=0, ok=2), taken_at=1000.0)
    text = render(now, prev, 2.0)
    assert "learned 100.0" in text and "-" not in text.split("learned ")[1][:1]


def test_color_marks_a_down_broker_and_errors() -> None:
    prev = parse_metrics(_exposition(1000, 10, 5, 1, fast=100, slow=0, ok=100), taken_at=998.0)
    now = parse_metrics(_exposition(2000, 12, 8, 2, fast=100, slow=10, ok=110), taken_at=1000.0)
    text = render(now, prev, 2.0, color=True)
    assert "\x1b[31mDOWN\x1b[0m" in text


def test_run_top_reads_a_live_endpoint_and_survives_an_unreachable_one() -> None:
    metrics.MODEL_VERSION.set(4)
    metrics.PREDICT_SECONDS.labels(rpc="Predict", input="features").observe(0.001)
    server, port = start_http_server("127.0.0.1", 0, health=lambda: HealthReport(live=True, ready=True))
    try:
        out = io.StringIO()
        run_top(f"http://127.0.0.1:{port}/metrics", 0.01, iterations=2, out=out)
    finally:
        server.stop()
    frames = [f for f in out.getvalue().split(FRAME_SEPARATOR) if f.strip()]
    assert len(frames) == 2
    assert all("model v4" in f for f in frames)
    assert "Predict/features" in frames[1] and "req/s" in frames[1]

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out = io.StringIO()
    run_top(f"http://127.0.0.1:{dead}/metrics", 0.01, iterations=2, out=out)
    assert out.getvalue().count("cannot read") == 2
