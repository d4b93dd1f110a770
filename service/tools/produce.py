"""``eddy produce``: replay a CSV or JSONL file as labeled events, optionally at a fixed rate."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from service.core.events import encode
from service.errors import BrokerError
from service.kafka.clients import ClientSecurity, make_producer

Row = dict[str, Any]


class TokenBucket:
    """Allows ``rate`` acquisitions per second on average, with bursts of at most ``burst``.

    ``acquire`` blocks (through ``sleep``) until a token is available. The clock and the sleep are
    injectable so the arithmetic can be tested without waiting.
    """

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be a positive number of events per second, got {rate}")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate / 20)  # ~50 ms of events
        self._clock, self._sleep = clock, sleep
        self._tokens = 1.0
        self._last = clock()

    def acquire(self) -> None:
        """Take one token, waiting for it if none is available."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            self._sleep((1.0 - self._tokens) / self.rate)
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        self._tokens -= 1.0


def read_rows(path: Path, required: list[str]) -> Iterator[Row]:
    """Stream the rows of a ``.csv`` (header row) or ``.jsonl``/``.ndjson`` file, one dict each.

    Raises ``ValueError`` naming the columns found when a ``required`` column is missing (CSV: at
    the header; JSONL: at the first line that lacks it), or when a JSONL line is not an object.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path, required)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _jsonl_rows(path, required)
    raise ValueError(f"{path}: unknown file type {suffix!r}; expected .csv or .jsonl")


def _csv_rows(path: Path, required: list[str]) -> Iterator[Row]:
    csv.field_size_limit(sys.maxsize)  # long texts are legitimate
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; "
                             f"columns found: {', '.join(columns) or '(none)'}")
        yield from reader


def _jsonl_rows(path: Path, required: list[str]) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in required if c not in row]
            if missing:
                raise ValueError(f"{path}:{number}: no field {', '.join(map(repr, missing))}; "
                                 f"fields found: {', '.join(map(str, row)) or '(none)'}")
            yield row


def parse_features(value: Any) -> list[float]:
    """Features from a JSON array (JSONL) or a CSV cell holding ``[1, 2]`` or ``1 2``/``1,2``."""
    if isinstance(value, list):
        return [float(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        return [float(v) for v in json.loads(text)]
    return [float(v) for v in text.replace(",", " ").split()]


def row_event(row: Row, event_id: str, *, text_col: str, label_col: str, features_col: str | None,
              base64_features: bool = False) -> bytes:
    """The wire bytes of one row (``features_col`` wins over ``text_col`` when given)."""
    label = str(row[label_col])
    if features_col is not None:
        return encode(event_id, label, features=parse_features(row[features_col]), base64_features=base64_features)
    return encode(event_id, label, text=str(row[text_col]))


def produce_file(path: Path, *, bootstrap: str, topic: str, text_col: str = "text", label_col: str = "label",
                 features_col: str | None = None, rate: float | None = None, limit: int | None = None,
                 id_prefix: str | None = None, progress: bool = True,
                 security: ClientSecurity | None = None, base64_features: bool = False) -> int:
    """Send the rows of ``path`` to ``topic`` as labeled events; return how many were acknowledged.

    Event ids are ``f"{id_prefix or path.stem}-{row index}"`` (0-based, counting data rows), also
    used as message keys. ``rate`` caps the send rate in events per second (token bucket);
    ``limit`` stops after that many rows; ``base64_features`` sends features as base64 float32.
    The file is streamed, never loaded whole. Raises
    ``ValueError`` for a missing file or column (the message names the columns found) and
    ``BrokerError`` when the broker cannot be reached or did not acknowledge every event.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    required = [label_col, features_col if features_col is not None else text_col]
    rows = islice(read_rows(path, required), limit)
    first = next(rows, None)  # read the header before connecting, so a bad column fails fast
    prefix = id_prefix or path.stem
    producer = make_producer(bootstrap, security=security, linger_ms=20, client_id="eddy-produce")
    bucket = TokenBucket(rate) if rate else None
    errors: list[BaseException] = []
    sent = 0
    try:
        with _progress(progress, limit, topic) as bar:
            for index, row in enumerate(_chain(first, rows)):
                value = row_event(row, f"{prefix}-{index}", text_col=text_col, label_col=label_col,
                                  features_col=features_col, base64_features=base64_features)
                if bucket is not None:
                    bucket.acquire()
                future = producer.send(topic, value=value, key=f"{prefix}-{index}".encode())
                future.add_errback(errors.append)
                sent += 1
                bar.update(1)
        producer.flush()
    except KafkaError as exc:
        raise BrokerError(f"producing to {topic} at {bootstrap} failed after {sent} events: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        producer.close(timeout=10)
    if errors:
        raise BrokerError(f"{len(errors)} of {sent} events were not acknowledged by {bootstrap}: {errors[0]}")
    return sent


def _chain(first: Row | None, rest: Iterator[Row]) -> Iterator[Row]:
    if first is not None:
        yield first
        yield from rest


def _progress(enabled: bool, total: int | None, topic: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", desc=f"-> {topic}", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)
