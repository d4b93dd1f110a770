"""Out-of-scope rejection end to end in one process: threshold at export, served answers, unknown labels.

Real heads, real ONNX Runtime, a real gRPC server driven by tritonclient (OIP v2) and the eddy.v1
stub. The review queue against the real broker is in ``test_review_queue.py``.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from learner.heads import make_head
from learner.unknown import conformal_threshold, heldout_msp
from memory import ReplayMemory
from service import metrics
from service.core.batch import learn_batch
from service.core.recent_rows import RecentRows
from service.core.state import new_state
from service.models.exporter import Exporter
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot, load_registered
from service.roles.exports import ExportPolicy, ExportScheduler
from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
from tests.service.grpc_fixtures import D, running_server, served
from tests.service.test_memory_uses import records

HEADS = {"ridge": {"expansion_width": 64, "lam": 1.0}, "slda": {}, "ncm": {}}


def clusters(seed: int, k: int, n: int, noise: float = 0.35) -> tuple[np.ndarray, list[str]]:
    """``n`` unit rows around each of the first ``k`` axes (overlapping a little), labelled ``c0..``; shuffled."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([np.eye(D)[i] + noise * rng.standard_normal((n, D)) for i in range(k)])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    labels = [f"c{i}" for i in range(k) for _ in range(n)]
    order = rng.permutation(len(labels))
    return X[order], [labels[i] for i in order]


def far_rows(seed: int, n: int) -> np.ndarray:
    """Rows pointing between the learned axes, towards the unlearned ones: out of scope."""
    rng = np.random.default_rng(seed)
    X = np.ones((n, D)) / np.sqrt(D) + 0.05 * rng.standard_normal((n, D))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


# -- the threshold -------------------------------------------------------------------------------
def test_export_stores_the_conformal_threshold_and_refreshes_it_as_the_stream_moves(tmp_path: Path) -> None:
    X, labels = clusters(0, 3, 60)
    state = new_state("ridge", {"lam": "gcv", "expansion_width": 32, "temperature": "auto"},
                      ReplayMemory(D, max_items=5000, use_gpu="never"), window=5000, backbone_identity="bb")
    slot = ModelSlot()
    registry = ModelRegistry(tmp_path / "models", keep=5)
    exporter = Exporter(registry=registry, slot=slot, backbone=None,
                        backbone_identity="bb", head_kind="ridge", parity_tolerance=1e-4, max_accuracy_drop=1.0)
    exports = ExportScheduler(exporter, ExportPolicy(every_events=1, every_seconds=0.0, gcv_every_seconds=0.0,
                                                     reject_rate=0.05))
    try:
        learn_batch(state, records(X, labels, 0), embed=None, dim=D, max_event_bytes=10_000)
        assert exports.export_now(state, RecentRows(64, D)) == 1
        first = slot.get()
        assert first is not None and first.unknown_threshold is not None
        # The threshold is the floor((n+1)*alpha)-th smallest leave-one-out MSP of the memory items
        # (all 180 here), under the temperature fitted on the same items.
        expected = conformal_threshold(heldout_msp(state.head, X, labels), 0.05)
        assert first.unknown_threshold == pytest.approx(expected, abs=1e-6)
        assert first.meta["unknown_calibration_items"] == "180" and first.meta["unknown_reject_rate"] == "0.05"
        assert metrics.UNKNOWN_THRESHOLD._value.get() == pytest.approx(first.unknown_threshold)
        # The stream moves on: a fourth class arrives; the next export chooses a new threshold.
        X2, labels2 = clusters(1, 4, 60)
        learn_batch(state, records(X2, labels2, len(labels)), embed=None, dim=D, max_event_bytes=10_000)
        assert exports.export_now(state, RecentRows(64, D)) == 2
        second = slot.get()
        assert second is not None and second.unknown_threshold is not None
        assert second.meta["unknown_calibration_items"] == str(len(labels) + len(labels2))
        assert second.unknown_threshold != pytest.approx(first.unknown_threshold, abs=1e-6)
        assert second.unknown_threshold == pytest.approx(
            conformal_threshold(heldout_msp(state.head, np.concatenate([X, X2]), labels + labels2), 0.05), abs=1e-6)
        # A serving-only process loads the same threshold from the registry (it is in the ONNX metadata).
        follower = load_registered(registry, 2, None)
        assert follower.unknown_threshold == second.unknown_threshold
    finally:
        exports.close(state)


def test_without_a_reject_rate_no_threshold_is_stored(tmp_path: Path) -> None:
    X, labels = clusters(0, 2, 30)
    state = new_state("ncm", {}, ReplayMemory(D, max_items=500, use_gpu="never"), window=500, backbone_identity="bb")
    slot = ModelSlot()
    exporter = Exporter(registry=ModelRegistry(tmp_path / "m", keep=2), slot=slot, backbone=None,
                        backbone_identity="bb", head_kind="ncm", parity_tolerance=1e-4, max_accuracy_drop=1.0)
    exports = ExportScheduler(exporter, ExportPolicy(every_events=1, every_seconds=0.0, gcv_every_seconds=0.0))
    try:
        learn_batch(state, records(X, labels, 0), embed=None, dim=D, max_event_bytes=10_000)
        exports.export_now(state, RecentRows(64, D))
    finally:
        exports.close(state)
    model = slot.get()
    assert model is not None and model.unknown_threshold is None
    assert not model.rejects(np.zeros(3)).any()  # no threshold: nothing is unknown


