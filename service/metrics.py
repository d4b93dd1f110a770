"""Every Prometheus metric eddy exports, defined once (prefix ``eddy_``).

Label cardinality is bounded: labels take values from fixed sets (results, reasons, RPC names,
input kinds, partitions of the consumed topic), never class names or event ids.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BUILD_INFO = Info("eddy_build", "Version and component identities of this eddy process.", registry=REGISTRY)

EVENTS = Counter(
    "eddy_events_total",
    "Events consumed, by result (learned, dead_letter, duplicate, forgotten).",
    ["result"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "eddy_dead_letters_total", "Events sent to the dead-letter topic, by reason.", ["reason"], registry=REGISTRY
)
FORGET_UNKNOWN_IDS = Counter(
    "eddy_forget_unknown_ids_total", "Ids named in forget requests that eddy could not find.", registry=REGISTRY
)
CONSUMER_LAG = Gauge(
    "eddy_consumer_lag", "Messages between the position and the end of each partition.", ["partition"],
    registry=REGISTRY,
)
LEARN_BATCH_SECONDS = Histogram(
    "eddy_learn_batch_seconds", "Time to learn one batch (head + memory).", buckets=_SECONDS_BUCKETS,
    registry=REGISTRY,
)
EMBED_SECONDS = Histogram(
    "eddy_embed_seconds",
    "Time the learner waited for one batch's text embeddings (embedded ahead while the previous batch is learned).",
    buckets=_SECONDS_BUCKETS,
    registry=REGISTRY,
)
PREDICT_SECONDS = Histogram(
    "eddy_predict_seconds", "Prediction latency by RPC and input kind.", ["rpc", "input"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
REQUESTS = Counter(
    "eddy_requests_total", "gRPC requests by RPC and status code.", ["rpc", "code"], registry=REGISTRY
)
PREQUENTIAL_ACCURACY = Gauge(
    "eddy_prequential_accuracy", "Rolling test-then-train accuracy of the learning head.", ["head"],
    registry=REGISTRY,
)
MODEL_VERSION = Gauge("eddy_model_version", "Version of the model currently served.", registry=REGISTRY)
SWAPS = Counter(
    "eddy_swaps_total", "Model swaps by result (applied, rejected) and reason.", ["result", "reason"],
    registry=REGISTRY,
)
LAST_SWAP_TIMESTAMP = Gauge(
    "eddy_last_swap_timestamp_seconds", "Unix time of the last applied swap.", registry=REGISTRY
)
LABEL_TO_SERVABLE_SECONDS = Histogram(
    "eddy_label_to_servable_seconds",
    "Time from an event's arrival to the first served model that includes it.",
    buckets=_SECONDS_BUCKETS, registry=REGISTRY,
)
CLASSES = Gauge("eddy_classes", "Classes known to the learning head.", registry=REGISTRY)
MEMORY_ITEMS = Gauge("eddy_memory_items", "Vectors in the replay memory.", registry=REGISTRY)
MEMORY_BYTES = Gauge("eddy_memory_bytes", "Bytes held by the replay memory.", registry=REGISTRY)
SNAPSHOT_SECONDS = Histogram(
    "eddy_snapshot_seconds", "Time to write one snapshot.", buckets=_SECONDS_BUCKETS, registry=REGISTRY
)
LAST_SNAPSHOT_TIMESTAMP = Gauge(
    "eddy_last_snapshot_timestamp_seconds", "Unix time of the last snapshot written.", registry=REGISTRY
)
BROKER_UP = Gauge(
    "eddy_broker_up", "1 while the Kafka broker answers, 0 while it does not.", registry=REGISTRY
)
SNAPSHOT_FAILURES = Counter(
    "eddy_snapshot_failures_total", "Snapshot writes that failed (full or read-only disk); each is retried.",
    registry=REGISTRY,
)
EXPORT_FAILURES = Counter(
    "eddy_export_failures_total", "Exports that failed with an error (e.g. the registry could not be written).",
    registry=REGISTRY,
)
_broker_up = threading.Event()  # the same fact for /readyz, without reading the gauge's internals


def set_broker_up(up: bool) -> None:
    """Record whether the Kafka broker answers (``eddy_broker_up`` and ``broker_is_up``)."""
    BROKER_UP.set(1 if up else 0)
    if up:
        _broker_up.set()
    else:
        _broker_up.clear()


def broker_is_up() -> bool:
    """The last value given to ``set_broker_up`` (False before any)."""
    return _broker_up.is_set()

EXPORT_SECONDS = Histogram(
    "eddy_export_seconds", "Time to solve, export and gate one model.", buckets=_SECONDS_BUCKETS,
    registry=REGISTRY,
)

UNKNOWN_PREDICTIONS = Counter(
    "eddy_predictions_unknown_total",
    "Predictions answered with the unknown label (score below the model's threshold), by API.",
    ["api"], registry=REGISTRY,
)
UNKNOWN_THRESHOLD = Gauge(
    "eddy_unknown_threshold",
    "The served model's unknown threshold on the tempered max probability (0: none chosen yet).",
    registry=REGISTRY,
)
UNKNOWN_HELDOUT_REJECT_RATE = Gauge(
    "eddy_unknown_heldout_reject_rate",
    "Share of labelled events the served model would have rejected as unknown, scored before they were "
    "learned (in-scope events, since the last restart); the promise is serving.unknown.reject_rate.",
    registry=REGISTRY,
)
UNKNOWN_CHECKS = Counter(
    "eddy_unknown_checks_total",
    "Labelled events scored by the served model before learning, by kind (in_scope, or unknown: labelled "
    "with serving.unknown.label, never learned) and result (rejected, accepted).",
    ["kind", "result"], registry=REGISTRY,
)
REVIEW_RECORDS = Counter(
    "eddy_review_records_total",
    "Predictions offered to the review queue, by result (published, duplicate, rate_limited, dropped, failed).",
    ["result"], registry=REGISTRY,
)

_faults: dict[str, str] = {}  # component -> why it is degraded; shown in /readyz details
_faults_lock = threading.Lock()


def set_fault(component: str, reason: str | None) -> None:
    """Record that ``component`` (``snapshot``, ``export``) is degraded and why, or (None) that it recovered."""
    with _faults_lock:
        if reason is None:
            _faults.pop(component, None)
        else:
            _faults[component] = reason


def faults() -> dict[str, str]:
    """Components degraded now and why (empty when all is well)."""
    with _faults_lock:
        return dict(_faults)
