"""The offline evaluator: stream order, prequential and checkpoint metrics, caching, run_eval."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from learner.evaluate import embed_cached, evaluate_stream, joint_reference, run_eval, stream_order
from learner.heads.base import Head, Readout, StateDict


class NearestMeanHead(Head):
    """Exact nearest-class-mean head (plain numpy) so the evaluator is tested without other helpers' code."""

    kind = "test-ncm"

    def __init__(self) -> None:
        self.classes_: list[str] = []
        self.n_features_in_: int | None = None
        self.sums: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        for x, label in zip(np.asarray(X, dtype=np.float64), labels, strict=True):
            if label not in self.n:
                self.classes_.append(label)
                self.sums[label], self.n[label] = np.zeros_like(x), 0
            self.sums[label] += x
            self.n[label] += 1

    def forget_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        raise NotImplementedError

    def readout(self) -> Readout:
        means = np.stack([self.sums[c] / self.n[c] for c in self.classes_])
        return Readout(tuple(self.classes_), (2 * means.T).astype(np.float32),
                       (-(means**2).sum(1)).astype(np.float32), 1.0)

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        if not self.classes_:
            return np.zeros((len(X), 0)), []
        return self.readout().predict_proba(X), list(self.classes_)

    def state_dict(self) -> StateDict:
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        pass

    def counts(self) -> dict[str, int]:
        return dict(self.n)


class LastClassHead(NearestMeanHead):
    """Always predicts the most recently learned class: forgets everything older, on purpose."""

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        if not self.classes_:
            return np.zeros((len(X), 0)), []
        probs = np.zeros((len(X), len(self.classes_)))
        probs[:, self.classes_.index(self._last)] = 1.0
        return probs, list(self.classes_)

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        super().learn_many(X, labels)
        self._last = labels[-1]


def blobs(k: int, per_class: int, seed: int = 0, d: int = 8) -> tuple[np.ndarray, list[str]]:
    """Perfectly separable clusters: class i sits at 10 * e_i plus small noise."""
    rng = np.random.default_rng(seed)
    y = [f"class-{i}" for i in range(k) for _ in range(per_class)]
    X = np.repeat(10 * np.eye(k, d), per_class, axis=0) + rng.normal(scale=0.1, size=(k * per_class, d))
    return X.astype(np.float32), y


def test_class_incremental_order_is_contiguous_and_seeded() -> None:
    _, y = blobs(6, 7)
    shuffled = list(np.random.default_rng(1).permutation(np.asarray(y, dtype=object)))
    idx = stream_order(shuffled, "class-incremental", seed=3)
    assert sorted(idx.tolist()) == list(range(len(y)))
    streamed = [shuffled[i] for i in idx]
    runs = [label for i, label in enumerate(streamed) if i == 0 or streamed[i - 1] != label]
    assert len(runs) == 6 and len(set(runs)) == 6  # each class in one block
    assert np.array_equal(idx, stream_order(shuffled, "class-incremental", seed=3))
    orders = {tuple(dict.fromkeys(shuffled[i] for i in stream_order(shuffled, "class-incremental", s)))
              for s in range(5)}
    assert len(orders) > 1  # the class order depends on the seed


def test_given_and_random_orders() -> None:
    _, y = blobs(3, 4)
    assert stream_order(y, "given", 0).tolist() == list(range(12))
    assert sorted(stream_order(y, "random", 0).tolist()) == list(range(12))
    with pytest.raises(ValueError, match="order must be"):
        stream_order(y, "sorted", 0)  # type: ignore[arg-type]


def test_separable_stream_is_right_after_first_batch_of_each_class() -> None:
    X, y = blobs(5, 30)
    Xt, yt = blobs(5, 10, seed=1)
    out = evaluate_stream(X, y, Xt, yt, head=NearestMeanHead(), order="class-incremental", seed=0,
                          eval_every=30, batch_size=10)
    # Only each class's first batch (10 events, class unknown) is wrong.
    assert out["prequential_accuracy"] == pytest.approx(1 - 5 * 10 / 150)
    assert out["prequential_accuracy_seen_classes"] == 1.0
    assert out["final_accuracy"] == 1.0 and out["forgetting"] == 0.0
    assert out["min_old_class_accuracy"] == 1.0
    assert out["n_events"] == 150 and out["n_classes"] == 5 and out["learn_events_per_s"] > 0
    curve = out["curve"]
    assert curve["events"] == [30, 60, 90, 120, 150] and curve["n_classes"] == [1, 2, 3, 4, 5]
    assert curve["old_class_accuracy"][0] is None and curve["seen_class_accuracy"] == [1.0] * 5
    json.dumps(out)  # JSON-ready


