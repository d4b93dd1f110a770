"""Run the real daemon (``python -m service.app.cli serve``) as a child process for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    grpc_port: int
    metrics_port: int
    http_port: int = 0  # OIP v2 over HTTP/REST

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str) -> float:
        """Sum of samples whose name{labels} equals ``name`` exactly (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = resp.read().decode()
        total = 0.0
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                if key == name:
                    total += float(value)
        return total

    def wait_metric(self, name: str, cond: Callable[[float], bool], timeout: float = 120) -> float:
        """Wait until ``cond(metric)`` holds and return the metric; fail at once if the daemon exited."""
        last = [float("nan")]

        def check() -> tuple[float] | None:  # a tuple: a metric of 0 that meets ``cond`` is still "done"
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            last[0] = self.metric(name)
            return (last[0],) if cond(last[0]) else None

        try:
            (value,) = wait_for(check, timeout, message=name, ignore=(OSError,))
        except AssertionError as exc:
            if "daemon exited" in str(exc):
                raise
            raise AssertionError(f"timed out waiting on {name} (last {last[0]}):\n{self.log()[-4000:]}") from None
        return float(value)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, return the exit code; a non-zero one prints the log's tail for the report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = int(self.proc.returncode)
        if code != 0:
            print(f"daemon exited with {code}; its log ends:\n{self.log()[-6000:]}")
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def state(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "service.app.cli", "state", "--json"], env=self.env,
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def daemon_env(tmp: Path, bootstrap: str, topic: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
    env.update({
        "EDDY_CONFIG": str(tmp / "none.toml"),
        "EDDY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "EDDY_KAFKA__TOPIC": topic,
        "EDDY_KAFKA__CONTROL_TOPIC": f"{topic}.control",
        "EDDY_KAFKA__GROUP_ID": f"{topic}.g",
        "EDDY_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "EDDY_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "EDDY_CHECKPOINT__DIR": str(tmp / "checkpoints"),
        "EDDY_EXPORT__REGISTRY_DIR": str(tmp / "models"),
        "EDDY_BACKBONE__CACHE_DIR": str(REPO / ".eddy" / "cache"),
        "EDDY_METRICS__LOG_EVERY_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def start_daemon(tmp: Path, env: dict[str, str], *, role: str = "all", name: str = "daemon") -> DaemonProc:
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    env = {**env, "EDDY_SERVING__GRPC_PORT": str(grpc_port), "EDDY_METRICS__PORT": str(metrics_port),
           "EDDY_SERVING__HTTP_PORT": str(http_port)}
    log_path = tmp / f"{name}.log"
    with log_path.open("ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service.app.cli", "serve", "--role", role], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    d = DaemonProc(proc, env, log_path, grpc_port, metrics_port, http_port)
    d.wait_metric("eddy_model_version", lambda v: True, timeout=120)
    return d
