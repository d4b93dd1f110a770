"""The replay memory: a bounded, class-balanced store of embeddings with FAISS search.

``ReplayMemory`` keeps float32 embeddings (``dim`` columns) with per-item metadata (event id,
label, timestamp, source partition and offset) under stable int64 ids that it assigns itself from a
monotonic counter. Which events it keeps is decided by ``memory.policy`` (class-balanced reservoir
sampling, optional recency weighting); search goes through ``memory.index.VectorIndex`` (flat, IVF
or HNSW; GPU replica when available). See those modules for the rules and their reasons.

Contracts the service relies on:

- Deterministic: the same calls with the same seed give the same contents and the same results;
  ``state_dict()`` / ``load_state_dict()`` resume exactly (search results, and the random stream
  that drives later admissions).
- An event id is stored at most once: adding an id that is already stored (or repeated within one
  ``add``) is counted as a duplicate and ignored.
- Removing events (``remove_event_ids``) frees their slots but does not rewind the reservoir's seen
  counts; the next events of that class fill the slots. ``remove_label`` forgets the class
  entirely: its capacity goes back to the other classes.
- Inner-product scores equal cosine similarities only for L2-normalised vectors (the backbone's
  are); the memory stores vectors as given.
- No I/O, no clock (timestamps are arguments), not thread-safe: one owner calls it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memory.index import IndexKind, Metric, UseGpu, VectorIndex
from memory.policy import choose_evictions, class_targets, items_for_bytes, reservoir_decision, trim_counts

PY_BYTES_PER_ITEM = 240  # Python-side bookkeeping per item (2 dict entries, a str object, list slot)
ASSUMED_EVENT_ID_CHARS = 64  # used only to turn max_bytes into items
STATE_FORMAT = 1


class IndexBuild:
    """A rebuild in progress: a snapshot of live vectors and, once ``run``, the new FAISS index."""

    def __init__(self, index: VectorIndex, X: np.ndarray, ids: np.ndarray, generation: int) -> None:
        self.X, self.ids, self.generation = X, ids, generation
        self._index = index
        self.result: tuple[Any, int] | None = None

    def run(self) -> tuple[Any, int]:
        """Build the index (expensive; safe on another thread: reads only the snapshot and settings)."""
        if self.result is None:
            self.result = self._index.build(self.X, self.ids)
        return self.result


@dataclass(frozen=True)
class AddResult:
    """What one ``add`` call did.

    ``admitted``: event ids from this call that are now stored. ``evicted``: event ids that were
    stored before this call and are not any more. ``rejected``: items of this call not stored
    (reservoir said no, or a later item of the same call displaced them). ``duplicates``: items
    ignored because their event id was already stored or repeated in the call.
    """

    admitted: tuple[str, ...]
    evicted: tuple[str, ...]
    rejected: int
    duplicates: int


class ReplayMemory:
    """Bounded class-balanced replay memory over a FAISS index.

    Capacity is ``min(max_items, items that fit in max_bytes)``; ``max_items=None`` (or 0 when
    ``max_bytes`` is given) means "bytes only". ``max_bytes`` is converted with an upper estimate of
    the per-item cost (vector copies in numpy and FAISS, metadata, Python bookkeeping, index
    overhead; event ids assumed <= 64 characters), so ``nbytes <= max_bytes`` holds.

    ``auto_rebuild``: rebuild the FAISS index inside the mutating call when it asks for it (HNSW
    with more than 20% tombstones; IVF ready to be trained or retrained). With ``False`` the owner
    watches ``index_needs_rebuild`` and either calls ``rebuild()`` or, to keep the learn loop
    responsive, ``job = start_rebuild()`` (a copy), ``job.run()`` on a worker thread, then
    ``finish_rebuild(job)`` back on its own thread (reconciles adds/removals made meanwhile). Until
    then HNSW searches stay correct (tombstones are skipped) but slower and larger, and IVF keeps
    searching its exact flat stand-in (or its older, coarser training).
    """

    def __init__(self, dim: int, *, index: IndexKind = "flat", metric: Metric = "ip",
                 max_items: int | None = 20_000, max_bytes: int | None = None, recency_weight: float = 0.0,
                 seed: int = 0, use_gpu: UseGpu = "auto", nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 16, ef_construction: int = 40, ef_search: int = 64,
                 auto_rebuild: bool = True) -> None:
        if not 0.0 <= recency_weight <= 1.0:
            raise ValueError(f"recency_weight must be in [0, 1], got {recency_weight}")
        if max_items is not None and max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.dim, self.kind, self.metric = dim, index, metric
        self.recency_weight, self.seed, self.auto_rebuild = recency_weight, seed, auto_rebuild
        self.max_items, self.max_bytes = max_items, max_bytes
        self._index = VectorIndex(dim, index, metric, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                                  ef_construction=ef_construction, ef_search=ef_search, use_gpu=use_gpu)
        self.capacity = self._capacity()
        self._rng = np.random.default_rng(seed)
        self._clear()

    def _capacity(self) -> int:
        limits = []
        if self.max_items is not None and (self.max_items > 0 or self.max_bytes is None):
            limits.append(self.max_items)
        if self.max_bytes is not None:
            per = (4 * self.dim + 32 + PY_BYTES_PER_ITEM + ASSUMED_EVENT_ID_CHARS
                   + self._index.bytes_per_item())
            limits.append(items_for_bytes(self.max_bytes, per))
        return min(limits) if limits else 0

    def _clear(self) -> None:
        self._n = 0
        self._X = np.zeros((0, self.dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._codes = np.zeros(0, dtype=np.int32)  # index into self._names
        self._ts = np.zeros(0, dtype=np.float64)
        self._part = np.zeros(0, dtype=np.int32)
        self._off = np.zeros(0, dtype=np.int64)
        self._eids: list[str] = []
        self._slot_of: dict[int, int] = {}  # memory id -> row
        self._id_of: dict[str, int] = {}  # event id -> memory id
        self._names: list[str] = []
        self._code_of: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # active classes, first-seen order -> events seen
        self._stored: dict[str, int] = {}
        self._targets: dict[str, int] = {}
        self._next_id = 0
        self._eid_chars = 0
        self._generation = getattr(self, "_generation", 0) + 1  # invalidates rebuilds started before

    # -- adding -------------------------------------------------------------------------------------
    def add(self, X: np.ndarray, labels: Sequence[str], event_ids: Sequence[str],
            ts: np.ndarray | None = None, partitions: np.ndarray | None = None,
            offsets: np.ndarray | None = None) -> AddResult:
        """Offer ``n`` events to the memory; the policy decides which are kept and which make room.

        ``X``: (n, dim) finite floats (stored as float32). ``labels`` and ``event_ids``: n strings.
        ``ts`` (float seconds), ``partitions`` (int32), ``offsets`` (int64): n values each or None
        (stored as NaN / -1 / -1). Raises ``ValueError`` naming the numbers on any shape mismatch;
        nothing is changed then.
        """
        X = self._check(X, "X")
        n = len(X)
        meta = self._check_meta(n, labels, event_ids, ts, partitions, offsets)
        pending: dict[int, None] = {}  # ids admitted by this call, in order
        gone: list[int] = []  # ids stored before this call and evicted by it
        evicted: list[str] = []
        offered: set[str] = set()
        rows = []
        for i, eid in enumerate(meta[1]):
            if eid not in self._id_of and eid not in offered:
                offered.add(eid)
                rows.append(i)
        if sum(self._seen.values()) + len(rows) <= self.capacity:
            # Every target equals its class's seen count, so all are admitted and nothing is evicted:
            # the per-item path below would do exactly this, without drawing from the rng.
            self._register(rows, meta[0])
            for i in rows:
                pending[self._put(X[i], meta, i)] = None
        elif self.recency_weight == 0.0 and self._uniform(rows, meta[0]):
            self._offer_uniform(X, meta, rows, pending, gone, evicted)
        elif self._steady(rows, meta[0]):
            self._offer_steady(X, meta, rows, pending, gone, evicted)
        else:
            for i in rows:
                self._offer_one(X, meta, i, pending, gone, evicted)
        self._index.remove(np.asarray(gone, dtype=np.int64))
        new_ids = np.fromiter(pending, dtype=np.int64, count=len(pending))
        self._index.add(self._X[[self._slot_of[int(j)] for j in new_ids]], new_ids)
        self._maybe_rebuild()
        return AddResult(tuple(self._eids[self._slot_of[int(j)]] for j in new_ids), tuple(evicted),
                         len(rows) - len(pending), n - len(rows))

    def _register(self, rows: list[int], labels: list[str]) -> None:
        for label, cnt in Counter(labels[i] for i in rows).items():
            self._seen[label] = self._seen.get(label, 0) + cnt
        self._targets = class_targets(self._seen, self.capacity)

    def _offer_one(self, X: np.ndarray, meta: tuple[Any, ...], i: int, pending: dict[int, None],
                   gone: list[int], evicted: list[str]) -> None:
        label = meta[0][i]
        old = self._seen.get(label, 0)
        self._seen[label] = old + 1
        if old == 0 or self._targets.get(label, 0) >= old:  # only then can any target move
            self._targets = class_targets(self._seen, self.capacity)
            for c, excess in trim_counts(self._stored, self._targets).items():
                for j in choose_evictions(self._ids_of_class(c), excess, self._rng):
                    self._evict(int(j), pending, gone, evicted)
        decision = reservoir_decision(self._seen[label], self._targets[label], self._stored.get(label, 0),
                                      self._rng, self.recency_weight)
        if decision == "reject":
            return
        if decision == "replace":
            members = self._ids_of_class(label)
            self._evict(int(members[self._rng.integers(len(members))]), pending, gone, evicted)
        pending[self._put(X[i], meta, i)] = None

    def _uniform(self, rows: list[int], labels: list[str]) -> bool:
        """Whether each class offered holds a uniform sample of all its events seen (no freed slots).

        Then so does the uniform reservoir one by one, after the call, whatever the order of its
        steps: class ``c`` ends holding a uniformly random ``target_c`` of its events seen.
        """
        return all(self._stored.get(label, 0) == min(self._targets.get(label, 0), self._seen.get(label, 0))
                   for label in {labels[i] for i in rows})

    def _offer_uniform(self, X: np.ndarray, meta: tuple[Any, ...], rows: list[int], pending: dict[int, None],
                       gone: list[int], evicted: list[str]) -> None:
        """The uniform reservoir (``recency_weight`` 0) for a whole call, in one step per class.

        One by one, every class ends holding a uniformly random subset of its events seen, of the
        size of its final target (Algorithm R; uniform evictions when a target shrinks). So draw
        that subset directly: the number ``k`` of this call's events in it is hypergeometric, they
        are a uniform ``k`` of this call's events of the class, and the rest a uniform subset of
        its stored items (itself a uniform sample of the earlier events). Classes not offered
        shrink to their new targets by uniform evictions, as one by one.
        """
        labels = meta[0]
        new_of: dict[str, list[int]] = {}
        for i in rows:
            new_of.setdefault(labels[i], []).append(i)
        before = {label: self._seen.get(label, 0) for label in new_of}
        for label, offered in new_of.items():
            self._seen[label] = before[label] + len(offered)
        self._targets = class_targets(self._seen, self.capacity)
        admit: list[int] = []
        for label in [*self._stored, *(c for c in new_of if c not in self._stored)]:
            stored, target, offered = self._stored.get(label, 0), self._targets.get(label, 0), new_of.get(label, [])
            k = int(self._rng.hypergeometric(len(offered), before.get(label, 0), target)) if offered and target else 0
            if target - k > stored:  # its target grew past what it holds: the new events fill it, as one by one
                k = min(target - stored, len(offered))
            drop = stored - (target - k)
            if drop > 0:
                for j in choose_evictions(self._ids_of_class(label), drop, self._rng):
                    self._evict(int(j), pending, gone, evicted)
            if k:
                admit += [offered[p] for p in self._rng.choice(len(offered), size=k, replace=False).tolist()]
        for i in sorted(admit):
            pending[self._put(X[i], meta, i)] = None

    def _steady(self, rows: list[int], labels: list[str]) -> bool:
        """Whether every class offered is known, full and past its target (no target can move)."""
        for label in {labels[i] for i in rows}:
            target = self._targets.get(label)
            if target is None or target >= self._seen[label] or self._stored.get(label, 0) != target:
                return False
        return True

    def _offer_steady(self, X: np.ndarray, meta: tuple[Any, ...], rows: list[int], pending: dict[int, None],
                      gone: list[int], evicted: list[str]) -> None:
        """``_offer_one`` for a whole batch once no target can move (``_steady``), with vectorised draws.

        The same policy, drawn in another order: the ``n``-th event of a class at its target is kept
        with probability ``target / n`` (or ``recency_weight``), and each kept event replaces a
        uniformly chosen item of its class, earlier events of the batch included. Replacing by
        position, the item left in each position is the last kept event that drew it; earlier
        ones were admitted and displaced within the call (``rejected``), as one by one.
        """
        labels = [meta[0][i] for i in rows]
        seen_at = np.empty(len(rows), np.int64)  # this event's count in its class, itself included
        targets = np.empty(len(rows), np.int64)
        for k, label in enumerate(labels):
            self._seen[label] += 1
            seen_at[k], targets[k] = self._seen[label], self._targets[label]
        keep = self._rng.integers(0, seen_at) < targets  # Algorithm R
        if self.recency_weight > 0.0:
            keep |= self._rng.random(len(rows)) < self.recency_weight
        keep &= targets > 0
        kept: dict[str, list[int]] = {}
        for k in np.flatnonzero(keep).tolist():
            kept.setdefault(labels[k], []).append(rows[k])
        for label, offered in kept.items():
            members = self._ids_of_class(label)
            last: dict[int, int] = {}  # position in the class -> the last kept event that drew it
            for pos, i in zip(self._rng.integers(0, len(members), size=len(offered)).tolist(), offered, strict=True):
                last[pos] = i
            for pos, i in sorted(last.items(), key=lambda item: item[1]):
                self._evict(int(members[pos]), pending, gone, evicted)
                pending[self._put(X[i], meta, i)] = None

    def _evict(self, j: int, pending: dict[int, None], gone: list[int], evicted: list[str]) -> None:
        eid = self._drop(j)
        if j in pending:
            del pending[j]
        else:
            gone.append(j)
            evicted.append(eid)

    def _put(self, x: np.ndarray, meta: tuple[Any, ...], i: int) -> int:
        labels, eids, ts, parts, offs = meta
        label = labels[i]
        if self._n == len(self._ids):
            self._grow()
        s, j = self._n, self._next_id
        self._next_id += 1
        if label not in self._code_of:
            self._code_of[label] = len(self._names)
            self._names.append(label)
        self._X[s], self._ids[s], self._codes[s] = x, j, self._code_of[label]
        self._ts[s], self._part[s], self._off[s] = ts[i], parts[i], offs[i]
        self._eids.append(eids[i])
        self._slot_of[j], self._id_of[eids[i]] = s, j
        self._stored[label] = self._stored.get(label, 0) + 1
        self._eid_chars += len(eids[i])
        self._n += 1
        return j

    def _grow(self) -> None:
        """Double the row arrays, never beyond capacity (so nbytes stays within max_bytes)."""
        new = min(max(2 * len(self._ids), 64), max(self.capacity, self._n + 1))
        if new <= len(self._ids):
            new = len(self._ids) + 1
        for name in ("_X", "_ids", "_codes", "_ts", "_part", "_off"):
            old = getattr(self, name)
            arr = np.zeros((new, *old.shape[1:]), dtype=old.dtype)
            arr[: self._n] = old[: self._n]
            setattr(self, name, arr)

    def _drop(self, j: int) -> str:
        """Remove id ``j`` from the bookkeeping (not from FAISS) by moving the last row into its slot."""
        s, last = self._slot_of.pop(j), self._n - 1
        eid, label = self._eids[s], self._names[self._codes[s]]
        if s != last:
            for arr in (self._X, self._ids, self._codes, self._ts, self._part, self._off):
                arr[s] = arr[last]
            self._eids[s] = self._eids[last]
            self._slot_of[int(self._ids[s])] = s
        self._eids.pop()
        del self._id_of[eid]
        self._stored[label] -= 1
        self._eid_chars -= len(eid)
        self._n -= 1
        return eid

    def _ids_of_class(self, label: str) -> np.ndarray:
        return self._ids[: self._n][self._codes[: self._n] == self._code_of[label]]

    def _check(self, X: np.ndarray, name: str) -> np.ndarray:
        A = np.asarray(X)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (n, {self.dim}), got {A.shape}")
        A = np.ascontiguousarray(A, dtype=np.float32)
        if not np.isfinite(A).all():
            raise ValueError(f"{name} must be finite (found NaN or Inf)")
        return A

    @staticmethod
    def _check_meta(n: int, labels: Sequence[str], event_ids: Sequence[str], ts: np.ndarray | None,
                    partitions: np.ndarray | None, offsets: np.ndarray | None) -> tuple[Any, ...]:
        labels, event_ids = [str(v) for v in labels], [str(v) for v in event_ids]
        ts_ = np.full(n, np.nan) if ts is None else np.asarray(ts, dtype=np.float64).reshape(-1)
        parts = np.full(n, -1, np.int32) if partitions is None else np.asarray(partitions, np.int32).ravel()
        offs = np.full(n, -1, np.int64) if offsets is None else np.asarray(offsets, np.int64).ravel()
        for name, v in (("labels", labels), ("event_ids", event_ids), ("ts", ts_), ("partitions", parts),
                        ("offsets", offs)):
            if len(v) != n:
                raise ValueError(f"got {len(v)} {name} for {n} rows")
        return labels, event_ids, ts_, parts, offs

    # -- removing -----------------------------------------------------------------------------------
    def remove_event_ids(self, event_ids: Iterable[str]) -> int:
        """Remove the given events; returns how many were stored (unknown ids are ignored)."""
        ids = [self._id_of[e] for e in dict.fromkeys(event_ids) if e in self._id_of]
        return self._remove(ids)

    def remove_label(self, label: str) -> int:
        """Remove every item of ``label`` and forget the class (its capacity returns to the others)."""
        if label not in self._seen:
            return 0
        removed = self._remove([int(j) for j in self._ids_of_class(label)]) if label in self._code_of else 0
        del self._seen[label]
        self._stored.pop(label, None)
        self._targets = class_targets(self._seen, self.capacity)
        return removed

    def _remove(self, ids: list[int]) -> int:
        for j in ids:
            self._drop(j)
        self._index.remove(np.asarray(ids, dtype=np.int64))
        self._maybe_rebuild()
        return len(ids)

    # -- index maintenance --------------------------------------------------------------------------
    def _maybe_rebuild(self) -> None:
        if self.auto_rebuild and self._index.wants_rebuild(self._n):
            self.rebuild()

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the live vectors (drops HNSW tombstones, (re)trains IVF).

        Synchronous; costs one index build over ``len(self)`` vectors. Search results afterwards are
        those of a fresh index over the same items. To build off the owner's thread instead, use
        ``start_rebuild`` / ``IndexBuild.run`` / ``finish_rebuild``.
        """
        self.finish_rebuild(self.start_rebuild())

    def start_rebuild(self) -> IndexBuild:
        """Snapshot the live vectors for a rebuild (a copy: O(len) memory, no FAISS work).

        ``job.run()`` then does the expensive build and may run on any thread while this memory
        keeps being used; ``finish_rebuild(job)`` installs it from the owner's thread.
        """
        order = np.argsort(self._ids[: self._n], kind="stable")
        X, ids = self._X[: self._n][order], self._ids[: self._n][order]
        return IndexBuild(self._index, X, ids, self._generation)

    def finish_rebuild(self, job: IndexBuild) -> bool:
        """Install a rebuilt index, reconciled with what changed since ``start_rebuild``.

        Items added since are added to it and items removed since are removed (or tombstoned), so
        the result is exactly the memory's current contents. Runs ``job.run()`` first if it has not
        run. Returns False (and changes nothing) if ``load_state_dict`` or another rebuild replaced
        the index in between.
        """
        if job.generation != self._generation:
            return False
        built = job.result if job.result is not None else job.run()
        live = self._ids[: self._n]
        new_ids = np.setdiff1d(live, job.ids, assume_unique=True)
        gone = np.setdiff1d(job.ids, live, assume_unique=True)
        self._index.install(built)
        self._generation += 1
        if len(new_ids):
            self._index.add(self._X[[self._slot_of[int(j)] for j in new_ids]], new_ids)
        self._index.remove(gone)
        return True

    @property
    def index(self) -> VectorIndex:
        """The FAISS wrapper (for ``set_search_params`` and facts such as ``ntotal``); do not mutate."""
        return self._index

    @property
    def index_needs_rebuild(self) -> bool:
        """Whether ``rebuild()`` is due (for an owner that runs with ``auto_rebuild=False``)."""
        return self._index.wants_rebuild(self._n)

    # -- reading ------------------------------------------------------------------------------------
    def search(self, Q: np.ndarray, k: int, exclude_labels: Iterable[str] | None = None,
               ) -> tuple[np.ndarray, list[list[str]], list[list[str]]]:
        """The ``k`` most similar stored items for each query row of ``Q`` (m, dim).

        Returns (scores float32 (m, k), labels, event_ids), best first; scores are inner products
        (``metric="ip"``) or minus squared L2 distances (``"l2"``). Rows with fewer than ``k``
        candidates are padded with ``-inf`` and ``""``. Items whose label is in ``exclude_labels``
        are never returned. Raises ``ValueError`` for a wrong shape or ``k < 1``.
        """
        Q = self._check(Q, "Q")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        exclude = None
        if exclude_labels:
            codes = [self._code_of[x] for x in set(exclude_labels) if x in self._code_of]
            exclude = self._ids[: self._n][np.isin(self._codes[: self._n], codes)]
        scores, ids = self._index.search(Q, k, exclude)
        labels = [["" if j < 0 else self._names[self._codes[self._slot_of[j]]] for j in row.tolist()]
                  for row in ids]
        eids = [["" if j < 0 else self._eids[self._slot_of[j]] for j in row.tolist()] for row in ids]
        return scores, labels, eids

    def get(self, event_ids: Iterable[str]) -> tuple[np.ndarray, list[str], list[str]]:
        """Stored vectors of the given events: (X float32 (f, dim), labels, found event ids).

        Unknown ids are skipped; order follows ``event_ids``.
        """
        found = [e for e in dict.fromkeys(event_ids) if e in self._id_of]
        slots = [self._slot_of[self._id_of[e]] for e in found]
        return self._X[slots].copy(), [self._names[c] for c in self._codes[slots]], found

    def metadata(self, event_ids: Iterable[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(found event ids, ts float64, partitions int32, offsets int64) of the stored events given."""
        found = [e for e in dict.fromkeys(event_ids) if e in self._id_of]
        slots = [self._slot_of[self._id_of[e]] for e in found]
        return found, self._ts[slots].copy(), self._part[slots].copy(), self._off[slots].copy()

    def all(self) -> tuple[np.ndarray, list[str], list[str]]:
        """Every stored item, oldest first: (X float32 (n, dim), labels, event ids)."""
        order = np.argsort(self._ids[: self._n], kind="stable")
        return (self._X[: self._n][order], [self._names[c] for c in self._codes[: self._n][order]],
                [self._eids[s] for s in order.tolist()])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list[str]]:
        """A class-balanced sample of ``min(n, len(self))`` distinct items, shuffled.

        Per-class quotas follow ``policy.class_targets`` over the stored counts (equal shares; a
        class with fewer items gives the rest to the others); items are uniform within a class.
        Draws only from ``rng`` (the memory's own random state is untouched).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        quotas = class_targets({c: v for c, v in self._stored.items() if v > 0}, n)
        codes = self._codes[: self._n]
        picks = [rng.choice(np.flatnonzero(codes == self._code_of[c]), size=q, replace=False)
                 for c, q in quotas.items() if q]
        slots = rng.permutation(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
        return (self._X[slots].copy(), [self._names[c] for c in codes[slots]],
                [self._eids[s] for s in slots.tolist()])

    def counts(self) -> dict[str, int]:
        """Stored items per label (labels with at least one item, first-seen order)."""
        return {c: v for c, v in self._stored.items() if v > 0}

    def targets(self) -> dict[str, int]:
        """The policy's current per-class capacity (first-seen order)."""
        return dict(self._targets)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._id_of

    @property
    def nbytes(self) -> int:
        """Estimated bytes held: row arrays as allocated, Python bookkeeping, and the FAISS index."""
        arrays = sum(a.nbytes for a in (self._X, self._ids, self._codes, self._ts, self._part, self._off))
        return int(arrays + self._n * PY_BYTES_PER_ITEM + self._eid_chars + self._index.nbytes())

    # -- persistence --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: numpy arrays (no objects), strings and ints.

        ``load_state_dict`` of this on a memory with the same settings gives identical search
        results and identical future admissions.
        """
        n = self._n
        return {
            "format": STATE_FORMAT, "dim": self.dim, "kind": self.kind, "metric": self.metric,
            "vectors": self._X[:n].copy(), "ids": self._ids[:n].copy(),
            "labels": np.array([self._names[c] for c in self._codes[:n]], dtype=str),
            "event_ids": np.array(self._eids, dtype=str),
            "ts": self._ts[:n].copy(), "partitions": self._part[:n].copy(), "offsets": self._off[:n].copy(),
            "classes": np.array(list(self._seen), dtype=str),
            "seen": np.array(list(self._seen.values()), dtype=np.int64),
            "next_id": self._next_id, "seed": self.seed,
            "rng": json.dumps(self._rng.bit_generator.state),
            "index": self._index.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents by a ``state_dict``; this memory's settings are kept.

        Raises ``ValueError`` if the dimension differs. If the index kind or metric differ, the
        index is rebuilt from the stored vectors; if the capacity is now smaller, classes are
        trimmed to their new targets.
        """
        if int(state["dim"]) != self.dim:
            raise ValueError(f"memory state has dim {int(state['dim'])}, expected {self.dim}")
        if int(state["format"]) != STATE_FORMAT:
            raise ValueError(f"memory state format {state['format']}, expected {STATE_FORMAT}")
        self._clear()
        labels = [str(v) for v in state["labels"]]
        eids = [str(v) for v in state["event_ids"]]
        n = len(eids)
        meta = (labels, eids, np.asarray(state["ts"]), np.asarray(state["partitions"]),
                np.asarray(state["offsets"]))
        ids, X = np.asarray(state["ids"], dtype=np.int64), np.asarray(state["vectors"], dtype=np.float32)
        for i in range(n):
            self._next_id = int(ids[i])
            self._put(X[i], meta, i)
        self._seen = {str(c): int(v) for c, v in zip(state["classes"], state["seen"], strict=True)}
        self._stored = {c: self._stored.get(c, 0) for c in self._seen}
        self._next_id = int(state["next_id"])
        self._targets = class_targets(self._seen, self.capacity)
        bg = json.loads(str(state["rng"]))
        self._rng = np.random.Generator(getattr(np.random, bg["bit_generator"])())
        self._rng.bit_generator.state = bg
        index_state = state["index"]
        if (index_state["kind"], index_state["metric"]) == (self.kind, self.metric):
            self._index.load_state_dict(index_state)
        else:
            self.rebuild()
        gone: list[int] = []
        for c, excess in trim_counts(self._stored, self._targets).items():
            for j in choose_evictions(self._ids_of_class(c), excess, self._rng):
                self._drop(int(j))
                gone.append(int(j))
        if gone:
            self._index.remove(np.asarray(gone, dtype=np.int64))
            self._maybe_rebuild()
