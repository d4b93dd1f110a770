"""When and how the learn loop exports: the schedule, the export thread, and adopting its outcome.

An export solves a frozen copy of the head on its own thread (ridge's GCV lambda takes seconds at
M = 2048), fits the temperature on a held-out memory sample, and hands the result to the
``Exporter`` (gates, registry, swap). The learner goes on learning meanwhile and adopts the
choices made on the copy once the export lands.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from learner.heads.stats import ExactHead
from learner.heldout import fit_heldout_temperature
from memory.compensation import Compensator
from service import metrics
from service.core.recent_rows import RecentRows
from service.core.state import LearnerState
from service.models.exporter import Exporter, ExportResult

log = logging.getLogger(__name__)

EXPORT_SHARE = 1 / 3  # of wall time, at most, spent on routine exports (caught up)
BACKLOG_EXPORT_SHARE = 1 / 20  # the same while the consumer works off a backlog
CALIBRATION_SAMPLE = 1024  # memory items the temperature is fitted on (bench/calibration.py)


@dataclass(frozen=True)
class ExportPolicy:
    """Plain settings of the export schedule."""

    every_events: int
    every_seconds: float
    gcv_every_seconds: float


@dataclass(frozen=True)
class ExportJob:
    """A frozen copy of the head and what the gates need, handed to the export thread."""

    head: ExactHead
    X: np.ndarray
    labels: list[str]
    offsets: dict[str, int]
    pending_since: float | None
    refit: bool
    compensation: Compensator | None = None  # frozen error memory for the served model
    calibration: tuple[np.ndarray, list[str]] | None = None  # memory sample to fit the temperature on


class ExportScheduler:
    """Decides when to export and runs one export at a time on its own thread.

    Used from the learner thread only: ``note_learned``/``note_forgotten`` mark the head changed,
    ``maybe_export`` starts an export when one is due and affordable, ``collect`` applies a finished
    one. ``exporter`` None (a learner that only snapshots) never exports. ``settle`` is called before
    the head is read or changed here (the learn loop's head updates may run on a worker thread).
    """

    def __init__(self, exporter: Exporter | None, policy: ExportPolicy,
                 settle: Callable[[], None] = lambda: None) -> None:
        self.exporter = exporter
        self.policy = policy
        self.settle = settle
        self.paused = False  # set by a rollback: keep serving it until an explicit export
        self.changed = False
        self.urgent = False  # a new class or a forget: export as soon as the budget allows
        self.pending_since: float | None = None  # when the oldest unexported change arrived
        self.since_export = 0
        self.cost = 0.0  # seconds the last export job took (solve, refit, gates, swap)
        self._last_export = self._last_gcv = time.monotonic()
        self._inflight: Future[tuple[ExportJob, ExportResult, float]] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="export")
        self._calibration_rng = np.random.default_rng(0)

    # -- what changed ------------------------------------------------------------------------
    def note_learned(self, n_events: int, *, changed: bool, new_class: bool, received_at: float) -> None:
        """Account a learned batch of ``n_events`` (``changed``: the head's statistics moved)."""
        self.since_export += n_events
        if changed:
            self.changed = True
            if self.pending_since is None:
                self.pending_since = received_at
        if new_class:
            self.urgent = True

    def note_forgotten(self) -> None:
        """The head lost events: export at once (a forget must reach the served model)."""
        self.changed = True
        self.urgent = True
        self.pending_since = self.pending_since or time.time()

    # -- scheduling --------------------------------------------------------------------------
    def maybe_export(self, state: LearnerState, recent: RecentRows, *, backlog: bool) -> None:
        """Collect a finished export; start the next one if due (and affordable, unless urgent)."""
        self.collect(state)
        if self.exporter is None or not self.changed or self._inflight is not None or self.paused:
            return
        since = time.monotonic() - self._last_export
        # A new class (or a forget) goes out at once: freshness is the promise.
        routine = self.since_export >= self.policy.every_events or since >= self.policy.every_seconds
        if self.urgent or (routine and routine_export_affordable(since, self.cost, backlog)):
            self.start(state, recent, backlog=backlog)

    def start(self, state: LearnerState, recent: RecentRows, *, backlog: bool = False) -> None:
        """Hand a frozen copy of the head to the export thread; learning goes on meanwhile.

        The copy costs one memcpy of the statistics; solving happens on it.
        """
        refit = refit_due(time.monotonic() - self._last_gcv, self.policy.gcv_every_seconds, backlog)
        if refit:
            self._last_gcv = time.monotonic()
        X, labels = recent.rows()
        self.settle()
        job = ExportJob(copy.deepcopy(state.head), X, labels, dict(state.offsets), self.pending_since, refit,
                        compensation=Compensator.freeze(state.errors) if state.errors is not None else None,
                        calibration=self._calibration_sample(state) if refit else None)
        self.pending_since = None
        self.changed = self.urgent = False
        self.since_export = 0
        self._last_export = time.monotonic()
        self._inflight = self._pool.submit(self._run, job)

    def _calibration_sample(self, state: LearnerState) -> tuple[np.ndarray, list[str]] | None:
        """A class-balanced memory sample to fit the temperature on, when it is "auto"; else None.

        Taken on the learner thread: the memory is mutated there, so it is read there.
        """
        memory = state.memory
        if memory is None or not len(memory) or state.head.temperature != "auto":
            return None
        X, labels, _ = memory.sample(CALIBRATION_SAMPLE, self._calibration_rng)
        return X, labels

    def _run(self, job: ExportJob) -> tuple[ExportJob, ExportResult, float]:
        assert self.exporter is not None
        start = time.perf_counter()
        # Ridge's lambda is chosen by GCV only on a refit (seconds at M = 2048, on schedule); until
        # the first one, exports use a provisional lambda rather than stall the first model on it.
        job.head.prepare_solve(refit=job.refit)
        if job.calibration is not None:  # after the lambda: leave-one-out scores depend on it
            temperature = fit_heldout_temperature(job.head, *job.calibration)
            if temperature is not None:
                job.head.set_temperature(temperature)
        result = self.exporter.export(job.head, probe=job.X[-64:], window=(job.X, job.labels),
                                      offsets=job.offsets, compensation=job.compensation)
        return job, result, time.perf_counter() - start

    def collect(self, state: LearnerState, *, wait: bool = False) -> int | None:
        """Apply a finished export's outcome to ``state``; return its version if it was applied."""
        future = self._inflight
        if future is None or not (wait or future.done()):
            return None
        self._inflight = None
        try:
            job, result, self.cost = future.result()
        except Exception:
            log.exception("export failed; the served model is unchanged")
            self.changed = True
            return None
        self.settle()
        state.head.adopt_choices(job.head)
        if not result.applied or result.version is None:
            return None
        state.model_version = result.version
        if job.pending_since is not None:
            metrics.LABEL_TO_SERVABLE_SECONDS.observe(max(time.time() - job.pending_since, 0.0))
        return int(result.version)

    def pause(self, state: LearnerState) -> None:
        """Stop automatic exports (after a rollback) once any export in flight has landed."""
        self.paused = True
        self.collect(state, wait=True)

    def export_now(self, state: LearnerState, recent: RecentRows) -> int | None:
        """Export the current head through the gates now and wait; return the applied version, if any."""
        if self.exporter is None:
            return None
        self.paused = False
        self.collect(state, wait=True)
        self.start(state, recent)
        return self.collect(state, wait=True)

    def close(self, state: LearnerState | None) -> None:
        """Land the export in flight (when ``state`` is given) and stop the thread; else cancel it."""
        if state is None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        self.collect(state, wait=True)
        self._pool.shutdown()


def routine_export_affordable(since: float, cost: float, backlog: bool) -> bool:
    """Whether a routine export may start ``since`` seconds after the last one began, which took ``cost``.

    Routine exports share the cores with the backbone and the learner: they take at most a third
    of the time, a twentieth while a backlog is worked off (the served model trails by the backlog
    anyway, and the cores are better spent closing it: an export's ~0.2-0.5 s of one core stalls
    both of ONNX Runtime's threads, so it cost the text backlog about twice its own CPU time).
    """
    return since * (BACKLOG_EXPORT_SHARE if backlog else EXPORT_SHARE) >= cost


def refit_due(age: float, period: float, backlog: bool) -> bool:
    """Whether to re-choose ridge's lambda (GCV) ``age`` seconds after the last choice.

    Every ``period`` seconds; the choice costs seconds at M = 2048 and drifts slowly, so it waits
    out a backlog for up to four periods.
    """
    return age > period and (not backlog or age > 4 * period)
