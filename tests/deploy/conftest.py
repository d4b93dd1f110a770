"""A real Prometheus server for the deploy tests: ``prometheus_server(targets)`` starts one.

The factory writes a scrape config for ``targets`` (``host:port`` strings, job ``eddy``), starts
Debian's ``prometheus`` binary on a free local port with its storage in a temporary directory,
waits until it is ready, and stops it when the test ends. Tests skip when the binary is absent
(``make tools`` / deploy/install-tools.sh installs it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    """``tests.helpers.wait_for`` that treats a server not answering yet as "not yet"."""
    return wait_for(condition, timeout, interval=interval, message=what, ignore=(OSError, ValueError, KeyError))


@dataclass
class PrometheusServer:
    """A running Prometheus: ``url`` is its base address, ``log`` its combined output file."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return ``data``; raises ``ValueError`` on an API error."""
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
                doc = json.load(resp)
        except urllib.error.HTTPError as err:
            doc = json.load(err)
        if doc.get("status") != "success":
            raise ValueError(f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` now (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        data = self.api("query", query=promql)
        return list(data["result"]) if data["resultType"] == "vector" else [{"value": data["result"]}]

    def wait(self, condition: Callable[[], Any], *, what: str, timeout: float = 30.0) -> Any:
        """Poll ``condition`` until truthy (``wait_until``), failing early if Prometheus died."""

        def check() -> Any:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            return condition()

        return wait_until(check, timeout=timeout, what=what)

    def wait_for(self, promql: str, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``promql`` returns a non-empty vector; return it."""
        return self.wait(lambda: self.query(promql), timeout=timeout, what=f"data for {promql!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: ``prometheus_server(["127.0.0.1:9100"], rule_files=[...], interval="1s")``."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (run `make tools` or deploy/install-tools.sh)")
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], *, rule_files: Sequence[Path] = (), interval: str = "1s",
              job: str = "eddy") -> PrometheusServer:
        home = tmp_path / f"prometheus-{len(started)}"
        home.mkdir()
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        (home / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = home / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [binary, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, cwd=home,
            )
        server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, log=log)
        started.append(server)

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text()}")
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                return resp.status == 200

        wait_until(ready, timeout=60, what="prometheus to become ready")
        return server

    yield start
    for server in started:
        server.stop()