def test_forgetting_and_stability_gap_numbers() -> None:
    X, y = blobs(3, 20)
    Xt, yt = blobs(3, 10, seed=1)
    out = evaluate_stream(X, y, Xt, yt, head=LastClassHead(), order="class-incremental", seed=0,
                          eval_every=20, batch_size=20)
    # Each checkpoint knows only the newest class: classes 1 and 2 drop from 1.0 to 0.0.
    assert out["final_accuracy"] == pytest.approx(1 / 3)
    assert out["forgetting"] == pytest.approx(2 / 3)
    assert out["min_old_class_accuracy"] == 0.0
    assert out["curve"]["seen_class_accuracy"] == pytest.approx([1.0, 0.5, 1 / 3])


def test_unstreamed_test_class_counts_wrong_and_final_checkpoint_always_taken() -> None:
    X, y = blobs(3, 10)
    Xt, yt = blobs(4, 5, seed=1)
    out = evaluate_stream(X, y, Xt, yt, head=NearestMeanHead(), order="random", seed=2,
                          eval_every=1000, batch_size=7)
    assert out["curve"]["events"] == [30]
    assert out["final_accuracy"] == pytest.approx(0.75)


def test_bad_arguments_raise() -> None:
    X, y = blobs(2, 3)
    with pytest.raises(ValueError, match="labels"):
        evaluate_stream(X, y[:-1], X, y, head=NearestMeanHead(), order="given", seed=0, eval_every=1)
    with pytest.raises(ValueError, match="eval_every"):
        evaluate_stream(X, y, X, y, head=NearestMeanHead(), order="given", seed=0, eval_every=0)


def test_joint_reference_on_separable_data() -> None:
    X, y = blobs(4, 25)
    Xt, yt = blobs(4, 5, seed=1)
    ref = joint_reference(X, y, Xt, yt, seed=0, Cs=(0.1, 10.0))
    assert ref["accuracy"] == 1.0 and ref["C"] in (0.1, 10.0)
    assert set(ref["validation_accuracy"]) == {"0.1", "10.0"}


class CountingBackbone:
    """A deterministic text hasher standing in for MiniLM where only caching is under test."""

    identity = "counting@000"
    dim = 4

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return np.array([[len(t), t.count("a"), 1.0, 0.0] for t in texts], dtype=np.float32).reshape(-1, 4)


def test_embed_cached_hits_and_misses(tmp_path: Path) -> None:
    backbone = CountingBackbone()
    first = embed_cached(["a", "bb", "aaa"], backbone, tmp_path, "max_tokens=128")
    again = embed_cached(["a", "bb", "aaa"], backbone, tmp_path, "max_tokens=128")
    assert backbone.calls == 1 and np.array_equal(first, again)
    embed_cached(["a", "bb", "aaa"], backbone, tmp_path, "max_tokens=64")
    embed_cached(["a", "bba", "aa"], backbone, tmp_path, "max_tokens=128")  # same joined text, other split
    assert backbone.calls == 3
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def write_jsonl(path: Path, X: np.ndarray, y: list[str]) -> Path:
    rows = (json.dumps({"features": x.tolist(), "label": label}) for x, label in zip(X, y, strict=True))
    path.write_text("".join(row + "\n" for row in rows))
    return path


def test_run_eval_on_feature_files(tmp_path: Path) -> None:
    pytest.importorskip("learner.heads.ncm")
    X, y = blobs(4, 40)
    train = write_jsonl(tmp_path / "train.jsonl", X, y)
    out = run_eval(train, None, head_kind="ncm", order="class-incremental", seed=0, eval_every=32,
                   batch_size=16, json_out=tmp_path / "out.json", cache_dir=tmp_path / "cache",
                   progress=False)
    saved = json.loads((tmp_path / "out.json").read_text())
    for key in ("head", "prequential_accuracy", "final_accuracy", "joint_reference_accuracy", "forgetting",
                "min_old_class_accuracy", "n_events", "n_classes", "learn_events_per_s", "order", "seed",
                "head_params", "backbone_identity"):
        assert key in saved, key
    assert saved["n_events"] == 128 and saved["n_classes"] == 4  # 80% of 160, stratified
    assert out["final_accuracy"] == 1.0 and out["joint_reference_accuracy"] == 1.0
    assert out["backbone_identity"] == "features"
