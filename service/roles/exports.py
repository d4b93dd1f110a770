"""When and how the learn loop exports: the schedule, the export thread, and adopting its outcome.

An export solves a frozen copy of the head on its own thread (ridge's GCV lambda takes seconds at
M = 2048), fits the temperature on a held-out memory sample, chooses the unknown threshold on the
same sample (``learner.unknown``), and hands the result to the ``Exporter`` (gates, registry,
swap). The learner goes on learning meanwhile and adopts the
choices made on the copy once the export lands.

A forget must reach the served model: while ``state.counters.forgets_unexported`` is positive (it
survives restarts in the snapshot), an export is urgent and carries ``forget=True``, which skips
the accuracy comparison (the served model still knows what was forgotten, so it would win it) but
not the parity gate, and erases the registry versions that still know the forgotten events. A
failed export (an error, e.g. a registry that cannot be written) is logged, counted
(``eddy_export_failures_total``), shown in ``/readyz`` and retried with backoff.
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
from learner.unknown import conformal_threshold, heldout_msp
from memory.compensation import Compensator
from service import metrics
from service.core.recent_rows import RecentRows
from service.core.state import LearnerState
from service.models.exporter import Exporter, ExportResult, UnknownThreshold
from service.roles.snapshots import RetryBackoff

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
    reject_rate: float | None = None  # serving.unknown.reject_rate; None: no unknown threshold


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
    calibration: tuple[np.ndarray, list[str]] | None = None  # memory sample: temperature, unknown threshold
    fit_temperature: bool = False  # fit the temperature on ``calibration`` (else only the threshold)
    forgets: int = 0  # forget requests this export carries to the served model (0: a routine export)


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
        self._retry = RetryBackoff(max_seconds=30.0)
        self.last_reason = ""  # why the last export was not applied ("" when it was)
        # The unknown threshold is chosen with the temperature (on a refit) and whenever classes
        # change; exports in between carry it (the leave-one-out scores cost a Cholesky of the
        # M x M Gram matrix, ~0.1-0.2 s at M = 2048: too much for every export).
        self.unknown: UnknownThreshold | None = None

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
        if state.counters.forgets_unexported > 0:  # also after a restart that found one not yet exported
            if self.paused:  # erasure outranks a rollback's pause: the rolled-back model knows the data
                log.warning("a forget ends the rollback pause: exporting a model without the forgotten events")
                self.paused = False
            self.changed = self.urgent = True
        if self.exporter is None or not self.changed or self._inflight is not None or self.paused:
            return
        if self._retry.failures and not self._retry.due():
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
        fit_temperature = refit and state.head.temperature == "auto"
        threshold_due = self.policy.reject_rate is not None and (
            refit or self.urgent or self.unknown is None or self.unknown.threshold is None
            or self.unknown.classes != len(state.head.classes_))
        calibration = None
        if fit_temperature or threshold_due:
            calibration = self._calibration_sample(state) or ((X, labels) if len(labels) else None)
        job = ExportJob(copy.deepcopy(state.head), X, labels, dict(state.offsets), self.pending_since, refit,
                        compensation=Compensator.freeze(state.errors) if state.errors is not None else None,
                        calibration=calibration, fit_temperature=fit_temperature,
                        forgets=state.counters.forgets_unexported)
        self.pending_since = None
        self.changed = self.urgent = False
        self.since_export = 0
        self._last_export = time.monotonic()
        self._inflight = self._pool.submit(self._run, job)

    def _calibration_sample(self, state: LearnerState) -> tuple[np.ndarray, list[str]] | None:
        """A class-balanced memory sample (learned events, scored leave-one-out); None without memory.

        Taken on the learner thread: the memory is mutated there, so it is read there.
        """
        memory = state.memory
        if memory is None or not len(memory):
            return None
        X, labels, _ = memory.sample(CALIBRATION_SAMPLE, self._calibration_rng)
        return X, labels

    def _run(self, job: ExportJob) -> tuple[ExportJob, ExportResult, float]:
        assert self.exporter is not None
        start = time.perf_counter()
        # Ridge's lambda is chosen by GCV only on a refit (seconds at M = 2048, on schedule); until
        # the first one, exports use a provisional lambda rather than stall the first model on it.
        job.head.prepare_solve(refit=job.refit)
        if job.calibration is not None and job.fit_temperature:  # after the lambda: LOO scores depend on it
            temperature = fit_heldout_temperature(job.head, *job.calibration)
            if temperature is not None:
                job.head.set_temperature(temperature)
        if job.calibration is not None and self.policy.reject_rate is not None:  # after the temperature
            self.unknown = unknown_threshold(job.head, *job.calibration, self.policy.reject_rate)
        result = self.exporter.export(job.head, probe=job.X[-64:], window=(job.X, job.labels),
                                      offsets=job.offsets, compensation=job.compensation, forget=job.forgets > 0,
                                      unknown=self.unknown)
        return job, result, time.perf_counter() - start

    def collect(self, state: LearnerState, *, wait: bool = False) -> int | None:
        """Apply a finished export's outcome to ``state``; return its version if it was applied."""
        future = self._inflight
        if future is None or not (wait or future.done()):
            return None
        self._inflight = None
        try:
            job, result, self.cost = future.result()
        except Exception as exc:
            self._failed(exc)
            return None
        self.settle()
        if self._retry.failures:
            log.warning("export works again after %d failures", self._retry.failures)
            self._retry.reset()
            metrics.set_fault("export", None)
        state.head.adopt_choices(job.head)
        self.last_reason = result.reason
        if job.forgets and result.version is not None:  # published; older versions erased
            state.counters.forgets_unexported = max(state.counters.forgets_unexported - job.forgets, 0)
        elif job.forgets:  # e.g. parity failed: the forget has not reached the served model yet
            self.changed = self.urgent = True
            log.error("a forget could not reach the served model (%s); retrying", result.reason)
            self._retry.failed()
        if not result.applied or result.version is None:
            return None
        state.model_version = result.version
        if job.pending_since is not None:
            metrics.LABEL_TO_SERVABLE_SECONDS.observe(max(time.time() - job.pending_since, 0.0))
        return int(result.version)

    def _failed(self, exc: Exception) -> None:
        delay = self._retry.failed()
        self.changed = True
        self.last_reason = f"export failed: {exc}"
        metrics.EXPORT_FAILURES.inc()
        metrics.set_fault("export", f"{self.last_reason}; the served model is unchanged, retry in {delay:.1f} s")
        log.error("export failed (%d in a row), the served model is unchanged; retry in %.1f s",
                  self._retry.failures, delay, exc_info=exc)

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


def unknown_threshold(head: ExactHead, X: np.ndarray, labels: list[str], reject_rate: float) -> UnknownThreshold:
    """The conformal unknown threshold of ``head`` on learned rows scored leave-one-out (``learner.unknown``)."""
    scores = heldout_msp(head, X, labels)
    threshold = conformal_threshold(scores, reject_rate) if len(scores) else None
    rejected = float(np.mean(scores < threshold)) if threshold is not None else 0.0
    return UnknownThreshold(threshold, reject_rate, len(scores), rejected, len(head.classes_))


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
