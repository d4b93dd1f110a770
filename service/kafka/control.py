"""The control topic from the outside: publish a forget request, read the topic without a group.

In scale-out mode no single process owns the learner state, so ``Admin/Forget`` on a serving
replica publishes the request to ``kafka.control_topic`` (``ControlPublisher``); every learner
replica reads that topic whole (``control_consumer``) and applies the request to its partitions.
"""

from __future__ import annotations

import json
import logging

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from service.core.forget import ForgetRequest
from service.errors import BrokerError
from service.kafka.clients import PLAINTEXT, ClientSecurity, make_producer

log = logging.getLogger(__name__)


def control_message(request: ForgetRequest) -> bytes:
    """The control-topic value of ``request`` (what ``service.core.forget.parse_control`` reads)."""
    body: dict[str, object] = {}
    if request.ids:
        body["ids"] = list(request.ids)
    if request.label is not None:
        body["label"] = request.label
    if not body:
        raise ValueError("a forget request needs ids or a label")
    return json.dumps({"forget": body}).encode()


class ControlPublisher:
    """Publishes forget requests to the control topic and waits for the broker's acknowledgement."""

    def __init__(self, bootstrap: str, topic: str, *, security: ClientSecurity | None = None,
                 timeout_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.security = security
        self.timeout_s = timeout_s
        self._producer: KafkaProducer | None = None

    def publish(self, request: ForgetRequest) -> str:
        """Publish ``request``; return ``"topic:partition@offset"`` once Kafka acknowledged it.

        Raises ``ValueError`` for an empty request and ``BrokerError`` when the broker did not
        acknowledge it (the caller must not report the request as accepted then).
        """
        value = control_message(request)
        try:
            if self._producer is None:
                self._producer = make_producer(self.bootstrap, security=self.security, client_id="eddy-admin")
            meta = self._producer.send(self.topic, key=b"forget", value=value).get(timeout=self.timeout_s)
        except KafkaError as exc:
            raise BrokerError(f"publishing a forget request to {self.topic!r} failed: "
                              f"{type(exc).__name__}: {exc}") from None
        return f"{meta.topic}:{meta.partition}@{meta.offset}"

    def close(self) -> None:
        """Close the producer."""
        if self._producer is not None:
            self._producer.close()


def control_consumer(bootstrap: str, *, security: ClientSecurity | None = None,
                     client_id: str = "eddy-control") -> KafkaConsumer:
    """A group-less consumer for reading the whole control topic (the caller assigns partitions)."""
    try:
        return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, client_id=client_id,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             isolation_level="read_committed", **(security or PLAINTEXT).kwargs())
    except KafkaError as exc:
        raise BrokerError(f"connecting a control-topic consumer at {bootstrap} failed: {exc}") from None
