"""Restore a snapshot whose head was built with other settings: rebuild the head from its replay memory.

``LearnerState.restore`` refuses a snapshot whose head statistics do not fit the configured head
(another kind, or ridge with another ``expansion_width`` / ``seed``): the head raises
``ValueError``. Rather than failing to start, the learner then loads the snapshot's replay memory
and has a new head learn every stored item (``memory.rebuild.rebuild_head``). Everything else in
the snapshot (offsets, id window, tombstones, counters, error memory) is restored as usual, so
no event is replayed: the new head has seen only the memory's sample of the stream, which the
WARNING line says in numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from learner.heads import make_head
from memory.rebuild import rebuild_head
from service.core.state import LearnerState
from service.errors import CheckpointError

log = logging.getLogger(__name__)


def restore_state(state: LearnerState, snapshot: dict[str, Any], kind: str, params: dict[str, Any]) -> bool:
    """Restore ``snapshot`` into ``state``; return True if the head had to be rebuilt from the memory.

    ``kind``/``params`` are the configured head's. Raises ``CheckpointError`` when the head does
    not fit and there is no replay memory to rebuild it from (in the snapshot or in ``state``).
    """
    try:
        make_head(kind, **params).load_state_dict(snapshot["head"])
    except ValueError as exc:
        reason = str(exc)
    else:
        state.restore(snapshot)
        return False
    memory_state = snapshot.get("memory")
    if state.memory is None or memory_state is None:
        raise CheckpointError(f"the snapshot's head does not fit the configured {kind} head ({reason}), "
                              "and there is no replay memory to rebuild it from: "
                              "restore the old head settings or start from an empty checkpoint folder")
    state.memory.load_state_dict(memory_state)
    head = rebuild_head(state.memory, kind, params)
    learned = int(np.sum(snapshot["head"].get("counts", [])))
    log.warning("snapshot head does not fit the configured %s head (%s): rebuilt it from the replay memory; "
                "the new head has learned only the memory, %d items of the %d events the old head had learned",
                kind, reason, len(state.memory), learned)
    state.restore({**snapshot, "head": head.state_dict(), "memory": None})
    state.head = head
    return True
