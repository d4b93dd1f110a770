"""One batch of Kafka records through the learner: decode, dedupe, embed, learn, remember.

``learn_batch`` is the pure heart of the data path (no sockets, no clocks): it mutates a
``LearnerState`` and returns what the caller must do next (dead letters to send). Each record is
handled exactly once with respect to the state: a record below the state's next offset for its
partition is ignored, and every handled record advances that offset, whatever its fate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from learner.heads.stats import ExactHead
from service import metrics
from service.core.events import Event, decode
from service.core.state import LearnerState
from service.errors import BackboneUnavailable

log = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], np.ndarray]
Predict = Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]]]
# rows -> (bool (n,): would the served model answer unknown?, its classes); None when none is served
Reject = Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]] | None]


class HeadUpdates(Protocol):
    """How ``learn_batch`` applies a batch to the head: now (``LearnNow``), or started on a worker.

    ``settle()`` returns once every update started so far is in the head (so its ``classes_`` and
    statistics may be read); ``start(head, X, labels)`` begins ``head.learn_many(X, labels)``,
    updates applying in the order they were started; ``labels_in_flight()`` are the labels of
    updates started but not yet settled (the class cap counts them without waiting).
    """

    def settle(self) -> None: ...  # noqa: D102

    def start(self, head: ExactHead, X: np.ndarray, labels: list[str]) -> None: ...  # noqa: D102

    def labels_in_flight(self) -> Sequence[str]: ...  # noqa: D102


class LearnNow:
    """``HeadUpdates`` on the calling thread: ``start`` learns at once, ``settle`` has nothing to wait for."""

    def settle(self) -> None:
        """Nothing is ever in flight."""

    def start(self, head: ExactHead, X: np.ndarray, labels: list[str]) -> None:
        """``head.learn_many(X, labels)``, now."""
        head.learn_many(X, labels)

    def labels_in_flight(self) -> Sequence[str]:
        """None: every update is done on return."""
        return ()


LEARN_NOW = LearnNow()


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed Kafka record, reduced to what the learner needs."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    received_at: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be learned, and why."""

    record: Record
    reason: str
    detail: str


@dataclass
class BatchOutcome:
    """What happened to one batch."""

    learned: int = 0
    duplicates: int = 0
    skipped_forgotten: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    n_classes: int | None = None  # the head's classes once this batch is in it (None: nothing learned)
    correct: int = 0
    predicted: int = 0
    X: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)
    # Unknown detection, checked against events before they are learned (never learned: unknown_*).
    unknown_labelled: int = 0
    unknown_checked: int = 0
    unknown_caught: int = 0
    in_scope_scored: int = 0
    in_scope_rejected: int = 0


@dataclass
class RejectionTally:
    """In-scope events the served model would have answered unknown, scored before they were learned."""

    scored: int = 0
    rejected: int = 0

    def add(self, out: BatchOutcome) -> None:
        """Count a batch's checks and publish the running rate (``eddy_unknown_heldout_reject_rate``)."""
        if out.in_scope_scored:
            self.scored += out.in_scope_scored
            self.rejected += out.in_scope_rejected
            metrics.UNKNOWN_HELDOUT_REJECT_RATE.set(self.rejected / self.scored)


REJECTIONS = RejectionTally()  # per process, like the metrics it feeds


def report(out: BatchOutcome, dlq: Any, seconds: float) -> None:
    """Send a batch's dead letters to ``dlq`` and count its outcome in the metrics."""
    for dl in out.dead_letters:
        dlq.send(dl.record.value, reason=dl.reason, detail=dl.detail, topic=dl.record.topic,
                 partition=dl.record.partition, offset=dl.record.offset, headers=list(dl.record.headers))
        metrics.DEAD_LETTERS.labels(reason=dl.reason).inc()
    metrics.EVENTS.labels(result="learned").inc(out.learned)
    metrics.EVENTS.labels(result="duplicate").inc(out.duplicates)
    metrics.EVENTS.labels(result="dead_letter").inc(len(out.dead_letters))
    metrics.EVENTS.labels(result="forgotten").inc(out.skipped_forgotten)
    metrics.EVENTS.labels(result="unknown_label").inc(out.unknown_labelled)
    for kind, seen, rejected in (("in_scope", out.in_scope_scored, out.in_scope_rejected),
                                 ("unknown", out.unknown_checked, out.unknown_caught)):
        metrics.UNKNOWN_CHECKS.labels(kind=kind, result="rejected").inc(rejected)
        metrics.UNKNOWN_CHECKS.labels(kind=kind, result="accepted").inc(seen - rejected)
    REJECTIONS.add(out)
    metrics.LEARN_BATCH_SECONDS.observe(seconds)


def tp_key(topic: str, partition: int) -> str:
    """The key of a partition in snapshot offsets."""
    return f"{topic}:{partition}"


