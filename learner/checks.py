"""The contract every head keeps, one property per function (as river's ``checks``).

Each ``check_*(make, dim)`` builds fresh heads with ``make()``, feeds them small deterministic
data of dimension ``dim`` (``dim >= 2``) and raises ``AssertionError`` naming what broke.
``ALL_CHECKS`` lists them; ``tests/learner/test_heads_contract.py`` runs every head kind x every
check. Pure numpy (and onnxruntime in memory for the export check), no I/O.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import numpy as np

from learner.heads.base import Head, StateDict

MakeHead = Callable[[], Head]


def sample(dim: int, n: int = 60, k: int = 3, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` float32 rows in ``k`` Gaussian clusters with labels ``"c0".."c{k-1}"`` (interleaved)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(k, dim))
    codes = np.arange(n) % k
    X = centres[codes] + rng.normal(size=(n, dim))
    return X.astype(np.float32), [f"c{c}" for c in codes]


def _snapshot_copy(state: StateDict) -> StateDict:
    """What a snapshot gives back: arrays copied, everything else through JSON."""
    arrays: dict[str, np.ndarray] = {}

    def split(value: object, key: str) -> object:
        if isinstance(value, np.ndarray):
            arrays[key] = value.copy()
            return {"__array__": key}
        if isinstance(value, dict):
            return {k: split(v, f"{key}/{k}") for k, v in value.items()}
        return value

    def join(value: object) -> object:
        if isinstance(value, dict):
            if set(value) == {"__array__"}:
                return arrays[str(value["__array__"])]
            return {k: join(v) for k, v in value.items()}
        return value

    meta = json.loads(json.dumps(split(state, "")))
    out = join(meta)
    assert isinstance(out, dict)
    return out


def _assert_valid_probabilities(P: np.ndarray, n: int, k: int) -> None:
    assert P.shape == (n, k), f"probabilities have shape {P.shape}, expected {(n, k)}"
    assert np.isfinite(P).all(), "probabilities are not finite"
    assert (P >= 0).all() and (P <= 1).all(), "probabilities outside [0, 1]"
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-9, err_msg="rows do not sum to 1")


def check_probabilities_valid(make: MakeHead, dim: int) -> None:
    """Probabilities are finite, in [0, 1], rows sum to 1, columns follow ``classes``."""
    head = make()
    X, y = sample(dim)
    head.learn_many(X, y)
    far = np.vstack([X * 1e3, -X, np.zeros((1, dim), np.float32)])  # extremes must not overflow
    for Z in (X, far):
        P, classes = head.predict_proba_many(Z)
        _assert_valid_probabilities(P, len(Z), 3)
        assert classes == ["c0", "c1", "c2"] == head.classes_, f"classes {classes}, classes_ {head.classes_}"


def check_inputs_untouched(make: MakeHead, dim: int) -> None:
    """``learn_many``, ``predict_proba_many`` and ``forget_many`` never modify their inputs."""
    head = make()
    for dtype in (np.float32, np.float64):
        X, y = sample(dim)
        X = X.astype(dtype)
        X_before, y_before = X.copy(), list(y)
        X.flags.writeable = False  # an in-place write raises instead of passing silently
        head.learn_many(X, y)
        head.predict_proba_many(X)
        head.forget_many(X[:9], y[:9])
        np.testing.assert_array_equal(X, X_before)
        assert y == y_before, "labels were modified"


def check_predict_before_learning(make: MakeHead, dim: int) -> None:
    """Before any learning, predictions are ``(n, 0)`` and ``[]``; the readout has no classes."""
    head = make()
    X, _ = sample(dim, n=5)
    P, classes = head.predict_proba_many(X)
    assert P.shape == (5, 0) and classes == [], f"got shape {P.shape} and classes {classes}"
    assert head.readout().classes == () and head.counts() == {} and head.classes_ == []


def check_state_round_trip(make: MakeHead, dim: int) -> None:
    """A state saved (arrays copied, the rest through JSON) and loaded predicts identically."""
    head = make()
    X, y = sample(dim)
    for start, stop in ((0, 0), (0, 30), (30, 60)):  # empty, part-learned, fully learned
        head.learn_many(X[start:stop], y[start:stop])
        P, classes = head.predict_proba_many(X)
        clone = make()
        clone.load_state_dict(_snapshot_copy(head.state_dict()))
        P2, classes2 = clone.predict_proba_many(X)
        assert classes2 == classes and clone.counts() == head.counts()
        np.testing.assert_allclose(P2, P, rtol=0, atol=1e-12, err_msg="restored head predicts differently")


def check_clone_independence(make: MakeHead, dim: int) -> None:
    """A deep copy or a restored state learns on its own; the original is unaffected."""
    head = make()
    X, y = sample(dim)
    head.learn_many(X[:30], y[:30])
    P_before = head.predict_proba_many(X)[0]
    restored = make()
    restored.load_state_dict(head.state_dict())
    for other in (copy.deepcopy(head), restored):
        other.learn_many(X[30:] + 1.0, y[30:])  # known classes: statistics updated in place
        other.learn_many(X[:5], ["new"] * 5)
        assert "new" in other.classes_ and "new" not in head.classes_
        np.testing.assert_array_equal(head.predict_proba_many(X)[0], P_before)
        fresh = make()  # what the original's state says now (no cached solve can hide a change)
        fresh.load_state_dict(head.state_dict())
        np.testing.assert_allclose(fresh.predict_proba_many(X)[0], P_before, rtol=0, atol=1e-12,
                                   err_msg="learning in a clone changed the original's state")


def check_wrong_dimension(make: MakeHead, dim: int) -> None:
    """Every entry point raises ``ValueError`` naming both numbers for a wrong feature count."""
    head = make()
    X, y = sample(dim)
    head.learn_many(X, y)
    bad = np.zeros((4, dim - 1), np.float32)
    calls: list[Callable[[], object]] = [lambda: head.learn_many(bad, ["c0"] * 4),
                                         lambda: head.forget_many(bad, ["c0"] * 4),
                                         lambda: head.predict_proba_many(bad)]
    for call in calls:
        try:
            call()
        except ValueError as exc:
            assert str(dim) in str(exc) and str(dim - 1) in str(exc), f"message lacks the numbers: {exc}"
        else:
            raise AssertionError("a wrong feature dimension was accepted")
    assert head.counts() == {"c0": 20, "c1": 20, "c2": 20}, "a rejected call changed the head"


def check_forget_class(make: MakeHead, dim: int) -> None:
    """Forgetting every event of a class removes it, leaving what a head that never saw it has."""
    head, reference = make(), make()
    X, y = sample(dim)
    head.learn_many(X, y)
    keep = np.array([label != "c1" for label in y])
    head.forget_many(X[~keep], [label for label in y if label == "c1"])
    reference.learn_many(X[keep], [label for label in y if label != "c1"])
    assert head.classes_ == reference.classes_ == ["c0", "c2"], f"classes {head.classes_}"
    assert "c1" not in head.counts()
    P, classes = head.predict_proba_many(X)
    P_ref, _ = reference.predict_proba_many(X)
    assert classes == ["c0", "c2"]
    np.testing.assert_allclose(P, P_ref, atol=1e-6, err_msg="forgetting a class differs from never seeing it")


def check_predict_matches_readout(make: MakeHead, dim: int) -> None:
    """``predict_proba_many`` equals ``readout().predict_proba`` (what the ONNX export runs)."""
    head = make()
    X, y = sample(dim)
    for start in (0, 30):
        head.learn_many(X[start : start + 30], y[start : start + 30])
        P, classes = head.predict_proba_many(X)
        readout = head.readout()
        assert list(readout.classes) == classes
        np.testing.assert_allclose(readout.predict_proba(X), P, rtol=0, atol=1e-6)


def check_chunking_equals_batch(make: MakeHead, dim: int) -> None:
    """Learning in chunks and in another order gives the statistics of one batch (to 1e-9)."""
    X, y = sample(dim)
    whole, chunked = make(), make()
    whole.learn_many(X, y)
    order = np.random.default_rng(1).permutation(len(y))
    for part in np.array_split(order, 7):
        chunked.learn_many(X[part], [y[i] for i in part])
    _assert_same_statistics(_statistics(chunked), _statistics(whole))


def check_unknown_score_parity(make: MakeHead, dim: int) -> None:
    """The exported ONNX graph's ``unknown_score`` is the head's own MSP (to 1e-5), and held-out MSPs are valid.

    Runs the graph in onnxruntime from bytes (no file): the served model and the learner must
    agree on which inputs are rejected as unknown, not just on the probabilities.
    """
    from learner.export import INPUT_NAME, OUTPUT_NAME, UNKNOWN_SCORE_NAME, load_session, readout_to_onnx
    from learner.unknown import heldout_msp, max_probability

    head = make()
    X, y = sample(dim)
    head.learn_many(X[:45], y[:45])
    session, _ = load_session(readout_to_onnx(head.readout(), metadata={}).SerializeToString())
    probe = np.concatenate([X[45:], 10 * np.random.default_rng(2).normal(size=(5, dim))]).astype(np.float32)
    probs, score = session.run([OUTPUT_NAME, UNKNOWN_SCORE_NAME], {INPUT_NAME: probe})
    P, _ = head.predict_proba_many(probe)
    np.testing.assert_allclose(score, max_probability(P), rtol=0, atol=1e-5, err_msg="ONNX unknown_score != head MSP")
    np.testing.assert_allclose(score, probs.max(axis=1), rtol=0, atol=1e-7)
    held = heldout_msp(head, X[:45], y[:45])
    assert held.shape == (45,), f"held-out scores have shape {held.shape}, expected (45,)"
    k = len(head.classes_)
    assert ((held >= 1.0 / k - 1e-9) & (held <= 1.0 + 1e-9)).all(), "held-out MSP outside [1/k, 1]"


def _statistics(head: Head) -> dict[str, np.ndarray]:
    stats = getattr(head, "statistics", None)
    assert callable(stats), f"{type(head).__name__} has no statistics()"
    out = stats()
    assert isinstance(out, dict)
    return out


def _assert_same_statistics(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float = 1e-9) -> None:
    assert a.keys() == b.keys(), f"statistics keys differ: {sorted(a)} vs {sorted(b)}"
    np.testing.assert_array_equal(a["classes"], b["classes"])
    for key in a:
        if key != "classes":
            scale = max(float(np.abs(b[key]).max()) if b[key].size else 0.0, 1.0)
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=tol * scale, err_msg=key)


ALL_CHECKS: list[Callable[[MakeHead, int], None]] = [
    check_probabilities_valid,
    check_inputs_untouched,
    check_predict_before_learning,
    check_state_round_trip,
    check_clone_independence,
    check_wrong_dimension,
    check_forget_class,
    check_predict_matches_readout,
    check_chunking_equals_batch,
    check_unknown_score_parity,
]
