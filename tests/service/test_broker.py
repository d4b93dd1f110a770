"""The local broker runner: start/stop/status on a real JVM, data kept across restarts, clear errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from service.errors import BrokerError
from service.tools import broker
from service.tools.broker import LocalKafka, free_port, java_major, port_in_use
from tests.conftest import KAFKA_LIB
from tests.helpers import consume


@pytest.mark.kafka
def test_started_broker_answers_an_admin_client(kafka_bootstrap: str, topic_name: str) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(topic_name, b"x").get(timeout=30)  # auto.create.topics.enable
    producer.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert topic_name in admin.list_topics()
    finally:
        admin.close()


@pytest.mark.kafka
def test_stop_start_keeps_data_and_leaves_no_process(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    port, data = free_port(), tmp_path / "kafka"
    assert broker.cli_start(port, data) == 0
    assert "started at 127.0.0.1:" in capsys.readouterr().out
    kafka = LocalKafka(port=port, data_dir=data, lib_dir=KAFKA_LIB)
    first = kafka.status()
    assert first.running and first.pid is not None
    assert kafka.start() == f"127.0.0.1:{port}"  # already running: same broker, nothing new started
    assert kafka.status().pid == first.pid
    assert broker.cli_start(port, data) == 0
    assert "already running" in capsys.readouterr().out

    values = [f"event-{i}".encode() for i in range(20)]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    for v in values:
        producer.send("kept", v)
    producer.flush()
    producer.close()

    assert broker.cli_stop(port, data) == 0
    assert "stopped" in capsys.readouterr().out
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
    assert not port_in_use(port)
    assert not (data / "broker.pid").exists()
    assert broker.cli_status(port, data) == 1
    assert "not running" in capsys.readouterr().out
    assert kafka.stop() is False  # stopping twice is harmless

    try:
        assert kafka.start() == f"127.0.0.1:{port}"
        assert broker.cli_status(port, data) == 0
        assert [r.value for r in consume(kafka.bootstrap, "kept", len(values))] == values
    finally:
        assert kafka.stop() is True
    assert not port_in_use(port)


def test_missing_java_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no java on it
    with pytest.raises(BrokerError, match=r"java not found on PATH: install a Java 17\+ runtime") as err:
        LocalKafka(port=free_port(), data_dir=tmp_path / "d", lib_dir=tmp_path / "lib").start()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d" / "broker.pid").exists()


def test_old_java_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "java"
    fake.write_text('#!/bin/sh\necho \'openjdk version "11.0.22" 2024-01-16\' >&2\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"is Java 11, Kafka 4 needs Java 17 or newer"):
        LocalKafka(port=free_port(), data_dir=tmp_path / "d", lib_dir=tmp_path / "lib").start()


def test_missing_maven_is_named_when_jars_are_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = broker.shutil.which("java")
    if java is None:
        pytest.skip("needs java")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "java").symlink_to(os.path.realpath(java))
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(BrokerError, match=r"mvn not found on PATH and .* has no Kafka jars: install Maven"):
        LocalKafka(port=free_port(), data_dir=tmp_path / "d", lib_dir=tmp_path / "empty-lib").start()


@pytest.mark.kafka
def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match=rf"port {port} on 127.0.0.1 is already in use"):
            LocalKafka(port=port, data_dir=tmp_path / "d", lib_dir=KAFKA_LIB).start()


@pytest.mark.parametrize(("output", "major"), [
    ('openjdk version "17.0.15" 2025-04-15', 17),
    ('java version "1.8.0_412"', 8),
    ('openjdk version "21" 2023-09-19', 21),
    ("no version here", None),
])
def test_java_major(output: str, major: int | None) -> None:
    assert java_major(output) == major
