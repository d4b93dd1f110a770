"""Everything a snapshot holds, and the bounded id bookkeeping behind exactly-once learning.

``LearnerState`` is the single object the learn loop mutates: head, replay memory, the next offset
of every partition it has read, the window of recently learned ids (for idempotency and for
locating an event again when it must be forgotten), tombstones of forgotten ids, counters and the
model version. ``state_dict()``/``from_state_dict()`` round-trip it through a snapshot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from learner.heads import make_head
from learner.heads.stats import ExactHead

if TYPE_CHECKING:
    from memory import ErrorMemory, ReplayMemory

_PARTITION_SHIFT = 40  # offsets below 2**40 (1e12 messages per partition) fit beside the partition


def pack_location(partition: int, offset: int) -> int:
    """Pack a (partition, offset) pair into one int64."""
    return (partition << _PARTITION_SHIFT) | offset


def unpack_location(loc: int) -> tuple[int, int]:
    """Inverse of ``pack_location``."""
    return loc >> _PARTITION_SHIFT, loc & ((1 << _PARTITION_SHIFT) - 1)


class IdWindow:
    """The ids of the last ``capacity`` learned events, each with its location and label.

    Membership answers "was this id learned recently?" (producer retries are skipped); the location
    lets a forget request re-read the event from Kafka. Ids live in a ring of ``capacity`` slots,
    oldest overwritten first, so memory is bounded; a discarded (forgotten) id leaves its slot
    empty until the ring comes round. Locations and labels sit in numpy arrays beside the ring, so
    a snapshot copies them instead of walking a million Python tuples (~0.8 s at the default
    capacity, on the learner thread).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 0)
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._loc = np.zeros(0, np.int64)
        self._code = np.zeros(0, np.int64)
        self._added = 0  # insertions so far; the next goes to slot ``_added % capacity``
        self._labels: list[str] = []
        self._label_codes: dict[str, int] = {}

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, event_id: str, partition: int, offset: int, label: str) -> None:
        """Remember one learned event; overwrites the oldest slot once the ring is full."""
        if self.capacity == 0:
            return
        code = self._label_codes.get(label)
        if code is None:
            code = self._label_codes[label] = len(self._labels)
            self._labels.append(label)
        slot = self._slot_of.get(event_id)
        if slot is None:
            slot = self._added % self.capacity
            self._added += 1
            if slot == len(self._ids):  # still filling the ring
                self._grow()
                self._ids.append(None)
            evicted = self._ids[slot]
            if evicted is not None:
                del self._slot_of[evicted]
            self._ids[slot] = event_id
            self._slot_of[event_id] = slot
        self._loc[slot] = pack_location(partition, offset)
        self._code[slot] = code

    def _grow(self) -> None:
        if len(self._ids) < len(self._loc):
            return
        size = min(max(2 * len(self._loc), 1024), self.capacity)
        self._loc = np.resize(self._loc, size)
        self._code = np.resize(self._code, size)

    def locate(self, event_id: str) -> tuple[int, int] | None:
        """(partition, offset) of a remembered id, or None."""
        slot = self._slot_of.get(event_id)
        return None if slot is None else unpack_location(int(self._loc[slot]))

    def _live_slots(self) -> list[int]:
        """Occupied slots, oldest first."""
        n = len(self._ids)
        start = self._added % n if n == self.capacity and n else 0
        return [s for s in range(start, n) if self._ids[s] is not None] + \
               [s for s in range(start) if self._ids[s] is not None]

    def ids_with_label(self, label: str) -> list[str]:
        """Remembered ids whose label is ``label``, oldest first."""
        code = self._label_codes.get(label)
        if code is None:
            return []
        return [self._ids[s] for s in self._live_slots() if self._code[s] == code]  # type: ignore[misc]

    def discard(self, ids: Iterable[str]) -> None:
        """Forget ids (after their events were forgotten)."""
        for event_id in ids:
            slot = self._slot_of.pop(event_id, None)
            if slot is not None:
                self._ids[slot] = None

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays for a snapshot (oldest first)."""
        slots = self._live_slots()
        index = np.asarray(slots, dtype=np.int64)
        return {"capacity": self.capacity, "ids": [self._ids[s] for s in slots],
                "locations": self._loc[index], "label_codes": self._code[index], "labels": list(self._labels)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], capacity: int | None = None) -> IdWindow:
        """Inverse of ``state_dict``; with ``capacity``, the oldest ids beyond it are dropped."""
        window = cls(int(state["capacity"]) if capacity is None else capacity)
        labels = list(state["labels"])
        ids = list(state["ids"])
        keep = min(len(ids), window.capacity)
        ids = ids[len(ids) - keep:]
        if len(set(ids)) != len(ids):  # never written by state_dict; replayed one by one to be safe
            for event_id, loc, code in zip(ids, state["locations"][-keep:].tolist(),
                                           state["label_codes"][-keep:].tolist(), strict=True):
                window.add(event_id, *unpack_location(loc), labels[code])
            return window
        # Oldest first into slots 0..keep-1, as if added in that order: a million ids restore in
        # ~0.7 s instead of ~1.7 s one by one (start-up after a crash waits on it).
        window._ids = list(ids)
        window._slot_of = dict(zip(ids, range(keep), strict=True))
        window._loc = np.array(state["locations"][len(state["locations"]) - keep:], dtype=np.int64)
        window._code = np.array(state["label_codes"][len(state["label_codes"]) - keep:], dtype=np.int64)
        window._labels = labels
        window._label_codes = {label: code for code, label in enumerate(labels)}
        window._added = keep
        return window


class Tombstones:
    """Ids that were forgotten: an event with such an id that arrives later is not learned."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, ids: Iterable[str]) -> None:
        """Remember forgotten ids, dropping the oldest beyond capacity."""
        for event_id in ids:
            self._ids[event_id] = None
            self._ids.move_to_end(event_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a snapshot."""
        return {"capacity": self.capacity, "ids": list(self._ids)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], capacity: int | None = None) -> Tombstones:
        """Inverse of ``state_dict``; with ``capacity``, the oldest ids beyond it are dropped."""
        stones = cls(int(state["capacity"]) if capacity is None else capacity)
        stones.add(state["ids"])
        return stones


@dataclass
class Counters:
    """Running totals reported by ``eddy state`` (all survive restarts through the snapshot)."""

    learned: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    forgotten: int = 0
    forget_unknown: int = 0
    forgotten_skipped: int = 0  # events not learned because their id had been forgotten
    forgets_unexported: int = 0  # forget requests applied here but not yet in a published model


@dataclass
class LearnerState:
    """The learner's whole mutable state; the learn loop is its only writer."""

    head: ExactHead
    memory: ReplayMemory | None
    window: IdWindow
    tombstones: Tombstones
    offsets: dict[str, int] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    model_version: int = 0
    backbone_identity: str = ""
    errors: ErrorMemory | None = None  # recent mistakes of the served model (memory.error_compensation)

    def state_dict(self) -> dict[str, Any]:
        """Everything a snapshot stores."""
        return {
            "format": 1,
            "head": self.head.state_dict(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "window": self.window.state_dict(),
            "tombstones": self.tombstones.state_dict(),
            "offsets": dict(self.offsets),
            "counters": vars(self.counters).copy(),
            "model_version": self.model_version,
            "backbone_identity": self.backbone_identity,
            "errors": self.errors.state_dict() if self.errors is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a snapshot's state into this object (the head and memory keep their settings)."""
        self.head.load_state_dict(state["head"])
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])
        # The configured capacities win over the snapshot's (a changed dedupe_window takes effect).
        self.window = IdWindow.from_state_dict(state["window"], capacity=self.window.capacity)
        self.tombstones = Tombstones.from_state_dict(state["tombstones"], capacity=self.tombstones.capacity)
        self.offsets = {k: int(v) for k, v in state["offsets"].items()}
        self.counters = Counters(**{k: int(v) for k, v in state["counters"].items() if k in Counters.__annotations__})
        self.model_version = int(state["model_version"])
        self.backbone_identity = str(state["backbone_identity"])
        if self.errors is not None and state.get("errors") is not None:  # older snapshots have none
            self.errors.load_state_dict(state["errors"])


def new_state(head_kind: str, head_params: dict[str, Any], memory: ReplayMemory | None, *,
              window: int, backbone_identity: str, errors: ErrorMemory | None = None) -> LearnerState:
    """A fresh state, as before the first event (``errors``: an empty error memory, or None)."""
    return LearnerState(
        head=make_head(head_kind, **head_params), memory=memory, window=IdWindow(window),
        tombstones=Tombstones(max(window, 1)), backbone_identity=backbone_identity, errors=errors,
    )
