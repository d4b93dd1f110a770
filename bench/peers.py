"""The methods eddy's heads are compared with, behind the heads' own interface.

``learner.evaluate.evaluate_stream`` drives anything with ``learn_many(X, labels)`` and
``predict_proba_many(X) -> (probs, classes)``; this module adapts to that:

* ``RiverHead``: any River classifier, fed one event at a time (``learn_one`` with the feature
  row as ``{index: value}``), predicted with ``predict_proba_one``. River learners are online
  SGD/passive-aggressive/k-NN models, not exact sums of statistics: they cannot forget exactly
  and their result depends on order, which is the point of the comparison.
* ``RIVER_METHODS``: the River learners compared, each with the one hyperparameter tuned and its
  grid (every method gets the same number of candidates).
* ``PreviousLabel`` / ``MajoritySoFar``: blind baselines that never look at the features.
* ``AvalancheSLDA``: avalanche-lib's ``StreamingLDA`` (Hayes & Kanan, CVPR-W 2020) used on the
  same features through its own ``fit``/``predict`` (the model, not the training framework).

None of these can be served by eddy: ``state_dict``, ``readout`` and ``forget_many`` raise
``NotImplementedError``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from learner.heads.base import Head, Readout, StateDict


class PeerHead(Head):
    """A comparison method: learns and predicts like a head, cannot be exported or forget."""

    kind = "peer"

    def __init__(self) -> None:
        self.classes_: list[str] = []
        self.n_features_in_: int | None = None
        self._counts: collections.Counter[str] = collections.Counter()

    def _see(self, labels: Sequence[str]) -> None:
        for label in labels:
            if label not in self._counts:
                self.classes_.append(label)
            self._counts[label] += 1

    def counts(self) -> dict[str, int]:
        """Events learned per class, first-seen order."""
        return {c: self._counts[c] for c in self.classes_}

    def forget_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Not supported: these learners cannot remove an event exactly."""
        raise NotImplementedError(f"{type(self).__name__} cannot forget exactly")

    def state_dict(self) -> StateDict:
        """Not supported (not servable by eddy)."""
        raise NotImplementedError(f"{type(self).__name__} has no eddy state")

    def load_state_dict(self, state: StateDict) -> None:
        """Not supported (not servable by eddy)."""
        raise NotImplementedError(f"{type(self).__name__} has no eddy state")

    def readout(self) -> Readout:
        """Not supported (not servable by eddy)."""
        raise NotImplementedError(f"{type(self).__name__} has no linear readout")

    def _empty(self, n: int) -> tuple[np.ndarray, list[str]]:
        return np.zeros((n, 0)), []


