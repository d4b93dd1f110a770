"""Replay and error memory put to use: served compensation, temperature from memory, mistakes in snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from learner.export import load_session, readout_to_onnx
from learner.heads import make_head
from memory import Compensator, ErrorMemory, ReplayMemory
from service.core.batch import Record, learn_batch
from service.core.events import encode
from service.core.recent_rows import RecentRows
from service.core.snapshots import pack, unpack
from service.core.state import LearnerState, new_state
from service.models.exporter import Exporter
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot, ServedModel
from service.roles.exports import ExportPolicy, ExportScheduler

D = 8


def unit(X: np.ndarray) -> np.ndarray:
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def around(rng: np.random.Generator, axis: int, n: int) -> np.ndarray:
    return unit(np.eye(D)[axis] + 0.05 * rng.standard_normal((n, D)))


def served_ncm(X: np.ndarray, labels: list[str], compensation: Compensator | None = None) -> ServedModel:
    head = make_head("ncm")
    head.learn_many(X, labels)
    readout = head.readout()
    meta = {"classes": json.dumps(list(readout.classes)), "model_version": "1"}
    session, _ = load_session(readout_to_onnx(readout, metadata=meta).SerializeToString())
    return ServedModel.from_session(session, version=1, meta=meta, compensation=compensation)


def test_compensation_moves_a_mispredicted_neighbourhood_and_is_a_no_op_without_it() -> None:
    rng = np.random.default_rng(0)
    # The head learned "a" around axis 0 and "c" around axis 2; around axis 1 it says "a" (nearest
    # mean), but the truth there is "b", which it knows from a few events far away (axis 3).
    X = np.concatenate([around(rng, 0, 20), around(rng, 2, 20), around(rng, 3, 5)])
    labels = ["a"] * 20 + ["c"] * 20 + ["b"] * 5
    queries = unit(np.eye(D)[1] + 0.8 * np.eye(D)[0] + 0.05 * rng.standard_normal((30, D)))
    far = around(rng, 2, 10)
    plain = served_ncm(X, labels)
    raw = plain.session.run(["probabilities"], {"features": np.concatenate([queries, far])})[0]
    assert np.array_equal(plain.predict_features(np.concatenate([queries, far])), raw)  # no compensation: ONNX
    column = {c: i for i, c in enumerate(plain.classes)}
    assert (raw[:30].argmax(1) == column["a"]).all()

    errors = ErrorMemory(100, D)
    stored = errors.add_mistakes(queries[:10], ["b"] * 10, ["a"] * 10)  # what learn_batch records
    assert stored == 10
    model = served_ncm(X, labels, Compensator.freeze(errors, k=5, strength=1.0, threshold=0.6))
    errors.add(around(rng, 2, 5), ["a"] * 5)  # later mistakes do not reach the frozen copy
    fixed = model.predict_features(queries[10:])
    assert fixed.dtype == np.float32 and np.allclose(fixed.sum(1), 1.0, atol=1e-5)
    assert (fixed.argmax(1) == column["b"]).all()  # the neighbourhood now says its true label
    assert np.array_equal(model.predict_features(far), raw[30:])  # far from every mistake: untouched
    assert np.array_equal(model.predict_raw(queries), raw[:30])  # the raw head is still there


def records(X: np.ndarray, labels: list[str], start: int) -> list[Record]:
    return [Record("t", 0, start + i, encode(f"e{start + i}", y, features=x)) for i, (x, y)
            in enumerate(zip(X, labels, strict=True))]


def test_learn_batch_remembers_the_served_models_mistakes_and_snapshots_keep_them() -> None:
    rng = np.random.default_rng(1)
    X = np.concatenate([around(rng, 0, 10), around(rng, 1, 10)])
    labels = ["a"] * 10 + ["b"] * 10
    state = new_state("ncm", {}, None, window=100, backbone_identity="bb", errors=ErrorMemory(50, D))

    def always_a(rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return np.tile([1.0, 0.0], (len(rows), 1)), ["a", "b"]

    out = learn_batch(state, records(X, labels, 0), embed=None, dim=D, max_event_bytes=10_000, predict=always_a)
    assert (out.correct, out.predicted, out.learned) == (10, 20, 20)
    assert state.errors is not None and len(state.errors) == 10  # the ten "b" events were mispredicted
    restored = new_state("ncm", {}, None, window=100, backbone_identity="bb", errors=ErrorMemory(50, D))
    restored.restore(unpack(pack(state.state_dict())))
    assert restored.errors is not None
    assert restored.errors.state_dict()["labels"].tolist() == ["b"] * 10
    np.testing.assert_array_equal(restored.errors.state_dict()["vectors"], state.errors.state_dict()["vectors"])
    old = new_state("ncm", {}, None, window=100, backbone_identity="bb")  # compensation off: nothing kept
    old.restore(unpack(pack(state.state_dict())))
    assert old.errors is None and old.state_dict()["errors"] is None


def export_once(state: LearnerState, registry: ModelRegistry, head_kind: str) -> ModelSlot:
    """Export ``state``'s head through the learn loop's export path (gates included) as version 1."""
    slot = ModelSlot()
    exporter = Exporter(registry=registry, slot=slot, backbone=None, backbone_identity="bb",
                        head_kind=head_kind, parity_tolerance=1e-4, max_accuracy_drop=0.02)
    exports = ExportScheduler(exporter, ExportPolicy(every_events=1, every_seconds=0.0, gcv_every_seconds=0.0))
    try:
        assert exports.export_now(state, RecentRows(64, D)) == 1
    finally:
        exports.close(state)
    return slot


@pytest.mark.parametrize("temperature", ["auto", 0.05])
def test_export_fits_the_temperature_on_the_memory_and_serves_the_compensation(tmp_path: Path,
                                                                               temperature: object) -> None:
    rng = np.random.default_rng(2)
    X = np.concatenate([around(rng, i, 40) for i in range(4)])
    labels = [f"c{i}" for i in range(4) for _ in range(40)]
    state = new_state("ridge", {"lam": "gcv", "expansion_width": 32, "temperature": temperature},
                      ReplayMemory(D, max_items=1000, use_gpu="never"), window=1000, backbone_identity="bb",
                      errors=ErrorMemory(50, D))
    learn_batch(state, records(X, labels, 0), embed=None, dim=D, max_event_bytes=10_000)
    assert state.errors is not None and state.memory is not None and len(state.memory) == 160
    state.errors.add(X[:3], ["c1"] * 3)
    slot = export_once(state, ModelRegistry(tmp_path / "models", keep=3), "ridge")
    model = slot.get()
    assert model is not None and model.compensation is not None and len(model.compensation.errors) == 3
    fitted = state.head.fitted_temperature_  # type: ignore[attr-defined]
    if temperature == "auto":  # fitted on the export thread and kept by the live head
        assert fitted is not None and fitted != 0.05
        assert state.head.readout().temperature == pytest.approx(fitted)
    else:  # a configured temperature is never refitted
        assert fitted is None
    # the parity gate compared the raw ONNX head with the solved readout: it passed, and the raw
    # output still equals the readout's probabilities
    np.testing.assert_allclose(model.predict_raw(X[-5:]), state.head.readout().predict_proba(X[-5:]), atol=1e-5)


def test_forgetting_removes_the_events_from_the_error_memory() -> None:
    from service.core.forget import ForgetRequest, apply_forget

    rng = np.random.default_rng(3)
    X = np.concatenate([around(rng, 0, 4), around(rng, 1, 4), around(rng, 2, 4)])
    labels = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    recs = records(X, labels, 0)
    state = new_state("ncm", {}, None, window=100, backbone_identity="bb", errors=ErrorMemory(50, D))

    def always_a(rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return np.tile([1.0, 0.0, 0.0], (len(rows), 1)), ["a", "b", "c"]

    learn_batch(state, recs, embed=None, dim=D, max_event_bytes=10_000, predict=always_a)
    assert state.errors is not None and len(state.errors) == 8
    by_location = {(r.partition, r.offset): r.value for r in recs}
    apply_forget(state, ForgetRequest(ids=("e4", "e5")), refetch=lambda locs: {loc: by_location[loc] for loc in locs},
                 embed=None, dim=D, max_event_bytes=10_000)
    assert len(state.errors) == 6
    apply_forget(state, ForgetRequest(label="c"), refetch=lambda locs: {loc: by_location[loc] for loc in locs},
                 embed=None, dim=D, max_event_bytes=10_000)
    assert state.errors.state_dict()["labels"].tolist() == ["b", "b"]


def test_routine_exports_yield_the_cores_to_a_backlog_but_new_classes_do_not_wait() -> None:
    from service.roles.exports import refit_due, routine_export_affordable

    # An export that took 0.5 s: caught up, the next may start 1.5 s after it began; behind, 10 s.
    assert routine_export_affordable(1.5, 0.5, backlog=False)
    assert not routine_export_affordable(1.4, 0.5, backlog=False)
    assert not routine_export_affordable(9.9, 0.5, backlog=True)
    assert routine_export_affordable(10.0, 0.5, backlog=True)
    # GCV every 30 s when caught up; a backlog defers it, but never past four periods.
    assert refit_due(31, 30, backlog=False) and not refit_due(29, 30, backlog=False)
    assert not refit_due(100, 30, backlog=True) and refit_due(121, 30, backlog=True)
    assert refit_due(0.1, 0, backlog=True)  # period 0: every export re-chooses


def test_processes_following_the_registry_serve_the_same_compensation(tmp_path: Path) -> None:
    """A serve replica, or the daemon after a restart, answers exactly as the learner's own model."""
    from service.models.served import RegistryFollower, load_registered

    rng = np.random.default_rng(4)
    X = np.concatenate([around(rng, i, 30) for i in range(4)])
    labels = [f"c{i}" for i in range(4) for _ in range(30)]
    state = new_state("ncm", {}, None, window=1000, backbone_identity="bb", errors=ErrorMemory(50, D))
    learn_batch(state, records(X, labels, 0), embed=None, dim=D, max_event_bytes=10_000)
    assert state.errors is not None
    state.errors.add(around(rng, 0, 5), ["c3"] * 5)  # mistakes near c0 that were really c3
    registry = ModelRegistry(tmp_path / "models", keep=2)
    learner_model = export_once(state, registry, "ncm").get()
    assert learner_model is not None and learner_model.compensation is not None

    replica_slot = ModelSlot()
    assert RegistryFollower(registry, replica_slot, None, interval=0.1).poll_once()
    replica = replica_slot.get()
    assert replica is not None and replica.compensation is not None
    probe = around(rng, 0, 20)
    np.testing.assert_array_equal(replica.predict_features(probe), learner_model.predict_features(probe))
    assert not np.allclose(replica.predict_raw(probe), replica.predict_features(probe))  # it does compensate

    rolled = registry.rollback(1)  # a rollback republishes the sidecar with the model
    again = load_registered(registry, rolled, None)
    np.testing.assert_array_equal(again.predict_features(probe), learner_model.predict_features(probe))
    registry.rollback(rolled)
    files = sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith("."))
    assert files == ["manifest.json", "v00000002.onnx", "v00000002.onnx.sidecar",
                     "v00000003.onnx", "v00000003.onnx.sidecar"]  # pruned with their models
