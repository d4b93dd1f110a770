"""Exact, additive sufficient statistics shared by the heads, and the head skeleton built on them.

``ClassTable`` keeps classes in first-seen order with per-class event counts and per-class sums
of a feature map (float64). ``SecondMoment`` keeps ``sum z z^T`` (float64) with a BLAS rank-k
update. ``ExactHead`` is the common skeleton: input checks, learn/forget bookkeeping, the cached
readout, temperature handling and the common part of ``state_dict``. A concrete head supplies
its feature map, its extra statistics and its solve.

Everything here is a sum over events, so learning in any chunking or order gives the same
statistics (up to float64 rounding), and forgetting subtracts exactly what learning added. When
the last event is forgotten the statistics are reset to exact zeros so no rounding residue stays.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.sparse
from scipy.linalg.blas import dsyrk

from learner.heads.base import Head, Readout, StateDict, check_features


def group_matrix(codes: np.ndarray, k: int) -> scipy.sparse.csc_array:
    """Sparse one-hot ``(k, n)`` matrix ``M[codes[i], i] = 1``: ``M @ rows`` sums rows per class.

    Built as the transpose of a CSR matrix with one entry per row, so construction needs no sort;
    the product costs O(n p) in one pass, with no per-row Python loop.
    """
    n = len(codes)
    onehot = scipy.sparse.csr_array((np.ones(n), codes, np.arange(n + 1)), shape=(n, k))
    return onehot.T


def check_labels(labels: Sequence[str], n: int) -> list[str]:
    """Return ``labels`` as a list of ``n`` strings; ``ValueError`` on a length or type mismatch."""
    out = list(labels)
    if len(out) != n:
        raise ValueError(f"got {len(out)} labels for {n} feature rows")
    for label in out:
        if not isinstance(label, str):
            raise ValueError(f"labels must be strings, got {type(label).__name__} {label!r}")
    return out


def check_temperature(value: float | str) -> float | str:
    """Validate a temperature hyperparameter: ``"auto"`` or a finite positive number."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise ValueError(f"temperature must be 'auto' or a positive finite number, got {value!r}")
    return float(value)


class ClassTable:
    """Classes in first-seen order, with per-class event counts and row sums of width ``width``."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.classes: list[str] = []
        self.index: dict[str, int] = {}
        self.counts = np.zeros(0, dtype=np.int64)
        self.sums = np.zeros((0, width), dtype=np.float64)

    def encode(self, labels: list[str], *, add_new: bool) -> np.ndarray:
        """Class index of every label. New labels are appended if ``add_new``, else ``ValueError``."""
        index = self.index
        new = [label for label in dict.fromkeys(labels) if label not in index]
        if new and not add_new:
            raise ValueError(f"cannot forget {len(new)} label(s) never learned (or fully forgotten), "
                             f"e.g. {new[0]!r}")
        for label in new:
            index[label] = len(self.classes)
            self.classes.append(label)
        if new:
            self.counts = np.r_[self.counts, np.zeros(len(new), dtype=np.int64)]
            self.sums = np.vstack([self.sums, np.zeros((len(new), self.width))])
        return np.fromiter((index[label] for label in labels), dtype=np.intp, count=len(labels))

    def add(self, codes: np.ndarray, rows: np.ndarray, sign: float) -> None:
        """Add (``sign=1``) or subtract (``sign=-1``) the rows' sums and counts per class."""
        grouped = group_matrix(codes, len(self.classes)) @ rows
        counts = np.bincount(codes, minlength=len(self.classes))
        if sign > 0:
            self.sums += grouped
            self.counts += counts
        else:
            self.sums -= grouped
            self.counts -= counts

    def check_removable(self, codes: np.ndarray) -> None:
        """``ValueError`` if forgetting events with these codes would make any count negative."""
        need = np.bincount(codes, minlength=len(self.classes))
        over = np.flatnonzero(need > self.counts)
        if len(over):
            c = over[0]
            raise ValueError(f"cannot forget {need[c]} events of class {self.classes[c]!r}: "
                             f"only {self.counts[c]} learned")

    def drop_empty(self) -> None:
        """Remove classes whose count reached zero (their sums go with them)."""
        keep = self.counts > 0
        if keep.all():
            return
        self.classes = [c for c, k in zip(self.classes, keep, strict=True) if k]
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.counts, self.sums = self.counts[keep], self.sums[keep]

    def sorted_order(self) -> np.ndarray:
        """Indices that put the classes in sorted label order."""
        return np.array(sorted(range(len(self.classes)), key=self.classes.__getitem__), dtype=np.intp)

    def load(self, classes: list[str], counts: np.ndarray, sums: np.ndarray) -> None:
        """Replace the contents (copies the arrays); ``ValueError`` on inconsistent shapes."""
        counts = np.array(counts, dtype=np.int64)
        sums = np.array(sums, dtype=np.float64)
        k = len(classes)
        if counts.shape != (k,) or sums.shape != (k, self.width):
            raise ValueError(f"state holds {k} classes but counts {counts.shape} and sums {sums.shape} "
                             f"(expected ({k},) and ({k}, {self.width}))")
        if len(set(classes)) != k or (counts <= 0).any():
            raise ValueError("state classes must be unique with positive counts")
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}
        self.counts, self.sums = counts, sums


