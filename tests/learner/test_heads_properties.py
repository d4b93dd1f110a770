"""Heads equal their batch definitions: any chunking/order, exact forgetting, GCV, merging, registry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.heads import HEADS, NearestClassMeanHead, RidgeHead, StreamingLDAHead, make_head, merge_states
from learner.heads.ridge import choose_gcv_lambda, gcv_scores, random_projection

D = 5
FAST = settings(max_examples=30, deadline=None)
Stream = tuple[np.ndarray, list[str], list[np.ndarray]]


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """Events (X, labels) and a random order split into random chunks."""
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D)).astype(draw(st.sampled_from([np.float32, np.float64])))
    labels = [f"class-{c}" for c in rng.integers(0, k, n)]
    order = np.array(draw(st.permutations(range(n))), dtype=np.intp)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return X, labels, np.split(order, cuts)


def learn_in_chunks(head: RidgeHead | StreamingLDAHead | NearestClassMeanHead, X: np.ndarray,
                    labels: list[str], chunks: list[np.ndarray]) -> None:
    for chunk in chunks:
        head.learn_many(X[chunk], [labels[i] for i in chunk])


def batch_moments(X: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    X64 = X.astype(np.float64)
    classes = sorted(set(labels))
    y = np.array(labels)
    return {"classes": np.array(classes), "counts": np.array([(y == c).sum() for c in classes]),
            "sums": np.stack([X64[y == c].sum(axis=0) for c in classes]), "second_moment": X64.T @ X64}


def assert_stats_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float) -> None:
    assert sorted(a) == sorted(b)
    np.testing.assert_array_equal(a["classes"], b["classes"])
    for key in a:
        if key != "classes":
            scale = max(float(np.abs(b[key]).max()) if b[key].size else 0.0, 1.0)
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=tol * scale, err_msg=key)


def ridge_reference(X: np.ndarray, labels: list[str], classes: list[str], lam: float,
                    R: np.ndarray | None) -> np.ndarray:
    """Closed-form batch ridge on phi = [relu(R x) | x, 1] with one-hot targets in ``classes`` order."""
    X64 = X.astype(np.float64)
    Z = np.maximum(X64 @ R.astype(np.float64).T, 0) if R is not None else X64
    phi = np.hstack([Z, np.ones((len(X), 1))])
    Y = (np.array(labels)[:, None] == np.array(classes)[None, :]).astype(np.float64)
    return np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T @ Y)


@FAST
@given(data=streams(), width=st.sampled_from([0, 7]))
def test_ridge_any_chunking_equals_closed_form(data: Stream,
                                               width: int) -> None:
    X, labels, chunks = data
    head = RidgeHead(lam=0.3, expansion_width=width, seed=1)
    learn_in_chunks(head, X, labels, chunks)
    W_ref = ridge_reference(X, labels, head.classes_, 0.3, head.projection_)
    W = head.weights()
    assert np.linalg.norm(W - W_ref) <= 1e-8 * np.linalg.norm(W_ref)


@FAST
@given(data=streams())
def test_slda_and_ncm_statistics_equal_batch_moments(data: Stream) -> None:
    X, labels, chunks = data
    slda, ncm = StreamingLDAHead(), NearestClassMeanHead()
    learn_in_chunks(slda, X, labels, chunks)
    learn_in_chunks(ncm, X, labels, chunks)
    ref = batch_moments(X, labels)
    assert_stats_close(slda.statistics(), ref, 1e-9)
    assert_stats_close(ncm.statistics(), {k: v for k, v in ref.items() if k != "second_moment"}, 1e-9)
    assert slda.classes_ == list(dict.fromkeys(labels[i] for c in chunks for i in c))  # first-seen order


def test_slda_covariance_and_weights_match_batch_lda() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, D)) + np.repeat(rng.normal(scale=3, size=(4, D)), 50, axis=0)
    labels = [f"c{i // 50}" for i in range(200)]
    head = StreamingLDAHead(shrinkage=0.1)
    head.learn_many(X, labels)
    means = np.stack([X[i * 50 : (i + 1) * 50].mean(0) for i in range(4)])
    centred = X - np.repeat(means, 50, axis=0)
    sigma = centred.T @ centred / (200 - 4)
    np.testing.assert_allclose(head.covariance(), sigma, atol=1e-12)
    Lam = np.linalg.inv(0.9 * sigma + 0.1 * np.eye(D))
    r = head.readout()
    np.testing.assert_allclose(r.weight, (Lam @ means.T), rtol=1e-5)
    np.testing.assert_allclose(r.bias, -0.5 * np.einsum("kd,de,ke->k", means, Lam, means), rtol=1e-5)


@FAST
@given(kept=streams(), extra=streams(), kind=st.sampled_from(["ncm", "slda", "ridge0", "ridge7"]))
def test_learn_then_forget_equals_never_learned(kept: Stream,
                                                extra: Stream,
                                                kind: str) -> None:
    def make() -> NearestClassMeanHead | StreamingLDAHead | RidgeHead:
        if kind.startswith("ridge"):
            return RidgeHead(lam=1.0, expansion_width=int(kind[5:]))
        return NearestClassMeanHead() if kind == "ncm" else StreamingLDAHead()

    X, labels, chunks = kept
    X2, labels2, chunks2 = extra
    labels2 = [label.replace("class", "other") if i % 2 else label for i, label in enumerate(labels2)]
    never, head = make(), make()
    learn_in_chunks(never, X, labels, chunks)
    learn_in_chunks(head, X, labels, chunks[:1])
    learn_in_chunks(head, X2, labels2, chunks2)
    learn_in_chunks(head, X, labels, chunks[1:])
    learn_in_chunks(head, X2, labels2, chunks2[::-1])  # forget in another chunking and order below
    for chunk in chunks2:
        head.forget_many(X2[chunk], [labels2[i] for i in chunk])
    for chunk in chunks2:
        head.forget_many(X2[chunk], [labels2[i] for i in chunk])
    assert_stats_close(head.statistics(), never.statistics(), 1e-8)
    assert head.counts() == dict(sorted(never.counts().items(), key=lambda kv: head.classes_.index(kv[0])))


def test_forgetting_everything_gives_exact_zeros() -> None:
    head = RidgeHead(lam=1.0, expansion_width=0)
    X = np.random.default_rng(0).normal(size=(30, D))
    head.learn_many(X, ["a"] * 30)
    head.forget_many(X[::-1], ["a"] * 30)
    assert head.classes_ == [] and not head.gram().any()
    assert head.predict_proba_many(X)[0].shape == (30, 0)


def test_forget_rejects_unknown_label_or_too_many_events_and_changes_nothing() -> None:
    head = StreamingLDAHead()
    X = np.random.default_rng(0).normal(size=(4, D))
    head.learn_many(X[:2], ["a", "b"])
    before = head.statistics()
    with pytest.raises(ValueError, match="never learned"):
        head.forget_many(X[:2], ["a", "zzz"])
    with pytest.raises(ValueError, match="only 1 learned"):
        head.forget_many(X[:2], ["a", "a"])
    assert_stats_close(head.statistics(), before, 0.0)


def brute_gcv(phi: np.ndarray, Y: np.ndarray, lam: float) -> float:
    """GCV from the explicit hat matrix H = phi (phi^T phi + lam I)^-1 phi^T."""
    n, p = phi.shape
    H = phi @ np.linalg.solve(phi.T @ phi + lam * np.eye(p), phi.T)
    rss = float(((Y - H @ Y) ** 2).sum())
    return n * rss / (n - np.trace(H)) ** 2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(12, 40), width=st.sampled_from([0, 6, 30]))
def test_gcv_formula_and_choice_match_the_hat_matrix(seed: int, n: int, width: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D))
    labels = [f"c{c}" for c in rng.integers(0, 3, n)]
    head = RidgeHead(lam="gcv", expansion_width=width, seed=seed % 100)
    head.learn_many(X, labels)
    phi = head.features(X)
    Y = (np.array(labels)[:, None] == np.array(head.classes_)[None, :]).astype(np.float64)
    G = head.gram()
    s, V = np.linalg.eigh(G)
    qt2 = ((V.T @ (phi.T @ Y)) ** 2).sum(axis=1)
    scale = s.clip(0).mean()
    lams = scale * np.logspace(-4, 4, 60)
    brute = np.array([brute_gcv(phi, Y, lam) for lam in lams])
    fast = gcv_scores(s, qt2, n, float(n), lams)
    df = np.array([np.trace(np.linalg.solve(G + lam * np.eye(len(G)), G)) for lam in lams])
    finite = np.isfinite(fast) & (n - df > 1e-3)
    np.testing.assert_allclose(fast[finite], brute[finite], rtol=1e-6)
    chosen = head.choose_lambda()
    assert chosen is not None
    assert brute_gcv(phi, Y, chosen) <= brute[finite].min() * (1 + 1e-6)
    assert chosen == head.lambda_() == pytest.approx(choose_gcv_lambda(G, phi.T @ Y, n), rel=1e-6)


def test_gcv_lambda_is_cached_until_chosen_again() -> None:
    rng = np.random.default_rng(0)
    head = RidgeHead(expansion_width=16)
    head.learn_many(rng.normal(size=(50, D)), [f"c{i % 3}" for i in range(50)])
    head.readout()
    first = head.lam_
    head.learn_many(rng.normal(size=(50, D)) * 5, [f"c{i % 4}" for i in range(50)])
    head.readout()
    assert head.lam_ == first
    assert head.choose_lambda() != first


def test_a_provisional_lambda_serves_until_gcv_chooses() -> None:
    rng = np.random.default_rng(1)
    head = RidgeHead(expansion_width=16)
    assert head.provisional_lambda() is None  # nothing learned yet
    X = rng.normal(size=(40, D))
    head.learn_many(X, [f"c{i % 3}" for i in range(40)])
    phi = head.features(X)  # the design matrix, bias column included
    want = 0.02 * np.trace(phi.T @ phi) / phi.shape[1]
    assert head.provisional_lambda() == pytest.approx(want, rel=1e-9)
    assert head.lambda_() == head.lam_ == pytest.approx(want, rel=1e-9)  # readouts do not run GCV now
    assert head.choose_lambda() != pytest.approx(want)  # a refit replaces it
    assert head.provisional_lambda() == head.lam_  # and a chosen lambda is kept
    assert RidgeHead(lam=3.0).provisional_lambda() == 3.0


def test_projection_is_regenerated_from_seed_and_checked_on_load() -> None:
    np.testing.assert_array_equal(random_projection(7, 16, D), random_projection(7, 16, D))
    assert random_projection(7, 16, D).dtype == np.float32
    head = RidgeHead(lam=1.0, expansion_width=16, seed=7)
    head.learn_many(np.ones((2, D)), ["a", "b"])
    state = head.state_dict()
    assert "projection" not in state and isinstance(state["projection_sha256"], str)
    clone = RidgeHead(lam=2.0, expansion_width=16, seed=7)  # lam is a solve setting: loading is fine
    clone.load_state_dict(state)
    np.testing.assert_array_equal(clone.projection_, head.projection_)
    for other in (RidgeHead(expansion_width=16, seed=8), RidgeHead(expansion_width=32, seed=7)):
        with pytest.raises(ValueError, match=r"seed|expansion_width"):
            other.load_state_dict(state)
    state["projection_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="projection"):
        RidgeHead(expansion_width=16, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        NearestClassMeanHead().load_state_dict(state)


@pytest.mark.parametrize("kind,params", [("ncm", {}), ("slda", {}),
                                         ("ridge", {"lam": 1.0, "expansion_width": 8})])
def test_merge_states_equals_learning_everything(kind: str, params: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, D))
    labels = [f"c{i % 4}" for i in range(60)] + [f"d{i % 2}" for i in range(30)]
    parts = [make_head(kind, **params) for _ in range(3)]
    for head, rows in zip(parts, (slice(0, 30), slice(30, 60), slice(60, 90)), strict=True):
        head.learn_many(X[rows][::-1], labels[rows][::-1])
    everything = make_head(kind, **params)
    everything.learn_many(X, labels)
    merged = make_head(kind, **params)
    empty = make_head(kind, **params).state_dict()
    merged.load_state_dict(merge_states([empty] + [h.state_dict() for h in parts]))
    assert merged.classes_ == ["c1", "c0", "c3", "c2", "d1", "d0"]  # first seen across inputs, in order
    assert_stats_close(merged.statistics(), everything.statistics(), 1e-12)
    with pytest.raises(ValueError):
        merge_states([parts[0].state_dict(), make_head(kind, temperature=0.5).state_dict()])


def test_registry_and_make_head() -> None:
    assert set(HEADS) == {"ncm", "slda", "ridge"}
    assert isinstance(make_head("ridge", lam=2.0, expansion_width=0), RidgeHead)
    with pytest.raises(ValueError, match="ncm, ridge, slda"):
        make_head("knn")
    with pytest.raises(ValueError, match="bad parameters"):
        make_head("ncm", lam=1.0)
    for bad in ({"lam": -1.0}, {"lam": "auto"}, {"expansion_width": -1}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            make_head("ridge", **bad)
    with pytest.raises(ValueError, match="shrinkage"):
        make_head("slda", shrinkage=2.0)


def test_hyperparameters_rebuild_the_head() -> None:
    head = make_head("ridge", lam=0.5, expansion_width=4, seed=2, temperature=0.3)
    state = head.state_dict()
    assert make_head(state["kind"], **state["hyperparameters"]).state_dict()["hyperparameters"] == \
        state["hyperparameters"]


def test_temperature_auto_uses_default_until_set() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, D))
    head = NearestClassMeanHead()
    head.learn_many(X, [f"c{i % 2}" for i in range(20)])
    assert head.readout().temperature == 0.05
    head.set_temperature(0.2)
    assert head.readout().temperature == 0.2
    clone = NearestClassMeanHead()
    clone.load_state_dict(head.state_dict())
    assert clone.temperature_ == 0.2
    fixed = NearestClassMeanHead(temperature=0.7)
    fixed.load_state_dict(head.state_dict())
    assert fixed.readout().temperature == 0.7  # a configured temperature wins over a fitted one
    with pytest.raises(ValueError):
        head.set_temperature(-1.0)


def test_labels_must_match_rows_and_be_strings() -> None:
    head = NearestClassMeanHead()
    with pytest.raises(ValueError, match="2 labels for 3"):
        head.learn_many(np.zeros((3, D)), ["a", "b"])
    with pytest.raises(ValueError, match="strings"):
        head.learn_many(np.zeros((1, D)), [3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="finite"):
        head.learn_many(np.full((1, D), np.nan), ["a"])
    assert head.counts() == {} and head.n_features_in_ is None