class RiverHead(PeerHead):
    """A River classifier fed event by event; ``make`` builds a fresh model."""

    kind = "river"

    def __init__(self, name: str, make: Callable[[], Any]) -> None:
        super().__init__()
        self.name = name
        self.model = make()

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """``learn_one`` on each row in order."""
        for row, label in zip(np.asarray(X, dtype=np.float64), labels, strict=True):
            self.model.learn_one(dict(enumerate(row.tolist())), label)
        self._see(labels)
        self.n_features_in_ = X.shape[1]

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``predict_proba_one`` on each row, laid out over the classes seen (missing ones: 0)."""
        if not self.classes_:
            return self._empty(len(X))
        col = {c: j for j, c in enumerate(self.classes_)}
        out = np.zeros((len(X), len(self.classes_)))
        for i, row in enumerate(np.asarray(X, dtype=np.float64)):
            for label, p in self.model.predict_proba_one(dict(enumerate(row.tolist()))).items():
                if label in col:
                    out[i, col[label]] = p
        return out, list(self.classes_)


@dataclass(frozen=True)
class RiverMethod:
    """A River learner with one tuned hyperparameter: ``build(value)`` makes a fresh model."""

    name: str
    param: str
    grid: tuple[float, ...]
    build: Callable[[float], Any]
    description: str

    def head(self, value: float) -> RiverHead:
        """A ``RiverHead`` of this method at ``param = value``."""
        return RiverHead(self.name, lambda: self.build(value))


def _softmax(lr: float) -> Any:
    from river import linear_model, optim

    return linear_model.SoftmaxRegression(optimizer=optim.SGD(lr))


def _ovr_logistic(lr: float) -> Any:
    from river import linear_model, multiclass, optim

    return multiclass.OneVsRestClassifier(linear_model.LogisticRegression(optimizer=optim.SGD(lr)))


def _ovr_pa(C: float) -> Any:
    from river import linear_model, multiclass

    return multiclass.OneVsRestClassifier(linear_model.PAClassifier(C=C, mode=1))


def _ovr_alma(alpha: float) -> Any:
    from river import linear_model, multiclass

    return multiclass.OneVsRestClassifier(linear_model.ALMAClassifier(alpha=alpha))


def _knn(k: float) -> Any:
    from river import neighbors

    return neighbors.KNNClassifier(n_neighbors=int(k))


# Five candidates each: the same tuning budget for every River method.
RIVER_METHODS: dict[str, RiverMethod] = {m.name: m for m in (
    RiverMethod("river-softmax", "lr", (0.03, 0.1, 0.3, 1.0, 3.0), _softmax,
                "linear_model.SoftmaxRegression(optimizer=SGD(lr)) (multinomial logistic)"),
    RiverMethod("river-ovr-logistic", "lr", (0.1, 0.3, 1.0, 3.0, 10.0), _ovr_logistic,
                "multiclass.OneVsRestClassifier(linear_model.LogisticRegression(optimizer=SGD(lr)))"),
    RiverMethod("river-ovr-pa", "C", (0.01, 0.1, 1.0, 10.0, 100.0), _ovr_pa,
                "multiclass.OneVsRestClassifier(linear_model.PAClassifier(C, mode=1))"),
    RiverMethod("river-ovr-alma", "alpha", (0.1, 0.3, 0.5, 0.7, 0.9), _ovr_alma,
                "multiclass.OneVsRestClassifier(linear_model.ALMAClassifier(alpha))"),
    RiverMethod("river-knn", "n_neighbors", (1, 3, 5, 10, 20), _knn,
                "neighbors.KNNClassifier(n_neighbors) (default SWINN engine, window of 1000)"),
)}


class PreviousLabel(PeerHead):
    """Blind baseline: predicts the last label learned (the 'no-change' classifier)."""

    kind = "blind-previous-label"

    def __init__(self) -> None:
        super().__init__()
        self._last: str | None = None

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Remember the classes and the last label."""
        self._see(labels)
        if len(labels):
            self._last = labels[-1]

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Probability 1 on the last label learned."""
        if not self.classes_:
            return self._empty(len(X))
        out = np.zeros((len(X), len(self.classes_)))
        out[:, self.classes_.index(str(self._last))] = 1.0
        return out, list(self.classes_)


class MajoritySoFar(PeerHead):
    """Blind baseline: predicts the most frequent label learned so far (ties: first seen)."""

    kind = "blind-majority"

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Count the labels."""
        self._see(labels)

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Probability 1 on the most frequent label so far."""
        if not self.classes_:
            return self._empty(len(X))
        counts = [self._counts[c] for c in self.classes_]
        out = np.zeros((len(X), len(self.classes_)))
        out[:, int(np.argmax(counts))] = 1.0
        return out, list(self.classes_)


def per_event_blind_accuracy(labels: Sequence[str]) -> dict[str, float]:
    """Prequential accuracy of the blind baselines with batches of one event (exact, from labels).

    The batched protocol of ``evaluate_stream`` hides how strong 'no-change' is on an ordered
    stream; this is the classical per-event number (Zliobaite et al., 2015).
    """
    y = list(labels)
    if not y:
        return {"previous_label": 0.0, "majority": 0.0}
    previous = sum(a == b for a, b in zip(y[1:], y[:-1], strict=True))
    counts: collections.Counter[str] = collections.Counter()
    first: dict[str, int] = {}
    majority_hits = 0
    best: str | None = None
    for i, label in enumerate(y):
        majority_hits += label == best
        counts[label] += 1
        first.setdefault(label, i)
        if best is None or (counts[label], -first[label]) > (counts[best], -first[best]):
            best = label
    return {"previous_label": previous / len(y), "majority": majority_hits / len(y)}


class AvalancheSLDA(PeerHead):
    """avalanche-lib's ``StreamingLDA`` model on precomputed features (``fit`` per event, ``predict``).

    ``num_classes`` must bound the number of classes (Avalanche preallocates); scores of classes
    not yet seen are left out, so the comparison does not reward guessing unseen classes.
    """

    kind = "avalanche-slda"

    def __init__(self, input_size: int, num_classes: int, shrinkage: float = 1e-4) -> None:
        super().__init__()
        import torch
        from avalanche.training import StreamingLDA
        from avalanche.training.plugins import EvaluationPlugin

        self._torch = torch
        self.model = StreamingLDA(slda_model=torch.nn.Identity(), criterion=torch.nn.CrossEntropyLoss(),
                                  input_size=input_size, num_classes=num_classes,
                                  shrinkage_param=shrinkage, evaluator=EvaluationPlugin())
        self._index: dict[str, int] = {}

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """``StreamingLDA.fit`` on each event in order."""
        torch = self._torch
        T = torch.as_tensor(np.asarray(X, dtype=np.float32))
        for i, label in enumerate(labels):
            j = self._index.setdefault(label, len(self._index))
            self.model.fit(T[i : i + 1], torch.tensor([j]))
        self._see(labels)

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Softmax of Avalanche's LDA scores over the classes seen."""
        if not self.classes_:
            return self._empty(len(X))
        scores = self.model.predict(self._torch.as_tensor(np.asarray(X, dtype=np.float32))).numpy()
        cols = [self._index[c] for c in self.classes_]
        S = scores[:, cols].astype(np.float64)
        S -= S.max(axis=1, keepdims=True)
        P = np.exp(S)
        return P / P.sum(axis=1, keepdims=True), list(self.classes_)


def avalanche_status() -> str | None:
    """``None`` if avalanche-lib's StreamingLDA imports, else ``"not installable here: <reason>"``."""
    try:
        from avalanche.training import StreamingLDA  # noqa: F401
    except Exception as exc:  # any import failure means the peer is unavailable
        return f"not installable here: {type(exc).__name__}: {exc}"
    return None
