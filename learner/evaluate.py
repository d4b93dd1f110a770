"""Offline prequential evaluation of a head on a labelled stream (used by ``eddy eval`` and bench/).

The stream is fed in batches, test-then-train: each batch is predicted by the head as it stands,
then learned. Every ``eval_every`` events (and at the end) the head is scored on the held-out test
rows, which gives

* ``final_accuracy``: accuracy on every test row at the end (classes never streamed count wrong);
* ``forgetting``: mean over streamed classes of (best accuracy at any checkpoint - final accuracy);
* ``min_old_class_accuracy``: the lowest, over checkpoints, accuracy on test rows of the classes
  already seen at the *previous* checkpoint (the stability gap: does learning new classes hurt
  old ones?); ``None`` when no checkpoint had old classes.

At each checkpoint the head first gets the maintenance the service gives it periodically (ridge
re-chooses its GCV lambda), timed apart from ``learn_many``.

``joint_reference`` is the offline upper reference: multinomial logistic regression trained on
all training rows at once. File reading, embedding caching and JSON output live in ``run_eval``.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from learner.backbone import Backbone
from learner.datasets import LabeledData, read_labeled
from learner.files import atomic_write
from learner.heads.base import Head

Order = Literal["class-incremental", "random", "given"]
_EMBED_CHUNK = 512  # texts per progress step (and per resumable cache file) when embedding


def stream_order(labels: Sequence[str], order: Order, seed: int) -> np.ndarray:
    """Indices into ``labels`` in stream order.

    ``"given"`` keeps file order; ``"random"`` is a seeded permutation; ``"class-incremental"``
    puts each class's events together (shuffled within the class), classes in a seeded random
    order. Raises ``ValueError`` for an unknown order.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=object)
    if order == "given":
        return np.arange(len(y))
    if order == "random":
        return rng.permutation(len(y))
    if order == "class-incremental":
        classes = sorted(set(y.tolist()))
        blocks = [rng.permutation(np.flatnonzero(y == classes[c])) for c in rng.permutation(len(classes))]
        return np.concatenate(blocks) if blocks else np.arange(0)
    raise ValueError(f"order must be 'class-incremental', 'random' or 'given', got {order!r}")


def predict_labels(head: Head, X: np.ndarray) -> np.ndarray:
    """The head's most probable label per row (object array); ``None`` while it knows no class."""
    probs, classes = head.predict_proba_many(X)
    if not classes:
        return np.full(len(X), None, dtype=object)
    return np.asarray(classes, dtype=object)[np.asarray(probs).argmax(axis=1)]