def learn_batch(state: LearnerState, records: Sequence[Record], *, embed: Embed | None, dim: int,
                max_event_bytes: int, predict: Predict | None = None, max_classes: int | None = None,
                unknown_label: str | None = None, reject: Reject | None = None,
                head_updates: HeadUpdates = LEARN_NOW) -> BatchOutcome:
    """Learn every good event in ``records``; return dead letters and counts.

    ``embed`` turns texts into ``(n, dim)`` float32 rows (None: text events are dead-lettered).
    ``predict``, if given, scores the events before they are learned (prequential accuracy); its
    mistakes go to ``state.errors`` when the state has an error memory.
    ``max_classes``, if given, bounds the head's classes: an event of a new label that would be
    class ``max_classes + 1`` is dead-lettered as ``too_many_classes`` (events of known labels
    are still learned; a forgotten label frees its place).
    Events labelled ``unknown_label`` are never learned (the unknown label is not a class); with
    ``reject`` they check the served model's rejection (``unknown_caught``), as the in-scope events
    check its in-scope rejection rate (``in_scope_rejected``) before they are learned.
    ``head_updates`` applies the batch to the head: by default now; the learn loop passes one that
    runs it on a worker thread (``service.roles.head_ahead``), so on return the head may still be
    learning this batch while everything else in the state (offsets, memory, id window, counters)
    already holds it: call its ``settle()`` before reading the head.
    Never raises for a bad record. Raises ``BackboneUnavailable`` (from ``embed``) before changing
    ``state``, so the caller can stop without counting the batch.
    """
    out = BatchOutcome()
    events: list[tuple[Record, Event]] = []
    batch_ids: set[str] = set()
    offsets: dict[str, int] = {}
    room = _ClassRoom(state, max_classes, head_updates.labels_in_flight())
    for rec in records:
        key = tp_key(rec.topic, rec.partition)
        if rec.offset < state.offsets.get(key, 0):
            continue  # already covered by the restored state
        offsets[key] = rec.offset + 1
        decoded = decode(rec.value, dim=dim, max_bytes=max_event_bytes)
        if not isinstance(decoded, Event):
            out.dead_letters.append(DeadLetter(rec, decoded.reason, decoded.detail))
            continue
        if decoded.id in state.window or decoded.id in batch_ids:
            out.duplicates += 1
            continue
        if decoded.id in state.tombstones:
            out.skipped_forgotten += 1
            continue
        if decoded.label != unknown_label and not room.admits(decoded.label):  # the unknown label is no class
            out.dead_letters.append(DeadLetter(rec, "too_many_classes", room.refusal(decoded.label)))
            continue
        batch_ids.add(decoded.id)
        events.append((rec, decoded))
    X, kept = _features(events, embed, dim, out)  # may raise BackboneUnavailable: the state is untouched
    state.offsets.update(offsets)
    if unknown_label is not None and kept:
        X, kept = _set_aside_unknown(X, kept, unknown_label, reject, out)
    if kept:
        _learn(state, X, kept, out, predict, head_updates)
    state.counters.learned += out.learned
    state.counters.duplicates += out.duplicates
    state.counters.dead_lettered += len(out.dead_letters)
    state.counters.forgotten_skipped += out.skipped_forgotten
    return out


class _ClassRoom:
    """Which labels one batch may learn under ``max_classes`` (known ones, then new ones while room)."""

    def __init__(self, state: LearnerState, max_classes: int | None, in_flight: Sequence[str] = ()) -> None:
        self.max_classes = max_classes
        # The head's classes, plus those of a batch whose update is still running (pipelined learner).
        self.known: set[str] = set(state.head.classes_) | set(in_flight) if max_classes is not None else set()

    def admits(self, label: str) -> bool:
        if self.max_classes is None or label in self.known:
            return True
        if len(self.known) >= self.max_classes:
            return False
        self.known.add(label)
        return True

    def refusal(self, label: str) -> str:
        return (f"label {label[:80]!r} would be class {len(self.known) + 1}; head.max_classes is "
                f"{self.max_classes} (forget a label to make room, or raise the limit)")


def texts_of(records: Sequence[Record], *, dim: int, max_event_bytes: int) -> list[str]:
    """The texts of the valid text events among ``records`` (what ``learn_batch`` may embed)."""
    texts = []
    for rec in records:
        if rec.value is None or b'"text"' not in rec.value:  # a features event: no need to decode it
            continue
        decoded = decode(rec.value, dim=dim, max_bytes=max_event_bytes)
        if isinstance(decoded, Event) and decoded.text is not None:
            texts.append(decoded.text)
    return texts


