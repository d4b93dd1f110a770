"""``eddy state``: what the newest snapshot says, and the head's statistics for comparing runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from learner.heads import make_head
from service.core.snapshots import SnapshotStore
from service.errors import CheckpointError


def describe_state(checkpoint_dir: Path, *, export_stats: Path | None = None) -> dict[str, Any]:
    """Summarise the newest valid snapshot; optionally write the head's statistics as ``.npz``.

    The statistics (arrays plus class labels in sorted order) let two runs be compared exactly.
    Raises ``CheckpointError`` if the folder holds no valid snapshot.
    """
    state = SnapshotStore(checkpoint_dir).latest()
    if state is None:
        raise CheckpointError(f"no valid snapshot in {checkpoint_dir}")
    head_state = state["head"]
    head = make_head(str(head_state["kind"]), **_hyper(head_state))
    head.load_state_dict(head_state)
    counts = head.counts()
    report = {
        "events_learned": int(sum(counts.values())),
        "per_class_counts": dict(sorted(counts.items())),
        "classes": len(counts),
        "head_kind": str(head_state["kind"]),
        "duplicates_skipped": state["counters"]["duplicates"],
        "dead_lettered": state["counters"]["dead_lettered"],
        "forgotten": state["counters"]["forgotten"],
        "forgotten_skipped": state["counters"].get("forgotten_skipped", 0),
        "forget_unknown_ids": state["counters"]["forget_unknown"],
        "learned_total": state["counters"]["learned"],
        "model_version": state["model_version"],
        "backbone_identity": state["backbone_identity"],
        "offsets": state["offsets"],
        "memory_items": _memory_items(state.get("memory")),
    }
    if export_stats is not None:
        stats = head.statistics()
        np.savez(export_stats, **stats)  # type: ignore[arg-type]
        report["exported_stats"] = str(export_stats)
    return report


def _hyper(head_state: dict[str, Any]) -> dict[str, Any]:
    hyper = head_state.get("hyperparameters", {})
    return dict(hyper) if isinstance(hyper, dict) else {}


def _memory_items(memory: Any) -> int:
    if not isinstance(memory, dict):
        return 0
    ids = memory.get("event_ids")
    return len(ids) if ids is not None else 0
