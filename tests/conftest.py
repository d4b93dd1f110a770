"""Fixtures shared by every test: the real Kafka broker, unique topic names, data paths.

The broker is one real Apache Kafka (KRaft) per test session, started by ``service.tools.broker`` on a
free port with a temporary data dir; its jars are cached in the repo's ``.eddy/kafka/lib`` so Maven
runs once per checkout. It starts only when a test asks for ``kafka_bootstrap`` and stops at the end
of the session. Set ``EDDY_TEST_BOOTSTRAP=host:port`` to use a broker you run yourself instead.
Tests that use the broker are marked ``kafka`` automatically (``pytest -m "not kafka"`` skips them).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import BrokerError
from service.tools.broker import LocalKafka, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_LIB = REPO_ROOT / ".eddy" / "kafka" / "lib"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        uses_broker = "kafka_bootstrap" in getattr(item, "fixturenames", ())
        if uses_broker and item.get_closest_marker("kafka") is None:
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``"127.0.0.1:<port>"`` of a real broker shared by the whole session."""
    external = os.environ.get("EDDY_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    kafka = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("kafka"), lib_dir=KAFKA_LIB)
    try:
        bootstrap = kafka.start(timeout=120)
    except BrokerError as exc:
        pytest.fail(f"could not start the test broker: {exc} (`pytest -m 'not kafka'` runs the rest)",
                    pytrace=False)
    try:
        yield bootstrap
    finally:
        kafka.stop()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test (and readable in broker logs)."""
    stem = re.sub(r"[^a-zA-Z0-9._-]", "-", request.node.name)[:60]
    return f"t-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    """``/work/shared/data/banking77`` (train.csv, test.csv: text,category); skips when absent."""
    path = REPO_ROOT.parent / "shared" / "data" / "banking77"
    if not (path / "train.csv").is_file():
        pytest.skip(f"banking77 data not found at {path}")
    return path
