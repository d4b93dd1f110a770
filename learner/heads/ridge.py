"""Analytic ridge head on (optionally) random ReLU features: ACIL / RanPAC style.

Zhuang et al., "ACIL: Analytic Class-Incremental Learning" (NeurIPS 2022); McDonnell et al.,
"RanPAC: Random Projections and Pre-trained Models for Continual Learning" (NeurIPS 2023).

Feature map: ``phi(x) = [relu(R x), 1]`` with a Gaussian ``R`` of shape ``(M, d)``
(``M = expansion_width``, entries N(0, 1) drawn by ``numpy.random.default_rng(seed)`` and stored
as float32, the precision the exported model uses), or ``phi(x) = [x, 1]`` when ``M = 0``. The
trailing 1 makes the last row of ``W`` the bias; the bias is regularised like every other
weight (harmless: ``lam`` is small relative to ``G[-1, -1] = n``). ``R`` is not saved: it is
regenerated from ``seed`` and the shape on load, and a SHA-256 of it is saved and checked.

Statistics (float64): ``G = sum phi phi^T`` (p, p), ``Q = sum phi y^T`` with one-hot ``y``
(p, k; a new class adds a zero column, and ``Q``'s columns are just per-class sums of phi),
per-class counts and ``n``. Weights: ``W = (G + lam I)^-1 Q`` by Cholesky, lazily, when the
readout is needed. Forgetting subtracts from ``G``, ``Q`` and the counts; a class with no
events left loses its column.

``lam = "gcv"`` chooses lambda by generalised cross-validation from the statistics alone
(Golub, Heath & Wahba 1979): with ``G = V diag(s) V^T`` and ``Qt = V^T Q``,

    RSS(lam) = n - sum_i |Qt_i|^2 (s_i + 2 lam) / (s_i + lam)^2     (sum |y|^2 = n for one-hot)
    df(lam)  = sum_i s_i / (s_i + lam)
    GCV(lam) = n RSS(lam) / (n - df(lam))^2

minimised over 50 log-spaced values ``1e-4..1e4 x mean(s)``, then refined by a bounded scalar
search between the neighbours of the best grid point. The choice is cached: it is made on the
first readout and again only when ``choose_lambda()`` is called (the service does so
periodically, off the hot path, and exports with ``provisional_lambda()`` until its first
choice). The weights always come from the Cholesky solve.

Probabilities: ``softmax((phi(x) W) / T)``. The scores regress one-hot targets, so the true
class scores near 1 and the rest near 0; the default ``T = 0.05`` turns a 0.25 margin into odds
of e^5 (NLL-optimal on banking77/MiniLM: 0.046 at M = 0, 0.063 at M = 2048).
``temperature="auto"`` uses it until ``set_temperature`` installs a fitted one.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import scipy.optimize

from learner.heads.base import Readout, StateDict
from learner.heads.stats import ExactHead, SecondMoment

GCV_GRID = np.logspace(-4, 4, 50)  # relative to the mean eigenvalue of G
PROVISIONAL_LAMBDA = 0.02  # x the mean eigenvalue, until GCV has chosen (see provisional_lambda)


def random_projection(seed: int, width: int, d: int) -> np.ndarray:
    """The Gaussian expansion matrix, float32 (width, d); a pure function of its arguments."""
    return np.random.default_rng(seed).standard_normal((width, d)).astype(np.float32)


def gcv_scores(s: np.ndarray, qt2: np.ndarray, n: float, y2: float, lams: np.ndarray) -> np.ndarray:
    """GCV criterion at each ``lam`` from eigenvalues ``s`` of G and ``qt2 = |(V^T Q)_i|^2``.

    ``y2`` is ``sum |y|^2`` (``n`` for one-hot targets). Where ``df >= n`` (as many effective
    parameters as events) the criterion is ``inf``.
    """
    lams = np.asarray(lams, dtype=np.float64)[:, None]
    s = np.maximum(s, 0.0)[None, :]  # tiny negative eigenvalues are rounding
    rss = y2 - ((s + 2 * lams) / (s + lams) ** 2 * qt2).sum(axis=1)
    df = (s / (s + lams)).sum(axis=1)
    resid_df = n - df
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n * np.maximum(rss, 0.0) / resid_df**2
    return np.where(resid_df > 1e-9 * max(n, 1.0), out, np.inf)


def choose_gcv_lambda(G: np.ndarray, Q: np.ndarray, n: float, y2: float | None = None) -> float:
    """The ``lam`` minimising GCV for ridge on statistics ``G`` (p, p), ``Q`` (p, k), ``n`` events.

    Only the upper triangle of ``G`` is read. One eigendecomposition, then a 50-point log grid
    over ``1e-4..1e4 x mean eigenvalue`` and a bounded refinement on ``log lam``. ``ValueError``
    if ``n <= 0``.
    """
    if n <= 0:
        raise ValueError(f"GCV needs at least one event, got n={n}")
    # numpy's eigh releases the GIL; scipy's held it for the whole ~1.5 s call at M = 2048, stalling
    # every other thread of the daemon (gRPC, Kafka heartbeats).
    s, V = np.linalg.eigh(G, UPLO="U")
    qt2 = ((V.T @ Q) ** 2).sum(axis=1)
    y2 = float(n) if y2 is None else y2
    scale = max(float(np.maximum(s, 0).mean()), 1e-12)
    grid = scale * GCV_GRID
    scores = gcv_scores(s, qt2, n, y2, grid)
    best = int(np.argmin(scores))
    if not np.isfinite(scores[best]):
        return float(grid[-1])
    lo, hi = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    res = scipy.optimize.minimize_scalar(lambda t: float(gcv_scores(s, qt2, n, y2, np.exp([t]))[0]),
                                         bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    refined = float(np.exp(res.x))
    return refined if res.fun <= scores[best] else float(grid[best])


class RidgeHead(ExactHead):
    """Analytic ridge head.

    ``lam``: ``"gcv"`` (default) or a positive float. ``expansion_width``: ``M >= 0`` random ReLU
    features (default 2048; 0 = ridge on the raw features). ``seed``: seeds ``R``.
    ``temperature``: ``"auto"`` (0.05 until fitted) or a float. ``ValueError`` for bad values.
    """

    kind: ClassVar[str] = "ridge"
    default_temperature: ClassVar[float] = 0.05
    _stat_params: ClassVar[tuple[str, ...]] = ("expansion_width", "seed")

    def __init__(self, lam: float | str = "gcv", expansion_width: int = 2048, seed: int = 0,
                 temperature: float | str = "auto") -> None:
        fixed = isinstance(lam, int | float) and not isinstance(lam, bool)
        if lam != "gcv" and not (fixed and 0 < float(lam) < np.inf):
            raise ValueError(f"lam must be 'gcv' or a positive finite number, got {lam!r}")
        if isinstance(expansion_width, bool) or not isinstance(expansion_width, int) or expansion_width < 0:
            raise ValueError(f"expansion_width must be an int >= 0, got {expansion_width!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.lam: float | str = lam if lam == "gcv" else float(lam)
        self.expansion_width = expansion_width
        self.seed = seed
        super().__init__(temperature)

    def _clear(self) -> None:
        super()._clear()
        self.projection_: np.ndarray | None = None  # float32 (M, d), or None when M == 0
        self._projection64: np.ndarray | None = None
        self._gram = SecondMoment(0)
        self.lam_: float | None = None  # the cached GCV choice (None until chosen, or lam fixed)
        self._weights: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"lam": self.lam, "expansion_width": self.expansion_width, "seed": self.seed,
                "temperature": self.temperature}

    # -- statistics --------------------------------------------------------------------------
    def _width(self, d: int) -> int:
        return (self.expansion_width or d) + 1

    def _start(self, d: int) -> None:
        super()._start(d)
        self._gram = SecondMoment(self._width(d))
        if self.expansion_width:
            self.projection_ = random_projection(self.seed, self.expansion_width, d)
            self._projection64 = self.projection_.astype(np.float64)

    def features(self, X: np.ndarray) -> np.ndarray:
        """``phi(X)`` (float64, (n, p)) for float64 ``X`` of the learned dimension, bias column last."""
        n = len(X)
        phi = np.empty((n, self._table.width), dtype=np.float64)
        if self._projection64 is not None:
            np.matmul(X, self._projection64.T, out=phi[:, :-1])
            np.maximum(phi[:, :-1], 0.0, out=phi[:, :-1])
        else:
            phi[:, :-1] = X
        phi[:, -1] = 1.0
        return phi

    def _features(self, X: np.ndarray) -> np.ndarray:
        return self.features(X)

    def _accumulate_extra(self, Z: np.ndarray, sign: float) -> None:
        self._gram.add(Z, sign)
        self._weights = None

    def _reset_extra(self) -> None:
        self._gram.reset()

    def _changed(self) -> None:
        super()._changed()
        self._weights = None

    def gram(self) -> np.ndarray:
        """``G = sum phi phi^T`` (float64, (p, p))."""
        return self._gram.full()

    def _extra_state(self) -> StateDict:
        digest = "" if self.projection_ is None else hashlib.sha256(self.projection_.tobytes()).hexdigest()
        # The upper triangle is the whole matrix (loading symmetrises); no symmetric copy to build.
        return {"gram": self._gram.upper(), "lam_chosen": self.lam_ or 0.0, "projection_sha256": digest}

    def _load_extra(self, state: StateDict) -> None:
        digest = "" if self.projection_ is None else hashlib.sha256(self.projection_.tobytes()).hexdigest()
        if str(state.get("projection_sha256", "")) != digest:
            raise ValueError("the regenerated random projection differs from the saved one "
                             f"(seed {self.seed}, shape ({self.expansion_width}, {self.n_features_in_}))")
        self._gram.load(state["gram"])
        chosen = float(state.get("lam_chosen", 0.0))
        if self.lam == "gcv" and chosen > 0:
            self.lam_ = chosen

    def _extra_statistics(self) -> dict[str, np.ndarray]:
        order = self._table.sorted_order()
        return {"gram": self._gram.full(), "Q": self._table.sums[order].T.copy(),
                "n": np.array(int(self._table.counts.sum()))}

    def _absorb_extra(self, other: ExactHead) -> None:
        assert isinstance(other, RidgeHead)
        self._gram.load(self._gram.full() + other._gram.full())
        self.lam_ = None

    # -- solve -------------------------------------------------------------------------------
    def prepare_solve(self, *, refit: bool) -> None:
        """Choose lambda: by GCV on a ``refit`` (seconds at M = 2048), else provisionally if none yet."""
        if refit:
            self.choose_lambda()
        else:
            self.provisional_lambda()

    def adopt_choices(self, solved: ExactHead) -> None:
        """Keep ``solved``'s lambda and fitted temperature for the next solves."""
        super().adopt_choices(solved)
        assert isinstance(solved, RidgeHead)
        if solved.lam_ is not None and solved.lam_ != self.lam_:
            self.lam_ = solved.lam_
            self._weights, self._readout = None, None

    def choose_lambda(self) -> float | None:
        """Re-choose ``lam`` by GCV now (no-op returning ``lam`` when it is fixed).

        Returns the lambda in use, or None if nothing is learned yet.
        """
        if self.lam != "gcv":
            return float(self.lam)
        n = int(self._table.counts.sum())
        if n == 0:
            return None
        self.lam_ = choose_gcv_lambda(self._gram.upper(), self._table.sums.T, n)
        self._weights, self._readout = None, None
        return self.lam_

    def provisional_lambda(self) -> float | None:
        """Adopt ``PROVISIONAL_LAMBDA`` x the mean eigenvalue of ``G`` unless a lambda was chosen.

        For a service that wants a model out before it can afford the eigendecomposition (seconds
        at M = 2048): GCV on banking77/MiniLM picks 0.02-0.06 x the mean eigenvalue from 2,000
        events on, and on the first few hundred, where M > n, it runs into the grid's lower edge.
        ``choose_lambda()`` replaces it. Returns the lambda in use, or None if nothing is learned.
        """
        if self.lam != "gcv":
            return float(self.lam)
        if self.lam_ is None:
            if self._gram.width == 0 or int(self._table.counts.sum()) == 0:
                return None
            self.lam_ = PROVISIONAL_LAMBDA * self._gram.trace() / self._gram.width
            self._weights, self._readout = None, None
        return self.lam_

    def lambda_(self) -> float:
        """The lambda the weights use (choosing it by GCV first if none was chosen yet)."""
        if self.lam != "gcv":
            return float(self.lam)
        if self.lam_ is None:
            self.choose_lambda()
        return self.lam_ if self.lam_ is not None else 1.0

    def weights(self) -> np.ndarray:
        """``W = (G + lam I)^-1 Q`` (float64, (p, k), columns in ``classes_`` order, bias row last)."""
        if self._weights is None:
            # numpy's Cholesky releases the GIL (scipy's cho_factor held it ~0.1 s at M = 2048) and
            # reads only the lower triangle: the transposed upper-triangle copy is enough.
            lam = self.lambda_()
            A = self._gram.upper().T
            A[np.diag_indices_from(A)] += lam
            Q = self._table.sums.T
            try:
                L = np.linalg.cholesky(A)
                Y = scipy.linalg.solve_triangular(L, Q, lower=True, check_finite=False)
                self._weights = scipy.linalg.solve_triangular(L.T, Y, lower=False, check_finite=False)
            except np.linalg.LinAlgError:  # lam tiny relative to rounding in G: general solve
                A = self._gram.full()
                A[np.diag_indices_from(A)] += lam
                self._weights = np.linalg.solve(A, Q)
        return self._weights

    def _solve(self) -> Readout:
        W = self.weights()
        return Readout(tuple(self._table.classes), W[:-1].astype(np.float32), W[-1].astype(np.float32),
                       self.temperature_, projection=self.projection_)

    def _empty_readout(self) -> Readout:
        p = max(self._table.width - 1, 0)
        return Readout((), np.zeros((p, 0), np.float32), np.zeros(0, np.float32), self.temperature_,
                       projection=self.projection_)
