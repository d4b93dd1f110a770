"""A forget reaches the served model: gates, recent rows, registry, tombstones (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.forget import MAX_IDS_PER_REQUEST, ForgetRequest, Refetch, apply_forget
from service.core.recent_rows import RecentRows
from service.core.state import LearnerState, new_state
from service.errors import ModelError
from service.models.exporter import Exporter
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot
from service.roles.exports import ExportPolicy, ExportScheduler
from service.serving.grpc.eddy_v1 import is_loopback

D = 8


def stream(n_per_class: int, classes: str = "abc", seed: int = 0) -> tuple[np.ndarray, list[str], list[Record]]:
    rng = np.random.default_rng(seed)
    X = np.concatenate([np.eye(D)[i] + 0.05 * rng.standard_normal((n_per_class, D)) for i in range(len(classes))])
    X = X.astype(np.float32)
    labels = [c for c in classes for _ in range(n_per_class)]
    recs = [Record("t", 0, i, encode(f"e{i}", y, features=x.tolist())) for i, (x, y) in enumerate(zip(X, labels,
                                                                                                  strict=True))]
    return X, labels, recs


def refetch_from(recs: list[Record]) -> Refetch:
    by_location = {(r.partition, r.offset): r.value for r in recs}
    return lambda locs: {loc: by_location[loc] for loc in locs}


def scheduler(tmp_path: Path) -> tuple[ExportScheduler, ModelRegistry, ModelSlot]:
    registry, slot = ModelRegistry(tmp_path / "models", keep=5), ModelSlot()
    exporter = Exporter(registry=registry, slot=slot, backbone=None, backbone_identity="bb", head_kind="ncm",
                        parity_tolerance=1e-4, max_accuracy_drop=0.0)
    return ExportScheduler(exporter, ExportPolicy(every_events=10**9, every_seconds=1e9, gcv_every_seconds=1e9)), \
        registry, slot


def learned_state(recs: list[Record], window: int = 100) -> LearnerState:
    state = new_state("ncm", {}, None, window=window, backbone_identity="bb")
    learn_batch(state, recs, embed=None, dim=D, max_event_bytes=10_000)
    return state


def test_a_forgotten_label_is_served_at_once_even_where_the_old_model_wins_the_window(tmp_path: Path) -> None:
    X, labels, recs = stream(20)
    state = learned_state(recs)
    exports, registry, slot = scheduler(tmp_path)
    window = RecentRows(256, D)
    window.extend(X, labels)
    try:
        assert exports.export_now(state, window) == 1
        stale = RecentRows(256, D)  # still holds every "c" row: the old model is right on them, the new one never
        stale.extend(X, labels)
        apply_forget(state, ForgetRequest(label="c"), refetch=refetch_from(recs), embed=None, dim=D,
                     max_event_bytes=10_000)
        assert state.counters.forgets_unexported == 1
        exports.maybe_export(state, stale, backlog=False)  # urgent: starts at once
        exports.collect(state, wait=True)
    finally:
        exports.close(state)
    served = slot.get()
    assert served is not None and served.version == 2 and "c" not in served.classes
    assert state.counters.forgets_unexported == 0
    assert [v["version"] for v in registry.versions()] == [2]  # v1 knew "c": erased
    with pytest.raises(ModelError, match="erased"):
        registry.rollback()


def test_a_routine_export_still_meets_the_accuracy_gate(tmp_path: Path) -> None:
    X, labels, recs = stream(20)
    state = learned_state(recs)
    exports, _, slot = scheduler(tmp_path)
    window = RecentRows(256, D)
    window.extend(X, labels)
    try:
        assert exports.export_now(state, window) == 1
        # A head that lost "c" without a forget request (a broken solve, say) is rejected on the window.
        state.head.forget_many(X[40:], labels[40:])
        assert exports.export_now(state, window) is None
        assert exports.last_reason.startswith("quality")
    finally:
        exports.close(state)
    assert slot.version == 1


def test_forget_drops_its_rows_from_the_recent_rows() -> None:
    X, labels, recs = stream(10)
    state = learned_state(recs)
    recent = RecentRows(16, D)  # a full ring: the oldest 14 rows were overwritten
    recent.extend(X, labels)
    apply_forget(state, ForgetRequest(ids=("e29", "e28", "e0")), refetch=refetch_from(recs), embed=None, dim=D,
                 max_event_bytes=10_000, recent=recent)
    rows, names = recent.rows()
    assert len(rows) == 14 and names == ["b"] * 6 + ["c"] * 8
    assert not any(np.array_equal(r, X[28]) or np.array_equal(r, X[29]) for r in rows)
    apply_forget(state, ForgetRequest(label="b"), refetch=refetch_from(recs), embed=None, dim=D,
                 max_event_bytes=10_000, recent=recent)
    rows, names = recent.rows()
    assert names == ["c"] * 8
    np.testing.assert_array_equal(rows, X[20:28])


def test_nearly_equal_rows_count_as_the_forgotten_event() -> None:
    X, labels, _ = stream(4)
    recent = RecentRows(32, D)
    recent.extend(X, labels)
    assert recent.discard(X[[1, 5]] + 1e-6, [labels[1], labels[5]]) == 2
    assert recent.discard(X[[2]] + 0.1, [labels[2]]) == 0  # another event of the class stays
    assert len(recent) == 10


def test_junk_ids_are_counted_but_cannot_evict_the_tombstone_of_a_forgotten_event() -> None:
    _, _, recs = stream(4)
    state = learned_state(recs, window=12)  # the id window and the tombstones hold 12 ids
    result = apply_forget(state, ForgetRequest(ids=("e1",)), refetch=refetch_from(recs), embed=None, dim=D,
                          max_event_bytes=10_000)
    assert result.forgotten == 1
    for n in range(5):
        junk = apply_forget(state, ForgetRequest(ids=tuple(f"junk-{n}-{i}" for i in range(100))),
                            refetch=refetch_from(recs), embed=None, dim=D, max_event_bytes=10_000)
        assert (junk.forgotten, junk.unknown) == (0, 100)
    assert state.counters.forget_unknown == 500 and state.counters.forgets_unexported == 1
    again = Record("t", 0, 100, recs[1].value)  # the forgotten event produced again
    out = learn_batch(state, [again], embed=None, dim=D, max_event_bytes=10_000)
    assert (out.learned, out.skipped_forgotten) == (0, 1)


def test_a_forget_request_over_the_cap_is_refused_before_anything_changes() -> None:
    _, _, recs = stream(2)
    state = learned_state(recs)
    with pytest.raises(ValueError, match=f"at most {MAX_IDS_PER_REQUEST} ids"):
        apply_forget(state, ForgetRequest(ids=tuple(str(i) for i in range(MAX_IDS_PER_REQUEST + 1))),
                     refetch=refetch_from(recs), embed=None, dim=D, max_event_bytes=10_000)
    assert state.counters.forget_unknown == 0


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.8.9.1:1", True), ("ipv6:[::1]:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:80", True), ("unix:/tmp/eddy.sock", True),
    ("ipv4:10.0.0.7:5000", False), ("ipv6:[2001:db8::1]:5000", False), ("ipv4:nonsense", False), ("", False),
])
def test_only_loopback_peers_count_as_local(peer: str, local: bool) -> None:
    assert is_loopback(peer) is local


def test_a_forget_ends_a_rollback_pause(tmp_path: Path) -> None:
    X, labels, recs = stream(20)
    state = learned_state(recs)
    exports, _, slot = scheduler(tmp_path)
    window = RecentRows(256, D)
    window.extend(X, labels)
    try:
        assert exports.export_now(state, window) == 1
        exports.pause(state)  # what Admin/Rollback does: keep serving the chosen model
        apply_forget(state, ForgetRequest(label="a"), refetch=refetch_from(recs), embed=None, dim=D,
                     max_event_bytes=10_000, recent=window)
        exports.maybe_export(state, window, backlog=False)
        exports.collect(state, wait=True)
    finally:
        exports.close(state)
    served = slot.get()
    assert served is not None and list(served.classes) == ["b", "c"] and not exports.paused
