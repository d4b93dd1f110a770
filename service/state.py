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
from learner.heads.base import Head

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
    """The most recent ``capacity`` learned event ids, each with its location and label.

    Membership answers "was this id learned recently?" (producer retries are skipped); the location
    lets a forget request re-read the event from Kafka. Oldest entries fall out first, so memory is
    bounded by ``capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._labels: list[str] = []
        self._label_codes: dict[str, int] = {}

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, event_id: str, partition: int, offset: int, label: str) -> None:
        """Remember one learned event; evicts the oldest beyond capacity."""
        if self.capacity <= 0:
            return
        code = self._label_codes.get(label)
        if code is None:
            code = self._label_codes[label] = len(self._labels)
            self._labels.append(label)
        self._items[event_id] = (pack_location(partition, offset), code)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def locate(self, event_id: str) -> tuple[int, int] | None:
        """(partition, offset) of a remembered id, or None."""
        item = self._items.get(event_id)
        return None if item is None else unpack_location(item[0])

    def ids_with_label(self, label: str) -> list[str]:
        """Remembered ids whose label is ``label``, oldest first."""
        code = self._label_codes.get(label)
        return [] if code is None else [i for i, (_, c) in self._items.items() if c == code]

    def discard(self, ids: Iterable[str]) -> None:
        """Forget ids (after their events were forgotten)."""
        for event_id in ids:
            self._items.pop(event_id, None)

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays for a snapshot."""
        values = np.array(list(self._items.values()), dtype=np.int64).reshape(-1, 2)
        return {"capacity": self.capacity, "ids": list(self._items), "locations": values[:, 0],
                "label_codes": values[:, 1], "labels": list(self._labels)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], capacity: int | None = None) -> IdWindow:
        """Inverse of ``state_dict``; with ``capacity``, the oldest ids beyond it are dropped."""
        window = cls(int(state["capacity"]) if capacity is None else capacity)
        window._labels = list(state["labels"])
        window._label_codes = {label: i for i, label in enumerate(window._labels)}
        window._items = OrderedDict(
            zip(state["ids"], zip(state["locations"].tolist(), state["label_codes"].tolist(), strict=True),
                strict=True)
        )
        while len(window._items) > max(window.capacity, 0):
            window._items.popitem(last=False)
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


@dataclass
class LearnerState:
    """The learner's whole mutable state; the learn loop is its only writer."""

    head: Head
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