def _cblas_dsyrk() -> Any:
    """The ``cblas_dsyrk`` of scipy's own OpenBLAS, through ctypes, which releases the GIL (None if not found).

    scipy's ``dsyrk`` wrapper holds the GIL for the whole update, the bulk of a ridge head's
    learning, so the learn loop's other thread stood still while the head learned (issue 19).
    The same routine in the same library (so ``blas_threads`` caps it too), called through
    ctypes, lets that thread run. Falls back to scipy's wrapper where the library is not found.
    """
    import ctypes
    from pathlib import Path

    import scipy

    for lib in sorted((Path(scipy.__file__).parent.parent / "scipy.libs").glob("libscipy_openblas*.so*")):
        try:
            fn = ctypes.CDLL(str(lib)).scipy_cblas_dsyrk
        except (OSError, AttributeError):
            continue
        fn.restype = None
        fn.argtypes = [ctypes.c_int] * 5 + [ctypes.c_double, ctypes.c_void_p, ctypes.c_int, ctypes.c_double,
                                            ctypes.c_void_p, ctypes.c_int]
        return fn
    return None


_DSYRK_NOGIL = _cblas_dsyrk()
_COL_MAJOR, _UPPER, _NO_TRANS = 102, 121, 111  # CBLAS enums


class SecondMoment:
    """``sum z z^T`` (float64, (p, p)) updated by a BLAS symmetric rank-k update.

    Only the upper triangle is accumulated (half the work of ``Z.T @ Z``); ``full()`` returns
    the symmetric matrix. Storage is Fortran-ordered so ``dsyrk`` updates it in place. The strict
    lower triangle of the storage is kept at zero (``dsyrk`` never touches it), which makes
    ``full()`` one transpose-add instead of two masked copies (~10x faster at p = 2048).
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._upper = np.zeros((width, width), dtype=np.float64, order="F")

    def add(self, Z: np.ndarray, sign: float) -> None:
        """Add ``sign * Z^T Z`` for a float64 ``Z`` of shape (n, p) (without the GIL where possible)."""
        Z = np.ascontiguousarray(Z, dtype=np.float64)
        n, p = Z.shape
        if _DSYRK_NOGIL is not None and n and self._upper.flags.f_contiguous and max(n, p) < 2**31:
            # Z C-ordered (n, p) is column-major (p, n): C += sign * Z^T Z is "NoTrans" on it.
            _DSYRK_NOGIL(_COL_MAJOR, _UPPER, _NO_TRANS, p, n, float(sign), Z.ctypes.data, p, 1.0,
                         self._upper.ctypes.data, p)
            return
        Zt = Z.T  # F-ordered (p, n) view: dsyrk reads it without a copy
        self._upper = dsyrk(float(sign), Zt, 1.0, self._upper, trans=0, lower=0, overwrite_c=1)

    def upper(self) -> np.ndarray:
        """A new Fortran-ordered (p, p) copy whose upper triangle holds the matrix (lower: zeros).

        Enough for LAPACK routines told to read the upper triangle (``cho_factor(lower=False)``,
        ``eigh(lower=False)``), and saves building the symmetric matrix.
        """
        return self._upper.copy(order="F")

    def full(self) -> np.ndarray:
        """The symmetric (p, p) matrix as a new C-ordered array."""
        out = np.add(self._upper, self._upper.T, order="C")
        diagonal = np.einsum("ii->i", out)  # a writable view of the diagonal, counted twice above
        diagonal *= 0.5
        return out

    def trace(self) -> float:
        """The sum of the diagonal."""
        return float(np.trace(self._upper))

    def load(self, matrix: np.ndarray) -> None:
        """Replace the contents with a symmetric (p, p) matrix (copied)."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (self.width, self.width):
            raise ValueError(f"second moment has shape {matrix.shape}, expected ({self.width}, {self.width})")
        self._upper = np.asfortranarray(np.triu(matrix))

    def reset(self) -> None:
        """Exact zeros."""
        self._upper = np.zeros((self.width, self.width), dtype=np.float64, order="F")


