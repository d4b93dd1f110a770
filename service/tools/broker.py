"""The local Apache Kafka broker behind ``eddy kafka start|stop|status`` (and the test fixtures).

One real broker in KRaft combined mode (broker + controller in one JVM), listening on
``127.0.0.1:<port>`` with its controller on a second port. Its jars come from Maven Central once
(``deploy/kafka/pom.xml`` -> ``.eddy/kafka/lib``); its data live in ``data_dir`` and survive
stop/start. Layout of ``data_dir``::

    server.properties   written on every start (ports may change; the controller port does not)
    kraft/              log.dirs: topic data and the metadata log (meta.properties => formatted)
    controller.port     the controller port chosen at format time
    broker.pid          the JVM's pid while it runs
    broker.log          the JVM's console (warnings and errors only)
    logs/server.log     the broker's INFO log (rolled at 20 MB)

The JVM runs in its own session, so it outlives the ``eddy kafka start`` process until ``stop``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from service.errors import BrokerError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".eddy/kafka/data")
DEFAULT_LIB_DIR = Path(".eddy/kafka/lib")
DEFAULT_POM = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "pom.xml"
MIN_JAVA = 17
JAVA_HINT = "install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
MVN_HINT = "install Maven to fetch Apache Kafka once (apt-get install maven)"
_MARKER = ".complete"
# C1-only JIT and the serial collector halve the JVM's start time on a busy machine (measured:
# 8-10 s -> 4-5 s at load 10 on 2 cores); a single local broker never needs C2's peak speed.
FAST_START_JVM_OPTS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    """What ``status()`` found: ``running`` means the JVM of this data dir is alive and answers."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path


