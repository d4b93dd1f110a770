"""The served model and its slot: validated predictions, forward-only swaps, and the registry follower."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service import metrics
from service.errors import ModelError
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot, RegistryFollower, load_served_model
from tests.service.grpc_fixtures import CLASSES, D, make_readout, model_bytes, served


class FakeBackbone:
    """A deterministic stand-in for the text path's protocol (identity, dim, embed)."""

    identity = "test-backbone"
    dim = D

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rng = [np.random.default_rng(sum(t.encode())) for t in texts]
        return np.array([r.normal(size=D) for r in rng], dtype=np.float32).reshape(len(texts), D)


def test_predict_features_matches_the_readout() -> None:
    model = served(1, seed=3)
    X = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
    probs = model.predict_features(X)
    assert probs.dtype == np.float32 and probs.shape == (5, len(CLASSES))
    np.testing.assert_allclose(probs, make_readout(seed=3).predict_proba(X), atol=1e-5)
    assert model.classes == CLASSES and model.n_features == D and model.version == 1
    assert model.head_kind == "ridge" and model.source_offsets == {"eddy.events:0": 10}


def test_predict_features_rejects_wrong_width_and_nan() -> None:
    model = served(1)
    with pytest.raises(ValueError, match=f"got {D - 1} features, expected {D}"):
        model.predict_features(np.zeros((2, D - 1), dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        model.predict_features(np.full((1, D), np.nan, dtype=np.float32))
    assert model.predict_features(np.zeros((0, D))).shape == (0, len(CLASSES))


def test_predict_texts_needs_a_backbone() -> None:
    with pytest.raises(ModelError, match="no backbone"):
        served(1).predict_texts(["hello"])
    backbone = FakeBackbone()
    model = served(1, backbone=backbone)
    np.testing.assert_allclose(
        model.predict_texts(["a", "b"]), model.predict_features(backbone.embed(["a", "b"]))
    )


def test_top_k_orders_labels_by_probability() -> None:
    model = served(1)
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32)
    assert model.top_k(probs, 2) == [
        (["cards", "travel"], pytest.approx([0.5, 0.3])),
        (["billing", "travel"], pytest.approx([0.6, 0.3])),
    ]
    with pytest.raises(ValueError, match="between 1 and 3, got 4"):
        model.top_k(probs, 4)


def test_load_served_model_reads_version_and_checks_backbone(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes(7, backbone_identity="other@123"))
    assert load_served_model(path, None).version == 7
    with pytest.raises(ModelError, match="built on backbone 'other@123'"):
        load_served_model(path, FakeBackbone())
    with pytest.raises(ModelError, match="cannot read model"):
        load_served_model(tmp_path / "missing.onnx", None)


def test_slot_refuses_older_or_equal_versions() -> None:
    slot = ModelSlot()
    assert slot.get() is None
    rejected = metrics.SWAPS.labels(result="rejected", reason="stale_version")._value.get()
    assert slot.swap(served(2))
    assert not slot.swap(served(1))
    assert not slot.swap(served(2))
    assert slot.version == 2
    assert metrics.MODEL_VERSION._value.get() == 2
    assert metrics.SWAPS.labels(result="rejected", reason="stale_version")._value.get() == rejected + 2


def test_wait_for_returns_when_version_arrives() -> None:
    slot = ModelSlot()
    assert slot.wait_for(1, timeout=0.01) is None
    later = threading.Timer(0.05, slot.swap, args=(served(3),))
    later.start()
    model = slot.wait_for(2, timeout=5)
    assert model is not None and model.version == 3


def test_swaps_under_concurrent_predictions_never_fail_or_go_backwards() -> None:
    models = [served(v, seed=v % 5) for v in range(1, 201)]
    slot = ModelSlot()
    slot.swap(models[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(3)]
    X = np.ones((4, D), dtype=np.float32)

    def hammer(out: list[int]) -> None:
        try:
            while not stop.is_set():
                model = slot.get()
                assert model is not None
                probs = model.predict_features(X)
                assert probs.shape == (4, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
                out.append(model.version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in seen]
    for t in threads:
        t.start()
    for model in models[1:]:
        assert slot.swap(model)
        time.sleep(0)  # let the readers run between swaps
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    for versions in seen:
        assert versions and all(a <= b for a, b in itertools.pairwise(versions))
    assert slot.version == 200


def test_follower_serves_what_the_registry_names(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=3)
    slot = ModelSlot()
    follower = RegistryFollower(registry, slot, None, interval=0.01).start()
    try:
        registry.publish(model_bytes(1), {})
        assert slot.wait_for(1, timeout=10) is not None
        registry.publish(model_bytes(2), {})
        registry.rollback(1)
        model = slot.wait_for(3, timeout=10)
        assert model is not None and model.version == 3 and model.meta["rolled_back_from"] == "1"
    finally:
        follower.stop()


def test_follower_keeps_serving_when_a_model_cannot_load(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=3)
    slot = ModelSlot()
    registry.publish(model_bytes(1), {})
    follower = RegistryFollower(registry, slot, FakeBackbone(), interval=0.01)
    assert follower.poll_once()
    registry.publish(model_bytes(2, backbone_identity="other@1"), {})
    assert not follower.poll_once()
    assert slot.version == 1


def test_slot_keeps_the_newest_versions_loaded_and_releases_older_sessions() -> None:
    import gc
    import weakref

    slot = ModelSlot(versions_loaded=2)
    sessions = []
    for version in range(1, 6):
        model = served(version)
        sessions.append(weakref.ref(model.session))
        assert slot.swap(model)
        del model
    assert slot.loaded_versions() == [5, 4]
    assert slot.find(4) is not None and slot.find(4).version == 4 and slot.find(3) is None
    gc.collect()
    assert [ref() is not None for ref in sessions] == [False, False, False, True, True]