def evaluate_stream(X_train: np.ndarray, y_train: Sequence[str], X_test: np.ndarray, y_test: Sequence[str], *,
                    head: Head, order: Order, seed: int, eval_every: int, batch_size: int = 256,
                    progress: bool = False) -> dict[str, Any]:
    """Stream ``(X_train, y_train)`` into ``head`` test-then-train and score it on ``(X_test, y_test)``.

    ``X_*`` are ``(n, d)`` arrays, ``y_*`` string labels of matching length. Returns a JSON-ready
    dict (see the module docstring for the metrics) with a ``curve`` of per-checkpoint values.
    Raises ``ValueError`` for mismatched lengths or non-positive ``eval_every``/``batch_size``.
    """
    y_tr, y_te = np.asarray(y_train, dtype=object), np.asarray(y_test, dtype=object)
    if len(X_train) != len(y_tr) or len(X_test) != len(y_te):
        raise ValueError(f"got {len(X_train)}/{len(X_test)} train/test rows "
                         f"for {len(y_tr)}/{len(y_te)} labels")
    if eval_every < 1 or batch_size < 1:
        raise ValueError(f"eval_every and batch_size must be >= 1, got {eval_every} and {batch_size}")
    idx = stream_order(y_tr.tolist(), order, seed)
    tracker = _Checkpoints(y_te)
    seen: set[str] = set()
    correct = correct_seen = n_seen_rows = done = 0
    learn_seconds = maintenance_seconds = 0.0
    bar = tqdm(total=len(idx), desc="stream", unit="ev", disable=not progress)
    for start in range(0, len(idx), batch_size):
        rows = idx[start:start + batch_size]
        X, y = X_train[rows], y_tr[rows]
        hits = predict_labels(head, X) == y
        known = np.fromiter((label in seen for label in y), dtype=bool, count=len(y))
        correct += int(hits.sum())
        correct_seen += int(hits[known].sum())
        n_seen_rows += int(known.sum())
        t0 = time.perf_counter()
        head.learn_many(X, y.tolist())
        learn_seconds += time.perf_counter() - t0
        seen.update(y.tolist())
        previous, done = done, done + len(rows)
        if done // eval_every > previous // eval_every or done == len(idx):
            t0 = time.perf_counter()
            _maintain(head)
            maintenance_seconds += time.perf_counter() - t0
            tracker.record(done, predict_labels(head, X_test), seen, correct / done)
        bar.update(len(rows))
    bar.close()
    return {
        "head": getattr(head, "kind", type(head).__name__), "order": order, "seed": seed,
        "batch_size": batch_size, "eval_every": eval_every,
        "n_events": len(idx), "n_classes": len(seen), "n_test": len(y_te),
        "prequential_accuracy": correct / len(idx) if len(idx) else None,
        "prequential_accuracy_seen_classes": correct_seen / n_seen_rows if n_seen_rows else None,
        "learn_seconds": learn_seconds, "maintenance_seconds": maintenance_seconds,
        "learn_events_per_s": len(idx) / learn_seconds if learn_seconds > 0 else None,
        **tracker.summary(),
    }


def _maintain(head: Head) -> None:
    """What the service does to a head now and then, off the hot path: re-choose ridge's GCV lambda."""
    choose = getattr(head, "choose_lambda", None)
    if callable(choose):
        choose()


class _Checkpoints:
    """Test-set accuracies per checkpoint, overall, per class, on seen and on old classes."""

    def __init__(self, y_test: np.ndarray) -> None:
        self.y = y_test
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.previous_seen: set[str] = set()
        self.final_accuracy: float | None = None
        names = ("events", "prequential_accuracy", "seen_class_accuracy", "old_class_accuracy", "n_classes")
        self.curve: dict[str, list[Any]] = {name: [] for name in names}

    def record(self, events: int, predicted: np.ndarray, seen: set[str], prequential: float) -> None:
        hits = predicted == self.y
        self.final_accuracy = float(hits.mean()) if len(hits) else None
        self.last = {}
        for label in seen:
            rows = self.y == label
            if rows.any():
                self.last[label] = float(hits[rows].mean())
                self.best[label] = max(self.best.get(label, 0.0), self.last[label])
        self.curve["events"].append(events)
        self.curve["prequential_accuracy"].append(prequential)
        self.curve["seen_class_accuracy"].append(self._accuracy_on(hits, seen))
        self.curve["old_class_accuracy"].append(self._accuracy_on(hits, self.previous_seen))
        self.curve["n_classes"].append(len(seen))
        self.previous_seen = set(seen)

    def _accuracy_on(self, hits: np.ndarray, classes: set[str]) -> float | None:
        rows = np.fromiter((label in classes for label in self.y), dtype=bool, count=len(self.y))
        return float(hits[rows].mean()) if rows.any() else None

    def summary(self) -> dict[str, Any]:
        olds = [a for a in self.curve["old_class_accuracy"] if a is not None]
        drops = [self.best[c] - self.last[c] for c in self.last]
        return {"final_accuracy": self.final_accuracy,
                "forgetting": float(np.mean(drops)) if drops else None,
                "min_old_class_accuracy": min(olds) if olds else None,
                "curve": self.curve}


