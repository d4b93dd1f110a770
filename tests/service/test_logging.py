"""Log output: kafka-python's handled network errors read as one line, eddy's own errors keep their traceback."""

from __future__ import annotations

import io
import logging

from service.app.cli import _kafka_errors_on_one_line


def _render(logger_name: str) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(_kafka_errors_on_one_line)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        try:
            None.recv(4096)  # type: ignore[attr-defined]  # the race kafka-python logs while a client closes
        except AttributeError:
            logger.error("%s: Error receiving network data closing socket", "<KafkaTCPTransport>", exc_info=True)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_kafka_python_errors_are_one_line_with_the_exception_named():
    text = _render("kafka.net.transport")
    assert "Traceback" not in text and text.count("\n") == 1
    assert "<KafkaTCPTransport>: Error receiving network data closing socket (AttributeError:" in text


def test_eddy_errors_keep_their_traceback():
    assert "Traceback (most recent call last)" in _render("service.roles.learn_loop")
