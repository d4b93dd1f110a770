"""The learn loop: consume a batch, learn it, export on schedule, snapshot, commit offsets.

One thread owns the learner. Its cycle::

    poll -> learn_batch (bad events -> dead-letter topic) -> forget requests
         -> every N events / T seconds, if changed: export -> gates -> swap
         -> every N events / T seconds: flush dead letters -> capture the state (copies)
            -> write it durably (snapshot thread) -> commit its offsets (mirror)

Offsets move to Kafka only after a snapshot covers them; on start and on every partition
assignment the consumer seeks to the snapshot's offsets. A crash therefore replays exactly the
events after the last snapshot into the state of that snapshot: nothing is lost or counted twice.
Dead letters written after the last snapshot are written again on replay with the same key
(``topic:partition:offset``), so DLQ consumers can drop repeats by key (the DLQ is compacted).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from learner.heads.base import Head
from learner.heldout import fit_heldout_temperature
from memory.compensation import Compensator
from service import metrics
from service.batch import Embed, Predict, Record, learn_batch, report, texts_of, tp_key
from service.checkpoint import SnapshotStore
from service.embed_ahead import EmbedAhead
from service.errors import BackboneUnavailable, EddyError
from service.exporter import Exporter, ExportResult
from service.forget import Refetch, apply_forget, parse_control
from service.kafka import DeadLetterWriter, subscribe
from service.state import LearnerState
from service.window import RecentRows

log = logging.getLogger(__name__)

EXPORT_SHARE = 1 / 3  # of wall time, at most, spent on routine exports (caught up)
BACKLOG_EXPORT_SHARE = 1 / 20  # the same while the consumer works off a backlog
# A poll returns all that kafka-python has buffered (bounded by max_partition_fetch_bytes per
# partition); LearnLoop.step says why.
POLL_ALL = 1 << 30
CALIBRATION_SAMPLE = 1024  # memory items the temperature is fitted on (bench/calibration.py)


@dataclass(frozen=True)
class LoopOptions:
    """Plain settings of the learn loop."""

    topic: str
    control_topic: str
    dim: int
    max_event_bytes: int
    batch_max_events: int
    poll_timeout_ms: int
    export_every_events: int
    export_every_seconds: float
    snapshot_every_events: int
    snapshot_every_seconds: float
    log_every_seconds: float
    holdout_size: int
    gcv_every_seconds: float
    head_label: str
    retry_backoff_max_s: float = 5.0


class LearnLoop:
    """Owns the consumer and the learner state; ``run`` until ``stop`` is set."""

    def __init__(self, *, consumer: KafkaConsumer, dlq: DeadLetterWriter, state: LearnerState,
                 store: SnapshotStore, exporter: Exporter | None, embed: Embed | None,
                 refetch: Refetch, options: LoopOptions, predict: Predict | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.consumer = consumer
        self.dlq = dlq
        self.state = state
        self.store = store
        self.exporter = exporter
        self.embed = embed  # forget's re-embedding calls it directly
        self._embed_ahead = EmbedAhead(embed, options.dim) if embed is not None else None
        self.refetch = refetch
        self.opt = options
        self.predict = predict
        self.on_batch = on_batch
        self.recent = RecentRows(options.holdout_size, options.dim)
        self._since_export = 0
        self._since_snapshot = 0
        self._changed = False
        self._pending_since: float | None = None
        self._last_export = self._last_snapshot = self._last_gcv = time.monotonic()
        self._log_timer = Interval(options.log_every_seconds)
        self._exporting: Future[tuple[_ExportJob, ExportResult, float]] | None = None
        self._export_cost = 0.0  # seconds the last export job took (solve, refit, gates, swap)
        self._backlog = False  # more is waiting than one batch holds
        self._buffered: deque[Record] = deque()  # polled, not yet learned (learned before the next poll)
        self._urgent = False
        self._outage_backoff = 0.0
        self._revoked = False  # set on kafka-python's IO thread; the snapshot runs on ours
        self._last_outage_log = 0.0
        self.exports_paused = False  # set by a rollback: keep serving it until an explicit export
        self._export_pool = ThreadPoolExecutor(1, thread_name_prefix="export")
        # Snapshots are captured here (copies) and written there: the learner does not wait on
        # serialising, hashing and fsyncing ~100 MB (M = 2048 plus the replay memory).
        self._snapshot_pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self._snapshotting: Future[None] | None = None
        self._snapshot_offsets: dict[str, int] | None = None  # to mirror to Kafka once durable
        self._calibration_rng = np.random.default_rng(0)
        self._log_counts = {"learned": 0, "dead_letter": 0, "duplicate": 0}
        self.correct = self.predicted = 0
        self.alive = threading.Event()
        self._tasks: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the learner thread between batches (admin RPCs); returns its future."""
        future: Future[Any] = Future()
        self._tasks.put((fn, future))
        return future

    def _run_tasks(self) -> None:
        while not self._tasks.empty():
            fn, future = self._tasks.get_nowait()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then snapshot and return."""
        subscribe(self.consumer, [self.opt.topic, self.opt.control_topic], listener=_Rebalance(self))
        try:
            while not stop.is_set():
                try:
                    self.step()
                except BackboneUnavailable:
                    if not stop.is_set():
                        raise
                    # Stopping before the backbone loaded: the batch changed nothing, the next
                    # process learns it from the snapshot's offsets.
                    log.info("stopping before the backbone loaded; unlearned events are replayed on restart")
        except BaseException:
            # No snapshot of a half-applied batch: a restart replays from the last good snapshot.
            self._export_pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            if self._embed_ahead is not None:  # no thread left inside the encoder at exit
                self._embed_ahead.close()
        self._collect_export(wait=True)
        self._export_pool.shutdown()
        self.snapshot("shutdown")
        self._snapshot_pool.shutdown()

    def step(self) -> None:
        """One poll-learn-maybe-export-maybe-snapshot cycle.

        A poll takes every record kafka-python has buffered, and each step learns at most
        ``batch_max_events`` of them; the next poll waits until they are all learned. Why: with
        records left in its buffer, kafka-python 3.0.12 sends the next fetch for the other
        partitions alone (the control topic's, which is empty), and the broker holds that
        request for ``fetch.max.wait.ms`` (500 ms) before the events partition can be fetched
        again. Leaving half of each fetch buffered made the daemon 3-10x slower than a bare
        consumer (bench/throughput.py).
        """
        self.alive.set()
        if not self._buffered and not self._poll():
            return
        events = [self._buffered.popleft() for _ in range(min(self.opt.batch_max_events, len(self._buffered)))]
        if self._embed_ahead is not None and self._buffered:
            upcoming = list(islice(self._buffered, self.opt.batch_max_events))
            self._embed_ahead.queue_next(texts_of(upcoming, dim=self.opt.dim, max_event_bytes=self.opt.max_event_bytes))
        if events:
            self._learn(events)
        # Behind by more than a batch: in our buffer, or on the broker (the last fetch's high
        # watermark). A poll's size alone misses it when a fetch holds less than a batch.
        self._backlog = bool(self._buffered) or self._update_lag() >= self.opt.batch_max_events
        self._run_tasks()
        self._maybe_export()
        self._collect_snapshot()
        self._maybe_snapshot()
        self._maybe_log()

    def _poll(self) -> bool:
        """Poll everything kafka-python has buffered: events into ``_buffered``, control records applied.

        Returns False when the broker could not be reached (already reported and backed off).
        """
        try:
            polled = self.consumer.poll(timeout_ms=self.opt.poll_timeout_ms, max_records=POLL_ALL)
        except KafkaError as exc:
            self._broker_trouble(exc)
            return False
        self._outage_backoff = 0.0
        if self._revoked:
            self._revoked = False
            self.snapshot("revoke", commit=False)
        now = time.time()
        for tp, msgs in polled.items():
            for m in msgs:
                rec = Record(tp.topic, tp.partition, m.offset, m.value, tuple(m.headers or ()), now)
                if tp.topic == self.opt.control_topic:
                    self._control(rec)
                else:
                    self._buffered.append(rec)
        return True

    def _broker_trouble(self, exc: Exception) -> None:
        """The broker is unreachable: report it, keep serving and answering admin calls, back off."""
        metrics.BROKER_UP.set(0)
        now = time.monotonic()
        if now - self._last_outage_log > self.opt.log_every_seconds:
            self._last_outage_log = now
            log.warning("Kafka unreachable (%s); predictions go on, retrying with backoff", exc)
        self._run_tasks()
        self._outage_backoff = min(max(2 * self._outage_backoff, 0.1), self.opt.retry_backoff_max_s)
        time.sleep(self._outage_backoff)

    # -- learning ----------------------------------------------------------------------------
    def _learn(self, records: list[Record]) -> None:
        start = time.perf_counter()
        out = learn_batch(self.state, records, embed=self._embed_ahead, dim=self.opt.dim,
                          max_event_bytes=self.opt.max_event_bytes, predict=self.predict)
        report(out, self.dlq, time.perf_counter() - start)
        self.correct += out.correct
        self.predicted += out.predicted
        if out.X is not None and out.learned:
            self.recent.extend(out.X, out.labels)
            self._changed = True
            if self._pending_since is None:
                self._pending_since = records[0].received_at
        if out.new_classes:
            self._urgent = True  # a new class is exported as soon as the export budget allows
            metrics.CLASSES.set(len(self.state.head.classes_))
        self._since_export += len(records)
        self._since_snapshot += len(records)
        for key, n in (("learned", out.learned), ("dead_letter", len(out.dead_letters)),
                       ("duplicate", out.duplicates)):
            self._log_counts[key] += n
        if self.on_batch is not None:
            self.on_batch(out.learned)

    def _control(self, rec: Record) -> None:
        key = tp_key(rec.topic, rec.partition)
        if rec.offset < self.state.offsets.get(key, 0):
            return
        self.state.offsets[key] = rec.offset + 1
        request = parse_control(rec.value)
        if isinstance(request, str):
            log.warning("control message at %s offset %d ignored: %s", key, rec.offset, request)
            self.dlq.send(rec.value, reason="bad_control", detail=request, topic=rec.topic,
                          partition=rec.partition, offset=rec.offset, headers=list(rec.headers))
            return
        try:
            self.forget(request)
        except BackboneUnavailable:
            self.state.offsets[key] = rec.offset  # not applied: whoever runs next applies it
            raise
        except (ValueError, EddyError, KafkaError) as exc:
            # Re-reading and embedding happen before any state changes, so the state is intact.
            log.error("forget request at %s offset %d failed: %s", key, rec.offset, exc)
            metrics.DEAD_LETTERS.labels(reason="forget_failed").inc()
            self.dlq.send(rec.value, reason="forget_failed", detail=str(exc)[:500], topic=rec.topic,
                          partition=rec.partition, offset=rec.offset, headers=list(rec.headers))

    def forget(self, request: Any) -> dict[str, Any]:
        """Apply a forget request now (also used by the admin RPC) and export the result."""
        result = apply_forget(self.state, request, refetch=self.refetch, embed=self.embed,
                              dim=self.opt.dim, max_event_bytes=self.opt.max_event_bytes)
        metrics.EVENTS.labels(result="forgotten").inc(result.forgotten)
        metrics.FORGET_UNKNOWN_IDS.inc(result.unknown)
        self._since_snapshot += 1
        if result.forgotten:
            metrics.CLASSES.set(len(self.state.head.classes_))
            self._changed = True
            self._urgent = True
            self._pending_since = self._pending_since or time.time()
        return vars(result)

    # -- export ------------------------------------------------------------------------------
    def _maybe_export(self) -> None:
        self._collect_export()
        if self.exporter is None or not self._changed or self._exporting is not None or self.exports_paused:
            return
        since = time.monotonic() - self._last_export
        # A new class (or a forget) goes out at once: freshness is the promise.
        routine = self._since_export >= self.opt.export_every_events or since >= self.opt.export_every_seconds
        if self._urgent or (routine and routine_export_affordable(since, self._export_cost, self._backlog)):
            self._start_export()

    def _start_export(self) -> None:
        """Hand a frozen copy of the head to the export thread; learning goes on meanwhile.

        Solving (and re-choosing ridge's lambda by GCV, seconds at M = 2048) happens on the copy, so
        the learner never stalls on it; the copy costs one memcpy of the statistics.
        """
        refit = refit_due(time.monotonic() - self._last_gcv, self.opt.gcv_every_seconds, self._backlog)
        if refit:
            self._last_gcv = time.monotonic()
        X, labels = self.recent.rows()
        errors = self.state.errors
        job = _ExportJob(copy.deepcopy(self.state.head), X, labels, dict(self.state.offsets),
                         self._pending_since, refit,
                         compensation=Compensator.freeze(errors) if errors is not None else None,
                         calibration=self._calibration_sample() if refit else None)
        self._pending_since = None
        self._changed = False
        self._urgent = False
        self._since_export = 0
        self._last_export = time.monotonic()
        self._exporting = self._export_pool.submit(self._export, job)

    def _calibration_sample(self) -> tuple[np.ndarray, list[str]] | None:
        """A class-balanced memory sample to fit the temperature on, when it is "auto"; else None.

        Taken on the learner thread: the memory is mutated here, so it is read here.
        """
        memory = self.state.memory
        if memory is None or not len(memory) or getattr(self.state.head, "temperature", None) != "auto":
            return None
        X, labels, _ = memory.sample(CALIBRATION_SAMPLE, self._calibration_rng)
        return X, labels

    def _export(self, job: _ExportJob) -> tuple[_ExportJob, ExportResult, float]:
        assert self.exporter is not None
        start = time.perf_counter()
        # Ridge's lambda is chosen by GCV only on a refit (seconds at M = 2048, on schedule); until
        # the first one, exports use a provisional lambda rather than stall the first model on it.
        choose = getattr(job.head, "choose_lambda" if job.refit else "provisional_lambda", None)
        if callable(choose):
            choose()
        if job.calibration is not None:  # after choose_lambda: leave-one-out scores depend on it
            temperature = fit_heldout_temperature(job.head, *job.calibration)
            if temperature is not None:
                job.head.set_temperature(temperature)  # type: ignore[attr-defined]
        result = self.exporter.export(job.head, probe=job.X[-64:], window=(job.X, job.labels),
                                      offsets=job.offsets, compensation=job.compensation)
        return job, result, time.perf_counter() - start

    def _collect_export(self, wait: bool = False) -> int | None:
        """Apply a finished export's outcome on the learner thread; return its version if applied."""
        future = self._exporting
        if future is None or not (wait or future.done()):
            return None
        self._exporting = None
        try:
            job, result, self._export_cost = future.result()
        except Exception:
            log.exception("export failed; the served model is unchanged")
            self._changed = True
            return None
        _adopt_solver_choices(self.state.head, job.head)
        if not result.applied or result.version is None:
            return None
        self.state.model_version = result.version
        if job.pending_since is not None:
            metrics.LABEL_TO_SERVABLE_SECONDS.observe(max(time.time() - job.pending_since, 0.0))
        return int(result.version)

    def pause_exports(self) -> None:
        """Stop automatic exports (after a rollback) once any export in flight has landed."""
        self.exports_paused = True
        self._collect_export(wait=True)

    def export_now(self) -> int | None:
        """Export the current head through the gates now and wait; return the applied version, if any."""
        if self.exporter is None:
            return None
        self.exports_paused = False
        self._collect_export(wait=True)
        self._start_export()
        return self._collect_export(wait=True)

    # -- snapshots ---------------------------------------------------------------------------
    def _maybe_snapshot(self) -> None:
        if self._since_snapshot == 0:
            return
        due = time.monotonic() - self._last_snapshot >= self.opt.snapshot_every_seconds
        # The event count bounds the work a crash replays. While a backlog is worked off the
        # clock bounds it as well, and a feature stream reached 5,000 events every ~2 s: each
        # ~100 MB snapshot (M = 2048 plus the memory) then took a third of a core from learning.
        if due or (self._since_snapshot >= self.opt.snapshot_every_events and not self._backlog):
            self.snapshot("periodic", wait=False)

    def snapshot(self, why: str, *, commit: bool = True, wait: bool = True) -> None:
        """Flush dead letters, capture the state now, write it (in the background unless ``wait``).

        Once it is durable, and unless told not to, its offsets are mirrored to Kafka. One snapshot
        at a time, in order: a new one first waits for the one in flight. A failed write raises on
        this thread (here or at the next collection), as a crash.
        """
        self._collect_snapshot(wait=True)
        start = time.perf_counter()
        self.dlq.flush()
        state = self.state.state_dict()  # copies: learning goes on while they are written
        self._last_snapshot, self._since_snapshot = time.monotonic(), 0
        self._snapshot_offsets = dict(self.state.offsets) if commit else None
        self._snapshotting = self._snapshot_pool.submit(self._write_snapshot, state, start, why)
        if wait:
            self._collect_snapshot(wait=True)

    def _write_snapshot(self, state: dict[str, Any], start: float, why: str) -> None:
        self.store.write(state)
        seconds = time.perf_counter() - start
        metrics.SNAPSHOT_SECONDS.observe(seconds)
        metrics.LAST_SNAPSHOT_TIMESTAMP.set(time.time())
        log.debug("snapshot (%s) in %.3f s", why, seconds)

    def _collect_snapshot(self, wait: bool = False) -> None:
        """Once the snapshot in flight is durable, mirror the offsets it covers."""
        future = self._snapshotting
        if future is None or not (wait or future.done()):
            return
        self._snapshotting = None
        future.result()
        if self._snapshot_offsets is not None:
            self._commit_mirror(self._snapshot_offsets)

    def _commit_mirror(self, covered: dict[str, int]) -> None:
        offsets = {}
        for tp in self.consumer.assignment():
            nxt = covered.get(tp_key(tp.topic, tp.partition))
            if nxt is not None:
                offsets[tp] = OffsetAndMetadata(nxt, "", -1)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except Exception as exc:  # the mirror is best effort: the snapshot is the source of truth
            log.warning("offset commit to Kafka failed (snapshot is safe): %s", exc)

    def seek_to_state(self, partitions: list[TopicPartition]) -> None:
        """Position assigned partitions at the offsets the state covers (or the beginning)."""
        fresh = []
        for tp in partitions:
            nxt = self.state.offsets.get(tp_key(tp.topic, tp.partition))
            if nxt is None:
                fresh.append(tp)
            else:
                self.consumer.seek(tp, nxt)
        if fresh:
            self.consumer.seek_to_beginning(*fresh)

    # -- observability -----------------------------------------------------------------------
    def _maybe_log(self) -> None:
        dt = self._log_timer.elapsed_if_due()
        if dt is None:
            return
        lag = self._update_lag()
        metrics.BROKER_UP.set(1 if broker_up(self.consumer) else 0)
        if self.predicted:
            metrics.PREQUENTIAL_ACCURACY.labels(head=self.opt.head_label).set(self.correct / self.predicted)
        metrics.CLASSES.set(len(self.state.head.classes_))
        if self.state.memory is not None:
            metrics.MEMORY_ITEMS.set(len(self.state.memory))
            metrics.MEMORY_BYTES.set(self.state.memory.nbytes)
        c = self._log_counts
        acc = f"{self.correct / self.predicted:.3f}" if self.predicted else "-"
        log.info("learned %.0f/s  dead-letter %.1f/s  duplicates %d  lag %d  classes %d  model v%d  acc %s",
                 c["learned"] / dt, c["dead_letter"] / dt, c["duplicate"], lag,
                 len(self.state.head.classes_), self.state.model_version, acc)
        self._log_counts = dict.fromkeys(c, 0)
        self.correct = self.predicted = 0

    def _update_lag(self) -> int:
        total = 0
        for tp in self.consumer.assignment():
            if tp.topic != self.opt.topic:
                continue
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            lag = max(high - self.state.offsets.get(tp_key(tp.topic, tp.partition), 0), 0)
            metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(lag)
            total += lag
        return total


class Interval:
    """A periodic duty on the monotonic clock (the progress log line, in both learn loops)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = time.monotonic()

    def elapsed_if_due(self) -> float | None:
        """Seconds since the last time it was due, if at least ``seconds`` (restarting the interval); else None."""
        now = time.monotonic()
        elapsed = now - self._last
        if elapsed < self.seconds:
            return None
        self._last = now
        return elapsed


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


@dataclass(frozen=True)
class _ExportJob:
    """A frozen copy of the head and what the gates need, handed to the export thread."""

    head: Head
    X: np.ndarray
    labels: list[str]
    offsets: dict[str, int]
    pending_since: float | None
    refit: bool
    compensation: Compensator | None = None  # frozen error memory for the served model
    calibration: tuple[np.ndarray, list[str]] | None = None  # memory sample to fit the temperature on


def _adopt_solver_choices(head: Head, solved: Head) -> None:
    """Keep choices made while solving the copy (ridge's GCV lambda, a fitted temperature) for the next solves."""
    chosen = getattr(solved, "lam_", None)
    if chosen is not None and hasattr(head, "lam_"):
        head.lam_ = chosen
    fitted = getattr(solved, "fitted_temperature_", None)
    if fitted is not None and fitted != getattr(head, "fitted_temperature_", None):
        head.set_temperature(fitted)  # type: ignore[attr-defined]


class _Rebalance(ConsumerRebalanceListener):
    """Snapshot before partitions leave; seek to the snapshot's offsets when they arrive."""

    def __init__(self, loop: LearnLoop) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # kafka-python 3 calls this on its IO thread, where blocking work stalls heartbeats; the learner
        # thread snapshots as soon as poll returns. Only this process reads its snapshots, so the
        # partitions moving meanwhile cannot make anyone resume from a stale state.
        if revoked:
            self.loop._revoked = True

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.loop.seek_to_state(list(assigned))


def broker_up(consumer: KafkaConsumer) -> bool:
    """Whether the consumer holds a live connection to any broker (kafka-python 3 keeps them private)."""
    try:
        return bool(consumer._manager.least_used_connections())
    except Exception:
        return False