class ExactHead(Head):
    """Skeleton of an exact head: per-class sums of ``phi(x)`` plus head-specific statistics.

    Subclasses set ``kind`` and ``default_temperature`` and implement ``_width``, ``_start``,
    ``_features``, ``_accumulate_extra``, ``_reset_extra``, ``_solve``, ``hyperparameters`` and
    the ``_extra_*`` state hooks. Learned state ends in ``_``; ``classes_`` mirrors the table.
    """

    kind: ClassVar[str]
    default_temperature: ClassVar[float]
    # Hyperparameters whose change makes saved statistics meaningless (checked on load).
    _stat_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, temperature: float | str = "auto") -> None:
        self.temperature = check_temperature(temperature)
        self._clear()

    def _clear(self) -> None:
        """Forget all learned state (subclasses extend this for their own statistics)."""
        self.classes_: list[str] = []
        self.n_features_in_: int | None = None
        self.fitted_temperature_: float | None = None
        self._table = ClassTable(0)
        self._readout: Readout | None = None

    # -- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able: ``make_head(kind, **hyperparameters())`` rebuilds it."""

    @abstractmethod
    def _width(self, d: int) -> int:
        """Width of the per-class sums for input dimension ``d``."""

    def _start(self, d: int) -> None:
        """Allocate statistics for input dimension ``d`` (called once, on first data or load)."""
        self.n_features_in_ = d
        self._table = ClassTable(self._width(d))

    def _features(self, X: np.ndarray) -> np.ndarray:
        """The rows summed per class (float64, C-contiguous); default: ``X`` itself."""
        return np.ascontiguousarray(X)

    def _accumulate_extra(self, Z: np.ndarray, sign: float) -> None:
        """Update head-specific statistics with feature rows ``Z``."""

    def _reset_extra(self) -> None:
        """Set head-specific statistics to exact zeros (everything was forgotten)."""

    def _extra_state(self) -> StateDict:
        return {}

    def _load_extra(self, state: StateDict) -> None:
        pass

    def _extra_statistics(self) -> dict[str, np.ndarray]:
        return {}

    def _absorb_extra(self, other: ExactHead) -> None:
        """Add another same-kind head's head-specific statistics (for ``merge_states``)."""

    @abstractmethod
    def _solve(self) -> Readout:
        """Solve the head from its statistics (at least one class exists)."""

    # -- Head API ----------------------------------------------------------------------------
    @property
    def temperature_(self) -> float:
        """The temperature in use: a fixed one, the fitted one, or the head's default."""
        if isinstance(self.temperature, float):
            return self.temperature
        return self.fitted_temperature_ if self.fitted_temperature_ is not None else self.default_temperature

    def prepare_solve(self, *, refit: bool) -> None:
        """Make the data-dependent choices a solve needs (ridge: lambda); ``refit`` re-chooses them.

        A service calls this on a copy of the head before exporting it, then ``adopt_choices``
        on the original; heads with nothing to choose do nothing.
        """

    def adopt_choices(self, solved: ExactHead) -> None:
        """Keep the values ``solved`` (a copy of this head) chose from the data: a fitted temperature.

        Subclasses extend it with their own choices (ridge's lambda). The statistics are untouched.
        """
        fitted = solved.fitted_temperature_
        if fitted is not None and fitted != self.fitted_temperature_:
            self.set_temperature(fitted)

    def set_temperature(self, temperature: float) -> None:
        """Install a fitted temperature (see ``learner.calibration``).

        It takes effect only while the ``temperature`` hyperparameter is ``"auto"``: a configured
        number always wins. ``ValueError`` unless ``temperature`` is a positive finite number.
        """
        value = check_temperature(temperature)
        if not isinstance(value, float):
            raise ValueError(f"set_temperature needs a number, got {temperature!r}")
        self.fitted_temperature_ = value
        self._readout = None

    def learn_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Add the events' statistics; new labels become new classes (first-seen order)."""
        X64 = check_features(X, self.n_features_in_)
        names = check_labels(labels, len(X64))
        if not names:
            return
        if self.n_features_in_ is None:
            self._start(X64.shape[1])
        Z = self._features(X64)
        codes = self._table.encode(names, add_new=True)
        self._table.add(codes, Z, 1.0)
        self._accumulate_extra(Z, 1.0)
        self._changed()

    def forget_many(self, X: np.ndarray, labels: Sequence[str]) -> None:
        """Subtract exactly what ``learn_many(X, labels)`` added; emptied classes disappear.

        Raises ``ValueError`` (and changes nothing) for a label never learned or for more events
        of a class than were learned.
        """
        X64 = check_features(X, self.n_features_in_)
        names = check_labels(labels, len(X64))
        if not names:
            return
        codes = self._table.encode(names, add_new=False)
        self._table.check_removable(codes)
        Z = self._features(X64)
        self._table.add(codes, Z, -1.0)
        self._accumulate_extra(Z, -1.0)
        self._table.drop_empty()
        if not self._table.classes:  # nothing left: exact zeros, no rounding residue
            self._table.sums[:] = 0.0
            self._reset_extra()
        self._changed()

    def predict_proba_many(self, X: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``readout().predict_proba(X)`` and the classes; ``(n, 0)`` and ``[]`` with no classes."""
        X64 = check_features(X, self.n_features_in_)
        if not self.classes_:
            return np.zeros((len(X64), 0)), []
        readout = self.readout()
        return readout.predict_proba(X64), list(readout.classes)

    def readout(self) -> Readout:
        """The solved head (cached until the next learn, forget, load or temperature change)."""
        if self._readout is None:
            self._readout = self._solve() if self.classes_ else self._empty_readout()
        return self._readout

    def _empty_readout(self) -> Readout:
        p = self._table.width
        return Readout((), np.zeros((p, 0), np.float32), np.zeros(0, np.float32), self.temperature_)

    def counts(self) -> dict[str, int]:
        """Events currently learned per class, in ``classes_`` order."""
        return {c: int(n) for c, n in zip(self._table.classes, self._table.counts, strict=True)}

    def _changed(self) -> None:
        self.classes_ = list(self._table.classes)
        self._readout = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """Copies of the statistics, plus the head's identity and settings.

        Keys: ``kind``, ``hyperparameters`` (dict of constructor arguments), ``n_features`` (-1
        before any data), ``classes``, ``counts``, ``sums``, ``fitted_temperature`` (0.0 when
        none) and the head's own statistics.
        """
        state: StateDict = {
            "kind": self.kind,
            "hyperparameters": self.hyperparameters(),
            "n_features": -1 if self.n_features_in_ is None else self.n_features_in_,
            "classes": list(self._table.classes),
            "counts": self._table.counts.copy(),
            "sums": self._table.sums.copy(),
            "fitted_temperature": self.fitted_temperature_ or 0.0,
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: StateDict) -> None:
        """Restore statistics saved by a head of the same kind; this head keeps its own settings.

        Raises ``ValueError`` for another kind, or for hyperparameters that change what the
        statistics mean (e.g. ridge's ``expansion_width`` or ``seed``), or inconsistent shapes.
        """
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for head kind {state.get('kind')!r}, this head is {self.kind!r}")
        saved, mine = dict(state.get("hyperparameters", {})), self.hyperparameters()
        for name in self._stat_params:
            if saved.get(name) != mine[name]:
                raise ValueError(f"state has {name}={saved.get(name)!r}, this head has {name}={mine[name]!r}")
        d = int(state["n_features"])
        fitted = float(state.get("fitted_temperature", 0.0))
        self._clear()
        if d >= 0:
            self._start(d)
            self._table.load([str(c) for c in state["classes"]], state["counts"], state["sums"])
            self._load_extra(state)
        self.fitted_temperature_ = fitted if fitted > 0 else None
        self._changed()

    def statistics(self) -> dict[str, np.ndarray]:
        """Sufficient statistics with classes in sorted label order, for exact run comparison.

        Always holds ``classes`` (str array), ``counts`` (int64, (k,)) and ``sums`` (float64,
        (k, width)), plus the head's own statistics.
        """
        order = self._table.sorted_order()
        stats = {
            "classes": np.array([self._table.classes[i] for i in order], dtype=str),
            "counts": self._table.counts[order].copy(),
            "sums": self._table.sums[order].copy(),
        }
        stats.update(self._extra_statistics())
        return stats

    def absorb(self, other: ExactHead) -> None:
        """Add ``other``'s statistics (same kind and hyperparameters) to this head's, by class name.

        New classes are appended in ``other``'s order. Chosen/fitted values (ridge's lambda, the
        fitted temperature) are dropped since they no longer describe the data.
        """
        if other.kind != self.kind or other.hyperparameters() != self.hyperparameters():
            raise ValueError(f"cannot merge {other.kind} {other.hyperparameters()} into "
                             f"{self.kind} {self.hyperparameters()}")
        if other.n_features_in_ is None:
            return
        if self.n_features_in_ is None:
            self._start(other.n_features_in_)
        elif other.n_features_in_ != self.n_features_in_:
            raise ValueError(f"cannot merge a head with {other.n_features_in_} features into one with "
                             f"{self.n_features_in_}")
        codes = self._table.encode(list(other._table.classes), add_new=True)
        self._table.sums[codes] += other._table.sums
        self._table.counts[codes] += other._table.counts
        self._absorb_extra(other)
        self.fitted_temperature_ = None
        self._changed()
