"""Connection limits: the gRPC cap and idle timeout, the operations HTTP server's cap (issue 14)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

from service.models.served import ModelSlot
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from service.serving.grpc.server import ConnectionLimits
from service.serving.ops_http import HealthReport, start_http_server
from tests.helpers import wait_for
from tests.service.grpc_fixtures import running_server, served

# The HTTP/2 client preface and an empty SETTINGS frame: a connection that says hello, then idles.
H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def _open(addr: str, n: int, hello: bytes = b"") -> list[socket.socket]:
    host, port = addr.rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        if hello:
            s.sendall(hello)
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket, wait: float) -> bool:
    """True if the server closes ``s`` within ``wait`` seconds (frames it sends first are skipped)."""
    s.settimeout(wait)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _model_info(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        return pb_grpc.InferenceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5).model_version


@pytest.fixture
def slot() -> ModelSlot:
    s = ModelSlot()
    s.swap(served(1))
    return s


def test_connections_past_the_cap_are_refused_and_idle_ones_are_closed(slot: ModelSlot) -> None:
    limits = ConnectionLimits(max_connections=4, idle_seconds=1.5)
    with running_server(slot, connections=limits) as (addr, _):
        socks = _open(addr, 12, H2_HELLO)
        try:
            time.sleep(0.3)
            closed = [_closed_by_peer(s, 0.2) for s in socks]
            assert closed.count(False) == 4, closed  # four held, eight refused at once
            with pytest.raises(grpc.RpcError) as err:
                _model_info(addr)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            start = time.monotonic()
            assert all(_closed_by_peer(s, 5) for s in socks)  # the idle timeout frees every slot
            assert time.monotonic() - start < 4
            assert _model_info(addr) == 1
        finally:
            for s in socks:
                s.close()


def test_an_active_client_is_not_cut_by_the_idle_timeout(slot: ModelSlot) -> None:
    limits = ConnectionLimits(max_connections=4, idle_seconds=0.5)
    with running_server(slot, connections=limits) as (addr, _), grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in range(20):  # calls 0.1 s apart keep the connection busy enough
            assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=5).model_version == 1
            time.sleep(0.1)


def _health() -> HealthReport:
    return HealthReport(live=True, ready=True)


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return int(resp.status)


def test_the_ops_server_closes_connections_past_its_cap_and_frees_idle_ones() -> None:
    server, port = start_http_server("127.0.0.1", 0, health=_health, max_connections=3, idle_seconds=1.0)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        idle = _open(f"127.0.0.1:{port}", 3)
        time.sleep(0.2)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _get(url)  # every slot is held by an idle connection: closed at once, not queued
        wait_for(lambda: all(_closed_by_peer(s, 0.1) for s in idle), timeout=5)
        assert _get(url) == 200
        for s in idle:
            s.close()
    finally:
        server.stop()
