"""Answering "none of the above": which predictions are unknown, counted and offered for review.

A served model carries its unknown threshold (chosen by the learner from in-scope data only,
``learner.unknown``); a prediction is unknown when its score is below it. Both gRPC APIs ask
``Rejection.apply`` once per request; a client may turn rejection off per request (OIP v2
parameter ``unknown``, eddy.v1 ``keep_in_scope``). Rejected and low-margin predictions are offered
to the review queue (``service.serving.review``), when one is configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.metrics import UNKNOWN_PREDICTIONS
from service.models.served import ServedModel
from service.serving.review import ReviewQueue

DEFAULT_LABEL = "<unknown>"


@dataclass(frozen=True)
class UnknownPolicy:
    """Plain settings of ``serving.unknown``: whether to reject, and the label rejected inputs get."""

    enabled: bool = True
    label: str = DEFAULT_LABEL


class Rejection:
    """Decides which rows of a batch are unknown, counts them, and offers doubtful ones for review."""

    def __init__(self, policy: UnknownPolicy, review: ReviewQueue | None = None) -> None:
        self.policy = policy
        self.review = review

    @property
    def label(self) -> str:
        """The label unknown predictions answer with."""
        return self.policy.label

    def apply(self, api: str, model: ServedModel, probs: np.ndarray, score: np.ndarray,
              inputs: Sequence[str] | np.ndarray, *, enabled: bool = True) -> np.ndarray:
        """Boolean ``(n,)``: the rows to answer with the unknown label.

        All False when rejection is off (``serving.unknown.enabled`` or ``enabled`` for this
        request) or the model has no threshold yet. ``inputs`` (texts, or feature rows ``(n, d)``)
        go to the review queue with the rejected and low-margin rows; offering never blocks.
        """
        on = self.policy.enabled and enabled
        unknown = model.rejects(score) if on else np.zeros(len(score), dtype=bool)
        count = int(unknown.sum())
        if count:
            UNKNOWN_PREDICTIONS.labels(api=api).inc(count)
        if self.review is not None:
            self.review.offer(model, inputs, probs, score, unknown)
        return unknown
