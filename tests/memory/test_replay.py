"""The FAISS replay memory: deletion, balance, persistence, capacity, search contract."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from memory import ReplayMemory, gpu_count
from service.core.snapshots import pack, unpack

KINDS = ["flat", "ivf", "hnsw"]
DIM = 32
FAST_HNSW = {"hnsw_m": 8, "ef_construction": 32}  # a smaller graph keeps the tests quick; same code paths


def memory(kind: str = "flat", **kw: object) -> ReplayMemory:
    return ReplayMemory(DIM, index=kind, use_gpu="never", **{**FAST_HNSW, **kw})  # type: ignore[arg-type]


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def fill(m: ReplayMemory, X: np.ndarray, labels: list[str], prefix: str = "e",
         batch: int = 2000) -> list[str]:
    eids = [f"{prefix}{i}" for i in range(len(X))]
    for s in range(0, len(X), batch):
        m.add(X[s : s + batch], labels[s : s + batch], eids[s : s + batch],
              ts=np.arange(s, min(s + batch, len(X)), dtype=np.float64))
    return eids


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    return unit(rng, 20_000), [f"c{i % 7}" for i in range(20_000)]


@pytest.mark.parametrize("kind", KINDS)
def test_deleted_events_are_never_returned(kind: str, data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    m = memory(kind, max_items=len(X))
    eids = fill(m, X, labels)
    assert len(m) == len(X)
    rng = np.random.default_rng(1)
    gone = rng.choice(len(X), size=1000, replace=False)
    assert m.remove_event_ids([eids[i] for i in gone] + ["never-stored"]) == 1000
    assert len(m) == len(X) - 1000
    deleted = {eids[i] for i in gone}
    queries = np.concatenate([X[gone], unit(rng, 500)])
    for k in (1, 10, 50):
        scores, _, found = m.search(queries, k)
        returned = {e for row in found for e in row}
        assert not returned & deleted
        assert np.isfinite(scores).all()  # k live results for every query, deleted ones skipped
    # a kept vector still finds itself first
    kept = np.setdiff1d(np.arange(len(X)), gone)[:200]
    _, _, found = m.search(X[kept], 1)
    assert np.mean([row[0] == eids[i] for row, i in zip(found, kept, strict=True)]) > 0.95
    # removing enough to force an HNSW rebuild / IVF keeps the guarantee
    more = rng.choice(np.setdiff1d(np.arange(len(X)), gone), size=4000, replace=False)
    assert m.remove_event_ids([eids[i] for i in more]) == 4000
    deleted |= {eids[i] for i in more}
    _, _, found = m.search(X[more[:500]], 10)
    assert not {e for row in found for e in row} & deleted


def test_hnsw_tombstones_trigger_a_rebuild_past_20_percent(data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    m = memory("hnsw", max_items=4000, auto_rebuild=False)
    eids = fill(m, X[:4000], labels[:4000])
    m.remove_event_ids(eids[:700])
    assert not m.index_needs_rebuild  # 700 / 4000 = 17.5%
    m.remove_event_ids(eids[700:900])
    assert m.index_needs_rebuild  # 900 / 4000 = 22.5%
    before = m.search(X[1000:1100], 5)
    m.rebuild()
    assert not m.index_needs_rebuild
    after = m.search(X[1000:1100], 5)
    assert [r[0] for r in before[2]] == [r[0] for r in after[2]]


def test_balance_under_a_100_to_1_imbalance() -> None:
    rng = np.random.default_rng(2)
    n_major, n_minor, capacity = 30_000, 300, 400
    labels = np.array(["major"] * n_major + ["minor"] * n_minor)
    rng.shuffle(labels)
    m = ReplayMemory(8, max_items=capacity, seed=3, use_gpu="never")
    X = unit(rng, len(labels), 8)
    seen = {"major": 0, "minor": 0}
    for s in range(0, len(labels), 500):
        chunk = labels[s : s + 500].tolist()
        m.add(X[s : s + 500], chunk, [f"e{i}" for i in range(s, s + len(chunk))])
        for c in chunk:
            seen[c] += 1
        counts, targets = m.counts(), m.targets()
        assert sum(counts.values()) <= capacity
        for c in targets:
            assert abs(counts.get(c, 0) - targets[c]) <= 1
            assert targets[c] >= min(seen[c], capacity // 2)  # never starved below its fair share
    assert m.counts() == {"major": 200, "minor": 200} or m.counts() == {"minor": 200, "major": 200}
    # Reservoir: the kept majority items are spread over the whole stream, not just the latest.
    _, kept_labels, kept_ids = m.all()
    positions = np.array([int(e[1:]) for e, c in zip(kept_ids, kept_labels, strict=True) if c == "major"])
    assert abs(positions.mean() / len(labels) - 0.5) < 0.1


def test_a_new_class_trims_the_full_ones() -> None:
    rng = np.random.default_rng(4)
    m = ReplayMemory(8, max_items=100, use_gpu="never")
    r = m.add(unit(rng, 150, 8), ["a"] * 150, [f"a{i}" for i in range(150)])
    assert len(r.admitted) == 100 and r.rejected == 50 and m.counts() == {"a": 100}
    r = m.add(unit(rng, 60, 8), ["b"] * 60, [f"b{i}" for i in range(60)])
    assert m.counts() == {"a": 50, "b": 50}
    assert len(r.evicted) == 50 and all(e.startswith("a") for e in r.evicted)
    assert r.rejected == 10 and len(r.admitted) == 50
    _, _, found = m.search(unit(rng, 50, 8), 100)
    assert not {e for row in found for e in row} & set(r.evicted)


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip_gives_identical_results(kind: str, data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    m = memory(kind, max_items=3000, seed=5, recency_weight=0.1)
    eids = fill(m, X[:6000], labels[:6000], batch=500)
    m.remove_event_ids(eids[::7])
    restored = memory(kind, max_items=3000, seed=99, recency_weight=0.1)
    restored.load_state_dict(unpack(pack({"memory": m.state_dict()}))["memory"])
    Q = unit(np.random.default_rng(6), 200)
    a, b = m.search(Q, 10), restored.search(Q, 10)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert m.counts() == restored.counts() and m.nbytes == restored.nbytes
    # ... and both continue identically (same random stream, same future admissions)
    ra = m.add(X[6000:8000], labels[6000:8000], [f"n{i}" for i in range(2000)])
    rb = restored.add(X[6000:8000], labels[6000:8000], [f"n{i}" for i in range(2000)])
    assert ra == rb
    a, b = m.search(Q, 10), restored.search(Q, 10)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]


@pytest.mark.parametrize("kind", KINDS)
def test_capacity_in_bytes_is_respected(kind: str, data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    budget = 2_000_000
    m = memory(kind, max_items=None, max_bytes=budget)
    assert 0 < m.capacity < 20_000
    for s in range(0, 3 * m.capacity, 500):
        m.add(X[s : s + 500], labels[s : s + 500], [f"{i:036d}" for i in range(s, s + 500)])
        assert m.nbytes <= budget
    assert len(m) == m.capacity
    assert m.nbytes > 0.5 * budget  # the estimate is not absurdly loose either


def test_max_items_and_max_bytes_take_the_smaller() -> None:
    assert ReplayMemory(DIM, max_items=10, max_bytes=10**9).capacity == 10
    assert ReplayMemory(DIM, max_items=10**9, max_bytes=100_000).capacity < 200
    assert ReplayMemory(DIM, max_items=0).capacity == 0


@pytest.mark.parametrize("kind", KINDS)
def test_remove_label_removes_everything_of_that_label(kind: str, data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    m = memory(kind, max_items=3500)
    fill(m, X[:7000], labels[:7000])
    assert m.counts()["c3"] == 500
    assert m.remove_label("c3") == 500
    assert "c3" not in m.counts() and "c3" not in m.targets()
    assert m.remove_label("c3") == 0 and m.remove_label("nope") == 0
    _, found_labels, _ = m.search(X[3:7000:7], 20)  # the c3 vectors themselves
    assert not any(lab == "c3" for row in found_labels for lab in row)
    assert sum(m.targets().values()) == 3500  # its capacity went back to the others


def test_search_contract_padding_exclusion_and_errors() -> None:
    rng = np.random.default_rng(8)
    m = ReplayMemory(DIM, max_items=100, use_gpu="never")
    scores, labels, eids = m.search(unit(rng, 2), 3)
    assert scores.shape == (2, 3) and np.isneginf(scores).all() and labels == [["", "", ""]] * 2
    X = unit(rng, 4)
    m.add(X, ["a", "b", "a", "b"], ["1", "2", "3", "4"])
    scores, labels, eids = m.search(X[:1], 6)
    assert eids[0][0] == "1" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.isneginf(scores[0, 4:]).all() and eids[0][4:] == ["", ""]
    assert np.all(np.diff(scores[0, :4]) <= 0)
    _, labels, _ = m.search(X, 4, exclude_labels=["a"])
    assert all(lab in ("b", "") for row in labels for lab in row)
    with pytest.raises(ValueError, match=r"shape \(n, 32\), got \(1, 31\)"):
        m.search(np.zeros((1, 31), np.float32), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        m.search(X, 0)
    with pytest.raises(ValueError, match="got 1 labels for 4 rows"):
        m.add(X, ["a"], ["x", "y", "z", "w"])
    with pytest.raises(ValueError, match="finite"):
        m.add(np.full((1, DIM), np.nan), ["a"], ["nan"])
    assert len(m) == 4


def test_l2_metric_scores_are_negative_squared_distances() -> None:
    rng = np.random.default_rng(9)
    m = ReplayMemory(DIM, metric="l2", max_items=100, use_gpu="never")
    X = unit(rng, 10)
    m.add(X, ["a"] * 10, [str(i) for i in range(10)])
    scores, _, eids = m.search(X[:1], 2)
    assert eids[0][0] == "0" and scores[0, 0] == pytest.approx(0.0, abs=1e-5)
    assert scores[0, 1] == pytest.approx(-float(np.sum((X[0] - X[int(eids[0][1])]) ** 2)), rel=1e-4)


def test_get_all_metadata_sample_and_duplicates() -> None:
    rng = np.random.default_rng(10)
    m = ReplayMemory(DIM, max_items=1000, use_gpu="never")
    X = unit(rng, 300)
    labels = ["a"] * 200 + ["b"] * 80 + ["c"] * 20
    r = m.add(X, labels, [f"e{i}" for i in range(300)], ts=np.arange(300.0),
              partitions=np.full(300, 2), offsets=np.arange(1000, 1300))
    assert len(r.admitted) == 300 and r.duplicates == 0
    r = m.add(X[:2], ["a", "a"], ["e0", "new"])  # e0 already stored
    assert r.duplicates == 1 and r.admitted == ("new",)
    G, g_labels, found = m.get(["e5", "missing", "e250"])
    assert found == ["e5", "e250"] and g_labels == ["a", "b"] and np.array_equal(G, X[[5, 250]])
    found, ts, parts, offs = m.metadata(["e7"])
    assert found == ["e7"] and ts[0] == 7.0 and parts[0] == 2 and offs[0] == 1007
    A, _, a_ids = m.all()
    assert a_ids[:3] == ["e0", "e1", "e2"] and a_ids[-1] == "new" and np.array_equal(A[:300], X)
    S, s_labels, s_ids = m.sample(90, np.random.default_rng(0))
    assert len(set(s_ids)) == 90
    assert {lab: s_labels.count(lab) for lab in "abc"} == {"a": 35, "b": 35, "c": 20}
    assert np.array_equal(S, m.get(s_ids)[0])
    assert m.counts() == {"a": 201, "b": 80, "c": 20} and "e1" in m and "zz" not in m


@pytest.mark.skipif(gpu_count() == 0, reason="no GPU visible to faiss (faiss-cpu build or no device)")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_search_matches_cpu(kind: str, data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    cpu = memory(kind, max_items=5000)
    gpu = ReplayMemory(DIM, index=kind, max_items=5000, use_gpu="auto")  # type: ignore[arg-type]
    fill(cpu, X[:5000], labels[:5000])
    eids = fill(gpu, X[:5000], labels[:5000])
    gpu.remove_event_ids(eids[:100])
    cpu.remove_event_ids(eids[:100])
    a, b = cpu.search(X[:200], 5), gpu.search(X[:200], 5)
    assert np.mean([x[0] == y[0] for x, y in zip(a[2], b[2], strict=True)]) > 0.99
    assert not {e for row in b[2] for e in row} & set(eids[:100])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_rebuild_built_on_another_thread_sees_changes_made_meanwhile(
        kind: str, data: tuple[np.ndarray, list[str]]) -> None:
    X, labels = data
    m = memory(kind, max_items=10_000, auto_rebuild=False)
    eids = fill(m, X[:2000], labels[:2000])
    assert m.index_needs_rebuild or kind == "hnsw"  # IVF: enough vectors to train
    job = m.start_rebuild()
    worker = threading.Thread(target=job.run)
    worker.start()
    m.add(X[2000:2500], labels[2000:2500], [f"late{i}" for i in range(500)])  # while it builds
    m.remove_event_ids(eids[:300])
    worker.join()
    assert m.finish_rebuild(job)
    assert not m.finish_rebuild(job)  # a job is installed at most once
    assert m.index.ntotal - m.index.n_dead == len(m) == 2200
    _, _, found = m.search(X[:300], 10)
    assert not {e for row in found for e in row} & set(eids[:300])
    _, _, found = m.search(X[2000:2100], 1)
    assert np.mean([row[0] == f"late{i}" for i, row in enumerate(found)]) > 0.9
    stale = m.start_rebuild()
    m.load_state_dict(m.state_dict())
    assert not m.finish_rebuild(stale)  # the index it was built from is gone


@pytest.mark.parametrize("recency_weight", [0.0, 1.0])
def test_batched_admission_follows_the_reservoir_policy(recency_weight: float) -> None:
    """Batched admission and eviction keep the one-by-one distribution.

    Uniform reservoir (w = 0): every event of a class is kept with probability target / seen,
    wherever it came in the stream. w = 1 keeps every event on arrival, then each later kept
    event of the class displaces a stored one with probability 1 / target: an event survives
    the ``k`` later events of its class with probability ``(1 - 1/target)**k``.
    """
    seeds, per_class, target, batch = 200, 200, 20, 100
    labels = ["a", "b"] * per_class
    kept = np.zeros(len(labels))
    batched_calls = 0
    # w = 0: every call in one step per class; w > 0: the calls once the classes are at their targets.
    path, batched_per_seed = ("_offer_uniform", 4) if recency_weight == 0.0 else ("_offer_steady", 3)
    for seed in range(seeds):
        m = ReplayMemory(4, max_items=2 * target, seed=seed, recency_weight=recency_weight, use_gpu="never")
        real = getattr(m, path)

        def counted(*args: object, real: object = real) -> None:
            nonlocal batched_calls
            batched_calls += 1
            real(*args)  # type: ignore[operator]

        setattr(m, path, counted)
        X = unit(np.random.default_rng(seed), len(labels), 4)
        for s in range(0, len(labels), batch):
            m.add(X[s:s + batch], labels[s:s + batch], [f"e{i}" for i in range(s, s + batch)])
        assert m.counts() == {"a": target, "b": target}
        kept[[int(e[1:]) for e in m.all()[2]]] += 1
    assert batched_calls == seeds * batched_per_seed
    p = kept / seeds
    if recency_weight == 0.0:
        want = np.full(len(labels), target / per_class)
    else:
        later = np.arange(len(labels))[::-1] // 2  # later events of the same class
        want = (1 - 1 / target) ** later
    # Per stretch of 40 events (20 per class): 8,000 trials, so a standard error of <= 0.006.
    for s in range(0, len(labels), 40):
        assert abs(p[s:s + 40].mean() - want[s:s + 40].mean()) < 0.025, (s, p[s:s + 40].mean(), want[s:s + 40].mean())


def test_batched_uniform_reservoir_while_classes_appear_and_targets_move() -> None:
    """Capacity reached mid-stream with classes of unequal rates arriving late (targets shrink and
    grow within calls): each class ends with its water-filled target, and every event of a class is
    equally likely to be kept (target / seen), as with one event per call."""
    seeds, capacity = 150, 60
    labels = (["a"] * 3 + ["b"]) * 60 + ["c", "a", "b", "d"] * 30  # c and d appear after the memory is full
    counts = Counter(labels)
    kept = np.zeros(len(labels))
    for seed in range(seeds):
        m = ReplayMemory(4, max_items=capacity, seed=seed, use_gpu="never")
        X = unit(np.random.default_rng(seed), len(labels), 4)
        for s in range(0, len(labels), 48):
            m.add(X[s:s + 48], labels[s:s + 48], [f"e{i}" for i in range(s, s + len(labels[s:s + 48]))])
        assert m.counts() == {"a": 15, "b": 15, "c": 15, "d": 15}
        kept[[int(e[1:]) for e in m.all()[2]]] += 1
    p = kept / seeds
    for label in "abcd":
        idx = np.array([i for i, c in enumerate(labels) if c == label])
        want = 15 / counts[label]
        for part in np.array_split(idx, 3):  # early, middle and late events of the class alike
            assert abs(p[part].mean() - want) < 0.03, (label, part[0], p[part].mean(), want)
