"""Offline evaluation of out-of-scope rejection, with the threshold eddy chooses itself.

``evaluate_ood`` replays what the service does at an export: the head learns the training rows,
ridge's lambda is chosen, the temperature is fitted on a memory-sized sample of learned rows
scored leave-one-out, and the unknown threshold is the conformal quantile of the same held-out
scores at ``reject_rate`` (``learner.unknown``). Out-of-scope rows are never seen before testing.
Reported per score (``msp`` is what eddy serves; the others are for comparison):

* ``ood_auroc``: threshold-free separation of in-scope test rows from out-of-scope rows;
* ``ood_recall``: share of out-of-scope rows rejected at eddy's threshold;
* ``in_scope_reject_rate``: share of in-scope test rows rejected (the promise is ``reject_rate``);
* ``in_scope_accuracy`` (no rejection) and ``in_scope_accuracy_with_rejection`` (accepted and
  correct, over all in-scope rows); their difference is the accuracy cost of rejection.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.stats

from learner.calibration import class_indices
from learner.datasets import read_labeled
from learner.heads.base import Head
from learner.heldout import fit_heldout_temperature, heldout_scores
from learner.unknown import (
    SCORES,
    class_gaussians,
    conformal_threshold,
    energy,
    heldout_msp,
    mahalanobis,
    max_probability,
    squared_distances,
)

CALIBRATION_SAMPLE = 1024  # as service/roles/exports.py: the memory sample of one export


def evaluate_ood(head: Head, X_train: np.ndarray, y_train: Sequence[str], X_test: np.ndarray,
                 y_test: Sequence[str], X_ood: np.ndarray, *, reject_rate: float = 0.02,
                 scores: Sequence[str] = ("msp",), seed: int = 0, batch_size: int = 1024) -> dict[str, Any]:
    """Learn ``X_train``, choose eddy's threshold, and score in-scope ``X_test`` against ``X_ood``.

    ``head`` must be fresh. Returns ``{"reject_rate", "calibration_items", "temperature",
    "in_scope_accuracy", "scores": {name: {...metrics, "threshold", "hist": {...}}}}``; raises
    ``ValueError`` for an unknown score name.
    """
    bad = sorted(set(scores) - set(SCORES))
    if bad:
        raise ValueError(f"unknown --ood-score {bad}: expected some of {list(SCORES)}")
    y_train = list(y_train)
    for start in range(0, len(y_train), batch_size):
        head.learn_many(X_train[start:start + batch_size], y_train[start:start + batch_size])
    prepare = getattr(head, "prepare_solve", None)
    if callable(prepare):
        prepare(refit=True)
    rng = np.random.default_rng(seed)
    cal = rng.choice(len(y_train), size=min(CALIBRATION_SAMPLE, len(y_train)), replace=False)
    X_cal, y_cal = X_train[cal], [y_train[i] for i in cal]
    if getattr(head, "temperature", None) == "auto":
        temperature = fit_heldout_temperature(head, X_cal, y_cal)
        if temperature is not None:
            head.set_temperature(temperature)  # type: ignore[attr-defined]
    readout = head.readout()
    P_test = readout.predict_proba(X_test)
    correct = np.asarray(readout.classes, dtype=object)[P_test.argmax(axis=1)] == np.asarray(y_test, dtype=object)
    out: dict[str, Any] = {"reject_rate": reject_rate, "calibration_items": len(cal),
                           "temperature": float(readout.temperature),
                           "in_scope_accuracy": float(correct.mean()), "scores": {}}
    for name in scores:
        held, test, ood = _scores(name, head, X_train, y_train, X_cal, y_cal, X_test, X_ood)
        out["scores"][name] = score_report(held, test, ood, correct, reject_rate)
    return out


def score_report(held: np.ndarray, test: np.ndarray, ood: np.ndarray, correct: np.ndarray,
                 reject_rate: float) -> dict[str, Any]:
    """Metrics of one score: threshold from ``held`` (in scope, held out), judged on ``test`` vs ``ood``."""
    threshold = conformal_threshold(held, reject_rate)
    t = -np.inf if threshold is None else threshold
    accepted = test >= t
    edges = np.histogram_bin_edges(np.concatenate([test, ood]), bins=40)
    return {
        "threshold": threshold,
        "ood_auroc": auroc(test, ood),
        "ood_recall": float(np.mean(ood < t)) if len(ood) else None,
        "in_scope_reject_rate": float(np.mean(~accepted)),
        "in_scope_accuracy_with_rejection": float(np.mean(accepted & correct)),
        "hist": {"edges": edges.tolist(), "in_scope": np.histogram(test, edges)[0].tolist(),
                 "ood": np.histogram(ood, edges)[0].tolist()},
    }


def auroc(in_scope: np.ndarray, ood: np.ndarray) -> float | None:
    """P(score of a random in-scope row > score of a random OOD row), ties counted half (Mann-Whitney)."""
    if not len(in_scope) or not len(ood):
        return None
    ranks = scipy.stats.rankdata(np.concatenate([in_scope, ood]))  # ties get their average rank
    n1, n2 = len(in_scope), len(ood)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def _scores(name: str, head: Head, X_train: np.ndarray, y_train: list[str], X_cal: np.ndarray, y_cal: list[str],
            X_test: np.ndarray, X_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out (leave-one-out) calibration scores, test scores and OOD scores of score ``name``."""
    readout = head.readout()
    T = float(readout.temperature)
    if name == "msp":
        return (heldout_msp(head, X_cal, y_cal), max_probability(readout.predict_proba(X_test)),
                max_probability(readout.predict_proba(X_ood)))
    if name == "energy":
        raw, _ = heldout_scores(head, X_cal, y_cal)
        return energy(raw, T), energy(readout.scores(X_test), T), energy(readout.scores(X_ood), T)
    classes, means, precision = class_gaussians(X_train, y_train)
    return (_heldout_mahalanobis(X_cal, y_cal, classes, means, precision, y_train),
            mahalanobis(X_test, means, precision), mahalanobis(X_ood, means, precision))