def joint_reference(X_train: np.ndarray, y_train: Sequence[str], X_test: np.ndarray, y_test: Sequence[str],
                    seed: int, Cs: Sequence[float] = (0.1, 1.0, 10.0, 100.0)) -> dict[str, Any]:
    """Offline reference: multinomial logistic regression on all training rows at once.

    ``C`` is chosen on a stratified 15% hold-out of the training rows (by ``seed``), then the model
    is refit on every training row. Returns ``accuracy`` (on the test rows), ``C`` and the
    hold-out accuracy of every ``C`` tried.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y_train, dtype=object)
    fit_idx, val_idx = split_indices(y, 0.15, seed)
    scores: dict[str, float] = {}
    for C in Cs:
        model = LogisticRegression(C=C, max_iter=2000).fit(X_train[fit_idx], y[fit_idx])
        scores[str(C)] = float(model.score(X_train[val_idx], y[val_idx]))
    best = max(Cs, key=lambda C: scores[str(C)])
    model = LogisticRegression(C=best, max_iter=2000).fit(X_train, y)
    return {"accuracy": float(model.score(X_test, np.asarray(y_test, dtype=object))), "C": best,
            "validation_accuracy": scores}


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into ``(keep, held_out)`` indices, stratified by label when every label has 2+ rows."""
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(labels.astype(str), return_counts=True)
    stratify = labels if counts.min() >= 2 else None
    keep, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed,
                                  stratify=stratify)
    return np.sort(keep), np.sort(held)


def embed_cached(texts: Sequence[str], backbone: Backbone, cache_dir: Path, key_extra: str = "", *,
                 progress: bool = False) -> np.ndarray:
    """``backbone.embed(texts)``, cached in ``cache_dir`` as ``.npy`` files (for evaluations only).

    The key is sha256 over the backbone identity, ``key_extra`` (e.g. ``max_tokens``) and every
    text, so any change to any of them misses the cache. Each chunk of ``_EMBED_CHUNK`` texts is
    also cached under its own key as it is done, so an interrupted run (a slow encoder on a busy
    machine) resumes where it stopped. Files are written atomically.
    """
    path = Path(cache_dir) / f"embeddings-{_texts_key(texts, backbone.identity, key_extra)}.npy"
    if path.exists():
        cached = np.load(path)
        if cached.shape == (len(texts), backbone.dim):
            return cached
    chunks = []
    for i in tqdm(range(0, len(texts), _EMBED_CHUNK), desc="embed", unit="chunk", disable=not progress):
        part = texts[i:i + _EMBED_CHUNK]
        chunk_path = Path(cache_dir) / f"embeddings-chunk-{_texts_key(part, backbone.identity, key_extra)}.npy"
        X = np.load(chunk_path) if chunk_path.exists() else None
        if X is None or X.shape != (len(part), backbone.dim):
            X = backbone.embed(part)
            _save_atomic(chunk_path, X)
        chunks.append(X)
    X = np.concatenate(chunks) if chunks else np.empty((0, backbone.dim), dtype=np.float32)
    _save_atomic(path, X)
    for i in range(0, len(texts), _EMBED_CHUNK):  # the whole array now holds them
        part = texts[i:i + _EMBED_CHUNK]
        (Path(cache_dir) / f"embeddings-chunk-{_texts_key(part, backbone.identity, key_extra)}.npy").unlink(
            missing_ok=True)
    return X


def _texts_key(texts: Sequence[str], identity: str, key_extra: str) -> str:
    digest = hashlib.sha256(f"{identity}\0{key_extra}\0".encode())
    for text in texts:
        data = text.encode()
        digest.update(struct.pack("<Q", len(data)) + data)  # length prefix: no ambiguous joins
    return digest.hexdigest()[:32]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, buffer.getvalue())