def java_major(version_output: str) -> int | None:
    """The major version in ``java -version`` output (``1.8.0_412`` -> 8, ``17.0.15`` -> 17), or None."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if m is None:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """Path of a ``java`` of at least version 17; ``BrokerError`` (one line, with a fix) otherwise."""
    java = shutil.which("java")
    if java is None:
        raise BrokerError(f"java not found on PATH: {JAVA_HINT}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"{java} -version failed ({exc}): {JAVA_HINT}") from None
    major = java_major(out.stderr + out.stdout)
    if major is None or major < MIN_JAVA:
        found = "an unknown version" if major is None else f"Java {major}"
        raise BrokerError(f"{java} is {found}, Kafka 4 needs Java {MIN_JAVA} or newer: {JAVA_HINT}")
    return java


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """True when something accepts TCP connections on ``127.0.0.1:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def kafka_answers(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a Kafka broker at ``bootstrap`` answers a metadata request within ``timeout_s``."""
    host, _, port = bootstrap.rpartition(":")
    with socket.socket() as s:  # a cheap check first: kafka-python logs loudly on refused connections
        s.settimeout(min(timeout_s, 1.0))
        if s.connect_ex((host, int(port))) != 0:
            return False
    from kafka import KafkaAdminClient

    ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ms, bootstrap_timeout_ms=ms,
                                 client_id="eddy-probe")
    except Exception:
        return False
    try:
        admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        admin.close()


class LocalKafka:
    """One local Apache Kafka broker (KRaft), owned through the files in ``data_dir``.

    Several ``LocalKafka`` objects (or processes) pointing at the same ``data_dir`` see the same
    broker: the pid file, not this object, is the source of truth.
    """

    def __init__(self, port: int = 9092, data_dir: Path = DEFAULT_DATA_DIR, lib_dir: Path = DEFAULT_LIB_DIR,
                 pom: Path = DEFAULT_POM, jvm_opts: tuple[str, ...] = FAST_START_JVM_OPTS) -> None:
        self.port = port
        self.data_dir = Path(data_dir).resolve()
        self.lib_dir = Path(lib_dir).resolve()
        self.pom = Path(pom).resolve()
        self.jvm_opts = jvm_opts
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The JVM's console output."""
        return self.data_dir / "broker.log"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def _props(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _kraft_dir(self) -> Path:
        return self.data_dir / "kraft"

    # -- jars ----------------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        """Fetch Kafka's jars into ``lib_dir`` once (needs ``mvn``); return ``lib_dir``."""
        return fetch_kafka_jars(self.pom, self.lib_dir)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> str:
        """Start the broker (formatting storage on first use) and return its bootstrap address.

        Returns at once when this data dir's broker already runs and answers. Raises
        ``BrokerError`` when Java/Maven is missing, a port is taken, or the broker does not answer
        within ``timeout`` seconds (the broker is then stopped; ``broker.log`` says why).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.data_dir / ".lock"):
            pid = self._alive_pid()
            if pid is not None:
                self.port = self._running_port() or self.port
                if kafka_answers(self.bootstrap):
                    log.info("Kafka already running at %s (pid %d)", self.bootstrap, pid)
                    return self.bootstrap
                self._wait_ready(pid, timeout)
                return self.bootstrap
            java = find_java()
            lib = self.ensure_jars()
            cport = self._controller_port()
            for p in (self.port, cport):
                if port_in_use(p):
                    raise BrokerError(f"port {p} on 127.0.0.1 is already in use: stop what uses it or pick "
                                      f"another port (eddy kafka start --port P)")
            self._write_properties(cport)
            if not (self._kraft_dir / "meta.properties").exists():
                self._format(java, lib)
            self._launch(java, lib)
            assert self._proc is not None
            self._wait_ready(self._proc.pid, timeout)
            return self.bootstrap

    def stop(self, timeout: float = 30) -> bool:
        """Stop this data dir's broker: SIGTERM, then SIGKILL after ``timeout`` s.

        Returns True when a broker was stopped, False when none ran. Afterwards no broker process
        of this data dir exists and the pid file is gone.
        """
        pid = self._alive_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        port = self._running_port() or self.port
        proc = psutil.Process(pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
            try:
                self._wait_exit(proc, timeout)
            except psutil.TimeoutExpired:
                log.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
                proc.kill()
                self._wait_exit(proc, 10)
        self._pid_file.unlink(missing_ok=True)
        self._proc = None
        _wait_until(lambda: not port_in_use(port), 10)
        return True

    def status(self) -> BrokerStatus:
        """Whether this data dir's broker runs and answers, with its pid and address."""
        pid = self._alive_pid()
        if pid is not None:
            self.port = self._running_port() or self.port
        running = pid is not None and kafka_answers(self.bootstrap)
        return BrokerStatus(running=running, pid=pid, bootstrap=self.bootstrap, data_dir=self.data_dir)

    # -- internals -----------------------------------------------------------------------------
    def _alive_pid(self) -> int | None:
        """The pid in the pid file if that process is alive and is this data dir's broker."""
        try:
            pid = int(self._pid_file.read_text().split()[0])
            if self._proc is not None and self._proc.pid == pid:  # our own child: ask the kernel directly
                return pid if self._proc.poll() is None else None
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmdline = _cmdline(proc)
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        # The pid may have been reused by an unrelated process after a reboot or a crash.
        return pid if "kafka.Kafka" in cmdline and str(self._props) in cmdline else None

    def _running_port(self) -> int | None:
        try:
            return int(self._pid_file.read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def _controller_port(self) -> int:
        """The controller port chosen when this data dir was first used (port+1 when it was free)."""
        path = self.data_dir / "controller.port"
        if path.exists():
            return int(path.read_text().strip())
        cport = self.port + 1 if self.port < 65535 and not port_in_use(self.port + 1) else free_port()
        path.write_text(f"{cport}\n")
        return cport

    def _write_properties(self, cport: int) -> None:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self._kraft_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # Fewer internal partitions than the defaults (50) make the first group/transaction
            # on a fresh single-node broker start in well under a second.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        text = "# Written by eddy (service/tools/broker.py) on every start; edits are overwritten.\n"
        self._props.write_text(text + "".join(f"{k}={v}\n" for k, v in props.items()))

    def _jvm(self, java: str, lib: Path, xms: str, xmx: str) -> list[str]:
        cmd = [java, f"-Xms{xms}", f"-Xmx{xmx}", *self.jvm_opts, "-Djava.awt.headless=true",
               f"-Dkafka.logs.dir={self.data_dir / 'logs'}"]
        log4j = self.pom.parent / "log4j2.yaml"
        if log4j.exists():
            cmd.append(f"-Dlog4j2.configurationFile={log4j}")
        return [*cmd, "-cp", f"{lib}/*"]

    def _format(self, java: str, lib: Path) -> None:
        cluster_id = _cluster_id()
        cmd = [*self._jvm(java, lib, "64m", "256m"), "kafka.tools.StorageTool", "format", "-t", cluster_id,
               "-c", str(self._props)]
        log.info("formatting Kafka storage in %s (cluster %s)", self._kraft_dir, cluster_id)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False, cwd=self.data_dir)
        if out.returncode != 0:
            raise BrokerError(f"formatting Kafka storage in {self._kraft_dir} failed "
                              f"(exit {out.returncode}): {_last_line(out.stdout + out.stderr)}")

    def _launch(self, java: str, lib: Path) -> None:
        cmd = [*self._jvm(java, lib, "256m", "512m"), "kafka.Kafka", str(self._props)]
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT, cwd=self.data_dir,
                                          start_new_session=True)
        self._pid_file.write_text(f"{self._proc.pid} {self.port}\n")
        log.info("started Kafka pid %d on %s", self._proc.pid, self.bootstrap)

    def _wait_ready(self, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not kafka_answers(self.bootstrap, timeout_s=2.0):
            if self._alive_pid() != pid:
                self._pid_file.unlink(missing_ok=True)
                code = self._proc.returncode if self._proc is not None else None
                self._proc = None
                raise BrokerError(f"Kafka exited during start (exit {code}): {self._log_tail()} "
                                  f"(see {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"Kafka did not answer on {self.bootstrap} within {timeout:.0f} s "
                                  f"(see {self.log_path} and {self.data_dir / 'logs/server.log'})")
            time.sleep(0.25)  # poll interval of a condition wait

    def _wait_exit(self, proc: psutil.Process, timeout: float) -> None:
        if self._proc is not None and self._proc.pid == proc.pid:
            try:  # our own child: reap it, or it lingers as a zombie
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise psutil.TimeoutExpired(timeout, proc.pid) from None
        else:
            proc.wait(timeout)

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no broker.log"
        errors = [ln for ln in lines if " ERROR " in ln or "Exception" in ln]
        return (errors or lines or ["broker.log is empty"])[-1][:300]


def fetch_kafka_jars(pom: Path, lib_dir: Path) -> Path:
    """Fetch the jars ``pom`` names into ``lib_dir`` once (needs ``mvn``); return ``lib_dir``.

    A marker file holding the pom's hash says the copy is complete and current, so a changed
    pom or an interrupted download is fetched again. Concurrent callers wait on a file lock,
    and the copy lands in a temporary folder that is renamed into place.
    """
    try:
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    except OSError:
        raise BrokerError(f"Kafka pom not found at {pom}: pass pom=<deploy/kafka/pom.xml>") from None

    def current() -> bool:
        marker = lib_dir / _MARKER
        return marker.is_file() and marker.read_text().strip() == digest

    if current():
        return lib_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"mvn not found on PATH and {lib_dir} has no Kafka jars: {MVN_HINT}")
    lib_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(lib_dir.parent / ".lib.lock"):
        if current():
            return lib_dir
        tmp = lib_dir.parent / f".lib.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("fetching Apache Kafka jars with Maven into %s", lib_dir)
        cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise BrokerError("mvn did not finish fetching Kafka's jars within 900 s") from None
        if out.returncode != 0 or not list(tmp.glob("kafka_2.13-*.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            raise BrokerError(f"mvn could not fetch Kafka's jars (exit {out.returncode}): "
                              f"{_last_line(out.stdout + out.stderr)}")
        (tmp / _MARKER).write_text(digest + "\n")
        shutil.rmtree(lib_dir, ignore_errors=True)
        tmp.rename(lib_dir)
    return lib_dir


def _cmdline(proc: psutil.Process, timeout: float = 2.0) -> list[str]:
    """The process's command line (retried: it reads empty just after the java launcher starts)."""
    deadline = time.monotonic() + timeout
    while True:
        cmdline = proc.cmdline()
        if cmdline or time.monotonic() > deadline:
            return cmdline
        time.sleep(0.02)


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID, URL-safe base64, not starting with '-' (as Kafka's Uuid)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (between processes), held for the block."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the `eddy kafka` subcommands ---------------------------------------------------------------
def cli_start(port: int = 9092, data_dir: Path | None = None) -> int:
    """``eddy kafka start``: print one line; 0 when the broker runs, 1 on error."""
    kafka = LocalKafka(port=port, data_dir=data_dir or DEFAULT_DATA_DIR)
    try:
        before = kafka.status()
        bootstrap = kafka.start()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pid = kafka.status().pid
    how = "already running" if before.running else "started"
    print(f"Kafka {how} at {bootstrap} (pid {pid}, data {kafka.data_dir})")
    return 0


def cli_stop(port: int = 9092, data_dir: Path | None = None) -> int:
    """``eddy kafka stop``: print one line; 0 whether or not a broker ran, 1 on error."""
    kafka = LocalKafka(port=port, data_dir=data_dir or DEFAULT_DATA_DIR)
    try:
        stopped = kafka.stop()
    except (BrokerError, psutil.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka {'stopped' if stopped else 'was not running'} (data {kafka.data_dir})")
    return 0


def cli_status(port: int = 9092, data_dir: Path | None = None) -> int:
    """``eddy kafka status``: print one line; 0 when the broker runs and answers, 1 otherwise."""
    st = LocalKafka(port=port, data_dir=data_dir or DEFAULT_DATA_DIR).status()
    if st.running:
        print(f"Kafka running at {st.bootstrap} (pid {st.pid}, data {st.data_dir})")
        return 0
    if st.pid is not None:
        print(f"Kafka process {st.pid} is alive but does not answer at {st.bootstrap} (data {st.data_dir})")
    else:
        print(f"Kafka is not running (data {st.data_dir})")
    return 1