def _features(events: list[tuple[Record, Event]], embed: Embed | None, dim: int,
              out: BatchOutcome) -> tuple[np.ndarray, list[tuple[Record, Event]]]:
    """Stack features in event order, embedding texts in one call; failures become dead letters."""
    rows: dict[int, np.ndarray] = {i: ev.features for i, (_, ev) in enumerate(events) if ev.features is not None}
    text_idx = [i for i, (_, ev) in enumerate(events) if ev.text is not None]
    if text_idx:
        texts = [events[i][1].text or "" for i in text_idx]
        for i, row in zip(text_idx, _embed_isolating(texts, embed, dim), strict=True):
            if isinstance(row, str):
                out.dead_letters.append(DeadLetter(events[i][0], "embed_failed", row))
            else:
                rows[i] = row
    kept = [events[i] for i in sorted(rows)]
    X = np.stack([rows[i] for i in sorted(rows)]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return X, kept


def _embed_isolating(texts: list[str], embed: Embed | None, dim: int) -> list[np.ndarray | str]:
    """Embed all texts; if the batch fails, retry one by one so only the bad text is rejected."""
    if embed is None:
        return ["no backbone is configured for text events"] * len(texts)
    try:
        start = time.perf_counter()
        rows = list(checked_embeddings(embed(texts), len(texts), dim))
        metrics.EMBED_SECONDS.observe(time.perf_counter() - start)
        return rows
    except BackboneUnavailable:
        raise  # no text is at fault: dead-lettering them would lose good events
    except Exception as exc:  # the encoder is foreign code: isolate the offending text
        log.warning("batch embedding failed (%s); retrying %d texts one by one", exc, len(texts))
    result: list[np.ndarray | str] = []
    for text in texts:
        try:
            result.append(checked_embeddings(embed([text]), 1, dim)[0])
        except Exception as exc:
            result.append(f"embedding failed: {type(exc).__name__}: {str(exc)[:200]}")
    return result


def checked_embeddings(X: Any, n: int, dim: int) -> np.ndarray:
    """``X`` as float32 ``(n, dim)`` finite rows; ``ValueError`` naming what the encoder returned otherwise."""
    X = np.asarray(X, dtype=np.float32)
    if X.shape != (n, dim):
        raise ValueError(f"backbone returned shape {X.shape}, expected ({n}, {dim})")
    if not np.isfinite(X).all():
        raise ValueError("backbone returned non-finite values")
    return X


def _set_aside_unknown(X: np.ndarray, kept: list[tuple[Record, Event]], unknown_label: str, reject: Reject | None,
                       out: BatchOutcome) -> tuple[np.ndarray, list[tuple[Record, Event]]]:
    """Count (and check) the unknown-labelled events; return the rest, to be learned."""
    is_unknown = np.array([ev.label == unknown_label for _, ev in kept], dtype=bool)
    out.unknown_labelled = int(is_unknown.sum())
    verdict = reject(X) if reject is not None else None
    if verdict is not None:
        rejected, classes = np.asarray(verdict[0], dtype=bool), set(verdict[1])
        # In scope: classes the served model knows (a class it has not learned yet is out of its scope).
        in_scope = np.array([ev.label in classes for _, ev in kept], dtype=bool) & ~is_unknown
        out.unknown_checked = out.unknown_labelled
        out.unknown_caught = int((rejected & is_unknown).sum())
        out.in_scope_scored = int(in_scope.sum())
        out.in_scope_rejected = int((rejected & in_scope).sum())
    if not out.unknown_labelled:
        return X, kept
    return X[~is_unknown], [item for item, unk in zip(kept, is_unknown.tolist(), strict=True) if not unk]


def _learn(state: LearnerState, X: np.ndarray, kept: list[tuple[Record, Event]], out: BatchOutcome,
           predict: Predict | None, head_updates: HeadUpdates) -> None:
    """Score (served model), start the head's update, then the memory and the id window while it runs."""
    labels = [ev.label for _, ev in kept]
    if predict is not None:
        probs, classes = predict(X)
        if len(classes):
            guesses = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
            out.correct = int(sum(g == y for g, y in zip(guesses, labels, strict=True)))
            out.predicted = len(labels)
            if state.errors is not None:  # ReLoop2: what the served model got wrong, for compensation
                state.errors.add_mistakes(X, labels, guesses.tolist())
    head_updates.settle()  # the previous batch's update: classes_ is read next
    known = set(state.head.classes_)
    out.new_classes = list(dict.fromkeys(label for label in labels if label not in known))
    out.n_classes = len(known) + len(out.new_classes)  # the update may still be running after this returns
    head_updates.start(state.head, X, labels)
    ids = [ev.id for _, ev in kept]
    if state.memory is not None:
        state.memory.add(
            X, labels, ids,
            ts=np.array([ev.ts if ev.ts is not None else rec.received_at for rec, ev in kept]),
            partitions=np.array([rec.partition for rec, _ in kept], dtype=np.int32),
            offsets=np.array([rec.offset for rec, _ in kept], dtype=np.int64),
        )
    for (rec, ev) in kept:
        state.window.add(ev.id, rec.partition, rec.offset, ev.label)
    out.learned = len(kept)
    out.X, out.labels = X, labels