def _heldout_mahalanobis(X: np.ndarray, y: list[str], classes: list[str], means: np.ndarray,
                         precision: np.ndarray, y_train: list[str]) -> np.ndarray:
    """Mahalanobis scores of learned rows with their own class mean left one out.

    Without row ``x`` its class mean moves to ``mu + (mu - x) / (n - 1)``, so its own distance
    grows by ``(n / (n - 1))^2`` (the shared covariance is not re-estimated: 1/N of it).
    """
    idx, _ = class_indices(y, classes)
    counts = np.array([sum(1 for label in y_train if label == c) for c in classes], dtype=np.float64)
    d2 = squared_distances(X, means, precision)
    n = counts[idx]
    d2[np.arange(len(X)), idx] *= np.where(n > 1, (n / np.maximum(n - 1, 1)) ** 2, np.inf)
    return -d2.min(axis=1)


def run_ood_eval(train: Path, test: Path | None, ood_test: Path, *, text_col: str = "text", label_col: str = "label",
                 head_kind: str = "ridge", head_params: dict[str, Any] | None = None, reject_rate: float = 0.02,
                 scores: Sequence[str] = ("msp",), seed: int = 0,
                 backbone: str | Sequence[str] = "all-MiniLM-L6-v2", runtime: Literal["onnx", "torch"] = "onnx",
                 max_tokens: int = 128, embed_batch_size: int = 64, threads: int = 0,
                 cache_dir: Path = Path(".eddy/cache"), precision: Literal["fp32", "int8"] = "fp32",
                 device: Literal["auto", "cpu", "cuda"] = "cpu", models_dir: Path = Path(".eddy/cache/models"),
                 progress: bool = True) -> dict[str, Any]:
    """``evaluate_ood`` on files: ``train`` is learned, ``test`` in scope (default: 20% of ``train``), ``ood_test`` not.

    ``ood_test``'s label column, if any, is ignored. Texts are embedded (and cached) as ``run_eval`` does.
    """
    from learner.evaluate import _features, split_indices  # the same embedding path and split as run_eval
    from learner.heads import make_head

    train_data = read_labeled(train, text_col=text_col, label_col=label_col)
    test_data = None if test is None else read_labeled(test, text_col=text_col, label_col=label_col)
    ood_data = read_labeled(ood_test, text_col=text_col, label_col=None)  # labels, if any, are ignored
    if (train_data.texts is None) != (ood_data.texts is None):
        raise ValueError(f"{train} and {ood_test} must both hold texts or both hold features")
    encoder = {"name": backbone, "runtime": runtime, "max_tokens": max_tokens, "batch_size": embed_batch_size,
               "threads": threads, "cache_dir": cache_dir, "precision": precision, "device": device,
               "models_dir": models_dir}
    identity, X_all, labels = _features(train_data, test_data, encoder=encoder, progress=progress)
    _, X_ood, _ = _features(ood_data, None, encoder=encoder, progress=progress)
    y_all = np.asarray(labels, dtype=object)
    if test is None:
        tr, te = split_indices(y_all, 0.2, seed)
    else:
        tr, te = np.arange(len(train_data)), np.arange(len(train_data), len(y_all))
    result = evaluate_ood(make_head(head_kind, **dict(head_params or {})), X_all[tr], y_all[tr].tolist(), X_all[te],
                          y_all[te].tolist(), X_ood, reject_rate=reject_rate, scores=scores, seed=seed)
    result.update(head=head_kind, backbone_identity=identity, train=str(train), ood_test=str(ood_test),
                  n_train=len(tr), n_test=len(te), n_ood=len(X_ood))
    return result
