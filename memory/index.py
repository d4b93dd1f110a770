"""FAISS index construction per kind, GPU detection, and the one wrapper the replay memory searches.

``VectorIndex`` hides how the three kinds differ; all take caller-assigned int64 ids:

- ``flat``: ``IndexIDMap2(IndexFlatIP | IndexFlatL2)``: exact search; ``remove_ids`` is real.
- ``ivf``: ``IndexIVFFlat`` with its *native* ids (IVF stores ids in its inverted lists). It is not
  wrapped in ``IndexIDMap2``: ``IndexIDMap::remove_ids`` assumes the inner index renumbers rows
  after a removal, as ``IndexFlat`` does and IVF does not, so after one removal that combination
  returns wrong ids (checked with faiss 1.15). Until it has ``39 * nlist`` vectors it is
  untrained and a flat index stands in; ``nlist`` defaults to ``round(sqrt(n))`` at training time
  (so training starts at ~1,521 vectors) and it is retrained when the data has grown 4x since.
- ``hnsw``: ``IndexIDMap(IndexHNSWFlat)``. HNSW cannot remove, so removed ids become tombstones that
  searches skip (an ``IDSelector`` inside the graph walk, so a search still returns ``k`` live
  results); once tombstones exceed ``rebuild_fraction`` (20%) of the graph, ``wants_rebuild()``
  says so and the owner rebuilds from its live vectors.

Scores are similarities, higher is closer: the inner product for ``metric="ip"`` (the cosine only
when vectors are L2-normalised, as the backbone's are) and minus the squared L2 distance for
``metric="l2"``. Missing results (fewer than ``k`` candidates) have id -1 and score ``-inf``.

GPU: with ``use_gpu="auto"`` and ``faiss.get_num_gpus() > 0`` (a faiss-gpu build), flat and IVF
searches run on a GPU replica made by ``index_cpu_to_gpu``; the CPU index stays the source of
truth (adds and removals go there and mark the replica stale; it is re-copied at the next search)
and is what gets serialised. HNSW has no GPU implementation in faiss and stays on the CPU, and so
do searches that must exclude ids (GPU indexes do not take an ``IDSelector``).

Not thread-safe: one owner (the learn loop) calls it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import faiss as _faiss
import numpy as np

# faiss's SWIG stubs miss its Python wrappers (ndarray arguments, SearchParameters keywords, downcasts),
# so the module is typed as Any here rather than sprinkling ignores.
faiss: Any = _faiss
FaissIndex = Any

log = logging.getLogger("eddy.memory")

IndexKind = Literal["flat", "ivf", "hnsw"]
Metric = Literal["ip", "l2"]
UseGpu = Literal["auto", "never"]
KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
IVF_MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
IVF_REGROW_FACTOR = 4  # retrain when n has grown this much since training (nlist ~ sqrt(n) doubles)
GPU_MAX_K = 2048  # faiss GPU k-selection limit


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu, which has no ``get_num_gpus``)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # CUDA present but unusable
        return 0


def wants_gpu(use_gpu: UseGpu, kind: IndexKind) -> bool:
    """Whether searches of this kind run on a GPU replica under the given setting."""
    if use_gpu not in ("auto", "never"):
        raise ValueError(f"use_gpu must be 'auto' or 'never', got {use_gpu!r}")
    return use_gpu == "auto" and kind != "hnsw" and gpu_count() > 0


def _faiss_metric(metric: Metric) -> int:
    if metric == "ip":
        return int(faiss.METRIC_INNER_PRODUCT)
    if metric == "l2":
        return int(faiss.METRIC_L2)
    raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def ivf_nlist(n: int, nlist: int | None) -> int:
    """The number of IVF lists for ``n`` training vectors: ``nlist`` if given, else ``round(sqrt(n))``."""
    return nlist if nlist is not None else max(1, round(math.sqrt(n)))


def serialize(index: FaissIndex) -> np.ndarray:
    """A CPU index as a uint8 array (``faiss.serialize_index``)."""
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def deserialize(blob: np.ndarray) -> FaissIndex:
    """Inverse of ``serialize``."""
    return faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))


class VectorIndex:
    """One FAISS index of a fixed kind, dimension and metric over caller-assigned int64 ids."""

    def __init__(self, dim: int, kind: IndexKind = "flat", metric: Metric = "ip", *, nlist: int | None = None,
                 nprobe: int = 16, hnsw_m: int = 16, ef_construction: int = 40, ef_search: int = 64,
                 use_gpu: UseGpu = "auto", rebuild_fraction: float = 0.2) -> None:
        if kind not in KINDS:
            raise ValueError(f"index must be one of {KINDS}, got {kind!r}")
        if dim < 1 or nprobe < 1 or hnsw_m < 2 or ef_search < 1 or ef_construction < 1:
            raise ValueError(f"bad index parameters: dim={dim} nprobe={nprobe} hnsw_m={hnsw_m} "
                             f"ef_search={ef_search} ef_construction={ef_construction}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if not 0.0 < rebuild_fraction < 1.0:
            raise ValueError(f"rebuild_fraction must be in (0, 1), got {rebuild_fraction}")
        self.dim, self.kind, self.metric = dim, kind, metric
        self._fmetric = _faiss_metric(metric)
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.rebuild_fraction = rebuild_fraction
        self.on_gpu = wants_gpu(use_gpu, kind)
        self._gpu_res: Any = None
        self._gpu: FaissIndex | None = None
        self._cpu: FaissIndex = self._fresh()
        self._dead: set[int] = set()  # HNSW tombstones
        self._dead_sel: Any = None
        self.trained_at = 0  # IVF: how many vectors the quantizer was trained on (0: untrained)

    # -- construction -------------------------------------------------------------------------------
    def _flat(self) -> FaissIndex:
        inner = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        return faiss.IndexIDMap2(inner)

    def _fresh(self) -> FaissIndex:
        if self.kind == "hnsw":
            h = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, self._fmetric)
            h.hnsw.efConstruction, h.hnsw.efSearch = self.ef_construction, self.ef_search
            return faiss.IndexIDMap(h)
        return self._flat()  # flat, and IVF until trained

    def _trained_ivf(self, X: np.ndarray) -> FaissIndex:
        nlist = ivf_nlist(len(X), self.nlist)
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._fmetric)
        # Bounded training cost (it runs inside the learn loop): <= 64 points per centroid, 10 rounds.
        ivf.cp.max_points_per_centroid, ivf.cp.niter = 64, 10
        ivf.train(X)
        ivf.nprobe = min(self.nprobe, nlist)
        return ivf

    # -- mutation -----------------------------------------------------------------------------------
    def add(self, X: np.ndarray, ids: np.ndarray) -> None:
        """Add float32 rows ``X`` (n, dim) under new int64 ``ids`` (n,)."""
        if len(ids):
            self._cpu.add_with_ids(np.ascontiguousarray(X, dtype=np.float32),
                                   np.ascontiguousarray(ids, dtype=np.int64))
            self._gpu = None

    def remove(self, ids: np.ndarray) -> None:
        """Remove ``ids`` (all must be present): for real, or as HNSW tombstones."""
        if not len(ids):
            return
        if self.kind == "hnsw":
            self._dead.update(int(i) for i in ids)
            self._dead_sel = None
        else:
            removed = self._cpu.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            if removed != len(ids):
                raise RuntimeError(f"faiss removed {removed} of {len(ids)} ids")  # bookkeeping bug
        self._gpu = None

    def wants_rebuild(self, n_live: int) -> bool:
        """True when ``rebuild`` would help: HNSW tombstones over the limit, IVF (re)training due."""
        if self.kind == "hnsw":
            return len(self._dead) > self.rebuild_fraction * max(self.ntotal, 1)
        if self.kind == "ivf":
            if not self.trained_at:
                return n_live >= IVF_MIN_POINTS_PER_LIST * ivf_nlist(n_live, self.nlist)
            return self.nlist is None and n_live >= IVF_REGROW_FACTOR * self.trained_at
        return False

    def rebuild(self, X: np.ndarray, ids: np.ndarray) -> None:
        """Replace the index by one built from the live rows ``X`` with ``ids``; drops tombstones.

        IVF is (re)trained when there are enough rows for ``nlist`` lists, else stays flat.
        """
        self.install(self.build(X, ids))

    def build(self, X: np.ndarray, ids: np.ndarray) -> tuple[FaissIndex, int]:
        """A new CPU index over ``X`` / ``ids`` and its IVF training size; reads only settings.

        Touches no state of this object, so it may run on another thread while this index keeps
        serving (faiss releases the GIL while it builds).
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        trained_at = 0
        if self.kind == "ivf" and len(X) >= IVF_MIN_POINTS_PER_LIST * ivf_nlist(len(X), self.nlist):
            index, trained_at = self._trained_ivf(X), len(X)
        else:
            index = self._fresh()
        if len(ids):
            index.add_with_ids(X, np.ascontiguousarray(ids, dtype=np.int64))
        return index, trained_at

    def install(self, built: tuple[FaissIndex, int]) -> None:
        """Make an index from ``build`` the current one (tombstones are dropped with the old one)."""
        self._cpu, self.trained_at = built
        self._gpu, self._dead, self._dead_sel = None, set(), None

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall trade-off of later searches (IVF ``nprobe``, HNSW ``efSearch``)."""
        if nprobe is not None:
            if nprobe < 1:
                raise ValueError(f"nprobe must be >= 1, got {nprobe}")
            self.nprobe = nprobe
            if self.kind == "ivf" and self.trained_at:
                ivf = faiss.extract_index_ivf(self._cpu)
                ivf.nprobe = min(nprobe, ivf.nlist)
                self._gpu = None
        if ef_search is not None:
            if ef_search < 1:
                raise ValueError(f"ef_search must be >= 1, got {ef_search}")
            self.ef_search = ef_search
            if self.kind == "hnsw":
                faiss.downcast_index(faiss.downcast_index(self._cpu).index).hnsw.efSearch = ef_search

    # -- search -------------------------------------------------------------------------------------
    def search(self, Q: np.ndarray, k: int, exclude: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores float32 (m, k), ids int64 (m, k)) for float32 queries ``Q`` (m, dim).

        ``exclude``: ids never to return (besides tombstones). Fewer than ``k`` hits pad with -1/-inf.
        """
        m = len(Q)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        ids = np.full((m, k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if m == 0 or kk == 0:
            return scores, ids
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        sel = self._selector(exclude)
        if sel is None and self.on_gpu and kk <= GPU_MAX_K:
            D, Iq = self._gpu_index().search(Q, kk)
        else:
            D, Iq = self._cpu.search(Q, kk, params=self._params(sel))
        D = D if self.metric == "ip" else -D
        ok = Iq >= 0
        scores[:, :kk] = np.where(ok, D, -np.inf)
        ids[:, :kk] = Iq
        return scores, ids

    def _selector(self, exclude: np.ndarray | None) -> Any:
        has_exclude = exclude is not None and len(exclude) > 0
        if not self._dead and not has_exclude:
            return None
        if not has_exclude:
            if self._dead_sel is None:
                batch = faiss.IDSelectorBatch(np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)))
                self._dead_sel = (faiss.IDSelectorNot(batch), batch)  # keep the inner alive
            return self._dead_sel[0]
        banned = np.asarray(exclude, dtype=np.int64)
        if self._dead:
            banned = np.concatenate([banned, np.fromiter(self._dead, dtype=np.int64, count=len(self._dead))])
        batch = faiss.IDSelectorBatch(banned)
        sel = faiss.IDSelectorNot(batch)
        sel.referenced_objects = [batch]  # keep the inner selector alive as long as the outer
        return sel

    def _params(self, sel: Any) -> Any:
        if sel is None:
            return None
        if self.kind == "ivf" and self.trained_at:
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(faiss.extract_index_ivf(self._cpu).nprobe))
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
        return faiss.SearchParameters(sel=sel)

    def _gpu_index(self) -> FaissIndex:
        if self._gpu is None:
            try:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._cpu)
            except (AttributeError, RuntimeError) as exc:  # no usable GPU after all: stay on the CPU
                log.warning("faiss GPU replica failed (%s); searching on the CPU", exc)
                self.on_gpu = False
                return self._cpu
        return self._gpu

    # -- facts and persistence ----------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Vectors held by the FAISS index, tombstones included."""
        return int(self._cpu.ntotal)

    @property
    def n_dead(self) -> int:
        """HNSW tombstones awaiting a rebuild (0 for other kinds)."""
        return len(self._dead)

    def nbytes(self) -> int:
        """Estimated bytes held by FAISS (vectors, ids, graph links or centroids)."""
        n = self.ntotal
        per = 4 * self.dim + 8  # the index's own copy of each vector + its id
        if self.kind == "flat" or (self.kind == "ivf" and not self.trained_at):
            per += 32  # IndexIDMap2's reverse hash map entry
        if self.kind == "hnsw":
            per += 4 * 2 * self.hnsw_m + 4 * self.hnsw_m // max(self.hnsw_m - 1, 1) + 16  # links + offsets
        fixed = 0
        if self.kind == "ivf" and self.trained_at:
            fixed = 4 * self.dim * faiss.extract_index_ivf(self._cpu).nlist
        return n * per + fixed + 8 * len(self._dead)

    def bytes_per_item(self) -> float:
        """Upper estimate of ``nbytes()`` per live item, used to turn a byte budget into items."""
        per = 4.0 * self.dim + 8 + 32
        if self.kind == "ivf":
            per += 4 * self.dim / IVF_MIN_POINTS_PER_LIST  # centroids: <= 1 per 39 items at training
        if self.kind == "hnsw":  # links, and up to rebuild_fraction of the graph as tombstones
            per = (per + 4 * 2 * self.hnsw_m + 4 * self.hnsw_m // max(self.hnsw_m - 1, 1) + 16 + 8) / (
                1 - self.rebuild_fraction)
        return per

    def state_dict(self) -> dict[str, Any]:
        """The CPU index serialised, plus tombstones and training facts."""
        return {
            "kind": self.kind, "metric": self.metric, "dim": self.dim,
            "index": serialize(self._cpu),
            "dead": np.fromiter(sorted(self._dead), dtype=np.int64, count=len(self._dead)),
            "trained_at": self.trained_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of the same kind, metric and dimension (else ``ValueError``)."""
        got = (state["kind"], state["metric"], int(state["dim"]))
        if got != (self.kind, self.metric, self.dim):
            raise ValueError(f"index state is {got}, expected {(self.kind, self.metric, self.dim)}")
        self._cpu, self._gpu = deserialize(state["index"]), None
        self._dead, self._dead_sel = {int(i) for i in state["dead"]}, None
        self.trained_at = int(state["trained_at"])
        self.set_search_params(nprobe=self.nprobe, ef_search=self.ef_search)  # current settings win
