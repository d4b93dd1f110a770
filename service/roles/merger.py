"""The merger (``eddy serve --role merge``): one model from the partition states of all replicas.

It reads the deltas topic (``service.kafka.deltas``) from the beginning, without a consumer group, and
keeps for each source partition the record with the highest ``(next_offset, seq)``. Whenever the
kept set changed (at most every ``export.every_seconds``) it sums the kept head states with
``learner.heads.merge_states``, solves, and exports through the ordinary ``Exporter`` (parity and
quality gates, registry publish); serving replicas follow the registry. The merged model is
exactly the single-process model over the same events: every partition contributes exactly one
cumulative state, so no event is applied twice or skipped, and a stale record (from a zombie
replica) never replaces a newer one.

The merged state is also written as a snapshot in ``checkpoint.dir`` (at most every
``checkpoint.every_seconds``, and on shutdown) in the format ``eddy state`` reads, so
``eddy state --checkpoint <dir> --export-stats stats.npz`` shows the merged counts and statistics.
A restarted merger rebuilds everything from the topic; it keeps no other state.

Forget requests are applied by the replicas, per partition (``service.roles.control``); a state
that lost events or a whole label is published at once and merged like any newer state, so the
next model drops them (a label forgotten everywhere disappears from the merged classes). The
quality gate's window leaves out rows of classes the merged head no longer has, and an export that
carries newly forgotten events skips the quality gate (a forget must be served; parity still
applies). Ids no partition
knew are counted once, here (``service.roles.forget_view``), once every partition applied the
same requests.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import KafkaConsumer

from learner.heads import make_head, merge_states
from service import metrics
from service.core.snapshots import SnapshotStore, unpack
from service.errors import CheckpointError
from service.kafka.clients import broker_reachable
from service.kafka.deltas import DeltaBook, DeltaRecord, assign_all, parse_record
from service.models.exporter import Exporter
from service.roles.exports import unknown_threshold
from service.roles.forget_view import settled_control, settled_unknown

log = logging.getLogger(__name__)
audit = logging.getLogger("eddy.audit")

_COUNTERS = ("learned", "duplicates", "dead_lettered", "forgotten", "forget_unknown")


@dataclass(frozen=True)
class MergeOptions:
    """Plain settings of the merger."""

    source_topic: str
    deltas_topic: str
    head_kind: str
    head_hyperparameters: dict[str, Any]
    backbone_identity: str
    export_every_seconds: float
    snapshot_every_seconds: float
    holdout_size: int
    poll_timeout_ms: int
    log_every_seconds: float
    control_topic: str = ""
    reject_rate: float | None = None  # serving.unknown.reject_rate: threshold on the recent rows, leave-one-out


class Merger:
    """Keeps the newest state of every source partition; merges and exports on change."""

    def __init__(self, *, consumer: KafkaConsumer, exporter: Exporter | None, store: SnapshotStore,
                 options: MergeOptions) -> None:
        self.consumer = consumer
        self.exporter = exporter
        self.store = store
        self.opt = options
        self.book = DeltaBook()
        self.states: dict[int, dict[str, Any]] = {}  # source partition -> unpacked record
        self.model_version = 0
        self.merges = 0
        self._dirty = self._unsnapshotted = False
        self._learned_reported = self._forgotten_reported = 0
        self._forgotten_served: int | None = None  # forgotten events behind the last applied export
        self.forget_unknown = 0  # settled count of ids no partition knew (forget_view)
        self.source_partitions = 0  # of the source topic, from the broker's metadata (0: unknown)
        self._settled_control: dict[str, int] = {}  # control offsets every partition has applied
        self._export_cost = 0.0
        self._last_export = self._last_snapshot = self._last_log = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Follow the deltas topic until ``stop`` is set; merge, export and snapshot once more at the end."""
        assign_all(self.consumer, self.opt.deltas_topic)
        self._refresh_partitions()
        try:
            while not stop.is_set():
                self.step()
        finally:
            if self._dirty:
                self.merge_now()
            if self._unsnapshotted:
                self.snapshot()

    def step(self) -> None:
        """Read what arrived, then maybe merge, snapshot and log."""
        for msgs in self.consumer.poll(timeout_ms=self.opt.poll_timeout_ms).values():
            for m in msgs:
                record = parse_record(m.key, m.value, m.headers)
                if record is not None:
                    self.offer(record)
        now = time.monotonic()
        interval = max(self.opt.export_every_seconds, 2 * self._export_cost)
        if self._dirty and now - self._last_export >= interval:
            self.merge_now()
        if self._unsnapshotted and now - self._last_snapshot >= self.opt.snapshot_every_seconds:
            self.snapshot()
        if now - self._last_log >= self.opt.log_every_seconds:
            self._log()

    # -- keeping the newest state per partition --------------------------------------------------
    def offer(self, record: DeltaRecord) -> bool:
        """Keep ``record`` if it is a valid, newer state of a partition of the source topic."""
        prefix = self.opt.source_topic + ":"
        if not record.key.startswith(prefix):
            return False
        kept = self.book.best.get(record.key)
        if kept is not None and record.rank <= kept.rank:
            return False  # older or equal: a replay, or a zombie replica's stale state
        try:
            payload = unpack(record.value)
        except (CheckpointError, ValueError, KeyError) as exc:
            log.error("ignoring corrupt state record %s@%d: %s", record.key, record.next_offset, exc)
            return False
        problem = self._incompatible(payload)
        if problem:
            log.error("ignoring state record %s@%d from %s: %s", record.key, record.next_offset,
                      payload.get("replica"), problem)
            return False
        self.book.offer(DeltaRecord(record.key, record.next_offset, record.seq, b""))  # rank only
        self.states[int(payload["partition"])] = payload
        self._dirty = True
        return True

    def _incompatible(self, payload: dict[str, Any]) -> str:
        head = payload["head"]
        if head.get("kind") != self.opt.head_kind:
            return f"head kind {head.get('kind')!r}, the merger is configured for {self.opt.head_kind!r}"
        if dict(head.get("hyperparameters", {})) != self.opt.head_hyperparameters:
            return f"head hyperparameters {head.get('hyperparameters')} != {self.opt.head_hyperparameters}"
        identity = str(payload.get("backbone_identity", ""))
        if identity and self.opt.backbone_identity and identity != self.opt.backbone_identity:
            return f"backbone {identity!r}, the merger runs {self.opt.backbone_identity!r}"
        return ""

    # -- merging -----------------------------------------------------------------------------
    def merged_head(self) -> Any:
        """A head holding the sum of the kept partition states (in partition order)."""
        head = make_head(self.opt.head_kind, **self.opt.head_hyperparameters)
        if self.states:
            head.load_state_dict(merge_states([self.states[p]["head"] for p in sorted(self.states)]))
        return head

    def counters(self) -> dict[str, int]:
        """Counters summed over the kept partition states (unknown ids: counted once, ``forget_view``)."""
        totals = {name: sum(int(s["counters"].get(name, 0)) for s in self.states.values()) for name in _COUNTERS}
        totals["forget_unknown"] = self.forget_unknown
        return totals

    def _refresh_partitions(self) -> None:
        parts = self.consumer.partitions_for_topic(self.opt.source_topic) if self.consumer is not None else None
        if parts:
            self.source_partitions = len(parts)

    def _settle_forgets(self) -> None:
        """Count, once, the ids that no partition knew, when every partition applied the same requests."""
        if len(self.states) < self.source_partitions:
            self._refresh_partitions()  # a topic may gain partitions
        partitions = self.source_partitions or len(self.states)
        unknown = settled_unknown(self.states, self.opt.control_topic, partitions)
        if unknown is None:
            return
        metrics.FORGET_UNKNOWN_IDS.inc(max(unknown - self.forget_unknown, 0))
        self.forget_unknown = unknown
        settled = settled_control(self.states, self.opt.control_topic, partitions)
        if settled and settled != self._settled_control:
            # The one audit line per request in scale-out mode (replicas log what each partition removed).
            self._settled_control = settled
            audit.info("forget requests up to control offsets %s applied in all %d partitions: %d events "
                       "forgotten, %d named ids found in none (totals)", settled, partitions,
                       self.counters()["forgotten"], unknown)

    def offsets(self) -> dict[str, int]:
        """``{"topic:partition": next_offset}`` covered by the merged state."""
        return {f"{self.opt.source_topic}:{p}": int(self.states[p]["next_offset"]) for p in sorted(self.states)}

    def merge_now(self) -> int | None:
        """Merge the kept states and export the result; return the new model version if applied."""
        self._dirty = False
        self._unsnapshotted = True
        self._last_export = time.monotonic()
        self.merges += 1
        self._settle_forgets()
        counters = self.counters()
        metrics.EVENTS.labels(result="learned").inc(max(counters["learned"] - self._learned_reported, 0))
        self._learned_reported = max(counters["learned"], self._learned_reported)
        metrics.EVENTS.labels(result="forgotten").inc(max(counters["forgotten"] - self._forgotten_reported, 0))
        self._forgotten_reported = max(counters["forgotten"], self._forgotten_reported)
        head = self.merged_head()
        metrics.CLASSES.set(len(head.classes_))
        if self.exporter is None:
            return None
        X, labels = self._recent_rows(set(head.classes_))
        window = (X, labels)
        if self._forgotten_served is not None and counters["forgotten"] > self._forgotten_served:
            # A forget must reach the served model: no accuracy comparison stops it (parity still does).
            window = (X[:0], [])
            log.info("merged state forgot %d events since the last export: quality gate skipped",
                     counters["forgotten"] - self._forgotten_served)
        rate = self.opt.reject_rate
        unknown = unknown_threshold(head, X, labels, rate) if rate is not None and len(labels) else None
        result = self.exporter.export(head, probe=X[-64:], window=window, offsets=self.offsets(), unknown=unknown)
        self._export_cost = result.seconds
        if result.applied and result.version is not None:
            self.model_version = result.version
            self._forgotten_served = counters["forgotten"]
            return result.version
        return None

    def _recent_rows(self, classes: set[str]) -> tuple[np.ndarray, list[str]]:
        """Recent rows carried by the partition states, of ``classes`` only: the gates' probe and window.

        Rows of a class the merged head no longer has (a forgotten label) would count against the
        candidate that rightly cannot predict it.
        """
        blocks: list[np.ndarray] = []
        labels: list[str] = []
        for p in sorted(self.states):
            rows = self.states[p].get("recent") or {}
            keep = [i for i, label in enumerate(rows.get("labels", [])) if label in classes]
            if keep:
                blocks.append(np.asarray(rows["X"], np.float32)[keep])
                labels.extend(rows["labels"][i] for i in keep)
        if not blocks:
            return np.zeros((0, 0), np.float32), []
        X = np.concatenate(blocks)
        newest = slice(max(len(X) - self.opt.holdout_size, 0), None)
        return X[newest], labels[newest]

    # -- snapshot ----------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Write the merged state where ``eddy state`` looks for it."""
        start = time.perf_counter()
        self.store.write({
            "format": 1,
            "role": "merge",
            "head": self.merged_head().state_dict(),
            "memory": None,
            "offsets": self.offsets(),
            "counters": self.counters(),
            "model_version": self.model_version,
            "backbone_identity": self.opt.backbone_identity,
            "sources": {str(p): {"next_offset": int(s["next_offset"]), "seq": int(s["seq"]),
                                 "replica": str(s.get("replica", ""))} for p, s in sorted(self.states.items())},
        })
        self._unsnapshotted = False
        self._last_snapshot = time.monotonic()
        metrics.SNAPSHOT_SECONDS.observe(time.perf_counter() - start)
        metrics.LAST_SNAPSHOT_TIMESTAMP.set(time.time())

    def _log(self) -> None:
        self._last_log = time.monotonic()
        metrics.set_broker_up(broker_reachable(self.consumer))
        log.info("merger: %d partitions, %d events, model v%d, %d merges", len(self.states),
                 self.counters()["learned"], self.model_version, self.merges)
