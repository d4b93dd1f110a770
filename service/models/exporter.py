"""Solve, export, gate, publish, swap: how a learned head becomes the served model.

Two gates stand before any swap:

* parity: the ONNX graph reproduces the in-process head's probabilities on a probe batch of recent
  rows within ``parity_tolerance``, and every output is finite;
* quality: on the recent-rows window, the candidate's accuracy is not more than
  ``max_accuracy_drop`` below the served model's (measured on the classes the served model knows,
  so a newly added class neither helps nor hurts). The window holds rows both models may have
  learned, so this is a regression guard against a broken solve, not a generalisation estimate.

A rejected export is logged with its reason and counted; the old model keeps serving.

An export that carries a forget (``forget=True``) skips the quality comparison: the served model
still knows the forgotten events, so on any window that held them it would win, and the forget
would never be served (issue 14). Parity still guards it. Once it is published, every older
registry version is erased (``ModelRegistry.erase_before``): they still know the forgotten events,
and a restart, a rollback or a manifest recovery must never serve them again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from learner.export import check_parity, load_session, readout_to_onnx
from learner.heads.base import Head, Readout
from memory.compensation import Compensator
from service import metrics
from service.models.registry import ModelRegistry
from service.models.served import Backbone, ModelSlot, ServedModel, compensation_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnknownThreshold:
    """The unknown threshold chosen for a model (``learner.unknown``), stored in its metadata.

    ``threshold`` None: too few held-out items to keep the promised rate, nothing is rejected.
    ``heldout_reject_rate`` is the share of the calibration items below the threshold.
    """

    threshold: float | None
    reject_rate: float
    items: int
    heldout_reject_rate: float
    classes: int

    def meta(self) -> dict[str, str]:
        """Model metadata entries (read back by ``ServedModel.unknown_threshold``)."""
        return {"unknown_threshold": "" if self.threshold is None else repr(self.threshold),
                "unknown_reject_rate": repr(self.reject_rate), "unknown_calibration_items": str(self.items),
                "unknown_heldout_reject_rate": f"{self.heldout_reject_rate:.6f}"}


@dataclass(frozen=True)
class ExportResult:
    """What one export attempt did."""

    applied: bool
    version: int | None
    reason: str
    seconds: float


class Exporter:
    """Turns a head into a gated, published, swapped-in model."""

    def __init__(self, *, registry: ModelRegistry, slot: ModelSlot, backbone: Backbone | None,
                 backbone_identity: str, head_kind: str, parity_tolerance: float,
                 max_accuracy_drop: float) -> None:
        self.registry = registry
        self.slot = slot
        self.backbone = backbone
        self.backbone_identity = backbone_identity
        self.head_kind = head_kind
        self.parity_tolerance = parity_tolerance
        self.max_accuracy_drop = max_accuracy_drop

    def export(self, head: Head, *, probe: np.ndarray, window: tuple[np.ndarray, list[str]],
               offsets: dict[str, int], compensation: Compensator | None = None,
               forget: bool = False, unknown: UnknownThreshold | None = None) -> ExportResult:
        """Export ``head`` and swap it in if it passes the gates. Never raises for a bad model.

        ``compensation`` (a frozen error memory) is attached to the served model; the gates judge
        the ONNX head alone. ``forget``: ``head`` has forgotten events the served model knows
        (module docstring). ``unknown`` (the threshold chosen for this head) goes into the metadata.
        Raises ``OSError`` when the registry cannot be written.
        """
        start = time.perf_counter()
        readout = head.readout()
        if not readout.classes:
            return ExportResult(False, None, "no classes yet", 0.0)
        version = self.registry.next_version()
        meta = {
            "classes": json.dumps(list(readout.classes)),
            "model_version": str(version),
            "backbone_identity": self.backbone_identity,
            "head_kind": self.head_kind,
            "created_at": f"{time.time():.3f}",
            "source_offsets": json.dumps(offsets, sort_keys=True),
            **(unknown.meta() if unknown is not None else {}),
        }
        data = readout_to_onnx(readout, metadata=meta).SerializeToString()
        session, _ = load_session(data)
        reason = self._gates(readout, session, probe, window, compare=not forget)
        if reason:
            metrics.SWAPS.labels(result="rejected", reason=reason.split(":")[0]).inc()
            log.warning("export rejected, version %d keeps serving: %s", self.slot_version(), reason)
            return ExportResult(False, None, reason, time.perf_counter() - start)
        sidecar = compensation_bytes(compensation) if compensation is not None else None
        published = self.registry.publish(data, meta, sidecar)
        if forget:
            erased = self.registry.erase_before(published)
            log.info("forget exported as version %d; erased older versions %s", published, erased or "none")
        served = ServedModel.from_session(session, version=published, meta=meta, backbone=self.backbone,
                                          compensation=compensation)
        swapped = self.slot.swap(served)
        seconds = time.perf_counter() - start
        if not swapped:  # a newer model (a rollback, say) got there first; the registry keeps this one
            return ExportResult(False, published, "a newer model is already served", seconds)
        metrics.EXPORT_SECONDS.observe(seconds)
        return ExportResult(True, published, "", seconds)

    def slot_version(self) -> int:
        """Version currently served (0 if none)."""
        current = self.slot.get()
        return current.version if current is not None else 0

    def _gates(self, readout: Readout, session: object, probe: np.ndarray,
               window: tuple[np.ndarray, list[str]], *, compare: bool = True) -> str:
        if len(probe):
            parity = check_parity(readout, session, probe, tol=self.parity_tolerance)
            if not parity.ok:
                return f"parity: {parity.reason}"
        current = self.slot.get()
        X, labels = window
        if current is None or not len(X) or not compare:
            return ""
        known = set(current.classes)
        mask = np.array([label in known for label in labels])
        if mask.sum() == 0:
            return ""
        truth = np.asarray(labels, dtype=object)[mask]
        new_acc = float(np.mean(np.asarray(readout.classes, dtype=object)[
            readout.predict_proba(X[mask]).argmax(1)] == truth))
        old_acc = float(np.mean(np.asarray(current.classes, dtype=object)[
            current.predict_raw(X[mask]).argmax(1)] == truth))  # head vs head: compensation aside
        if new_acc < old_acc - self.max_accuracy_drop:
            return f"quality: accuracy {new_acc:.4f} vs served {old_acc:.4f} (max drop {self.max_accuracy_drop})"
        return ""
