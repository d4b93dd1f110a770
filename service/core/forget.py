"""Forget requests from the control topic: remove events' contributions exactly.

A control message is ``{"forget": {"ids": ["a", "b"]}}`` or ``{"forget": {"label": "x"}}``.
Every head is a sum of per-event statistics, so forgetting subtracts exactly what learning added.
That needs each event's features again: eddy keeps the location (partition, offset) of the last
``kafka.dedupe_window`` learned ids and re-reads those events from Kafka, so exact forgetting
works for events within that window and within the topic's retention. Ids outside it are counted
as unknown (``eddy_forget_unknown_ids_total``) and logged, never silently ignored. Forgotten ids are
remembered (tombstones): if such an event is replayed it is not learned again.

Only ids that were learned (found in the id window) are tombstoned: an unknown id is counted and
nothing more, so a flood of junk ids cannot push a real tombstone out of its bounded set (issue
14). The tombstones are therefore bounded by what was actually forgotten. The cost: forgetting an
id *before* its event arrives does not stop it from being learned; forget it after it arrives.

The forgotten rows also leave the recent rows (the export gates' window), and
``counters.forgets_unexported`` counts the request until a model without them is published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.batch import Embed
from service.core.events import Event, decode
from service.core.recent_rows import RecentRows
from service.core.state import LearnerState

log = logging.getLogger("eddy.audit")

Refetch = Callable[[Sequence[tuple[int, int]]], dict[tuple[int, int], bytes | None]]
MAX_IDS_PER_REQUEST = 100_000


@dataclass(frozen=True)
class ForgetRequest:
    """Ids to forget, or a whole label."""

    ids: tuple[str, ...] = ()
    label: str | None = None


@dataclass(frozen=True)
class ForgetResult:
    """What a forget request removed."""

    forgotten: int
    unknown: int
    memory_removed: int
    partial: bool


def parse_control(raw: bytes | None) -> ForgetRequest | str:
    """Parse a control message; a string is the reason it is invalid."""
    try:
        obj = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return "control message is not JSON"
    body = obj.get("forget") if isinstance(obj, dict) else None
    if not isinstance(body, dict) or set(body) - {"ids", "label"} or not body:
        return 'expected {"forget": {"ids": [...]}} or {"forget": {"label": "..."}}'
    ids, label = body.get("ids", []), body.get("label")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > MAX_IDS_PER_REQUEST:
        return f"'ids' must be a list of at most {MAX_IDS_PER_REQUEST} strings"
    if label is not None and (not isinstance(label, str) or not label):
        return "'label' must be a non-empty string"
    return ForgetRequest(tuple(ids), label)


def apply_forget(state: LearnerState, request: ForgetRequest, *, refetch: Refetch, embed: Embed | None,
                 dim: int, max_event_bytes: int, recent: RecentRows | None = None) -> ForgetResult:
    """Remove the requested events from head, memory, error memory, id window and ``recent``; tombstone their ids.

    Raises ``ValueError`` for more than ``MAX_IDS_PER_REQUEST`` ids (the control topic's cap too).
    """
    if len(request.ids) > MAX_IDS_PER_REQUEST:
        raise ValueError(f"at most {MAX_IDS_PER_REQUEST} ids per forget request, got {len(request.ids)}")
    wanted = list(dict.fromkeys(request.ids))
    partial = False
    if request.label is not None:
        by_label = state.window.ids_with_label(request.label)
        in_head = state.head.counts().get(request.label, 0)
        partial = in_head > len(by_label)
        already = set(wanted)
        wanted.extend(i for i in by_label if i not in already)
    located = {i: loc for i in wanted if (loc := state.window.locate(i)) is not None}
    events = _reread(located, refetch, dim, max_event_bytes)
    unknown = len(wanted) - len(events)
    X = np.zeros((0, dim), np.float32)
    if events:
        X = _rows(events, embed, dim)
        state.head.forget_many(X, [ev.label for ev in events])
    removed = 0
    if state.memory is not None:
        removed = state.memory.remove_event_ids([ev.id for ev in events])
        if request.label is not None:
            removed += state.memory.remove_label(request.label)
    if state.errors is not None:  # forgotten events leave the error-compensation memory too
        if events:
            state.errors.discard(X, [ev.label for ev in events])
        if request.label is not None:
            state.errors.remove_label(request.label)
    if recent is not None:
        recent.discard(X, [ev.label for ev in events], label=request.label)
    state.window.discard(ev.id for ev in events)
    state.tombstones.add(ev.id for ev in events)  # forgotten ids only: junk cannot evict a real tombstone
    state.counters.forgotten += len(events)
    state.counters.forget_unknown += unknown
    if events or removed:
        state.counters.forgets_unexported += 1
    result = ForgetResult(len(events), unknown, removed, partial)
    log.info("forget applied: ids=%d label=%r forgotten=%d unknown=%d memory_removed=%d partial=%s",
             len(request.ids), request.label, result.forgotten, unknown, removed, partial)
    if partial:
        log.warning("label %r: some events are older than the id window and cannot be forgotten exactly",
                    request.label)
    return result


def _reread(located: dict[str, tuple[int, int]], refetch: Refetch, dim: int, max_bytes: int) -> list[Event]:
    raws = refetch(list(located.values())) if located else {}
    events = []
    for event_id, loc in located.items():
        decoded = decode(raws.get(loc), dim=dim, max_bytes=max_bytes)
        if isinstance(decoded, Event) and decoded.id == event_id:
            events.append(decoded)
        else:
            log.warning("forget: event %r at partition %d offset %d could not be re-read", event_id, *loc)
    return events


def _rows(events: list[Event], embed: Embed | None, dim: int) -> np.ndarray:
    X = np.zeros((len(events), dim), dtype=np.float32)
    texts = [(i, ev.text) for i, ev in enumerate(events) if ev.text is not None]
    for i, ev in enumerate(events):
        if ev.features is not None:
            X[i] = ev.features
    if texts:
        if embed is None:
            raise ValueError("text events cannot be forgotten without a backbone")
        X[[i for i, _ in texts]] = embed([t for _, t in texts if t is not None])
    return X