# -- unknown-labelled events ---------------------------------------------------------------------
def test_unknown_labelled_events_are_never_learned_but_check_the_served_rejection() -> None:
    X, labels = clusters(0, 2, 20)
    far = far_rows(1, 6)
    state = new_state("ncm", {}, None, window=100, backbone_identity="bb")
    out = learn_batch(state, records(X, labels, 0), embed=None, dim=D, max_event_bytes=10_000)
    assert out.unknown_labelled == 0
    rejected_far = np.array([False] * 20 + [True] * 6)  # what a served model would say, row by row

    def reject(rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        assert len(rows) == 26
        return rejected_far.copy(), ["c0", "c1"]

    mixed = np.concatenate([X[:20], far])
    mixed_labels = labels[:20] + ["<unknown>"] * 6
    out = learn_batch(state, records(mixed, mixed_labels, 100), embed=None, dim=D, max_event_bytes=10_000,
                      unknown_label="<unknown>", reject=reject)
    assert state.head.classes_ == ["c0", "c1"] or sorted(state.head.classes_) == ["c0", "c1"]
    assert sum(state.head.counts().values()) == 60  # 40 + the 20 in-scope events, none of the 6
    assert (out.learned, out.unknown_labelled, out.unknown_caught) == (20, 6, 6)
    assert (out.in_scope_scored, out.in_scope_rejected) == (20, 0)
    assert state.offsets["t:0"] == 126  # every record handled once, learned or not


# -- served answers ------------------------------------------------------------------------------
def served_head(kind: str, version: int = 3, reject_rate: float = 0.05) -> tuple[object, float]:
    """A real head of ``kind`` on three clusters, exported with its conformal threshold; (head, threshold)."""
    X, labels = clusters(0, 3, 60)
    head = make_head(kind, **HEADS[kind])
    head.learn_many(X, labels)
    threshold = conformal_threshold(heldout_msp(head, X, labels), reject_rate)
    assert threshold is not None
    return head, threshold


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_oip_v2_and_eddy_v1_answer_unknown_with_the_learners_own_score(kind: str) -> None:
    head, threshold = served_head(kind)
    model = served(3, readout=head.readout(), d=D,  # type: ignore[attr-defined]
                   extra_meta={"unknown_threshold": repr(threshold)})
    slot = ModelSlot()
    slot.swap(model)
    inside, _ = clusters(5, 3, 4, noise=0.05)
    queries = np.concatenate([inside, far_rows(2, 4)]).astype(np.float32)
    P, classes = head.predict_proba_many(queries)  # type: ignore[attr-defined]
    want_score = P.max(axis=1)
    with running_server(slot) as (address, _):
        client = tc.InferenceServerClient(address)
        tensor = tc.InferInput("FEATURES", list(queries.shape), "FP32")
        tensor.set_data_from_numpy(queries)
        result = client.infer("eddy", [tensor])
        score, unknown = result.as_numpy("SCORE"), result.as_numpy("UNKNOWN")
        np.testing.assert_allclose(score, want_score, atol=1e-4)  # the parity tolerance
        assert unknown.dtype == bool and unknown.tolist() == (want_score < threshold).tolist()
        assert not unknown[:12].any() and unknown[12:].all()  # in-scope kept, far rows rejected
        labels = [v.decode() for v in result.as_numpy("LABEL")[:, 0]]
        assert labels == [classes[j] for j in P.argmax(axis=1)]  # LABEL stays the in-scope best
        off = client.infer("eddy", [tensor], parameters={"unknown": False})
        assert not off.as_numpy("UNKNOWN").any()
        np.testing.assert_allclose(off.as_numpy("SCORE"), score)
        client.close()
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            far = pb.Features(values=queries[-1].tolist())
            answer = stub.Predict(pb.PredictRequest(features=far, top_k=2))
            assert answer.unknown and answer.label == "<unknown>"
            assert answer.predictions[0].label == classes[int(P[-1].argmax())]  # the best in-scope label
            assert answer.score == pytest.approx(want_score[-1], abs=1e-4)
            kept = stub.Predict(pb.PredictRequest(features=far, keep_in_scope=True))
            assert not kept.unknown and kept.label == answer.predictions[0].label
            batch = stub.PredictBatch(pb.PredictBatchRequest(
                features=[pb.Features(values=row.tolist()) for row in queries]))
            assert [r.unknown for r in batch.results] == unknown.tolist()
            assert [r.label for r in batch.results[12:]] == ["<unknown>"] * 4
            assert [r.label for r in batch.results[:12]] == labels[:12]
            info = stub.ModelInfo(pb.ModelInfoRequest())
            assert info.unknown_threshold == pytest.approx(threshold) and info.unknown_label == "<unknown>"


def test_rejection_can_be_turned_off_for_the_server_and_a_model_without_threshold_rejects_nothing() -> None:
    from service.serving.unknown import UnknownPolicy

    head, threshold = served_head("ncm")
    slot = ModelSlot()
    slot.swap(served(3, readout=head.readout(), d=D,  # type: ignore[attr-defined]
                     extra_meta={"unknown_threshold": repr(threshold)}))
    far = far_rows(3, 2)
    with running_server(slot, unknown=UnknownPolicy(enabled=False)) as (address, _):
        client = tc.InferenceServerClient(address)
        tensor = tc.InferInput("FEATURES", list(far.shape), "FP32")
        tensor.set_data_from_numpy(far)
        assert not client.infer("eddy", [tensor]).as_numpy("UNKNOWN").any()
        client.close()
    plain = ModelSlot()
    plain.swap(served(1, readout=head.readout(), d=D))  # type: ignore[attr-defined]
    with running_server(plain) as (address, _), grpc.insecure_channel(address) as channel:
        answer = pb_grpc.InferenceStub(channel).Predict(pb.PredictRequest(features=pb.Features(values=far[0].tolist())))
        assert not answer.unknown and answer.label == answer.predictions[0].label and 0 < answer.score <= 1
