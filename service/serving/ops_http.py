"""The operations HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one small server.

A stdlib ``ThreadingHTTPServer`` runs in a daemon thread, so a slow scraper never blocks the learn
loop or gRPC. Contract of the three paths (anything else is 404; methods other than GET and HEAD
get the stdlib's 501):

- ``/metrics``: every metric in ``service.metrics.REGISTRY`` in the Prometheus text format.
- ``/healthz``: 200 while the process is alive (``HealthReport.live``), 503 otherwise. Kubernetes
  restarts the pod on repeated failures, so it must only fail when a restart would help.
- ``/readyz``: 200 when the process should receive traffic (``HealthReport.ready``: a model is
  served and, for roles that learn, the broker answers), 503 with the reasons otherwise. Its
  ``degraded`` list says what does not work while the process still serves (a disk that cannot
  take snapshots or exports: learning is paused until it can).

Both health bodies are JSON: ``{"status": "ok"|"unavailable", "reasons": [...], ...details}``.
A health callable that raises counts as not live and not ready (its error becomes the reason),
so a bug in the check never shows up as a healthy pod.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import REGISTRY

log = logging.getLogger("eddy.http")

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"


@dataclass(frozen=True)
class HealthReport:
    """One answer of the process's health check.

    ``live``: the process loop runs (``/healthz``). ``ready``: it should receive traffic
    (``/readyz``). ``reasons``: human-readable causes when either is false. ``details``: extra
    JSON-serialisable facts shown in both bodies (role, model version, ...).
    """

    live: bool
    ready: bool
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def assess(*, loop_alive: bool, model_served: bool, broker_up: bool, serves: bool, learns: bool,
           details: dict[str, Any] | None = None, faults: dict[str, str] | None = None) -> HealthReport:
    """The liveness and readiness rule as a pure function.

    live = the process loop is alive. ready = live and, for a process that serves, a model is
    served (a Kafka outage does not make a serving process unready: it keeps answering with the
    last model); for a learn-only process, the broker answers. The broker's state is always in
    ``details`` so operators see it.

    ``faults`` (component -> reason: a snapshot or export that cannot be written) degrade the
    process: they are listed under ``degraded`` in ``details``. A serving process stays ready (it
    answers with the served model; learning waits for the disk), a learn-only one is not ready.
    """
    reasons = []
    if not loop_alive:
        reasons.append("process loop is not running")
    if serves and not model_served:
        reasons.append("no model is served yet")
    if learns and not serves and not broker_up:
        reasons.append("Kafka broker unreachable")
    degraded = [f"{component}: {why}" for component, why in sorted((faults or {}).items())]
    if learns and not serves:
        reasons.extend(degraded)
    info = {**(details or {}), "broker_up": broker_up, "degraded": degraded}
    return HealthReport(live=loop_alive, ready=not reasons, reasons=reasons, details=info)


class OpsHTTPServer(ThreadingHTTPServer):
    """The threaded HTTP server plus the thread that runs it; ``stop()`` ends both.

    At most ``max_connections`` connections are served at once (one thread each); one more is
    closed at once rather than queued, so a flood of idle connections costs no threads, and each
    connection is closed after ``idle_seconds`` without a complete request.
    """

    daemon_threads = True
    # A restarted daemon must rebind its port at once, even with connections in TIME_WAIT.
    allow_reuse_address = True
    request_queue_size = 128  # probes arriving together while a scrape is served are not dropped

    def __init__(self, address: tuple[str, int], health: Callable[[], HealthReport], *,
                 max_connections: int = 64, idle_seconds: float = 10.0) -> None:
        super().__init__(address, _handler_for(health, idle_seconds))
        self._slots = threading.BoundedSemaphore(max_connections)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="ops-http", daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` on its own thread if a slot is free; close it otherwise."""
        if not self._slots.acquire(blocking=False):
            log.debug("closing a connection from %s: %s", client_address, "all connection slots are busy")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then give its slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        if self.thread.is_alive():
            self.shutdown()
            self.thread.join(timeout=5)
        self.server_close()


def start_http_server(host: str, port: int, *, health: Callable[[], HealthReport], max_connections: int = 64,
                      idle_seconds: float = 10.0) -> tuple[OpsHTTPServer, int]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread.

    ``port`` 0 picks a free port; the bound port is returned. ``health`` is called once per health
    request, from a server thread, so it must be thread-safe and quick. ``max_connections`` and
    ``idle_seconds`` bound the connections (``OpsHTTPServer``). Raises ``OSError`` when the address
    cannot be bound (for example the port is taken).
    """
    server = OpsHTTPServer((host, port), health, max_connections=max_connections, idle_seconds=idle_seconds)
    server.thread.start()
    return server, int(server.server_address[1])


def _handler_for(health: Callable[[], HealthReport], idle_seconds: float) -> type[BaseHTTPRequestHandler]:
    class Handler(_OpsHandler):
        check = staticmethod(health)

    Handler.timeout = idle_seconds

    return Handler


class _OpsHandler(BaseHTTPRequestHandler):
    check: Callable[[], HealthReport]
    server_version = "eddy"
    # A stuck client must not hold a server thread forever.
    timeout = 10.0

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == METRICS_PATH:
            status, ctype, body = HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        elif path in (HEALTH_PATH, READY_PATH):
            status, ctype, body = self._health(ready=path == READY_PATH)
        else:
            status, ctype, body = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _health(self, *, ready: bool) -> tuple[HTTPStatus, str, bytes]:
        try:
            report = type(self).check()
        except Exception as exc:
            log.warning("health check raised: %r", exc)
            report = HealthReport(live=False, ready=False, reasons=[f"health check failed: {exc!r}"])
        ok = report.ready if ready else report.live
        doc = {"status": "ok" if ok else "unavailable", "live": report.live, "ready": report.ready,
               "reasons": list(report.reasons), **report.details}
        body = (json.dumps(doc, default=str, sort_keys=True) + "\n").encode()
        return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE), "application/json", body

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes and probes arrive every few seconds; access lines would drown the daemon's log.
        log.debug("%s " + format, self.address_string(), *args)
