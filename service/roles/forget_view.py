"""The merger's view of forget requests: ids that no partition knew, counted once.

Each partition state applies every forget request and counts as unknown the named ids that are
not in ITS id window (``counters.forget_unknown``), plus how many distinct ids the requests named
(``forget_named``). An id lives in one partition (producers key events by id), so over ``P``
partitions that all applied the same requests::

    unknown = (named ids found in no partition) + (found but not re-readable)
            = sum_p forget_unknown_p - (P - 1) * forget_named

which is what one single-process learner would count. Before every partition has applied the same
control records the sum is not yet meaningful, so ``settled_unknown`` says None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def control_offsets(payload: Mapping[str, Any], control_topic: str) -> dict[str, int]:
    """The control-topic offsets a partition state has applied (``{"topic:cp": next_offset}``)."""
    prefix = control_topic + ":"
    return {k: int(v) for k, v in payload.get("offsets", {}).items() if k.startswith(prefix) and int(v) > 0}


def settled_control(states: Mapping[int, Mapping[str, Any]], control_topic: str, partitions: int
                    ) -> dict[str, int] | None:
    """The control offsets all ``partitions`` have applied alike, or None while they differ."""
    if not control_topic or partitions <= 0 or len(states) < partitions:
        return None
    views = [(control_offsets(s, control_topic), int(s.get("forget_named", 0))) for s in states.values()]
    if any(view != views[0] for view in views[1:]):
        return None
    return views[0][0]


def settled_unknown(states: Mapping[int, Mapping[str, Any]], control_topic: str, partitions: int) -> int | None:
    """Unknown ids over all partitions, or None until all ``partitions`` applied the same requests."""
    if settled_control(states, control_topic, partitions) is None:
        return None
    named = int(next(iter(states.values())).get("forget_named", 0))
    total = sum(int(s["counters"].get("forget_unknown", 0)) for s in states.values())
    return max(total - (len(states) - 1) * named, 0)