def run_eval(train: Path, test: Path | None = None, *, text_col: str = "text", label_col: str = "label",
             head_kind: str = "ridge", head_params: dict[str, Any] | None = None,
             order: Order = "class-incremental", seed: int = 0, eval_every: int = 1000, batch_size: int = 256,
             json_out: Path | None = None, backbone: str | Sequence[str] = "all-MiniLM-L6-v2",
             runtime: Literal["onnx", "torch"] = "onnx", max_tokens: int = 128, embed_batch_size: int = 64,
             threads: int = 0, cache_dir: Path = Path(".eddy/cache"), joint: bool = True,
             precision: Literal["fp32", "int8"] = "fp32", device: Literal["auto", "cpu", "cuda"] = "cpu",
             models_dir: Path = Path(".eddy/cache/models"),
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``head_kind`` on the files ``train`` (streamed) and ``test`` (held out).

    Text files are embedded with the named backbone (cached under ``cache_dir``); JSONL files with
    ``features`` are used as they are. With ``test=None`` a stratified 20% of ``train`` (by
    ``seed``) is held out. Writes the result to ``json_out`` if given and returns it. Raises
    ``ValueError`` for unreadable data (see ``read_labeled``) or a train/test kind mismatch.
    """
    from learner.heads import make_head

    params = dict(head_params or {})
    train_data = read_labeled(train, text_col=text_col, label_col=label_col)
    test_data = None if test is None else read_labeled(test, text_col=text_col, label_col=label_col)
    if test_data is not None and (train_data.texts is None) != (test_data.texts is None):
        raise ValueError(f"{train} and {test} must both hold texts or both hold features")
    encoder = {"name": backbone, "runtime": runtime, "max_tokens": max_tokens, "batch_size": embed_batch_size,
               "threads": threads, "cache_dir": cache_dir, "precision": precision, "device": device,
               "models_dir": models_dir}
    identity, X_all, labels = _features(train_data, test_data, encoder=encoder, progress=progress)
    y_all = np.asarray(labels, dtype=object)
    if test is None:
        tr, te = split_indices(y_all, 0.2, seed)
    else:
        tr, te = np.arange(len(train_data)), np.arange(len(train_data), len(y_all))
    head = make_head(head_kind, **params)
    result = evaluate_stream(X_all[tr], y_all[tr].tolist(), X_all[te], y_all[te].tolist(), head=head,
                             order=order, seed=seed, eval_every=eval_every, batch_size=batch_size,
                             progress=progress)
    result.update(head=head_kind, head_params=params, backbone_identity=identity, train=str(train),
                  test=str(test) if test is not None else None)
    if joint:
        ref = joint_reference_cached(X_all[tr], y_all[tr].tolist(), X_all[te], y_all[te].tolist(), seed,
                                     cache_dir)
        result.update(joint_reference_accuracy=ref["accuracy"], joint_reference_C=ref["C"])
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2, default=str))
    return result


def joint_reference_cached(X_train: np.ndarray, y_train: list[str], X_test: np.ndarray, y_test: list[str],
                           seed: int, cache_dir: Path) -> dict[str, Any]:
    """``joint_reference``, cached as JSON keyed by sha256 of the exact inputs (a fit takes ~1 min)."""
    digest = hashlib.sha256(f"joint-v1\0{seed}\0".encode())
    for part in (X_train, X_test):
        digest.update(np.ascontiguousarray(part, dtype=np.float32).tobytes())
    digest.update(json.dumps([y_train, y_test]).encode())
    path = Path(cache_dir) / f"joint-{digest.hexdigest()[:32]}.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    ref = joint_reference(X_train, y_train, X_test, y_test, seed)
    atomic_write(path, json.dumps(ref).encode())
    return ref


def _features(train: LabeledData, test: LabeledData | None, *, encoder: dict[str, Any],
              progress: bool) -> tuple[str, np.ndarray, list[str]]:
    """Train then test rows as one feature matrix, with the backbone identity (``"features"`` if none).

    ``encoder`` holds ``load_backbone``'s arguments. Embeddings are cached per (backbone identity,
    ``max_tokens``, texts) under ``cache_dir``, so a second eval with the same encoder skips them.
    """
    parts = [train] if test is None else [train, test]
    labels = [label for part in parts for label in part.labels]
    if train.texts is None:
        return "features", np.concatenate([_need(p.features) for p in parts]).astype(np.float32), labels
    from learner.backbone import load_backbone

    model = load_backbone(**encoder)
    texts = [text for part in parts for text in _need(part.texts)]
    X = embed_cached(texts, model, encoder["cache_dir"], key_extra=f"max_tokens={encoder['max_tokens']}",
                     progress=progress)
    return model.identity, X, labels


def _need(value: Any) -> Any:
    """``value``, asserting it is set (train and test were checked to hold the same kind)."""
    assert value is not None
    return value
